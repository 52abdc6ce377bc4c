"""A kernel module file: name, modinfo, symbols, modversions and signature, read like libkmod."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
from itertools import repeat
from operator import itemgetter
from typing import Any, Callable, Generic, NamedTuple, Optional, TypeVar, Union, overload

from kvc.kmod import compression
from kvc.kmod.elf import ElfFile, Symbol, decode, split_strings
from kvc.kmod.errors import ModuleFormatError
from kvc.kmod.names import modname_from_path
from kvc.kmod.signature import ModuleSignature, read_signature

# A module file bigger than this is not a kernel module; refuse before reading it into memory.
MAX_MODULE_FILE = 1024 * 1024 * 1024
# Files up to this size are read whole; a bigger uncompressed one is mapped, since modinfo
# touches only a few of its pages. Reading is cheaper than mapping and unmapping a small file.
MAX_READ_WHOLE = 256 * 1024


def is_module_filename(filename: str) -> bool:
    return filename.endswith(compression.MODULE_SUFFIXES)


class ModinfoEntry(NamedTuple):
    key: str
    value: str


_KEY_AND_VALUE = itemgetter(0, 2)
_T = TypeVar("_T")


class _cached_property(Generic[_T]):
    """functools.cached_property without the lock it takes before Python 3.12 (a microsecond
    for each first use, three per module for modinfo): the value is computed once and kept in
    the instance's __dict__, where later lookups find it before this descriptor."""

    def __init__(self, compute: Callable[[Any], _T]) -> None:
        self._compute = compute
        self._name = compute.__name__
        self.__doc__ = compute.__doc__

    @overload
    def __get__(self, instance: None, owner: Optional[type] = None) -> _cached_property[_T]: ...

    @overload
    def __get__(self, instance: object, owner: Optional[type] = None) -> _T: ...

    def __get__(self, instance: object, owner: Optional[type] = None) -> Union[_T, _cached_property[_T]]:
        if instance is None:
            return self
        value = self._compute(instance)
        instance.__dict__[self._name] = value
        return value


def parse_modinfo(section: Optional[bytes]) -> tuple[ModinfoEntry, ...]:
    """A ``.modinfo`` section's ``key=value`` strings as kmod splits them (runs of NULs separate
    strings); a string without '=' is a key with an empty value."""
    if not section:
        return ()
    # All at C level: NamedTuple's own __new__ is a Python call per entry.
    pairs = map(_KEY_AND_VALUE, map(str.partition, filter(None, decode(section).split("\0")), repeat("=")))
    return tuple(map(tuple.__new__, repeat(ModinfoEntry), pairs))


class ModuleFile:
    """One ``.ko`` file (optionally xz/zstd/gzip compressed), parsed lazily."""

    def __init__(self, path: str, raw: Union[bytes, mmap.mmap]) -> None:
        self.path = path
        self.raw = raw
        self.compression, self.image = compression.decompress(raw, path)

    @classmethod
    def open(cls, path: str) -> ModuleFile:
        fd = os.open(path, os.O_RDONLY)
        try:
            status = os.fstat(fd)
            size = status.st_size
            if stat.S_ISDIR(status.st_mode):
                raise ModuleFormatError(path, "is a directory", errno=errno.EISDIR)
            if size > MAX_MODULE_FILE:
                raise ModuleFormatError(path, f"file is {size} bytes, larger than any kernel module", errno=errno.EFBIG)
            if size == 0:
                raw: Union[bytes, mmap.mmap] = b""
            elif size <= MAX_READ_WHOLE or compression.detect(os.pread(fd, 8, 0)) is not None:
                raw = os.read(fd, size)
            else:
                raw = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return cls(path, raw)

    @property
    def name(self) -> str:
        return modname_from_path(self.path)

    @_cached_property
    def elf(self) -> ElfFile:
        return ElfFile(self.image, self.path)

    @_cached_property
    def modinfo(self) -> tuple[ModinfoEntry, ...]:
        return parse_modinfo(self.elf.section_data(".modinfo"))

    def info_values(self, key: str) -> list[str]:
        return [entry.value for entry in self.modinfo if entry.key == key]

    def info_value(self, key: str) -> Optional[str]:
        values = self.info_values(key)
        return values[0] if values else None

    @property
    def vermagic(self) -> Optional[str]:
        return self.info_value("vermagic")

    @property
    def depends(self) -> list[str]:
        value = self.info_value("depends")
        return [name for name in value.split(",") if name] if value else []

    @property
    def aliases(self) -> list[str]:
        return self.info_values("alias")

    @property
    def softdeps(self) -> list[str]:
        return self.info_values("softdep")

    @property
    def weakdeps(self) -> list[str]:
        return self.info_values("weakdep")

    @property
    def firmware(self) -> list[str]:
        return self.info_values("firmware")

    @_cached_property
    def exported_symbols(self) -> list[Symbol]:
        return self.elf.exported_symbols()

    @_cached_property
    def dependency_symbols(self) -> list[Symbol]:
        return self.elf.dependency_symbols()

    @_cached_property
    def modversions(self) -> list[Symbol]:
        return [
            Symbol(decode(name[1:] if name.startswith(b".") else name), crc, "undefined")
            for crc, name in self.elf.modversions()
        ]

    @_cached_property
    def this_module_name(self) -> Optional[str]:
        """The name the kernel will register, from ``struct module`` in ``.gnu.linkonce.this_module``."""
        data = self.elf.section_data(".gnu.linkonce.this_module")
        if data is None:
            return None
        # struct module starts with `enum module_state state; struct list_head list; char name[]`.
        offset = 24 if self.elf.is_64 else 12
        field = data[offset : offset + 56]
        end = field.find(b"\0")
        return decode(field if end < 0 else field[:end]) or None

    @_cached_property
    def signature(self) -> Optional[ModuleSignature]:
        return read_signature(self.image, self.path)

    @property
    def parameters(self) -> list[tuple[str, Optional[str], Optional[str]]]:
        """(name, description, type) for each parameter, in order of first appearance."""
        found: dict[str, list[Optional[str]]] = {}
        for entry in self.modinfo:
            if entry.key not in ("parm", "parmtype"):
                continue
            name, _sep, rest = entry.value.partition(":")
            slot = found.setdefault(name, [None, None])
            slot[0 if entry.key == "parm" else 1] = rest
        return [(name, desc, kind) for name, (desc, kind) in found.items()]


def strip_for_force(image: bytes, elf: ElfFile, *, modversions: bool, vermagic: bool) -> bytes:
    """A copy of ``image`` prepared for a forced load, like kmod_elf_strip: clear SHF_ALLOC on
    ``__versions`` and/or blank the ``vermagic=`` string of ``.modinfo``."""
    changed = bytearray(image)
    if modversions:
        section = elf.section("__versions")
        if section is not None:
            flags_at = section.header_offset + 8
            fmt = elf.order + ("Q" if elf.is_64 else "I")
            (flags,) = struct.unpack_from(fmt, changed, flags_at)
            struct.pack_into(fmt, changed, flags_at, flags & ~0x2)
    if vermagic:
        section = elf.section(".modinfo")
        if section is not None:
            data = image[section.offset : section.offset + section.size]
            position = 0
            for text in split_strings(data):
                position = data.index(text, position)
                if text.startswith(b"vermagic="):
                    start = section.offset + position
                    changed[start : start + len(text)] = bytes(len(text))
                    break
                position += len(text)
    return bytes(changed)
