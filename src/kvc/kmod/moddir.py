"""A kernel's module directory (``/lib/modules/KVER``): kmod's indexes and lookups over them.

Lookups follow libkmod's order for a name or alias with no modprobe configuration: modules.dep
(exact name), modules.symbols (``symbol:NAME``), modules.alias (wildcard patterns),
modules.builtin (exact name), modules.builtin.alias. The first step with results wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from kvc.kmod.errors import IndexFormatError
from kvc.kmod.index import Index
from kvc.kmod.module import ModinfoEntry, name_from_path, parse_modinfo


@dataclass(frozen=True)
class ModuleEntry:
    """A module as an index knows it. ``path`` is None for a built-in module."""

    name: str
    path: Optional[str]
    dependencies: tuple[str, ...] = ()

    @property
    def builtin(self) -> bool:
        return self.path is None


def normalize_alias(alias: str) -> str:
    """libkmod's alias_normalize: '-' becomes '_' outside ``[...]``; an unmatched ']' is an error."""
    out = []
    depth = 0
    for char in alias:
        if char == "[":
            depth += 1
        elif char == "]":
            if depth == 0:
                raise ValueError(f"unmatched ']' in {alias!r}")
            depth -= 1
        elif char == "-" and depth == 0:
            char = "_"
        out.append(char)
    if depth:
        raise ValueError(f"unmatched '[' in {alias!r}")
    return "".join(out)


class ModuleDirectory:
    def __init__(self, path: str) -> None:
        self.path = path
        self._indexes: dict[str, Optional[Index]] = {}
        self._builtin_modinfo: Optional[dict[str, list[bytes]]] = None

    def _index(self, name: str) -> Optional[Index]:
        if name not in self._indexes:
            try:
                self._indexes[name] = Index.open(os.path.join(self.path, name))
            except (FileNotFoundError, NotADirectoryError):
                self._indexes[name] = None
            except IsADirectoryError:
                raise IndexFormatError(os.path.join(self.path, name), "is a directory") from None
        return self._indexes[name]

    def _absolute(self, relative: str) -> str:
        return relative if relative.startswith("/") else os.path.join(self.path, relative)

    def _entry_from_dep_line(self, line: str) -> ModuleEntry:
        head, _sep, deps = line.partition(":")
        path = self._absolute(head.strip())
        return ModuleEntry(name_from_path(path), path,
                           tuple(self._absolute(dep) for dep in deps.split()))

    def lookup_module(self, name: str) -> Optional[ModuleEntry]:
        """A module file by exact module name, from modules.dep.bin (or the text modules.dep)."""
        index = self._index("modules.dep.bin")
        if index is not None:
            line = index.lookup(name)
            return self._entry_from_dep_line(line) if line is not None else None
        return self._dep_text().get(name)

    def _dep_text(self) -> dict[str, ModuleEntry]:
        entries: dict[str, ModuleEntry] = {}
        try:
            with open(os.path.join(self.path, "modules.dep"), encoding="utf-8", errors="surrogateescape") as handle:
                for line in handle:
                    if ":" in line:
                        entry = self._entry_from_dep_line(line)
                        entries.setdefault(entry.name, entry)
        except FileNotFoundError:
            pass
        return entries

    def lookup_symbol_owner(self, symbol: str) -> Optional[str]:
        index = self._index("modules.symbols.bin")
        return index.lookup(f"symbol:{symbol}") if index is not None else None

    def is_builtin(self, name: str) -> bool:
        index = self._index("modules.builtin.bin")
        return index is not None and index.lookup(name) is not None

    def _modules_by_name(self, names: list[str]) -> list[ModuleEntry]:
        found = []
        for name in names:
            entry = self.lookup_module(name)
            found.append(entry if entry is not None else ModuleEntry(name, None))
        return found

    def lookup_name(self, name: str) -> list[ModuleEntry]:
        """``modinfo -m``: a module name only (modules.dep, then modules.builtin)."""
        entry = self.lookup_module(name)
        if entry is not None:
            return [entry]
        if self.is_builtin(name):
            return [ModuleEntry(name, None)]
        return []

    def resolve(self, name_or_alias: str) -> list[ModuleEntry]:
        """Every module a name or alias resolves to, in libkmod's lookup order."""
        try:
            key = normalize_alias(name_or_alias)
        except ValueError:
            return []
        if ":" not in key:
            entry = self.lookup_module(key)
            if entry is not None:
                return [entry]
        if key.startswith("symbol:"):
            symbols = self._index("modules.symbols.bin")
            if symbols is not None:
                owners = [value.value for value in symbols.search_wildcard(key)]
                if owners:
                    return self._modules_by_name(owners)
        aliases = self._index("modules.alias.bin")
        if aliases is not None:
            owners = [value.value for value in aliases.search_wildcard(key)]
            if owners:
                return self._modules_by_name(owners)
        if self.is_builtin(key):
            return [ModuleEntry(key, None)]
        builtin_aliases = self._index("modules.builtin.alias.bin")
        if builtin_aliases is not None:
            owners = [value.value for value in builtin_aliases.search_wildcard(key)]
            if owners:
                return [ModuleEntry(owner, None) for owner in owners]
        return []

    def builtin_modinfo(self, name: str) -> list[ModinfoEntry]:
        """A built-in module's modinfo from modules.builtin.modinfo (``name.key=value`` records)."""
        if self._builtin_modinfo is None:
            table: dict[str, list[bytes]] = {}
            try:
                with open(os.path.join(self.path, "modules.builtin.modinfo"), "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                data = b""
            for record in data.split(b"\0"):
                module, dot, rest = record.partition(b".")
                if dot and rest:
                    table.setdefault(module.decode("utf-8", "surrogateescape"), []).append(rest)
            self._builtin_modinfo = table
        return list(parse_modinfo(b"\0".join(self._builtin_modinfo.get(name, []))))
