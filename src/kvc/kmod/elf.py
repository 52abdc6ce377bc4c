"""A bounds-checked reader for the parts of ELF relocatable objects that kernel modules use.

It follows libkmod's reading rules (libkmod-elf.c) so that what we derive from a module —
sections by name, ``.modinfo`` strings, exported and imported symbols with CRCs — is what kmod
derives. Every offset and count is checked against the file size before use; a malformed file
raises :class:`~kvc.kmod.errors.ModuleFormatError` and never reads out of bounds.
"""

from __future__ import annotations

import errno
import mmap
import struct
import sys
from array import array
from itertools import compress
from typing import NamedTuple, NoReturn, Optional, Union

from kvc.kmod.errors import ModuleFormatError

ELF_MAGIC = b"\x7fELF"
_CLASS_32 = 1
_CLASS_64 = 2
_DATA_LSB = 1
_DATA_MSB = 2
_EI_NIDENT = 16

SHN_UNDEF = 0
SHN_ABS = 0xFFF1
SHF_ALLOC = 0x2
STB_LOCAL = 0
STB_GLOBAL = 1
STB_WEAK = 2
_STT_REGISTER = 13
_EM_SPARC = 2
_EM_SPARCV9 = 43

# (header struct, section header struct, symbol struct) per class, without the byte-order char.
_EHDR_TAIL = {_CLASS_32: "HHIIIIIHHHHHH", _CLASS_64: "HHIQQQIHHHHHH"}
_SHDR = {_CLASS_32: "IIIIIIIIII", _CLASS_64: "IIQQQQIIQQ"}
_SHDR_SIZE = {_CLASS_32: 40, _CLASS_64: 64}
_EHDR_SIZE = {_CLASS_32: 52, _CLASS_64: 64}
_SYM_SIZE = {_CLASS_32: 16, _CLASS_64: 24}
_MODVERSION_SIZE = 64
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"


# Both records are declared with the call syntax: under ``from __future__ import annotations``
# the class syntax compiles each field's annotation string at import, a millisecond in all.
Section = NamedTuple(  # noqa: UP014
    "Section",
    [
        ("number", int),
        ("name", str),
        ("type", int),
        ("flags", int),
        ("offset", int),
        ("size", int),
        ("header_offset", int),
        ("in_bounds", bool),
    ],
)
# A symbol as kmod reports it: name, CRC (0 when unknown) and binding ("global", "weak",
# "undefined", "local" or "none", as kmod names bindings).
Symbol = NamedTuple("Symbol", [("name", str), ("crc", int), ("bind", str)])  # noqa: UP014


def decode(raw: bytes) -> str:
    """Bytes from a module as text; undecodable bytes survive a round trip (surrogateescape)."""
    return raw.decode("utf-8", "surrogateescape")


def split_strings(data: bytes) -> list[bytes]:
    """Split a NUL-separated string table the way kmod_elf_get_strings does: runs of NULs
    separate strings, so empty strings never appear."""
    return [part for part in data.split(b"\0") if part]


class ElfFile:
    """An ELF image in memory. ``path`` is only used in error messages."""

    def __init__(self, data: Union[bytes, mmap.mmap], path: str) -> None:
        self.data = data
        self.path = path
        size = len(data)
        if size <= _EI_NIDENT or data[:4] != ELF_MAGIC:
            self._fail("not an ELF file", errno.ENOEXEC)
        elf_class, elf_data = data[4], data[5]
        if elf_class not in (_CLASS_32, _CLASS_64):
            self._fail(f"unknown ELF class {elf_class}")
        if size <= _EHDR_SIZE[elf_class]:
            self._fail("truncated ELF header")
        if elf_data == _DATA_LSB:
            self.order = "<"
        elif elf_data == _DATA_MSB:
            self.order = ">"
        else:
            self._fail(f"unknown ELF byte order {elf_data}")
        self.is_64 = elf_class == _CLASS_64
        self._class = elf_class
        (
            _type,
            machine,
            _version,
            _entry,
            _phoff,
            shoff,
            _flags,
            _ehsize,
            _phentsize,
            _phnum,
            shentsize,
            shnum,
            shstrndx,
        ) = struct.unpack_from(self.order + _EHDR_TAIL[elf_class], data, 16)
        self.machine = machine
        if shentsize != _SHDR_SIZE[elf_class]:
            self._fail(f"unexpected section header size {shentsize}")
        if shoff + shnum * shentsize > size:
            self._fail(f"section header table ({shnum} entries at offset {shoff}) runs past the end")
        self._shoff = shoff
        self._shnum = shnum
        if shstrndx == SHN_UNDEF or shstrndx >= shnum:
            self._fail(f"section name table index {shstrndx} out of range")
        # The header table is unpacked one entry at a time, when a section is asked for: most
        # readers want two or three sections of fifty.
        self._table = data[shoff : shoff + shnum * shentsize]
        self._shdr = struct.Struct(self.order + _SHDR[elf_class])
        self._shentsize = shentsize
        self._name_offsets: Optional[array[int]] = None
        names_off, names_size = self._header(shstrndx)[4:6]
        if names_off + names_size > size:
            self._fail("section name table runs past the end")
        names = data[names_off : names_off + names_size]
        if not names or names[-1] != 0:
            self._fail("section name table is not NUL-terminated")
        self._names = names
        self._by_name: dict[str, Optional[Section]] = {}

    def _header(self, index: int) -> tuple[int, ...]:
        """Section header ``index`` as (name, type, flags, addr, offset, size, …)."""
        return self._shdr.unpack_from(self._table, index * self._shentsize)

    def _name_column(self) -> array[int]:
        """Every section's sh_name, the first u32 of each header, copied out in one slice."""
        if self._name_offsets is None:
            words = array("I", self._table)
            if self.order != _NATIVE_ORDER:
                words.byteswap()
            self._name_offsets = words[:: self._shentsize // 4]
        return self._name_offsets

    def _make_section(self, index: int) -> Section:
        name_off, sh_type, flags, _addr, offset, size = self._header(index)[:6]
        names = self._names
        name = decode(names[name_off : names.index(b"\0", name_off)]) if name_off < len(names) else ""
        return Section(
            index,
            name,
            sh_type,
            flags,
            offset,
            size,
            self._shoff + index * self._shentsize,
            offset + size <= len(self.data),
        )

    @property
    def sections(self) -> tuple[Section, ...]:
        """Every section but the null one, in header order."""
        return tuple(self._make_section(index) for index in range(1, self._shnum))

    def _fail(self, problem: str, err: int = errno.EINVAL) -> NoReturn:
        raise ModuleFormatError(self.path, problem, errno=err)

    def section(self, name: str) -> Optional[Section]:
        """The first in-bounds section with this name, as kmod_elf_get_section finds it."""
        if name in self._by_name:
            return self._by_name[name]
        # Find where the name is spelled in the name table first, so that a lookup touches
        # only the headers and never decodes every section name.
        wanted = name.encode() + b"\0"
        offsets = set()
        position = self._names.find(wanted)
        while position >= 0:
            offsets.add(position)
            position = self._names.find(wanted, position + 1)
        found = None
        if offsets:
            size = len(self.data)
            for index in compress(range(self._shnum), map(offsets.__contains__, self._name_column())):
                header = self._header(index)
                if index and header[4] + header[5] <= size:
                    found = self._make_section(index)
                    break
        self._by_name[name] = found
        return found

    def section_by_index(self, index: int) -> Optional[Section]:
        if 1 <= index < self._shnum:
            return self._make_section(index)
        return None

    def section_data(self, name: str) -> Optional[bytes]:
        section = self.section(name)
        if section is None:
            return None
        return self.data[section.offset : section.offset + section.size]

    def strings(self, name: str) -> list[bytes]:
        """A NUL-separated string section (``.modinfo``, ``__ksymtab_strings``) as kmod splits it."""
        raw = self.section_data(name)
        return split_strings(raw) if raw else []

    def _symtab(self) -> Optional[tuple[bytes, list[tuple[int, int, int, int]]]]:
        """(.strtab bytes, [(name offset, value, info, shndx)] without entry 0), or None when
        either table is missing or the symbol table size is not a whole number of entries."""
        strtab = self.section_data(".strtab")
        symtab = self.section(".symtab")
        if strtab is None or symtab is None:
            return None
        entry = _SYM_SIZE[self._class]
        if symtab.size % entry:
            return None
        if self.is_64:
            fmt = self.order + "IBBHQQ"
            rows = [
                (n, v, i, s)
                for n, i, _o, s, v, _z in struct.iter_unpack(
                    fmt, self.data[symtab.offset + entry : symtab.offset + symtab.size]
                )
            ]
        else:
            fmt = self.order + "IIIBBH"
            rows = [
                (n, v, i, s)
                for n, v, _z, i, _o, s in struct.iter_unpack(
                    fmt, self.data[symtab.offset + entry : symtab.offset + symtab.size]
                )
            ]
        return strtab, rows

    @staticmethod
    def _name_at(table: bytes, offset: int) -> bytes:
        end = table.find(b"\0", offset)
        return table[offset:] if end < 0 else table[offset:end]

    def modversions(self) -> list[tuple[int, bytes]]:
        """``__versions`` entries as (crc, name). A table whose size is not a multiple of the
        entry size is ignored, as kmod does when resolving dependency symbols."""
        raw = self.section_data("__versions")
        if not raw or len(raw) % _MODVERSION_SIZE:
            return []
        crc_size = 8 if self.is_64 else 4
        crc_fmt = self.order + ("Q" if self.is_64 else "I")
        entries = []
        for pos in range(0, len(raw), _MODVERSION_SIZE):
            (crc,) = struct.unpack_from(crc_fmt, raw, pos)
            name = self._name_at(raw[pos + crc_size : pos + _MODVERSION_SIZE], 0)
            entries.append((crc, name))
        return entries

    def exported_symbols(self) -> list[Symbol]:
        """Exports as kmod_elf_get_symbols derives them: ``__crc_*`` symbols with their CRC,
        else the names in ``__ksymtab_strings`` with CRC 0."""
        table = self._symtab()
        if table is not None:
            strtab, rows = table
            if all(name_off < len(strtab) for name_off, _v, _i, _s in rows):
                exports = []
                for name_off, value, info, shndx in rows:
                    name = self._name_at(strtab, name_off)
                    if name.startswith(b"__crc_"):
                        exports.append(Symbol(decode(name[6:]), self._resolve_crc(value, shndx), _bind_name(info >> 4)))
                if exports:
                    return exports
        return [Symbol(decode(name), 0, "global") for name in self.strings("__ksymtab_strings")]

    def _resolve_crc(self, value: int, shndx: int) -> int:
        if shndx in (SHN_ABS, SHN_UNDEF):
            return value
        section = self.section_by_index(shndx)
        if section is None or not section.in_bounds or section.size < 4 or value > section.size - 4:
            return 0xFFFFFFFFFFFFFFFF
        (crc,) = struct.unpack_from(self.order + "I", self.data, section.offset + value)
        return int(crc)

    def dependency_symbols(self, *, unmatched_versions: bool = True) -> list[Symbol]:
        """Imports as kmod_elf_get_dependency_symbols derives them: undefined symbols in symtab
        order with CRCs from ``__versions``, then (unless ``unmatched_versions`` is False, which
        gives what the kernel itself resolves) unmatched ``__versions`` entries."""
        table = self._symtab()
        if table is None:
            raise self._fail("no usable .symtab/.strtab")
        strtab, rows = table
        versions = self.modversions()
        first_index: dict[bytes, int] = {}
        for index, (_crc, name) in enumerate(versions):
            first_index.setdefault(name, index)
        visited = [False] * len(versions)
        register_symbols = self.machine in (_EM_SPARC, _EM_SPARCV9)
        imports = []
        for position, (name_off, _value, info, shndx) in enumerate(rows, start=1):
            if shndx != SHN_UNDEF:
                continue
            if register_symbols and info & 0xF == _STT_REGISTER:
                continue
            if name_off >= len(strtab):
                self._fail(f"symbol {position} names offset {name_off} past .strtab")
            name = self._name_at(strtab, name_off)
            if not name:
                continue
            found = first_index.get(name)
            crc = 0
            if found is not None:
                visited[found] = True
                crc = versions[found][0]
            imports.append(Symbol(decode(name), crc, "weak" if info >> 4 == STB_WEAK else "undefined"))
        if unmatched_versions:
            imports.extend(
                Symbol(decode(name), crc, "undefined") for (crc, name), seen in zip(versions, visited) if not seen
            )
        return imports


def _bind_name(bind: int) -> str:
    return {STB_LOCAL: "local", STB_GLOBAL: "global", STB_WEAK: "weak"}.get(bind, "none")
