"""What depmod needs from one module file, read the way libkmod reads it, plus the hash depmod's
tables use to order their iteration.

A :data:`ModuleRecord` is a plain tuple of bytes, strings and ints (so that it marshals from
worker processes and into the cache cheaply)::

    (error, exports, imports, aliases, softdeps)
    error    None, or the strerror() text kmod prints when the module cannot be read
    exports  ((symbol, crc, hash_superfast(symbol)), ...)   as kmod_module_get_symbols
    imports  (names, crcs, weak)                             as kmod_module_get_dependency_symbols,
             packed: the names joined by NULs, the CRCs as native u64s, one 0/1 weak byte each
             (:func:`unpack_imports` gives the (symbol, crc, is_weak) tuples back)
    (symbol names are the raw bytes from the module)
    aliases  the .modinfo ``alias`` values, in order
    softdeps the .modinfo ``softdep`` values, in order

Little-endian x86-64 and arm64 ELF64 images take a fast path that reads the tables through
memoryview casts and C-level iterators, with no Python step per imported symbol; any other image,
or anything unusual about one, goes through :class:`~kvc.kmod.elf.ElfFile`, which is the reference
for both.
"""

from __future__ import annotations

import errno
import os
import re
import struct
from array import array
from itertools import compress, filterfalse, repeat
from operator import not_
from typing import Iterable, Optional

from kvc.kmod import compression
from kvc.kmod.elf import SHN_ABS, SHN_UNDEF, STB_WEAK, ElfFile
from kvc.kmod.errors import ModuleFormatError

Export = tuple[bytes, int, int]
Import = tuple[bytes, int, bool]
PackedImports = tuple[bytes, bytes, bytes]
ModuleRecord = tuple[Optional[str], tuple[Export, ...], PackedImports, tuple[str, ...], tuple[str, ...]]

# kvc.kmod.module.MAX_MODULE_FILE (a test checks they agree): importing that module, and the
# signature parsing it pulls in, would be a good part of depmod's start-up.
MAX_MODULE_FILE = 1024 * 1024 * 1024
_MASK = 0xFFFFFFFF
_EHDR64 = 64
_SHDR64 = 64
_SYM64 = 24
# EM_X86_64 and EM_AARCH64: the machines whose Debian trees test the fast reader (nothing in it
# is specific to one; SPARC's register symbols would be).
_FAST_MACHINES = (62, 183)
_ELF64_LSB = b"\x7fELF\x02\x01"
# e_machine, e_shoff, e_shentsize, e_shnum, e_shstrndx.
_EHDR_FIELDS = struct.Struct("<2xH20xQ10xHHH")
_CRC_PREFIX = b"__crc_"
_MODVERSION64 = 64
_NO_IMPORTS: PackedImports = (b"", b"", b"")
EMPTY_RECORD: ModuleRecord = (None, (), _NO_IMPORTS, (), ())
# st_info -> 1 for a weak binding (st_info >> 4), else 0.
_WEAK_FLAG = bytes(int(info >> 4 == STB_WEAK) for info in range(256))
# The name of each 64-byte __versions entry (a u64 CRC, then the name in 56 NUL-padded bytes): up
# to its first NUL, at most 56 bytes. One findall over the table does what a slice and a split
# per entry did, three times faster.
_VERSION_NAMES = re.compile(rb"(?s)(?=.{8}([^\0]{0,56})).{64}")
# Matched in the text with a NUL put in front: a pattern that starts with a literal is searched
# for as one, four times faster than trying "^ or NUL" at every position.
_ALIAS = re.compile(r"\0alias(?:=([^\0]*)|(?=\0|\Z))")
_SOFTDEP = re.compile(r"\0softdep(?:=([^\0]*)|(?=\0|\Z))")


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


def pack_imports(imports: Iterable[Import]) -> PackedImports:
    names: list[bytes] = []
    crcs = array("Q")
    weak = bytearray()
    for name, crc, is_weak in imports:
        names.append(name)
        crcs.append(crc)
        weak.append(is_weak)
    return b"\0".join(names), crcs.tobytes(), bytes(weak)


def unpack_imports(packed: PackedImports) -> list[Import]:
    """The (symbol, crc, is_weak) imports of a record, in kmod's order."""
    names, crcs, weak = packed
    if not weak:
        return []
    values = array("Q")
    values.frombytes(crcs)
    return [(name, crc, flag == 1) for name, crc, flag in zip(names.split(b"\0"), values, weak)]


def read_module(path: str) -> ModuleRecord:
    """Parse one module file; never raises for a bad file (the error is in the record)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size > MAX_MODULE_FILE:
                return (_strerror(errno.EFBIG), (), _NO_IMPORTS, (), ())
            raw = os.read(fd, size)
        finally:
            os.close(fd)
    except OSError as exc:
        return (_strerror(exc.errno or errno.EIO), (), _NO_IMPORTS, (), ())
    try:
        _kind, image = compression.decompress(raw, path)
        fast = fast_record(bytes(image))
        if fast is not None:
            return fast
        elf = ElfFile(image, path)
    except ModuleFormatError as exc:
        return (_strerror(exc.errno), (), _NO_IMPORTS, (), ())
    return parse_elf(elf)


def parse_elf(elf: ElfFile) -> ModuleRecord:
    """The reference reader: every ELF class and byte order, through :class:`ElfFile`."""
    exports = tuple((_raw(sym.name), sym.crc, hash_superfast(_raw(sym.name))) for sym in elf.exported_symbols())
    try:
        imports = pack_imports((_raw(sym.name), sym.crc, sym.bind == "weak") for sym in elf.dependency_symbols())
    except ModuleFormatError:
        # kmod_module_get_dependency_symbols failing only means "no dependencies" to depmod.
        imports = _NO_IMPORTS
    aliases, softdeps = _modinfo(elf.section_data(".modinfo"))
    return (None, exports, imports, aliases, softdeps)


def _modinfo(section: Optional[bytes]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ``alias`` and ``softdep`` values of ``.modinfo`` as kmod splits it (runs of NULs separate
    ``key=value`` strings, a string without '=' is a key with an empty value)."""
    if not section:
        return (), ()
    text = "\0" + bytes(section).decode("utf-8", "surrogateescape")
    return tuple(_ALIAS.findall(text)), tuple(_SOFTDEP.findall(text))


def fast_record(data: bytes) -> Optional[ModuleRecord]:
    """The record of a little-endian x86-64 or arm64 ELF64 image, read with C-level iterators over
    the raw tables instead of one Python step per symbol; None sends anything unusual (including
    every image :class:`ElfFile` would reject) to the reference reader."""
    size = len(data)
    if size <= _EHDR64 or data[:6] != _ELF64_LSB:
        return None
    machine, shoff, shentsize, shnum, shstrndx = _EHDR_FIELDS.unpack_from(data, 16)
    if (
        machine not in _FAST_MACHINES
        or shentsize != _SHDR64
        or shoff + shnum * _SHDR64 > size
        or shstrndx == SHN_UNDEF
        or shstrndx >= shnum
    ):
        return None
    headers = memoryview(data)[shoff : shoff + shnum * _SHDR64]
    name_offsets = headers.cast("I")[0::16].tolist()
    offsets = headers.cast("Q")[3::8].tolist()
    sizes = headers.cast("Q")[4::8].tolist()
    names_start, names_end = offsets[shstrndx], offsets[shstrndx] + sizes[shstrndx]
    if names_end > size or names_end == names_start or data[names_end - 1] != 0:
        return None
    section_names = data[names_start:names_end]
    # The lowest section index for each name offset, as ElfFile.section scans them.
    first_at = dict(zip(reversed(name_offsets[1:]), range(shnum - 1, 0, -1)))

    def find(name: bytes) -> int:
        """The section index (0: none), or -1 when the first match is out of bounds."""
        found = 0
        position = section_names.find(name)
        while position >= 0:
            index = first_at.get(position, 0)
            if index and (not found or index < found):
                found = index
            position = section_names.find(name, position + 1)
        if found and offsets[found] + sizes[found] > size:
            return -1
        return found

    symtab, strtab_index, versions_index, modinfo_index = (
        find(b".symtab\0"),
        find(b".strtab\0"),
        find(b"__versions\0"),
        find(b".modinfo\0"),
    )
    if min(symtab, strtab_index, versions_index, modinfo_index) < 0 or not symtab or not strtab_index:
        return None
    table_size = sizes[symtab]
    if table_size % _SYM64 or table_size <= _SYM64:
        return None
    strtab = data[offsets[strtab_index] : offsets[strtab_index] + sizes[strtab_index]]
    if not strtab or strtab[-1] != 0:
        return None
    table = memoryview(data)[offsets[symtab] + _SYM64 : offsets[symtab] + table_size]
    names = table.cast("I")[0::6].tolist()
    if max(names) >= len(strtab):
        return None
    sections = table.cast("H")[3::12].tolist()
    exports: list[Export] = []
    if _CRC_PREFIX in strtab:
        starts = set()
        position = strtab.find(_CRC_PREFIX)
        while position >= 0:
            starts.add(position)
            position = strtab.find(_CRC_PREFIX, position + 1)
        values = table.cast("Q")[1::3].tolist()
        for index in compress(range(len(names)), map(starts.__contains__, names)):
            start = names[index] + len(_CRC_PREFIX)
            raw_name = strtab[start : strtab.find(b"\0", start)]
            crc = _crc(data, values[index], sections[index], offsets, sizes)
            exports.append((raw_name, crc, hash_superfast(raw_name)))
    if not exports:
        ksymtab = find(b"__ksymtab_strings\0")
        if ksymtab < 0:
            return None
        if ksymtab:
            strings = data[offsets[ksymtab] : offsets[ksymtab] + sizes[ksymtab]].split(b"\0")
            exports = [(name, 0, hash_superfast(name)) for name in strings if name]
    undefined = list(compress(range(len(sections)), map(not_, sections)))
    starts_of = list(map(names.__getitem__, undefined))
    imported = list(map(strtab.__getitem__, map(slice, starts_of, map(strtab.find, repeat(b"\0"), starts_of))))
    weak = bytes(map(bytes(table[4::_SYM64]).__getitem__, undefined)).translate(_WEAK_FLAG)
    if b"" in imported:
        # A nameless undefined symbol is skipped, as kmod skips it.
        kept = [position for position, name in enumerate(imported) if name]
        imported = [imported[position] for position in kept]
        weak = bytes(weak[position] for position in kept)
    crcs: list[int] = []
    if versions_index and sizes[versions_index] and not sizes[versions_index] % _MODVERSION64:
        start, end = offsets[versions_index], offsets[versions_index] + sizes[versions_index]
        version_crcs = memoryview(data)[start:end].cast("Q")[0::8].tolist()
        version_names = _VERSION_NAMES.findall(data, start, end)
        # Each undefined symbol takes the CRC of the first entry of its name; entries that no
        # symbol takes follow as imports of their own.
        first_crc = dict(zip(reversed(version_names), reversed(version_crcs)))
        first_index = dict(zip(reversed(version_names), range(len(version_names) - 1, -1, -1)))
        crcs = list(map(first_crc.get, imported, repeat(0)))
        taken = set(map(first_index.get, imported))
        unmatched = list(filterfalse(taken.__contains__, range(len(version_names))))
        imported.extend(map(version_names.__getitem__, unmatched))
        crcs.extend(map(version_crcs.__getitem__, unmatched))
        weak += bytes(len(unmatched))
    else:
        crcs = [0] * len(imported)
    modinfo = data[offsets[modinfo_index] : offsets[modinfo_index] + sizes[modinfo_index]] if modinfo_index else None
    aliases, softdeps = _modinfo(modinfo)
    return (None, tuple(exports), (b"\0".join(imported), array("Q", crcs).tobytes(), weak), aliases, softdeps)


def _crc(data: bytes, value: int, shndx: int, offsets: list[int], sizes: list[int]) -> int:
    """The CRC of a ``__crc_`` symbol: its value when absolute, else the u32 it points at."""
    if shndx in (SHN_ABS, SHN_UNDEF):
        return value
    if not 1 <= shndx < len(offsets):
        return 0xFFFFFFFFFFFFFFFF
    offset, size = offsets[shndx], sizes[shndx]
    if offset + size > len(data) or size < 4 or value > size - 4:
        return 0xFFFFFFFFFFFFFFFF
    return int.from_bytes(data[offset + value : offset + value + 4], "little")
