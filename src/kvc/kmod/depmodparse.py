"""What depmod needs from one module file, read the way libkmod reads it, plus the hash depmod's
tables use to order their iteration.

A :data:`ModuleRecord` is a plain tuple (so that it pickles to worker processes and marshals into
the cache cheaply)::

    (error, exports, imports, aliases, softdeps)
    error    None, or the strerror() text kmod prints when the module cannot be read
    exports  ((symbol, crc, hash_superfast(symbol)), ...)   as kmod_module_get_symbols
    imports  ((symbol, crc, is_weak), ...)                   as kmod_module_get_dependency_symbols
    (symbol names are the raw bytes from the module)
    aliases  the .modinfo ``alias`` values, in order
    softdeps the .modinfo ``softdep`` values, in order

Little-endian ELF64 (every x86-64 module) takes a fast path that reads the symbol table through
memoryview casts; any other image, or one whose string offsets are out of bounds, goes through
:class:`~kvc.kmod.elf.ElfFile`, which is the reference for both.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

from kvc.kmod import compression
from kvc.kmod.elf import SHN_ABS, SHN_UNDEF, STB_WEAK, ElfFile
from kvc.kmod.errors import ModuleFormatError
from kvc.kmod.module import MAX_MODULE_FILE, parse_modinfo

Export = tuple[bytes, int, int]
Import = tuple[bytes, int, bool]
ModuleRecord = tuple[Optional[str], tuple[Export, ...], tuple[Import, ...], tuple[str, ...], tuple[str, ...]]

_MASK = 0xFFFFFFFF
_SYM64 = 24
_EM_X86_64 = 62
_CRC_PREFIX = b"__crc_"
_MODVERSION64 = 64


def _signed(byte: int) -> int:
    """A byte as x86's signed ``char``."""
    return byte - 256 if byte >= 128 else byte


def hash_superfast(key: bytes) -> int:
    """Paul Hsieh's SuperFastHash as kmod's shared/hash.c computes it (little-endian u16 reads,
    32-bit arithmetic, signed chars in the tail)."""
    length = len(key)
    value = length
    rem = length & 3
    end = length - rem
    position = 0
    while position < end:
        value = (value + (key[position] | key[position + 1] << 8)) & _MASK
        tmp = ((key[position + 2] | key[position + 3] << 8) << 11) ^ value
        value = ((value << 16) ^ tmp) & _MASK
        value = (value + (value >> 11)) & _MASK
        position += 4
    if rem == 3:
        value = (value + (key[position] | key[position + 1] << 8)) & _MASK
        value ^= (value << 16) & _MASK
        value ^= (_signed(key[position + 2]) << 18) & _MASK
        value = (value + (value >> 11)) & _MASK
    elif rem == 2:
        value = (value + (key[position] | key[position + 1] << 8)) & _MASK
        value ^= (value << 11) & _MASK
        value = (value + (value >> 17)) & _MASK
    elif rem == 1:
        value = (value + _signed(key[position])) & _MASK
        value ^= (value << 10) & _MASK
        value = (value + (value >> 1)) & _MASK
    value ^= (value << 3) & _MASK
    value = (value + (value >> 5)) & _MASK
    value ^= (value << 4) & _MASK
    value = (value + (value >> 17)) & _MASK
    value ^= (value << 25) & _MASK
    return (value + (value >> 6)) & _MASK


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _strerror(err: int) -> str:
    return os.strerror(err)


def read_module(path: str) -> ModuleRecord:
    """Parse one module file; never raises for a bad file (the error is in the record)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_MODULE_FILE:
                return (_strerror(errno.EFBIG), (), (), (), ())
            raw = handle.read()
    except OSError as exc:
        return (_strerror(exc.errno or errno.EIO), (), (), (), ())
    try:
        _kind, image = compression.decompress(raw, path)
        elf = ElfFile(image, path)
    except ModuleFormatError as exc:
        return (_strerror(exc.errno), (), (), (), ())
    return parse_elf(elf)


def parse_elf(elf: ElfFile) -> ModuleRecord:
    fast = _fast_symbols(elf) if elf.is_64 and elf.order == "<" and elf.machine == _EM_X86_64 else None
    if fast is not None:
        exports, imports = fast
    else:
        exports = tuple((_raw(sym.name), sym.crc, hash_superfast(_raw(sym.name))) for sym in elf.exported_symbols())
        try:
            imports = tuple((_raw(sym.name), sym.crc, sym.bind == "weak") for sym in elf.dependency_symbols())
        except ModuleFormatError:
            # kmod_module_get_dependency_symbols failing only means "no dependencies" to depmod.
            imports = ()
    aliases: list[str] = []
    softdeps: list[str] = []
    for entry in parse_modinfo(elf.section_data(".modinfo")):
        if entry.key == "alias":
            aliases.append(entry.value)
        elif entry.key == "softdep":
            softdeps.append(entry.value)
    return (None, exports, imports, tuple(aliases), tuple(softdeps))


def _fast_symbols(elf: ElfFile) -> Optional[tuple[tuple[Export, ...], tuple[Import, ...]]]:
    """Exports and imports of a little-endian ELF64 image, or None to take the reference path."""
    symtab = elf.section(".symtab")
    strtab_data = elf.section_data(".strtab")
    if symtab is None or strtab_data is None or symtab.size % _SYM64 or symtab.size <= _SYM64:
        return None
    strtab = bytes(strtab_data)
    if not strtab or strtab[-1] != 0:
        return None
    table = memoryview(elf.data)[symtab.offset + _SYM64:symtab.offset + symtab.size]
    names = table.cast("I")[0::6].tolist()
    if max(names) >= len(strtab):
        return None
    sections = table.cast("H")[3::12].tolist()
    find = strtab.find
    exports: list[Export] = []
    if _CRC_PREFIX in strtab:
        starts = set()
        position = find(_CRC_PREFIX)
        while position >= 0:
            starts.add(position)
            position = find(_CRC_PREFIX, position + 1)
        values = table.cast("Q")[1::3].tolist()
        crc_data: dict[int, Optional[tuple[int, int]]] = {}
        for index in [i for i, offset in enumerate(names) if offset in starts]:
            start = names[index] + len(_CRC_PREFIX)
            raw_name = strtab[start:find(b"\0", start)]
            exports.append((raw_name, _crc(elf, values[index], sections[index], crc_data), hash_superfast(raw_name)))
    if not exports:
        exports = [(name, 0, hash_superfast(name)) for name in elf.strings("__ksymtab_strings")]
    undefined = [i for i, section in enumerate(sections) if section == SHN_UNDEF]
    infos = table[4::_SYM64].tolist()
    versions = _modversions(elf)
    first_index: dict[bytes, int] = {}
    for position, (_crc_value, vname) in enumerate(versions):
        first_index.setdefault(vname, position)
    visited = [False] * len(versions)
    imports: list[Import] = []
    for index in undefined:
        start = names[index]
        raw_name = strtab[start:find(b"\0", start)]
        if not raw_name:
            continue
        found = first_index.get(raw_name)
        crc = 0
        if found is not None:
            visited[found] = True
            crc = versions[found][0]
        imports.append((raw_name, crc, infos[index] >> 4 == STB_WEAK))
    imports.extend((vname, crc, False) for (crc, vname), seen in zip(versions, visited) if not seen)
    return tuple(exports), tuple(imports)


def _modversions(elf: ElfFile) -> list[tuple[int, bytes]]:
    """``__versions`` of a little-endian ELF64 image: {u64 crc; char name[56]} entries."""
    raw = elf.section_data("__versions")
    if not raw or len(raw) % _MODVERSION64:
        return []
    data = bytes(raw)
    crcs = memoryview(data).cast("Q")[0::8].tolist()
    names = [data[at + 8:at + _MODVERSION64].split(b"\0", 1)[0] for at in range(0, len(data), _MODVERSION64)]
    return list(zip(crcs, names))


def _crc(elf: ElfFile, value: int, shndx: int, cache: dict[int, Optional[tuple[int, int]]]) -> int:
    """The CRC of a ``__crc_`` symbol: its value when absolute, else the u32 it points at."""
    if shndx in (SHN_ABS, SHN_UNDEF):
        return value
    if shndx not in cache:
        section = elf.section_by_index(shndx)
        ok = section is not None and section.in_bounds and section.size >= 4
        cache[shndx] = (section.offset, section.size) if ok and section is not None else None
    where = cache[shndx]
    if where is None or value > where[1] - 4:
        return 0xFFFFFFFFFFFFFFFF
    return int.from_bytes(elf.data[where[0] + value:where[0] + value + 4], "little")
