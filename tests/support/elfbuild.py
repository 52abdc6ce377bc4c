"""Build small ELF relocatable objects shaped like kernel modules, for tests: any class and byte
order, chosen sections, a symbol table and ``__versions``. Real kmod reads them too, so tests can
compare our output with kmod's on files no distribution ships (ELF32, big-endian, odd modinfo)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHN_UNDEF = 0
SHN_ABS = 0xFFF1
STB_GLOBAL = 1
STB_WEAK = 2


@dataclass
class SymbolSpec:
    name: str
    value: int = 0
    shndx: int = SHN_UNDEF
    bind: int = STB_GLOBAL


@dataclass
class ElfSpec:
    is_64: bool = True
    big_endian: bool = False
    machine: int = 62  # x86-64
    sections: list[tuple[str, bytes]] = field(default_factory=list)
    symbols: list[SymbolSpec] = field(default_factory=list)

    def add(self, name: str, data: bytes) -> int:
        """Add a PROGBITS section; returns its section index."""
        self.sections.append((name, data))
        return len(self.sections)


def modinfo_section(entries: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{key}={value}".encode() + b"\0" for key, value in entries)


def versions_section(entries: list[tuple[int, str]], is_64: bool = True, big_endian: bool = False) -> bytes:
    order = ">" if big_endian else "<"
    crc = "Q" if is_64 else "I"
    size = 64 - (8 if is_64 else 4)
    return b"".join(struct.pack(order + crc, value) + name.encode().ljust(size, b"\0") for value, name in entries)


def this_module_section(name: str, is_64: bool = True) -> bytes:
    offset = 24 if is_64 else 12
    return bytes(offset) + name.encode().ljust(56, b"\0") + bytes(64)


def build(spec: ElfSpec) -> bytes:
    order = ">" if spec.big_endian else "<"
    names = [""] + [name for name, _ in spec.sections]
    sections = list(spec.sections)
    if spec.symbols:
        strtab = b"\0"
        offsets = []
        for sym in spec.symbols:
            offsets.append(len(strtab))
            strtab += sym.name.encode() + b"\0"
        entry = "IBBHQQ" if spec.is_64 else "IIIBBH"
        rows = [bytes(24 if spec.is_64 else 16)]
        for sym, off in zip(spec.symbols, offsets):
            info = (sym.bind << 4) | 0
            if spec.is_64:
                rows.append(struct.pack(order + entry, off, info, 0, sym.shndx, sym.value, 0))
            else:
                rows.append(struct.pack(order + entry, off, sym.value, 0, info, 0, sym.shndx))
        sections.append((".symtab", b"".join(rows)))
        sections.append((".strtab", strtab))
        names += [".symtab", ".strtab"]
    names.append(".shstrtab")
    shstrtab = b""
    name_offsets = []
    for name in names:
        name_offsets.append(len(shstrtab))
        shstrtab += name.encode() + b"\0"
    sections.append((".shstrtab", shstrtab))
    ehsize = 64 if spec.is_64 else 52
    body = bytearray(ehsize)
    placed = []
    for _name, data in sections:
        while len(body) % 8:
            body.append(0)
        placed.append((len(body), len(data)))
        body += data
    while len(body) % 8:
        body.append(0)
    shoff = len(body)
    shnum = len(sections) + 1
    shentsize = 64 if spec.is_64 else 40
    headers = bytearray(shentsize)
    for index, ((name, _data), (offset, size)) in enumerate(zip(sections, placed), start=1):
        sh_type = {".symtab": SHT_SYMTAB, ".strtab": SHT_STRTAB, ".shstrtab": SHT_STRTAB}.get(name, SHT_PROGBITS)
        link = 0
        entsize = 0
        if name == ".symtab":
            link = index + 1
            entsize = 24 if spec.is_64 else 16
        if spec.is_64:
            headers += struct.pack(
                order + "IIQQQQIIQQ", name_offsets[index], sh_type, 0, 0, offset, size, link, 0, 1, entsize
            )
        else:
            headers += struct.pack(
                order + "IIIIIIIIII", name_offsets[index], sh_type, 0, 0, offset, size, link, 0, 1, entsize
            )
    body += headers
    ident = b"\x7fELF" + bytes([2 if spec.is_64 else 1, 2 if spec.big_endian else 1, 1]) + bytes(9)
    if spec.is_64:
        header = struct.pack(
            order + "HHIQQQIHHHHHH", 1, spec.machine, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, shnum, shnum - 1
        )
    else:
        header = struct.pack(
            order + "HHIIIIIHHHHHH", 1, spec.machine, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, shnum, shnum - 1
        )
    body[0:ehsize] = ident + header
    return bytes(body)
