"""A kernel's module directory (``/lib/modules/KVER``): depmod's indexes and libkmod's lookups.

:meth:`ModuleDirectory.resolve` follows ``kmod_module_new_from_lookup`` (libkmod-module.c, kmod 30)
on the ``alias_normalize``d input; the first step with results wins:

1. modprobe.d ``alias`` lines (fnmatch, all matches)              -- needs config: ``LookupConfig``
2. modules.dep.bin, exact name (skipped when the name holds ':')
3. modules.symbols.bin wildcard search, only for ``symbol:*``
4. an ``install``/``remove`` command for exactly the name         -- needs config: ``LookupConfig``
5. modules.alias.bin wildcard search (stored keys are fnmatch patterns; merged by priority)
6. modules.builtin.bin, exact name
7. modules.builtin.alias.bin wildcard search (an optional index)

A missing (or unreadable) index only skips its step, as libkmod ignores ENOSYS from a step.

``preload`` chooses between libkmod's two index readers. modprobe calls ``kmod_load_resources``,
which maps modules.dep/alias/symbols/builtin.bin (and builtin.alias.bin if it can) and falls back
to reading each file per lookup if any of the four fails; modinfo never preloads. The readers
differ only in the order of equal-priority values (see :mod:`kvc.kmod.index`).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, NamedTuple, Optional, Protocol, Sequence

from kvc.kmod.errors import IndexFormatError
from kvc.kmod.index import HEADER_SIZE, INDEX_MAGIC, INDEX_VERSION_MAJOR, Index, ReaderKind
from kvc.kmod.module import ModinfoEntry
from kvc.kmod.names import modname_from_path, modname_normalize
from kvc.kmod.paths import HostPaths

DEP_BIN = "modules.dep.bin"
ALIAS_BIN = "modules.alias.bin"
SYMBOLS_BIN = "modules.symbols.bin"
BUILTIN_BIN = "modules.builtin.bin"
BUILTIN_ALIAS_BIN = "modules.builtin.alias.bin"
BUILTIN_MODINFO = "modules.builtin.modinfo"
# kmod_load_resources maps these and builtin.alias.bin; if any of these four fails to map, libkmod
# drops them all and reads the index file on every lookup.
_PRELOAD_REQUIRED = (DEP_BIN, ALIAS_BIN, SYMBOLS_BIN, BUILTIN_BIN)
# libkmod keeps names in PATH_MAX buffers: alias_normalize stops after PATH_MAX - 1 bytes.
_PATH_MAX = 4096

# Where a resolved module came from (the lookup step that found it).
STEP_CONFIG_ALIAS = "config-alias"
STEP_MODULES_DEP = "modules.dep"
STEP_SYMBOLS = "modules.symbols"
STEP_COMMAND = "command"
STEP_ALIAS = "modules.alias"
STEP_BUILTIN = "modules.builtin"
STEP_BUILTIN_ALIAS = "modules.builtin.alias"


class ModuleEntry(NamedTuple):
    """A module as libkmod's lookup creates it.

    ``path`` is the absolute path of the module file from its modules.dep line (None when the
    module has no line, e.g. built-in); ``dependencies`` are the absolute paths on that line, in
    modules.dep order (users before what they use; modprobe loads them in reverse).
    ``builtin`` is what kmod_module_is_builtin answers: found by a built-in step, or named in
    modules.builtin.bin. ``step`` names the lookup step that found it.
    """

    name: str
    path: Optional[str]
    dependencies: tuple[str, ...] = ()
    builtin: bool = False
    step: str = ""


class DepLine(NamedTuple):
    """One modules.dep line: paths as written (relative to the module directory unless absolute)."""

    name: str
    path: str
    dependencies: tuple[str, ...]


class LookupConfig(Protocol):
    """What resolve() needs from modprobe configuration (lookup steps 1 and 4)."""

    def alias_targets(self, name: str) -> Sequence[str]:
        """Module names of every ``alias`` whose pattern fnmatches ``name``, in config order."""

    def has_command(self, name: str) -> bool:
        """Whether an ``install`` or ``remove`` command is configured for exactly ``name``."""


def normalize_alias(alias: str) -> str:
    """libkmod's alias_normalize: '-' becomes '_' except inside ``[...]``, which is copied up to
    the first ']' (no nesting). A ']' outside brackets or an unclosed '[' raises ValueError.
    Like libkmod, only the first PATH_MAX - 1 bytes are kept."""
    raw = alias.encode("utf-8", "surrogateescape")
    end = raw.find(b"\0")
    if end >= 0:
        raw = raw[:end]
    out = bytearray()
    position = 0
    while position < min(len(raw), _PATH_MAX - 1):
        char = raw[position]
        if char == 0x2D:  # '-'
            out.append(0x5F)
        elif char == 0x5D:  # ']'
            raise ValueError(f"unmatched ']' in {alias!r}")
        elif char == 0x5B:  # '['
            close = raw.find(b"]", position)
            if close < 0:
                raise ValueError(f"unmatched '[' in {alias!r}")
            out += raw[position : close + 1]
            position = close
        else:
            out.append(char)
        position += 1
    return out.decode("utf-8", "surrogateescape")


def parse_dep_line(line: str) -> Optional[DepLine]:
    """A modules.dep line as kmod_module_parse_depline splits it: the path is everything before
    the first ':', dependencies are separated by spaces or tabs. None without a ':'. The line is
    the C string libkmod has: a NUL (only a corrupt text modules.dep holds one) ends it."""
    head, colon, rest = line.partition("\0")[0].rstrip("\n").partition(":")
    if not colon:
        return None
    deps = tuple(rest.replace("\t", " ").split(" "))
    return DepLine(modname_from_path(head), head, tuple(dep for dep in deps if dep))


def parse_modules_dep(text: str) -> list[DepLine]:
    """Every line of a modules.dep file, in file order."""
    return [dep for dep in map(parse_dep_line, text.splitlines()) if dep is not None]


def parse_alias_lines(text: str, directive: str = "alias") -> list[tuple[str, str]]:
    """(pattern, module) from ``alias PATTERN MODULE`` lines (modules.alias, modules.symbols);
    comments and other lines are skipped."""
    pairs = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == directive:
            pairs.append((fields[1], fields[2]))
    return pairs


def parse_modules_builtin(text: str) -> list[str]:
    """Module names from modules.builtin, as depmod reads it into modules.builtin.bin: lines
    that do not start with a letter are skipped."""
    return [modname_from_path(line.strip()) for line in text.splitlines() if line[:1].isascii() and line[:1].isalpha()]


class BuiltinModinfo(NamedTuple):
    """modules.builtin.modinfo as libkmod-builtin.c (kmod 30) walks it: runs of consecutive
    ``module.key=value`` strings sharing a module name; a module's info is its first run.

    A string without a '.' (an empty one too) ends the walk: later modules are not found. A last
    string without its NUL also ends it, and libkmod then fails to read the run it interrupted
    (``broken`` names that module).
    """

    blocks: tuple[tuple[str, tuple[str, ...]], ...]
    broken: Optional[str] = None
    path: str = BUILTIN_MODINFO

    @classmethod
    def parse(cls, data: bytes, path: str = BUILTIN_MODINFO) -> BuiltinModinfo:
        blocks: list[tuple[str, list[str]]] = []
        strings = data.split(b"\0")
        unterminated = strings.pop() != b""
        for raw in strings:
            module, dot, rest = raw.decode("utf-8", "surrogateescape").partition(".")
            if not dot:
                unterminated = False
                break
            if blocks and blocks[-1][0] == module:
                blocks[-1][1].append(rest)
            else:
                blocks.append((module, [rest]))
        broken = blocks[-1][0] if unterminated and blocks else None
        return cls(tuple((module, tuple(found)) for module, found in blocks), broken, path)

    def strings(self, name: str) -> Optional[tuple[str, ...]]:
        """The ``key=value`` strings of the first run for ``name`` (module prefix removed), or
        None. Raises IndexFormatError for the run a truncated file cuts off."""
        for position, (module, found) in enumerate(self.blocks):
            if module == name:
                if self.broken == name and position == len(self.blocks) - 1:
                    raise IndexFormatError(self.path, f"the file ends inside a string of {name}")
                return found
        return None


def split_modinfo_string(text: str) -> ModinfoEntry:
    """A ``key=value`` string as kmod_module_get_info splits it (no '=': an empty value)."""
    key, _sep, value = text.partition("=")
    return ModinfoEntry(key, value)


class ModuleDirectory:
    """``/lib/modules/KVER`` (or any directory holding depmod's output)."""

    def __init__(self, path: str, *, preload: bool = True, text_fallback: bool = True) -> None:
        # libkmod makes the directory absolute (path_make_absolute_cwd) and joins with '/'.
        self.path = path if path.startswith("/") else f"{os.getcwd()}/{path}"
        self.preload = preload
        self.text_fallback = text_fallback
        self._indexes: dict[str, Optional[Index]] = {}
        self._reader: Optional[ReaderKind] = None
        self._dep_text: Optional[dict[str, str]] = None
        self._builtin_modinfo: Optional[BuiltinModinfo] = None

    @classmethod
    def from_host(
        cls, paths: HostPaths, kernel_release: str, *, preload: bool = True, text_fallback: bool = True
    ) -> ModuleDirectory:
        return cls(paths.module_dir(kernel_release), preload=preload, text_fallback=text_fallback)

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    # -- indexes ---------------------------------------------------------------------------

    @property
    def reader(self) -> ReaderKind:
        """The libkmod index reader lookups use: ``mmap`` when kmod_load_resources would succeed."""
        if self._reader is None:
            self._reader = "mmap" if self.preload and all(map(self._mappable, _PRELOAD_REQUIRED)) else "file"
        return self._reader

    def _mappable(self, name: str) -> bool:
        """Whether index_mm_open would accept the file (exists, header size, magic, major)."""
        try:
            with open(self.file(name), "rb") as handle:
                header = handle.read(HEADER_SIZE)
        except OSError:
            return False
        if len(header) < HEADER_SIZE:
            return False
        return (
            int.from_bytes(header[:4], "big") == INDEX_MAGIC
            and int.from_bytes(header[4:8], "big") >> 16 == INDEX_VERSION_MAJOR
        )

    def index(self, name: str) -> Optional[Index]:
        """An index by file name, or None when it is missing or empty (depmod writes empty
        builtin indexes when the kernel has no modules.builtin). Corrupt ones raise
        IndexFormatError."""
        if name not in self._indexes:
            path = self.file(name)
            try:
                if os.path.isdir(path):
                    raise IndexFormatError(path, "is a directory")
                if os.path.getsize(path) == 0:
                    self._indexes[name] = None
                else:
                    self._indexes[name] = Index.open(path, reader=self.reader)
            except (FileNotFoundError, NotADirectoryError):
                self._indexes[name] = None
        return self._indexes[name]

    def close(self) -> None:
        for index in self._indexes.values():
            if index is not None:
                index.close()
        self._indexes.clear()

    def __enter__(self) -> ModuleDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- text files ------------------------------------------------------------------------

    def _read_text(self, name: str) -> str:
        with open(self.file(name), encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read()

    def modules_dep(self) -> list[DepLine]:
        """The text modules.dep (FileNotFoundError if missing)."""
        return parse_modules_dep(self._read_text("modules.dep"))

    def modules_alias(self) -> list[tuple[str, str]]:
        """(pattern, module) pairs of the text modules.alias, in file order."""
        return parse_alias_lines(self._read_text("modules.alias"))

    def modules_symbols(self) -> list[tuple[str, str]]:
        """(``symbol:NAME``, module) pairs of the text modules.symbols, in file order."""
        return parse_alias_lines(self._read_text("modules.symbols"))

    def modules_builtin(self) -> list[str]:
        """Module names of the text modules.builtin, in file order."""
        return parse_modules_builtin(self._read_text("modules.builtin"))

    def _dep_lines(self) -> dict[str, str]:
        """The text modules.dep as {module name: line}; the first line of a name wins."""
        if self._dep_text is None:
            table: dict[str, str] = {}
            try:
                text = self._read_text("modules.dep")
            except FileNotFoundError:
                text = ""
            for line in text.splitlines():
                dep = parse_dep_line(line)
                if dep is not None:
                    table.setdefault(dep.name, line)
            self._dep_text = table
        return self._dep_text

    # -- single lookups ----------------------------------------------------------------------

    def absolute(self, path: str) -> str:
        """A modules.dep path made absolute as libkmod's path_join does."""
        return path if path.startswith("/") else f"{self.path}/{path}"

    def dep_line(self, name: str) -> Optional[str]:
        """kmod_search_moddep: the modules.dep line for an exact name, from modules.dep.bin (or,
        with ``text_fallback`` and no .bin, from the text modules.dep)."""
        index = self.index(DEP_BIN)
        if index is not None:
            return index.lookup(name)
        return self._dep_lines().get(name) if self.text_fallback else None

    def _entry(self, name: str, line: Optional[str], step: str, builtin: Optional[bool] = None) -> ModuleEntry:
        path: Optional[str] = None
        deps: tuple[str, ...] = ()
        parsed = parse_dep_line(line) if line is not None else None
        if parsed is not None:
            path = self.absolute(parsed.path)
            deps = tuple(self.absolute(dep) for dep in parsed.dependencies)
        if builtin is None:
            builtin = self.is_builtin(name)
        return ModuleEntry(name, path, deps, builtin, step)

    def lookup_module(self, name: str) -> Optional[ModuleEntry]:
        """A module by name (modname-normalized) from modules.dep, or None."""
        name = modname_normalize(name)
        line = self.dep_line(name)
        return self._entry(name, line, STEP_MODULES_DEP) if line is not None else None

    def module(self, name: str) -> ModuleEntry:
        """kmod_module_new_from_name: the module whatever the indexes say (path None if it has
        no modules.dep line)."""
        name = modname_normalize(name)
        return self._entry(name, self.dep_line(name), "")

    def lookup_symbol_owner(self, symbol: str) -> Optional[str]:
        """The module that exports ``symbol`` (exact key ``symbol:NAME`` in modules.symbols.bin)."""
        index = self.index(SYMBOLS_BIN)
        return index.lookup(f"symbol:{symbol}") if index is not None else None

    def is_builtin(self, name: str) -> bool:
        """kmod_lookup_alias_is_builtin: ``name`` is a key of modules.builtin.bin."""
        index = self.index(BUILTIN_BIN)
        return index is not None and index.lookup(name) is not None

    def builtin_alias_targets(self, alias: str) -> list[str]:
        index = self.index(BUILTIN_ALIAS_BIN)
        return [value.value for value in index.search_wildcard(alias)] if index is not None else []

    def alias_targets(self, alias: str) -> list[str]:
        """Module names modules.alias.bin gives for an (already normalized) alias, merged by
        priority ([] without the index)."""
        index = self.index(ALIAS_BIN)
        return [value.value for value in index.search_wildcard(alias)] if index is not None else []

    # -- lookup chains -----------------------------------------------------------------------

    def resolve(self, name_or_alias: str, config: Optional[LookupConfig] = None) -> list[ModuleEntry]:
        """Every module a name or alias resolves to (kmod_module_new_from_lookup). Duplicates
        are kept, as libkmod keeps them. An alias libkmod refuses to normalize gives []."""
        try:
            key = normalize_alias(name_or_alias)
        except ValueError:
            return []
        steps: list[Callable[[str], list[ModuleEntry]]] = []
        if config is not None:
            steps.append(lambda k: self._step_config_alias(k, config))
        steps += [self._step_moddep, self._step_symbols]
        if config is not None:
            steps.append(lambda k: self._step_command(k, config))
        steps += [self._step_alias, self._step_builtin, self._step_builtin_alias]
        for step in steps:
            found = step(key)
            if found:
                return found
        return []

    def lookup_name(self, name: str) -> list[ModuleEntry]:
        """kmod_module_new_from_name_lookup (``modinfo -m``): the modname-normalized name in
        modules.dep, then modules.builtin, then modules.builtin.alias."""
        key = modname_normalize(name)
        for step in (self._step_moddep, self._step_builtin, self._step_builtin_alias):
            found = step(key)
            if found:
                return found
        return []

    def _step_config_alias(self, key: str, config: LookupConfig) -> list[ModuleEntry]:
        return [self._entry(target, self.dep_line(target), STEP_CONFIG_ALIAS) for target in config.alias_targets(key)]

    def _step_moddep(self, key: str) -> list[ModuleEntry]:
        if ":" in key:
            return []
        line = self.dep_line(key)
        if line is None:
            return []
        return [self._entry(modname_normalize(key), line, STEP_MODULES_DEP)]

    def _step_symbols(self, key: str) -> list[ModuleEntry]:
        index = self.index(SYMBOLS_BIN) if key.startswith("symbol:") else None
        if index is None:
            return []
        return self._by_names((value.value for value in index.search_wildcard(key)), STEP_SYMBOLS)

    def _step_command(self, key: str, config: LookupConfig) -> list[ModuleEntry]:
        return [self._entry(key, self.dep_line(key), STEP_COMMAND)] if config.has_command(key) else []

    def _step_alias(self, key: str) -> list[ModuleEntry]:
        return self._by_names(self.alias_targets(key), STEP_ALIAS)

    def _step_builtin(self, key: str) -> list[ModuleEntry]:
        if not self.is_builtin(key):
            return []
        name = modname_normalize(key)
        return [self._entry(name, self.dep_line(name), STEP_BUILTIN, builtin=True)]

    def _step_builtin_alias(self, key: str) -> list[ModuleEntry]:
        return [
            self._entry(target, self.dep_line(target), STEP_BUILTIN_ALIAS, builtin=True)
            for target in self.builtin_alias_targets(key)
        ]

    def _by_names(self, names: Iterable[str], step: str) -> list[ModuleEntry]:
        return [self._entry(name, self.dep_line(name), step) for name in names]

    # -- built-in modinfo --------------------------------------------------------------------

    def _builtin_info(self) -> Optional[BuiltinModinfo]:
        if self._builtin_modinfo is None:
            try:
                with open(self.file(BUILTIN_MODINFO), "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                return None
            self._builtin_modinfo = BuiltinModinfo.parse(data, self.file(BUILTIN_MODINFO))
        return self._builtin_modinfo

    def find_builtin_modinfo(self, name: str) -> Optional[list[ModinfoEntry]]:
        """kmod_builtin_get_modinfo: a built-in module's (key, value) list in file order, from
        the first run of ``name.key=value`` records in modules.builtin.modinfo; None when the
        file or the module is missing."""
        info = self._builtin_info()
        strings = info.strings(name) if info is not None else None
        return None if strings is None else [split_modinfo_string(text) for text in strings]

    def builtin_modinfo(self, name: str) -> list[ModinfoEntry]:
        """Like :meth:`find_builtin_modinfo`, with [] for a module it does not know."""
        return self.find_builtin_modinfo(name) or []
