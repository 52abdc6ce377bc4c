"""Build x86_64 kernel modules shaped like kbuild's, for tests of the fake kernel: allocated
sections, ``__versions`` with real CRCs, exports as ``__ksymtab_<sym>`` with ``__crc_<sym>``
in ``__kcrctab`` and ``__kstrtabns_<sym>`` namespaces, ``init_module``/``cleanup_module``, and
a ``__param`` table with its ``.rela__param`` relocations (name, ops, variable) like
``module_param()`` makes. Real kmod reads them as well (modinfo, depmod)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

SHT_PROGBITS = 1
SHT_SYMTAB = 2
SHT_STRTAB = 3
SHT_RELA = 4
SHT_NOBITS = 8
SHF_WRITE = 0x1
SHF_ALLOC = 0x2
SHF_EXECINSTR = 0x4
SHF_INFO_LINK = 0x40
STB_LOCAL = 0
STB_GLOBAL = 1
STB_WEAK = 2
STT_NOTYPE = 0
STT_OBJECT = 1
STT_FUNC = 2
STT_SECTION = 3
R_X86_64_64 = 1


@dataclass
class Param:
    name: str
    kind: str = "int"  # int, uint, long, ulong, short, ushort, byte, hexint, bool, invbool, charp, bint
    perm: int = 0o444
    default: object = 0
    unsafe: bool = False


@dataclass
class Export:
    name: str
    crc: Optional[int] = 0x12345678
    gpl: bool = False
    namespace: str = ""


@dataclass
class ModuleSpec:
    name: str
    vermagic: Optional[str]
    imports: list[tuple[str, Optional[int]]] = field(default_factory=list)  # (symbol, CRC or None: no entry)
    weak_imports: list[str] = field(default_factory=list)
    exports: list[Export] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    modinfo: list[tuple[str, str]] = field(default_factory=list)  # extra entries (license, intree, ...)
    modversions: bool = True
    has_exit: bool = True
    text_size: int = 64
    machine: int = 62
    crcs: dict[str, int] = field(default_factory=dict)  # CRCs for the param_ops_* the params import


@dataclass
class _Section:
    name: str
    type: int
    flags: int
    data: bytes
    align: int = 1
    link: int = 0
    info: int = 0
    entsize: int = 0
    size: Optional[int] = None
    name_off: int = 0


def _section_symbol(index: int) -> tuple[str, int, int, int, int, int]:
    return ("", 0, 0, STT_SECTION, STB_LOCAL, index)


def build_module(spec: ModuleSpec) -> bytes:
    sections: list[_Section] = [_Section("", 0, 0, b"")]

    def add(
        name: str,
        data: bytes,
        flags: int = SHF_ALLOC,
        sh_type: int = SHT_PROGBITS,
        align: int = 8,
        link: int = 0,
        info: int = 0,
        entsize: int = 0,
        size: Optional[int] = None,
    ) -> int:
        sections.append(_Section(name, sh_type, flags, data, align, link, info, entsize, size))
        return len(sections) - 1

    text = add(".text", b"\xc3" * spec.text_size, SHF_ALLOC | SHF_EXECINSTR, align=16)
    info = [("name", spec.name), *spec.modinfo]
    if spec.vermagic is not None:
        info.append(("vermagic", spec.vermagic))
    for param in spec.params:
        info.append(("parmtype", f"{param.name}:{param.kind}"))
    modinfo = add(".modinfo", b"".join(f"{k}={v}".encode() + b"\0" for k, v in info), align=1)
    versions_index = 0
    if spec.modversions:
        versioned_ops = sorted({f"param_ops_{param.kind}" for param in spec.params} & set(spec.crcs))
        entries = [("module_layout", spec.crcs.get("module_layout", 0x9060323F))]
        entries += [(sym, crc) for sym, crc in spec.imports if crc is not None]
        entries += [(sym, spec.crcs[sym]) for sym in versioned_ops]
        versions_index = add(
            "__versions",
            b"".join(struct.pack("<Q", crc) + sym.encode().ljust(56, b"\0") for sym, crc in entries),
            align=32,
        )
    del modinfo, versions_index
    # exports
    symbols: list[tuple[str, int, int, int, int, int]] = [("", 0, 0, 0, 0, 0)]  # name, value, size, type, bind, shndx
    plain = [e for e in spec.exports if not e.gpl]
    gpl = [e for e in spec.exports if e.gpl]
    strings = b""
    string_at: dict[str, int] = {}
    for export in spec.exports:
        for text_value in (export.name, export.namespace):
            if text_value and text_value not in string_at:
                string_at[text_value] = len(strings)
                strings += text_value.encode() + b"\0"
    for group, suffix in ((plain, ""), (gpl, "_gpl")):
        if not group:
            continue
        ksymtab = add(f"__ksymtab{suffix}", bytes(12 * len(group)), align=4)
        kcrctab = (
            add(f"__kcrctab{suffix}", b"".join(struct.pack("<I", e.crc or 0) for e in group), align=4)
            if any(e.crc is not None for e in group)
            else 0
        )
        for position, export in enumerate(group):
            symbols.append((f"__ksymtab_{export.name}", 12 * position, 12, STT_NOTYPE, STB_LOCAL, ksymtab))
            if kcrctab and export.crc is not None:
                symbols.append((f"__crc_{export.name}", 4 * position, 0, STT_NOTYPE, STB_LOCAL, kcrctab))
    if strings:
        kstrtab = add("__ksymtab_strings", strings, align=1)
        for export in spec.exports:
            symbols.append((f"__kstrtab_{export.name}", string_at[export.name], 0, STT_NOTYPE, STB_LOCAL, kstrtab))
            if export.namespace:
                symbols.append(
                    (f"__kstrtabns_{export.name}", string_at[export.namespace], 0, STT_NOTYPE, STB_LOCAL, kstrtab)
                )
    # parameters: names in .rodata, variables in .data, kernel_param entries in __param
    rodata = b""
    data = b""
    param_rows: list[tuple[int, int, int, str]] = []  # (name offset, variable offset, perm|flags, ops)
    charp_relocs: list[tuple[int, int]] = []  # (.data offset of a char *, .rodata offset of its string)
    for param in spec.params:
        name_off = len(rodata)
        rodata += param.name.encode() + b"\0"
        while len(data) % 8:
            data += b"\0"
        var_off = len(data)
        if param.kind == "charp":
            data += bytes(8)
            if param.default is not None:
                charp_relocs.append((var_off, len(rodata)))
                rodata += str(param.default).encode() + b"\0"
        elif param.kind in ("bool", "invbool"):
            stored = bool(param.default) != (param.kind == "invbool")
            data += bytes([1 if stored else 0])
        else:
            size, signed = {
                "byte": (1, False),
                "short": (2, True),
                "ushort": (2, False),
                "int": (4, True),
                "uint": (4, False),
                "long": (8, True),
                "ulong": (8, False),
                "hexint": (4, False),
                "bint": (4, True),
                "ullong": (8, False),
            }[param.kind]
            data += int(str(param.default), 0).to_bytes(size, "little", signed=signed)
        param_rows.append(
            (name_off, var_off, param.perm | (0x1000000 if param.unsafe else 0), f"param_ops_{param.kind}")
        )
    this_module = bytes(24) + spec.name.encode().ljust(56, b"\0") + bytes(0x380 - 80)
    rodata_index = add(".rodata", rodata or b"\0", align=1)
    data_index = add(".data", data or b"\0", SHF_ALLOC | SHF_WRITE, align=8)
    param_index = add("__param", bytes(40 * len(param_rows)), align=8) if param_rows else 0
    this_index = add(".gnu.linkonce.this_module", this_module, SHF_ALLOC | SHF_WRITE, align=64)
    del this_index
    add(".bss", b"", SHF_ALLOC | SHF_WRITE, SHT_NOBITS, align=1, size=0)
    # section symbols and functions
    section_syms = {index: len(symbols) + position for position, index in enumerate((rodata_index, data_index))}
    symbols.append(_section_symbol(rodata_index))
    symbols.append(_section_symbol(data_index))
    first_global = len(symbols)
    symbols.append(("init_module", 0, 8, STT_FUNC, STB_GLOBAL, text))
    if spec.has_exit:
        symbols.append(("cleanup_module", 8, 8, STT_FUNC, STB_GLOBAL, text))
    for export in spec.exports:
        symbols.append((export.name, 16, 8, STT_FUNC, STB_GLOBAL, text))
    import_index: dict[str, int] = {}
    for sym, _crc in spec.imports:
        import_index[sym] = len(symbols)
        symbols.append((sym, 0, 0, STT_NOTYPE, STB_GLOBAL, 0))
    for sym in spec.weak_imports:
        symbols.append((sym, 0, 0, STT_NOTYPE, STB_WEAK, 0))
    for ops_name in sorted({row[3] for row in param_rows}):
        import_index[ops_name] = len(symbols)
        symbols.append((ops_name, 0, 0, STT_NOTYPE, STB_GLOBAL, 0))
    # __param entries and relocations
    relas = b""
    param_data = bytearray()
    for position, (name_off, var_off, perm_flags, ops) in enumerate(param_rows):
        perm, flags = perm_flags & 0xFFFF, perm_flags >> 24
        param_data += struct.pack("<QQQHbBxxxxQ", 0, 0, 0, perm, -1, flags, 0)
        base = 40 * position
        relas += struct.pack("<QQq", base, (section_syms[rodata_index] << 32) | R_X86_64_64, name_off)
        relas += struct.pack("<QQq", base + 16, (import_index[ops] << 32) | R_X86_64_64, 0)
        relas += struct.pack("<QQq", base + 32, (section_syms[data_index] << 32) | R_X86_64_64, var_off)
    if param_index:
        sections[param_index].data = bytes(param_data)
    # symbol and string tables
    strtab = b"\0"
    rows = []
    for name, value, size, sym_type, bind, shndx in symbols:
        offset = 0
        if name:
            offset = len(strtab)
            strtab += name.encode() + b"\0"
        rows.append(struct.pack("<IBBHQQ", offset, (bind << 4) | sym_type, 0, shndx, value, size))
    symtab_index = len(sections)
    add(".symtab", b"".join(rows), 0, SHT_SYMTAB, align=8, link=symtab_index + 1, info=first_global, entsize=24)
    add(".strtab", strtab, 0, SHT_STRTAB, align=1)
    if param_index:
        add(".rela__param", relas, SHF_INFO_LINK, SHT_RELA, align=8, link=symtab_index, info=param_index, entsize=24)
    if charp_relocs:
        data_relas = b"".join(
            struct.pack("<QQq", var_off, (section_syms[rodata_index] << 32) | R_X86_64_64, str_off)
            for var_off, str_off in charp_relocs
        )
        add(".rela.data", data_relas, SHF_INFO_LINK, SHT_RELA, align=8, link=symtab_index, info=data_index, entsize=24)
    shstrtab = b"\0"
    for section in sections[1:]:
        section.name_off = len(shstrtab)
        shstrtab += section.name.encode() + b"\0"
    shstrtab_index = len(sections)
    sections.append(_Section(".shstrtab", SHT_STRTAB, 0, shstrtab + b".shstrtab\0", name_off=len(shstrtab)))
    body = bytearray(64)
    offsets = [0]
    for section in sections[1:]:
        while len(body) % max(section.align, 1):
            body.append(0)
        offsets.append(len(body))
        if section.type != SHT_NOBITS:
            body += section.data
    while len(body) % 8:
        body.append(0)
    shoff = len(body)
    body += bytes(64)
    for index, section in enumerate(sections[1:], start=1):
        size = len(section.data) if section.size is None else section.size
        body += struct.pack(
            "<IIQQQQIIQQ",
            section.name_off,
            section.type,
            section.flags,
            0,
            offsets[index],
            size,
            section.link,
            section.info,
            section.align,
            section.entsize,
        )
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    header = struct.pack(
        "<HHIQQQIHHHHHH", 1, spec.machine, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(sections), shstrtab_index
    )
    body[0:64] = ident + header
    return bytes(body)


def signature_trailer(signed_module: bytes) -> bytes:
    """The appended signature of a signed module (signature data, struct, magic), to sign
    another image with the same signer and key for tests (the fake kernel checks no crypto)."""
    magic = b"~Module signature appended~\n"
    assert signed_module.endswith(magic)
    sig_len = struct.unpack(">I", signed_module[-len(magic) - 4 : -len(magic)])[0]
    return signed_module[-(len(magic) + 12 + sig_len) :]
