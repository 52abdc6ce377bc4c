"""A fake kernel: a directory standing in for ``/proc`` and ``/sys`` that behaves like Linux.

Under a root (``KVC_ROOT``) it keeps what the kernel shows about modules, in the kernel's own
formats, so that kmod's tools read the same state as ours:

* ``proc/modules`` (kernel/module/procfs.c), ``proc/sys/kernel/{osrelease,tainted,modules_disabled}``,
  ``proc/sys/kernel/random/boot_id`` (new for every fake kernel made);
* ``sys/module/NAME/{initstate,refcnt,coresize,initsize,taint,version,srcversion}``,
  ``holders/`` (links to the users) and ``parameters/`` (each parameter with a non-zero mode,
  showing its value as the kernel's ``param_get_*`` prints it);
* ``sys/module/compression`` when the kernel decompresses modules itself.

The state behind them lives in ``.kvc-fake-kernel/`` (``config.json``, ``state.json``, the
core kernel's export table read at creation, the ``dmesg`` log), written atomically (temp file,
rename) under an flock, so separate processes (the CLI, kmod's own tools) see one kernel. Like
a kernel's, the state does not outlive a reboot, so nothing is fsynced.

Loading follows ``load_module()`` of Linux 6.1 (kernel/module/main.c, version.c, signing.c,
kernel/params.c) step by step, with its errnos and its log lines: signature check (EBADMSG,
ENOPKG; unsigned or untrusted modules taint ``E``), ELF checks (ENOEXEC), blacklist (EPERM),
``module_layout`` CRC (ENOEXEC), vermagic (ENOEXEC), license/out-of-tree/staging/livepatch/test
taints, already loaded (EEXIST), symbol resolution against the core kernel's exports
(``Module.symvers`` and/or ``System.map``) and the loaded modules' (unknown: ENOENT, CRC
mismatch: EINVAL, namespace not imported: EINVAL), duplicate exports (ENOEXEC), and parameters
(EINVAL/ERANGE/ENOSPC; unknown ones are ignored with a warning). Using another module's
symbols takes a reference on it. ``delete_module`` refuses a module others use (EWOULDBLOCK,
even when forced), one in use otherwise (EWOULDBLOCK unless ``O_TRUNC``), one not live (EBUSY)
and one without exit function (EBUSY unless forced); an unknown name gives ENOENT.

What cannot be decided from the files is configured (:class:`KernelConfig`): which keys are
trusted, whether modversions/forced loading/unloading exist. Cryptographic signature checks are
not done: a well-formed PKCS#7 signature by a trusted key counts as valid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import marshal
import os
import re
import shutil
import stat
import struct
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from kvc.kmod import compression as _compression
from kvc.kmod.atomic import write_file
from kvc.kmod.errors import ModuleFormatError
from kvc.kmod.kernel.libkmod import SyscallKernel
from kvc.kmod.kernel.protocol import (
    MODULE_INIT_COMPRESSED_FILE,
    MODULE_INIT_FLAGS,
    MODULE_INIT_IGNORE_MODVERSIONS,
    MODULE_INIT_IGNORE_VERMAGIC,
    O_TRUNC,
    KernelError,
    LoadedModule,
    ModuleState,
)
from kvc.kmod.kernel.readers import (
    Export,
    parse_proc_modules,
    read_boot_id,
    read_module_state,
    read_symvers_exports,
    read_system_map_exports,
)
from kvc.kmod.paths import HostPaths
from kvc.kmod.signature import SIG_MAGIC, parse_signature

STATE_DIR = ".kvc-fake-kernel"
EXPORTS_FILE = "exports.marshal"  # ({symbol: crc}, {symbol: (crc, gpl, namespace)}) of the core kernel
PAGE_SIZE = 4096
MODULE_NAME_LEN = 56  # 64 - sizeof(unsigned long)

# Taint bits (include/linux/panic.h) and their letters; module_flags_taint() prints the bits
# that can be per-module, in bit order.
TAINT_PROPRIETARY_MODULE = 0
TAINT_FORCED_MODULE = 1
TAINT_FORCED_RMMOD = 3
TAINT_USER = 6
TAINT_CRAP = 10
TAINT_OOT_MODULE = 12
TAINT_UNSIGNED_MODULE = 13
TAINT_LIVEPATCH = 15
TAINT_TEST = 18
_TAINT_LETTERS = "PFSRMBUDAWCIOELKXTN"
_MODULE_TAINTS = (0, 1, 10, 12, 13, 15, 16, 17, 18)
_LOCKDEP_UNRELIABLE = {TAINT_PROPRIETARY_MODULE, TAINT_FORCED_MODULE, TAINT_FORCED_RMMOD}

_GPL_COMPATIBLE = ("GPL", "GPL v2", "GPL and additional rights", "Dual BSD/GPL", "Dual MIT/GPL", "Dual MPL/GPL")

# ELF constants the kernel checks.
_ET_REL = 1
_SHT_SYMTAB = 2
_SHT_RELA = 4
_SHT_NOBITS = 8
_SHT_REL = 9
_SHF_WRITE = 0x1
_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4
_SHF_RO_AFTER_INIT = 0x00200000
_SHN_UNDEF = 0
_SHN_LIVEPATCH = 0xFF20
_SHN_ABS = 0xFFF1
_SHN_COMMON = 0xFFF2
_STB_WEAK = 2
_EM_X86_64 = 62


@dataclass
class KernelConfig:
    """The fake kernel's build and boot configuration. Defaults are Debian 12's amd64 kernel."""

    release: str
    vermagic: str = ""
    symvers: Optional[str] = None  # Module.symvers: vmlinux lines are the core kernel's exports
    system_map: Optional[str] = None  # System.map: __ksymtab_<sym> entries, when there is no symvers
    modversions: bool = True  # CONFIG_MODVERSIONS
    force_load: bool = True  # CONFIG_MODULE_FORCE_LOAD
    unload: bool = True  # CONFIG_MODULE_UNLOAD
    force_unload: bool = True  # CONFIG_MODULE_FORCE_UNLOAD
    module_sig: bool = True  # CONFIG_MODULE_SIG
    sig_enforce: bool = False  # CONFIG_MODULE_SIG_FORCE / module.sig_enforce=1
    trusted_keys: Optional[list[str]] = None  # sig_key values (hex) of trusted keys; None: any key
    allow_missing_namespace_imports: bool = False  # CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS
    decompress: Optional[str] = None  # CONFIG_MODULE_DECOMPRESS with this compression (gzip, xz, zstd)
    dynamic_debug: bool = True  # CONFIG_DYNAMIC_DEBUG: "dyndbg" parameters are accepted
    livepatch: bool = True  # CONFIG_LIVEPATCH
    blacklist: list[str] = field(default_factory=list)  # module_blacklist= on the command line
    machine: int = _EM_X86_64  # e_machine the kernel accepts
    elf64: bool = True
    little_endian: bool = True

    def __post_init__(self) -> None:
        if not self.vermagic:
            self.vermagic = (
                f"{self.release} SMP preempt {'mod_unload ' if self.unload else ''}"
                f"{'modversions ' if self.modversions else ''}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def kconfig_options(path: str) -> dict[str, Any]:
    """:class:`KernelConfig` settings from a kernel ``.config`` (``/boot/config-RELEASE``)."""
    values: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = re.match(r"(CONFIG_\w+)=(.*)", line.strip())
            if match:
                values[match.group(1)] = match.group(2).strip('"')

    def on(name: str) -> bool:
        return values.get(name) == "y"

    options: dict[str, Any] = {
        "modversions": on("CONFIG_MODVERSIONS"),
        "force_load": on("CONFIG_MODULE_FORCE_LOAD"),
        "unload": on("CONFIG_MODULE_UNLOAD"),
        "force_unload": on("CONFIG_MODULE_FORCE_UNLOAD"),
        "module_sig": on("CONFIG_MODULE_SIG"),
        "sig_enforce": on("CONFIG_MODULE_SIG_FORCE"),
        "allow_missing_namespace_imports": on("CONFIG_MODULE_ALLOW_MISSING_NAMESPACE_IMPORTS"),
        "dynamic_debug": on("CONFIG_DYNAMIC_DEBUG") or on("CONFIG_DYNAMIC_DEBUG_CORE"),
        "livepatch": on("CONFIG_LIVEPATCH"),
    }
    if on("CONFIG_MODULE_DECOMPRESS"):
        for kind, option in (
            ("gzip", "CONFIG_MODULE_COMPRESS_GZIP"),
            ("xz", "CONFIG_MODULE_COMPRESS_XZ"),
            ("zstd", "CONFIG_MODULE_COMPRESS_ZSTD"),
        ):
            if on(option):
                options["decompress"] = kind
    return options


class _Refused(Exception):
    """load_module() or delete_module() failed with ``err``."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.err = err


# -- the kernel's view of a module image ---------------------------------------------------------


@dataclass(frozen=True)
class _Shdr:
    name: str
    type: int
    flags: int
    offset: int
    size: int
    link: int
    info: int
    addralign: int


@dataclass(frozen=True)
class _Sym:
    name: str
    value: int
    info: int
    shndx: int
    size: int = 0


class _Image:
    """A module image as load_module() parses it (``elf_validity_check``, ``find_sec``...)."""

    def __init__(self, data: bytes, config: KernelConfig, log: list[str]) -> None:
        self.data = data
        self.log = log
        self.is64 = config.elf64
        self.order = "<" if config.little_endian else ">"
        ehdr = self.order + ("HHIQQQIHHHHHH" if self.is64 else "HHIIIIIHHHHHH")
        if len(data) < 16 + struct.calcsize(ehdr):
            self._bad(f"Invalid ELF header len {len(data)}")
        if data[:4] != b"\x7fELF":
            self._bad("Invalid ELF header magic: != \x7fELF")
        (
            e_type,
            machine,
            _v,
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
        ) = struct.unpack_from(ehdr, data, 16)
        if e_type != _ET_REL:
            self._bad(f"Invalid ELF header type: {e_type} != {_ET_REL}")
        if machine != config.machine:
            self._bad(f"Invalid architecture in ELF header: {machine}")
        if shentsize != (64 if self.is64 else 40):
            self._bad("Invalid ELF section header size")
        if shoff >= len(data) or shnum * shentsize > len(data) - shoff:
            self._bad("Invalid ELF section header overflow")
        shdr = self.order + ("IIQQQQIIQQ" if self.is64 else "IIIIIIIIII")
        raw = [struct.unpack_from(shdr, data, shoff + i * shentsize) for i in range(shnum)]
        if shstrndx == 0 or shstrndx >= shnum:
            self._bad(f"Invalid ELF section name index: {shstrndx} || e_shstrndx ({shstrndx}) >= e_shnum ({shnum})")
        strs_off, strs_size = raw[shstrndx][4], raw[shstrndx][5]
        if strs_off + strs_size > len(data) or not strs_size or data[strs_off + strs_size - 1] != 0:
            self._bad("ELF Spec violation: section name table isn't null terminated")
        names = data[strs_off : strs_off + strs_size]
        self.sections: list[_Shdr] = []
        for index, (name_off, sh_type, flags, _addr, offset, size, link, info, align, _entsize) in enumerate(raw):
            if index and sh_type != _SHT_NOBITS and (offset + size > len(data) or offset + size < offset):
                self._bad(f"Module len {len(data)} truncated")
            end = names.find(b"\0", name_off)
            name = names[name_off:end].decode("utf-8", "surrogateescape") if name_off < len(names) else ""
            self.sections.append(_Shdr(name, sh_type, flags, offset, size, link, info, align))
        self.symtab_index = next((i for i, s in enumerate(self.sections) if s.type == _SHT_SYMTAB), 0)
        self.info_index = self.find_sec(".modinfo")
        self.name: Optional[str] = self.get_modinfo("name")
        self.mod_index = self.find_sec(".gnu.linkonce.this_module")
        if not self.mod_index:
            self._bad(f"{self.name or '(missing .modinfo section or name field)'}: No module found in object")
        if not self.symtab_index:
            self._bad(f"{self.name or '(missing .modinfo section or name field)'}: module has no symbols (stripped?)")
        mod = self.section_bytes(self.mod_index)
        offset = 24 if self.is64 else 12  # struct module: state, list_head list, name[]
        raw_name = mod[offset : offset + MODULE_NAME_LEN]
        self.mod_name = raw_name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if not self.name:
            self.name = self.mod_name
        self._relocs: dict[int, dict[int, tuple[int, int]]] = {}

    def _bad(self, message: str) -> None:
        self.log.append(message)
        raise _Refused(errno.ENOEXEC)

    def find_sec(self, name: str) -> int:
        """find_sec(): the first section with this name that is still SHF_ALLOC, or 0."""
        for index, section in enumerate(self.sections):
            if index and section.flags & _SHF_ALLOC and section.name == name:
                return index
        return 0

    def section_bytes(self, index: int) -> bytes:
        section = self.sections[index]
        if section.type == _SHT_NOBITS:
            return bytes(section.size)
        return self.data[section.offset : section.offset + section.size]

    def modinfo_entries(self, tag: str) -> list[str]:
        if not self.info_index:
            return []
        prefix = tag.encode() + b"="
        return [
            entry[len(prefix) :].decode("utf-8", "surrogateescape")
            for entry in self.section_bytes(self.info_index).split(b"\0")
            if entry.startswith(prefix)
        ]

    def get_modinfo(self, tag: str) -> Optional[str]:
        entries = self.modinfo_entries(tag)
        return entries[0] if entries else None

    @property
    def symbols(self) -> list[_Sym]:
        cached: Optional[list[_Sym]] = self.__dict__.get("_symbols")
        if cached is not None:
            return cached
        symtab = self.sections[self.symtab_index]
        strtab = self.section_bytes(symtab.link) if symtab.link < len(self.sections) else b""
        size = 24 if self.is64 else 16
        fmt = self.order + ("IBBHQQ" if self.is64 else "IIIBBH")
        data = self.section_bytes(self.symtab_index)
        symbols = []
        for pos in range(0, len(data) - size + 1, size):
            if self.is64:
                name_off, info, _other, shndx, value, size = struct.unpack_from(fmt, data, pos)
            else:
                name_off, value, size, info, _other, shndx = struct.unpack_from(fmt, data, pos)
            end = strtab.find(b"\0", name_off)
            name = strtab[name_off : end if end >= 0 else None].decode("utf-8", "surrogateescape")
            symbols.append(_Sym(name, value, info, shndx, size))
        self.__dict__["_symbols"] = symbols
        return symbols

    def relocations(self, target: int) -> dict[int, tuple[int, int]]:
        """{offset in section ``target``: (symbol index, addend)} from its REL/RELA sections."""
        if target in self._relocs:
            return self._relocs[target]
        found: dict[int, tuple[int, int]] = {}
        ptr = 8 if self.is64 else 4
        for section in self.sections:
            if section.type not in (_SHT_RELA, _SHT_REL) or section.info != target:
                continue
            entry = (24 if self.is64 else 12) if section.type == _SHT_RELA else (16 if self.is64 else 8)
            data = self.data[section.offset : section.offset + section.size]
            for pos in range(0, len(data) - entry + 1, entry):
                if self.is64:
                    offset, info = struct.unpack_from(self.order + "QQ", data, pos)
                    sym = info >> 32
                else:
                    offset, info = struct.unpack_from(self.order + "II", data, pos)
                    sym = info >> 8
                if section.type == _SHT_RELA:
                    (addend,) = struct.unpack_from(self.order + ("q" if self.is64 else "i"), data, pos + 2 * ptr)
                else:
                    addend = self._read_int(target, offset, ptr, signed=True) or 0
                found[offset] = (sym, addend)
        self._relocs[target] = found
        return found

    def _read_int(self, index: int, offset: int, size: int, *, signed: bool = False) -> Optional[int]:
        if not 0 < index < len(self.sections):
            return None
        data = self.section_bytes(index)
        if offset < 0 or offset + size > len(data):
            return None
        return int.from_bytes(data[offset : offset + size], "little" if self.order == "<" else "big", signed=signed)

    def pointer_at(self, index: int, offset: int) -> Union[str, tuple[int, int], None]:
        """What the pointer at ``index:offset`` points to after relocation: a (section, offset)
        inside the module, the name of an undefined symbol, or None (NULL)."""
        reloc = self.relocations(index).get(offset)
        if reloc is None:
            return None
        sym_index, addend = reloc
        if sym_index >= len(self.symbols):
            return None
        sym = self.symbols[sym_index]
        if sym.shndx == _SHN_UNDEF:
            return sym.name
        if sym.shndx >= len(self.sections):
            return None
        return (sym.shndx, sym.value + addend)

    def c_string(self, target: Union[str, tuple[int, int], None]) -> Optional[str]:
        if not isinstance(target, tuple):
            return None
        data = self.section_bytes(target[0])
        if not 0 <= target[1] <= len(data):
            return None
        end = data.find(b"\0", target[1])
        return data[target[1] : end if end >= 0 else None].decode("utf-8", "surrogateescape")


# -- module parameters (kernel/params.c) -----------------------------------------------------------

_INT_KINDS = {  # kind: (bytes, signed); long/ulong are pointer-sized
    "byte": (1, False),
    "short": (2, True),
    "ushort": (2, False),
    "int": (4, True),
    "uint": (4, False),
    "long": (8, True),
    "ulong": (8, False),
    "ullong": (8, False),
    "hexint": (4, False),
    "bint": (4, True),
}
_NOARG_KINDS = ("bool", "invbool", "bint", "bool_enable_only")


@dataclass
class _Param:
    name: str
    kind: str  # an _INT_KINDS key, bool, invbool, bool_enable_only, charp, string, array, custom
    perm: int
    value: Any  # int / bool / str / None (charp NULL) / list (array)
    unsafe: bool = False
    maxlen: int = 0  # string: buffer size
    elem: str = ""  # array: element kind
    max: int = 0  # array: capacity


def _kstrtoull(text: str, base: int = 0) -> int:
    """lib/kstrtox.c: an optional '+', a radix prefix (base 0), digits, an optional newline."""
    s = text[1:] if text.startswith("+") else text
    if base == 0:
        if s.startswith("0"):
            base = 16 if len(s) > 2 and s[1] in "xX" and s[2] in "0123456789abcdefABCDEF" else 8
        else:
            base = 10
    if base == 16 and s[:2].lower() == "0x":
        s = s[2:]
    digits = 0
    value = 0
    for char in s:
        digit = int(char, 36) if char.isascii() and char.isalnum() else 99
        if digit >= base:
            break
        value = value * base + digit
        digits += 1
    if digits == 0:
        raise _Refused(errno.EINVAL)
    rest = s[digits:]
    if rest.startswith("\n"):
        rest = rest[1:]
    if rest:
        raise _Refused(errno.EINVAL)
    if value >= 1 << 64:
        raise _Refused(errno.ERANGE)
    return value


def _kstrto(text: str, size: int, signed: bool) -> int:
    bits = size * 8
    if signed and text.startswith("-"):
        magnitude = _kstrtoull(text[1:])
        if magnitude > 1 << (bits - 1):
            raise _Refused(errno.ERANGE)
        return -magnitude
    value = _kstrtoull(text)
    if value >= 1 << (bits - 1 if signed else bits):
        raise _Refused(errno.ERANGE)
    return value


def _kstrtobool(text: Optional[str]) -> bool:
    if text is None:
        raise _Refused(errno.EINVAL)
    if text[:1] in ("y", "Y", "1"):
        return True
    if text[:1] in ("n", "N", "0"):
        return False
    if text[:1] in ("o", "O") and text[1:2] in ("n", "N"):
        return True
    if text[:1] in ("o", "O") and text[1:2] in ("f", "F"):
        return False
    raise _Refused(errno.EINVAL)


def _set_value(kind: str, val: Optional[str], current: Any, log: list[str], name: str, maxlen: int = 0) -> Any:
    """The value a ``param_set_<kind>`` stores for ``val`` (None: no '='), or _Refused."""
    if kind in _INT_KINDS:
        size, signed = _INT_KINDS[kind]
        if kind == "bint":
            return int(_kstrtobool("1" if val is None else val))
        return _kstrto(val or "", size, signed)
    if kind in ("bool", "invbool"):
        return _kstrtobool("1" if val is None else val)
    if kind == "bool_enable_only":
        new = _kstrtobool("1" if val is None else val)
        if not new and current:
            raise _Refused(errno.EROFS)
        return new or current
    if kind == "charp":
        text = val or ""
        if len(text.encode("utf-8", "surrogateescape")) > 1024:
            log.append(f"{name}: string parameter too long")
            raise _Refused(errno.ENOSPC)
        return text
    if kind == "string":
        text = val or ""
        if maxlen and len(text.encode("utf-8", "surrogateescape")) + 1 > maxlen:
            log.append(f"{name}: string doesn't fit in {maxlen - 1} chars.")
            raise _Refused(errno.ENOSPC)
        return text
    return val or ""


def _show_value(kind: str, value: Any) -> str:
    """What ``param_get_<kind>`` prints (with its newline)."""
    if kind == "hexint":
        return (f"0x{value:06x}" if value else "00000000") + "\n"
    if kind in _INT_KINDS:
        return f"{value}\n"
    if kind in ("bool", "bool_enable_only"):
        return "Y\n" if value else "N\n"
    if kind == "invbool":
        return "Y\n" if value else "N\n"
    if kind == "charp":
        return f"{'(null)' if value is None else value}\n"
    return f"{value if value is not None else ''}\n"


def _next_arg(args: str) -> tuple[str, Optional[str], str]:
    """lib/cmdline.c next_arg(): (param, value or None, rest), with the kernel's quote rules."""
    in_quote = quoted = False
    if args.startswith('"'):
        args = args[1:]
        in_quote = quoted = True
    equals = 0
    i = 0
    while i < len(args):
        char = args[i]
        if char.isspace() and not in_quote:
            break
        if equals == 0 and char == "=":
            equals = i
        if char == '"':
            in_quote = not in_quote
        i += 1
    word = args[:i]
    rest = args[i + 1 :] if i < len(args) else ""
    trim_end = quoted and i > 0 and word.endswith('"')
    if not equals:
        param, val = (word[:-1] if trim_end else word), None
    else:
        param, val = word[:equals], word[equals + 1 :]
        if val.startswith('"'):
            val = val[1:]
            if word.endswith('"'):
                val = val[:-1]
                trim_end = False
        if trim_end and val.endswith('"'):
            val = val[:-1]
    return param, val, rest.lstrip()


def _parameq(a: str, b: str) -> bool:
    return a.replace("-", "_") == b.replace("-", "_")


def _read_core_exports(config: KernelConfig) -> dict[str, Export]:
    core: dict[str, Export] = {}
    if config.system_map:
        found = read_system_map_exports(config.system_map)
        if found is None:
            raise KernelError(errno.ENOSYS, f"fake kernel: cannot read {config.system_map}")
        core.update(found)
    if config.symvers:
        owners = read_symvers_exports(config.symvers, "vmlinux")
        if owners is None:
            raise KernelError(errno.ENOSYS, f"fake kernel: cannot read {config.symvers}")
        core.update(owners.get("vmlinux", {}))
    return core


# -- the fake kernel ------------------------------------------------------------------------------


class FakeKernel(SyscallKernel):
    """The fake kernel kept under ``paths.root`` (see the module docstring).

    ``FakeKernel(paths)`` attaches to one made by :meth:`create`."""

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.state_dir = paths.host(f"/{STATE_DIR}")
        self._config: Optional[KernelConfig] = None
        self._core: Optional[tuple[dict[str, int], dict[str, tuple[Optional[int], bool, str]]]] = None
        self._last_log: list[str] = []

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        paths: HostPaths,
        release: str,
        *,
        symvers: Optional[str] = None,
        system_map: Optional[str] = None,
        vermagic: Optional[str] = None,
        kconfig: Optional[str] = None,
        builtin_modules: Sequence[str] = (),
        **options: Any,
    ) -> FakeKernel:
        """A fresh fake kernel under ``paths.root`` with nothing loaded. ``symvers``/``system_map``
        give the core kernel's exports; ``kconfig`` (a ``.config``) and ``options``
        (:class:`KernelConfig` fields) its configuration; ``builtin_modules`` get a
        ``/sys/module`` directory without ``initstate``, as built-in modules with parameters have."""
        settings: dict[str, Any] = kconfig_options(kconfig) if kconfig else {}
        settings.update(options)
        config = KernelConfig(
            release,
            vermagic or "",
            os.path.abspath(symvers) if symvers else None,
            os.path.abspath(system_map) if system_map else None,
            **settings,
        )
        kernel = cls(paths)
        if os.path.isdir(kernel.state_dir):
            shutil.rmtree(kernel.state_dir)
        for stale in (paths.sys_module, os.path.join(paths.proc, "modules")):
            if os.path.isdir(stale):
                shutil.rmtree(stale)
        os.makedirs(paths.sys_module, exist_ok=True)
        write_file(paths.host("/proc/sys/kernel/osrelease"), release + "\n", volatile=True)
        write_file(paths.host("/proc/sys/kernel/modules_disabled"), "0\n", volatile=True)
        write_file(paths.host("/proc/sys/kernel/random/boot_id"), f"{uuid.uuid4()}\n", 0o444, volatile=True)
        write_file(
            os.path.join(kernel.state_dir, "config.json"),
            json.dumps(asdict(config), indent=2) + "\n",
            volatile=True,
        )
        write_file(os.path.join(kernel.state_dir, "dmesg"), "", volatile=True)
        core = _read_core_exports(config)
        write_file(
            os.path.join(kernel.state_dir, EXPORTS_FILE),
            marshal.dumps(
                (
                    {name: export.crc or 0 for name, export in core.items()},
                    {name: tuple(export) for name, export in core.items()},
                )
            ),
            volatile=True,
        )
        if config.decompress:
            write_file(os.path.join(paths.sys_module, "compression"), config.decompress + "\n", 0o444, volatile=True)
        for name in builtin_modules:
            os.makedirs(os.path.join(paths.sys_module, name, "parameters"), exist_ok=True)
        with kernel._locked():
            kernel._save({"modules": [], "taint": 0, "once": []})
        return kernel

    # -- state --------------------------------------------------------------------------------

    @property
    def config(self) -> KernelConfig:
        if self._config is None:
            try:
                with open(os.path.join(self.state_dir, "config.json"), encoding="utf-8") as handle:
                    self._config = KernelConfig.from_dict(json.load(handle))
            except (OSError, ValueError, TypeError) as exc:
                raise KernelError(errno.ENOSYS, f"no fake kernel under {self.paths.root}: {exc}") from None
        return self._config

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.state_dir, exist_ok=True)
        with open(os.path.join(self.state_dir, "lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _load(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.state_dir, "state.json"), encoding="utf-8") as handle:
                data: dict[str, Any] = json.load(handle)
                return data
        except (OSError, ValueError) as exc:
            raise KernelError(errno.ENOSYS, f"no fake kernel under {self.paths.root}: {exc}") from None

    def _save(self, state: dict[str, Any]) -> None:
        """Persist the state, then render /proc and /sys from it."""
        previous = set(state.get("sysfs", []))
        state["sysfs"] = sorted(mod["name"] for mod in state["modules"])
        write_file(os.path.join(self.state_dir, "state.json"), json.dumps(state, indent=1) + "\n", volatile=True)
        self._render(state, previous)

    def _render(self, state: dict[str, Any], previous: set[str]) -> None:
        config = self.config
        lines = []
        address = "0x" + "0" * (16 if config.elf64 else 8)
        for mod in state["modules"]:  # newest first, as the kernel's list
            if config.unload:
                deps = "".join(f"{user}," for user in mod["users"])
                if mod["permanent"]:
                    deps += "[permanent],"
                unload = f" {_refcount(mod)} {deps or '-'}"
            else:
                unload = " - -"
            status = {"live": "Live", "coming": "Loading", "going": "Unloading"}[mod["state"]]
            flags = _module_flags(mod)
            lines.append(f"{mod['name']} {mod['size']}{unload} {status} {address}{' ' + flags if flags else ''}\n")
        write_file(os.path.join(self.paths.proc, "modules"), "".join(lines), 0o444, volatile=True)
        write_file(self.paths.host("/proc/sys/kernel/tainted"), f"{state['taint']}\n", volatile=True)
        for name in previous - set(state["sysfs"]):
            shutil.rmtree(os.path.join(self.paths.sys_module, name), ignore_errors=True)
        for mod in state["modules"]:
            self._render_module(mod)

    def _render_module(self, mod: dict[str, Any]) -> None:
        base = os.path.join(self.paths.sys_module, mod["name"])
        write_file(os.path.join(base, "initstate"), mod["state"] + "\n", 0o444, volatile=True)
        if self.config.unload:
            write_file(os.path.join(base, "refcnt"), f"{_refcount(mod)}\n", 0o444, volatile=True)
        write_file(os.path.join(base, "coresize"), f"{mod['size']}\n", 0o444, volatile=True)
        write_file(os.path.join(base, "initsize"), "0\n", 0o444, volatile=True)
        write_file(os.path.join(base, "taint"), _taint_letters(mod["taint"]) + "\n", 0o444, volatile=True)
        for key in ("version", "srcversion"):
            if mod.get(key) is not None:
                write_file(os.path.join(base, key), mod[key] + "\n", 0o444, volatile=True)
        holders = os.path.join(base, "holders")
        os.makedirs(holders, exist_ok=True)
        for entry in os.listdir(holders):
            if entry not in mod["users"]:
                os.unlink(os.path.join(holders, entry))
        for user in reversed(mod["users"]):
            link = os.path.join(holders, user)
            if not os.path.lexists(link):
                os.symlink(f"../../{user}", link)
        shown = [param for param in mod["params"] if param["perm"]]
        params_dir = os.path.join(base, "parameters")
        if shown:
            for param in shown:
                path = os.path.join(params_dir, param["name"])
                write_file(path, _show_param(param), (param["perm"] & 0o777) | stat.S_IRUSR, volatile=True)

    def log(self, *lines: str) -> None:
        """Append lines to the fake kernel log."""
        with open(os.path.join(self.state_dir, "dmesg"), "a", encoding="utf-8", errors="surrogateescape") as log:
            log.writelines(line + "\n" for line in lines)

    def dmesg(self) -> list[str]:
        """The kernel log so far, oldest first."""
        try:
            with open(os.path.join(self.state_dir, "dmesg"), encoding="utf-8", errors="surrogateescape") as log:
                return log.read().splitlines()
        except OSError:
            return []

    def tainted(self) -> int:
        """The kernel's taint mask (``/proc/sys/kernel/tainted``)."""
        return int(self._load()["taint"])

    # -- the Kernel protocol ------------------------------------------------------------------

    def boot_id(self) -> Optional[str]:
        return read_boot_id(self.paths)

    def elf_machine(self) -> int:
        return self.config.machine

    def release(self) -> str:
        return self.config.release

    def loaded_modules(self) -> list[LoadedModule]:
        try:
            with open(os.path.join(self.paths.proc, "modules"), encoding="utf-8", errors="surrogateescape") as handle:
                return parse_proc_modules(handle.read())
        except OSError:
            return []

    def module_state(self, name: str) -> Optional[ModuleState]:
        return read_module_state(self.paths.sys_module, name)

    def compression(self) -> Optional[str]:
        try:
            with open(os.path.join(self.paths.sys_module, "compression"), encoding="utf-8") as handle:
                return handle.read().strip() or None
        except OSError:
            return None

    def _core_table(self) -> tuple[dict[str, int], dict[str, tuple[Optional[int], bool, str]]]:
        """The core kernel's exported symbols (vmlinux lines of Module.symvers, else System.map),
        read once by :meth:`create` into the state, as a kernel has its table from boot on: the
        CRCs, and each symbol's (crc, gpl, namespace). Plain tuples: the boot path's load asks
        about a few symbols of 10,000."""
        if self._core is None:
            try:
                with open(os.path.join(self.state_dir, EXPORTS_FILE), "rb") as handle:
                    crcs, details = marshal.loads(handle.read())  # load(handle) reads in small pieces: 7x slower
            except (OSError, EOFError, ValueError, TypeError) as exc:
                raise KernelError(errno.ENOSYS, f"no fake kernel under {self.paths.root}: {exc}") from None
            self._core = (crcs, details)
        return self._core

    def core_export(self, symbol: str) -> Optional[Export]:
        """The core kernel's export of ``symbol``, or None."""
        entry = self._core_table()[1].get(symbol)
        return None if entry is None else Export(*entry)

    def exported_symbols(self) -> Mapping[str, int]:
        """Every symbol a module could use now: the core kernel's and the loaded modules'."""
        exports = dict(self._core_table()[0])
        for mod in self._load()["modules"]:
            exports.update({name: info[0] or 0 for name, info in mod["exports"].items()})
        return exports

    def _raise(self, err: int, what: str) -> None:
        if err:
            raise KernelError(err, f"{what}: {os.strerror(err)}", tuple(self._last_log))

    # -- test hooks ----------------------------------------------------------------------------

    def module_get(self, name: str, count: int = 1) -> None:
        """try_module_get() by someone outside the module list (an open device, a socket)."""
        with self._locked():
            state = self._load()
            mod = _find(state, name)
            if mod is None:
                raise KernelError(errno.ENOENT, f"{name} is not loaded")
            mod["refs"] += count
            self._save(state)

    def module_put(self, name: str, count: int = 1) -> None:
        self.module_get(name, -count)

    def set_initstate(self, name: str, initstate: str) -> None:
        """Put a module in ``coming`` or ``going`` (or back to ``live``), as during init/exit."""
        if initstate not in ("live", "coming", "going"):
            raise ValueError(initstate)
        with self._locked():
            state = self._load()
            mod = _find(state, name)
            if mod is None:
                raise KernelError(errno.ENOENT, f"{name} is not loaded")
            mod["state"] = initstate
            self._save(state)

    # -- syscalls -----------------------------------------------------------------------------

    def _may_init_module(self, log: list[str]) -> None:
        if not _has_cap_sys_module():
            raise _Refused(errno.EPERM)
        try:
            with open(self.paths.host("/proc/sys/kernel/modules_disabled"), encoding="ascii") as handle:
                disabled = handle.read().strip() == "1"
        except OSError:
            disabled = False
        if disabled:
            raise _Refused(errno.EPERM)

    def _syscall(self, body: Any, *args: Any) -> int:
        log: list[str] = []
        self._last_log = log
        try:
            with self._locked():
                body(log, *args)
            return 0
        except _Refused as refused:
            return refused.err
        finally:
            if log:
                self.log(*log)

    def sys_finit_module(self, fd: int, params: str, flags: int) -> int:
        return self._syscall(self._finit, fd, params, flags)

    def sys_init_module(self, image: bytes, params: str) -> int:
        return self._syscall(self._init, image, params)

    def sys_delete_module(self, name: str, flags: int) -> int:
        return self._syscall(self._delete, name, flags)

    def finit_module(self, path: str, params: str = "", flags: int = 0) -> None:
        """finit_module(2) on an opened ``path``; raises :class:`KernelError`."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._raise(self.sys_finit_module(fd, params, flags), f"finit_module({path})")
        finally:
            os.close(fd)

    def init_module(self, image: bytes, params: str = "") -> None:
        """init_module(2) with an image in memory; raises :class:`KernelError`."""
        self._raise(self.sys_init_module(image, params), "init_module")

    def delete_module(self, name: str, flags: int = 0) -> None:
        """delete_module(2); raises :class:`KernelError`."""
        self._raise(self.sys_delete_module(name, flags), f"delete_module({name})")

    def _finit(self, log: list[str], fd: int, params: str, flags: int) -> None:
        self._may_init_module(log)
        if flags & ~MODULE_INIT_FLAGS:
            raise _Refused(errno.EINVAL)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _Refused(errno.EINVAL)
            data = os.pread(fd, info.st_size, 0)
        except OSError as exc:
            raise _Refused(exc.errno or errno.EBADF) from None
        if not data:
            raise _Refused(errno.EINVAL)
        if flags & MODULE_INIT_COMPRESSED_FILE:
            data = self._decompress(log, data)
        self._load_module(log, data, params, flags)

    def _init(self, log: list[str], image: bytes, params: str) -> None:
        self._may_init_module(log)
        self._load_module(log, image, params, 0)

    def _decompress(self, log: list[str], data: bytes) -> bytes:
        kind = self.config.decompress
        if kind is None:
            raise _Refused(errno.EOPNOTSUPP)
        if _compression.detect(data) != kind:
            log.append(f"not {'an' if kind == 'xz' else 'a'} {kind} compressed module")
            raise _Refused(errno.EINVAL)
        try:
            _kind, image = _compression.decompress(data, "<module>")
        except ModuleFormatError:
            log.append(f"{kind} decompression failed")
            raise _Refused(errno.EINVAL) from None
        return bytes(image)

    # -- load_module() -------------------------------------------------------------------------

    def _load_module(self, log: list[str], data: bytes, params: str, flags: int) -> None:
        state = self._load()
        before = json.dumps([state["taint"], state["once"], state.get("debug_locks_off")])
        try:
            self._load_into(log, state, data, params, flags)
        except _Refused:
            # A failed load keeps what it did to the kernel's taint (add_taint() is immediate).
            if json.dumps([state["taint"], state["once"], state.get("debug_locks_off")]) != before:
                self._save(state)
            raise

    def _load_into(self, log: list[str], state: dict[str, Any], data: bytes, params: str, flags: int) -> None:
        config = self.config
        sig_ok = self._module_sig_check(log, data, flags)
        image = _Image(data, config, log)
        name = image.name or image.mod_name
        if name in config.blacklist:
            log.append(f"Module {name} is blacklisted")
            raise _Refused(errno.EPERM)
        versions_index = 0 if flags & MODULE_INIT_IGNORE_MODVERSIONS else image.find_sec("__versions")
        versions = _modversions(image, versions_index)
        mod_taint = 0

        def taint(bit: int, *, warn: str = "") -> None:
            nonlocal mod_taint
            if warn and not state["taint"] & (1 << bit):
                log.append(warn)
            self._add_taint(state, log, bit)
            mod_taint |= 1 << bit

        def force_load(reason: str) -> bool:
            if not config.force_load:
                return False
            taint(TAINT_FORCED_MODULE, warn=f"{image.mod_name}: {reason}: kernel tainted.")
            return True

        def check_version(symbol: str, crc: Optional[int]) -> bool:
            if crc is None or not config.modversions:
                return True
            if not versions_index:
                return force_load(symbol)
            if symbol in versions:
                if versions[symbol] == crc:
                    return True
                log.append(f"{name}: disagrees about version of symbol {symbol}")
                return False
            self._once(state, log, "no symbol version", f"{name}: no symbol version for {symbol}")
            return True

        # check_modstruct_version()
        layout = self.core_export("module_layout")
        if config.modversions and layout is not None and not check_version("module_layout", layout.crc):
            raise _Refused(errno.ENOEXEC)
        # layout_and_allocate() -> check_modinfo()
        modmagic = None if flags & MODULE_INIT_IGNORE_VERMAGIC else image.get_modinfo("vermagic")
        if modmagic is None:
            if not force_load("bad vermagic"):
                raise _Refused(errno.ENOEXEC)
        elif not _same_magic(modmagic, config.vermagic, bool(versions_index)):
            log.append(f"{name}: version magic '{modmagic}' should be '{config.vermagic}'")
            raise _Refused(errno.ENOEXEC)
        if image.get_modinfo("intree") is None:
            taint(TAINT_OOT_MODULE, warn=f"{image.mod_name}: loading out-of-tree module taints kernel.")
        if image.get_modinfo("staging") is not None:
            taint(TAINT_CRAP)
            log.append(
                f"{image.mod_name}: module is from the staging directory, the quality is unknown, you have been warned."
            )
        if image.get_modinfo("livepatch") is not None:
            if not config.livepatch:
                log.append(f"{image.mod_name}: module is marked as livepatch module, but livepatch support is disabled")
                raise _Refused(errno.ENOEXEC)
            taint(TAINT_LIVEPATCH)
            self._once(state, log, "livepatch", f"{image.mod_name}: tainting kernel with TAINT_LIVEPATCH")
        license_name = image.get_modinfo("license") or "unspecified"
        if license_name not in _GPL_COMPATIBLE:
            taint(TAINT_PROPRIETARY_MODULE, warn=f"{image.mod_name}: module license '{license_name}' taints kernel.")
        if image.get_modinfo("test") is not None:
            taint(TAINT_TEST, warn=f"{image.mod_name}: loading test module taints kernel.")
        # add_unformed_module()
        if _find(state, image.mod_name) is not None:
            raise _Refused(errno.EEXIST)
        if config.module_sig and not sig_ok:
            self._once(
                state,
                log,
                "unsigned",
                f"{image.mod_name}: module verification failed: signature "
                "and/or required key missing - tainting kernel",
            )
            taint(TAINT_UNSIGNED_MODULE)
        # find_module_sections(): the kernel's hard-coded license offenders
        if image.mod_name == "ndiswrapper":
            self._add_taint(state, log, TAINT_PROPRIETARY_MODULE)
        if image.mod_name in ("driverloader", "lve"):
            taint(TAINT_PROPRIETARY_MODULE)
        exports = _module_exports(image)
        if (
            config.modversions
            and (
                (any(not e.gpl for e in exports.values()) and not image.find_sec("__kcrctab"))
                or (any(e.gpl for e in exports.values()) and not image.find_sec("__kcrctab_gpl"))
            )
            and not force_load("no versions for exported symbols")
        ):
            raise _Refused(errno.ENOEXEC)
        # simplify_symbols() -> resolve_symbol()
        uses: list[str] = []
        using_gplonly = False
        failure = 0
        imported_ns = image.modinfo_entries("import_ns")
        for sym in image.symbols[1:]:
            if sym.shndx == _SHN_COMMON:
                if not sym.name.startswith("__gnu_lto"):
                    log.append(f"{image.mod_name}: please compile with -fno-common")
                    failure = errno.ENOEXEC
                continue
            if sym.shndx != _SHN_UNDEF:
                continue
            gplok = not mod_taint & (1 << TAINT_PROPRIETARY_MODULE)
            owner, export = self._find_symbol(state, sym.name, gplok)
            result = 0
            if export is None:
                result = errno.ENOENT
            else:
                if export.gpl:
                    using_gplonly = True
                if owner is not None and _find(state, owner)["taint"] & (1 << TAINT_PROPRIETARY_MODULE):
                    if using_gplonly:
                        log.append(
                            f"{image.mod_name}: module using GPL-only symbols uses symbols {sym.name} "
                            f"from proprietary module {owner}."
                        )
                        export = None
                        result = errno.ENOENT
                    elif not mod_taint & (1 << TAINT_PROPRIETARY_MODULE):
                        log.append(
                            f"{image.mod_name}: module uses symbols {sym.name} from proprietary module "
                            f"{owner}, inheriting taint."
                        )
                        mod_taint |= 1 << TAINT_PROPRIETARY_MODULE
                if export is not None and not result and not check_version(sym.name, export.crc):
                    result = errno.EINVAL
                if export is not None and not result and export.namespace and export.namespace not in imported_ns:
                    log.append(
                        f"{image.mod_name}: module uses symbol ({sym.name}) from namespace "
                        f"{export.namespace}, but does not import it."
                    )
                    if not config.allow_missing_namespace_imports:
                        result = errno.EINVAL
                if not result and owner is not None and owner not in uses:
                    provider = _find(state, owner)
                    if provider["state"] == "coming":
                        log.append(f"{image.mod_name}: gave up waiting for init of module {owner}.")
                        result = errno.EBUSY
                    elif provider["state"] == "going":
                        result = errno.ENOENT
                    else:
                        uses.append(owner)
            if export is None and sym.info >> 4 == _STB_WEAK:
                continue  # an unresolved weak symbol is fine; a refused one is not
            if result:
                log.append(f"{image.mod_name}: Unknown symbol {sym.name} (err -{result})")
                failure = result
        if failure:
            raise _Refused(failure)
        # complete_formation() -> verify_exported_symbols()
        for symbol in exports:
            owner, export = self._find_symbol(state, symbol, True)
            if export is not None:
                log.append(f"{image.mod_name}: exports duplicate symbol {symbol} (owned by {owner or 'kernel'})")
                raise _Refused(errno.ENOEXEC)
        # parse_args()
        kparams = _module_params(image)
        err = self._parse_args(log, state, image.mod_name, params, kparams)
        if err:
            raise _Refused(err)
        # mod_sysfs_setup(): a /sys/module directory of that name (a built-in) already exists
        if os.path.isdir(os.path.join(self.paths.sys_module, image.mod_name)):
            log.append(f"{image.mod_name}: module is already loaded")
            raise _Refused(errno.EINVAL)
        names = {s.name for s in image.symbols if s.shndx != _SHN_UNDEF}
        entry = {
            "name": image.mod_name,
            "size": _core_size(image),
            "state": "live",
            "taint": mod_taint,
            "users": [],
            "uses": uses,
            "refs": 0,
            "permanent": "init_module" in names and "cleanup_module" not in names,
            "exports": {sym: [e.crc, e.gpl, e.namespace] for sym, e in exports.items()},
            "params": [asdict(param) for param in kparams],
            "version": image.get_modinfo("version"),
            "srcversion": image.get_modinfo("srcversion"),
            # What the kernel was given (decompressed), so tests can tell which file's bytes it holds.
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        for owner in uses:
            _find(state, owner)["users"].insert(0, image.mod_name)
        state["modules"].insert(0, entry)
        self._save(state)

    def _module_sig_check(self, log: list[str], data: bytes, flags: int) -> bool:
        """module_sig_check(): True when the signature is good; raises for fatal problems."""
        config = self.config
        if not config.module_sig:
            return False
        err = errno.ENODATA
        mangled = flags & (MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC)
        if not mangled and len(data) > len(SIG_MAGIC) and data.endswith(SIG_MAGIC):
            err = self._verify_sig(log, data)
            if not err:
                return True
        reason = {
            errno.ENODATA: "unsigned module",
            errno.ENOPKG: "module with unsupported crypto",
            errno.ENOKEY: "module with unavailable key",
        }.get(err)
        if reason is None:
            raise _Refused(err)
        if config.sig_enforce:
            log.append(f"Loading of {reason} is rejected")
            raise _Refused(errno.EKEYREJECTED)
        return False

    def _verify_sig(self, log: list[str], data: bytes) -> int:
        body = data[: -len(SIG_MAGIC)]
        if len(body) <= 12:
            return errno.EBADMSG
        algo, hash_, id_type, signer_len, key_id_len, p0, p1, p2, sig_len = struct.unpack(">BBBBBBBBI", body[-12:])
        if sig_len >= len(body) - 12:
            return errno.EBADMSG
        if id_type != 2:
            log.append("module: not signed with expected PKCS#7 message")
            return errno.ENOPKG
        if algo or hash_ or signer_len or key_id_len or p0 or p1 or p2:
            log.append("module: PKCS#7 signature info has unexpected non-zero params")
            return errno.EBADMSG
        try:
            signature = parse_signature(data)
        except ModuleFormatError:
            return errno.EBADMSG
        if signature is None:
            return errno.EBADMSG
        trusted = self.config.trusted_keys
        if trusted is not None and signature.key_id.hex().upper() not in {
            key.replace(":", "").upper() for key in trusted
        }:
            return errno.ENOKEY
        return 0

    def _find_symbol(self, state: dict[str, Any], symbol: str, gplok: bool) -> tuple[Optional[str], Optional[Export]]:
        """find_symbol(): the core kernel first, then the modules, newest first."""
        export = self.core_export(symbol)
        if export is not None:
            return (None, export) if gplok or not export.gpl else (None, None)
        for mod in state["modules"]:
            info = mod["exports"].get(symbol)
            if info is not None:
                found = Export(info[0], bool(info[1]), info[2])
                return (mod["name"], found) if gplok or not found.gpl else (None, None)
        return None, None

    def _add_taint(self, state: dict[str, Any], log: list[str], bit: int) -> None:
        if bit in _LOCKDEP_UNRELIABLE and not state.get("debug_locks_off"):
            state["debug_locks_off"] = True
            log.append("Disabling lock debugging due to kernel taint")
        state["taint"] |= 1 << bit

    def _once(self, state: dict[str, Any], log: list[str], key: str, line: str) -> None:
        """pr_*_once(): each call site logs once per boot."""
        if key not in state["once"]:
            state["once"].append(key)
            log.append(line)

    def _parse_args(self, log: list[str], state: dict[str, Any], modname: str, args: str, kparams: list[_Param]) -> int:
        """parse_args() with unknown_module_param_cb: 0, or the last parameter's error."""
        err = 0
        rest = args.lstrip()
        while rest:
            param, val, rest = _next_arg(rest)
            if val is None and param == "--":
                if rest:
                    log.append(f"{modname}: parameters '{rest}' after `--' ignored")
                return err
            ret = 0
            kp = next((p for p in kparams if _parameq(param, p.name)), None)
            if kp is None:
                base = param.split(".", 1)[1] if "." in param else param
                if param != "async_probe" and not (self.config.dynamic_debug and base == "dyndbg"):
                    log.append(f"{modname}: unknown parameter '{param}' ignored")
            elif val is None and kp.kind not in _NOARG_KINDS:
                ret = errno.EINVAL
            else:
                try:
                    if kp.unsafe:
                        log.append(f"Setting dangerous option {kp.name} - tainting kernel")
                        self._add_taint(state, log, TAINT_USER)
                    kp.value = self._set_param(log, kp, val)
                except _Refused as refused:
                    ret = refused.err
            if ret == errno.ENOSPC:
                log.append(f"{modname}: `{val or ''}' too large for parameter `{param}'")
            elif ret:
                log.append(f"{modname}: `{val or ''}' invalid for parameter `{param}'")
            if ret:
                err = ret
        return err

    def _set_param(self, log: list[str], kp: _Param, val: Optional[str]) -> Any:
        if kp.kind != "array":
            return _set_value(kp.kind, val, kp.value, log, kp.name, kp.maxlen)
        text = val or ""
        values: list[Any] = []
        while True:
            if kp.max and len(values) == kp.max:
                log.append(f"{kp.name}: can only take {kp.max} arguments")
                raise _Refused(errno.EINVAL)
            item, sep, text = text.partition(",")
            values.append(_set_value(kp.elem, item, None, log, kp.name))
            if not sep:
                return values

    # -- delete_module() ---------------------------------------------------------------------------

    def _delete(self, log: list[str], name: str, flags: int) -> None:
        config = self.config
        if not config.unload:
            raise _Refused(errno.ENOSYS)
        self._may_init_module(log)
        name = name.encode("utf-8", "surrogateescape")[: MODULE_NAME_LEN - 1].decode("utf-8", "surrogateescape")
        state = self._load()
        mod = _find(state, name)
        if mod is None:
            raise _Refused(errno.ENOENT)
        if mod["users"]:
            raise _Refused(errno.EWOULDBLOCK)
        if mod["state"] != "live":
            raise _Refused(errno.EBUSY)
        forced = config.force_unload and bool(flags & O_TRUNC)
        if mod["permanent"]:
            if not forced:
                raise _Refused(errno.EBUSY)
            self._add_taint(state, log, TAINT_FORCED_RMMOD)
        if _refcount(mod):
            if not forced:
                raise _Refused(errno.EWOULDBLOCK)
            self._add_taint(state, log, TAINT_FORCED_RMMOD)
        state["modules"].remove(mod)
        for other in state["modules"]:
            if name in other["users"]:
                other["users"].remove(name)
        self._save(state)


# -- helpers ------------------------------------------------------------------------------------


def _find(state: Mapping[str, Any], name: str) -> Any:
    return next((mod for mod in state["modules"] if mod["name"] == name), None)


def _refcount(mod: Mapping[str, Any]) -> int:
    return len(mod["users"]) + int(mod["refs"])


def _taint_letters(mask: int) -> str:
    return "".join(_TAINT_LETTERS[bit] for bit in _MODULE_TAINTS if mask & (1 << bit))


def _module_flags(mod: Mapping[str, Any]) -> str:
    """module_flags(mod, buf, show_state=true) as /proc/modules prints it (only when tainted)."""
    if not mod["taint"]:
        return ""
    suffix = {"going": "-", "coming": "+"}.get(mod["state"], "")
    return f"({_taint_letters(mod['taint'])}{suffix})"


def _show_param(param: Mapping[str, Any]) -> str:
    if param["kind"] == "array":
        if not param["value"]:
            return ""
        return ",".join(_show_value(param["elem"], item)[:-1] for item in param["value"]) + "\n"
    return _show_value(param["kind"], param["value"])


def _same_magic(amagic: str, bmagic: str, has_crcs: bool) -> bool:
    """same_magic(): with CRCs, the release (up to the first space) does not count."""
    if has_crcs:
        amagic = amagic[len(amagic.split(" ", 1)[0]) :]
        bmagic = bmagic[len(bmagic.split(" ", 1)[0]) :]
    return amagic == bmagic


def _has_cap_sys_module() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 16))
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def _modversions(image: _Image, index: int) -> dict[str, int]:
    """``__versions`` as {name: crc}, the first entry of each name winning (check_version)."""
    if not index:
        return {}
    data = image.section_bytes(index)
    crc_size = 8 if image.is64 else 4
    found: dict[str, int] = {}
    for pos in range(0, len(data) - 63, 64):
        crc = int.from_bytes(data[pos : pos + crc_size], "little" if image.order == "<" else "big")
        raw = data[pos + crc_size : pos + 64].split(b"\0", 1)[0]
        found.setdefault(raw.decode("utf-8", "surrogateescape"), crc)
    return found


def _module_exports(image: _Image) -> dict[str, Export]:
    """The module's exports: ``__ksymtab_<sym>`` symbols (GPL-only when in ``__ksymtab_gpl``),
    the CRC of ``__crc_<sym>`` (from ``__kcrctab*``), the namespace ``__kstrtabns_<sym>`` names."""
    by_name = {sym.name: sym for sym in image.symbols if sym.shndx not in (_SHN_UNDEF,) and sym.name}
    exports: dict[str, Export] = {}
    for sym in image.symbols:
        if not sym.name.startswith("__ksymtab_") or not 0 < sym.shndx < len(image.sections):
            continue
        section = image.sections[sym.shndx].name
        if section not in ("__ksymtab", "__ksymtab_gpl"):
            continue
        name = sym.name[len("__ksymtab_") :]
        crc: Optional[int] = None
        crc_sym = by_name.get(f"__crc_{name}")
        if crc_sym is not None:
            if crc_sym.shndx == _SHN_ABS:
                crc = crc_sym.value & 0xFFFFFFFF
            else:
                crc = image._read_int(crc_sym.shndx, crc_sym.value, 4)
        namespace = ""
        ns_sym = by_name.get(f"__kstrtabns_{name}")
        if ns_sym is not None and 0 < ns_sym.shndx < len(image.sections):
            namespace = image.c_string((ns_sym.shndx, ns_sym.value)) or ""
        exports[name] = Export(crc, section == "__ksymtab_gpl", namespace)
    return exports


def _core_size(image: _Image) -> int:
    """core_layout.size as layout_sections() and layout_symtab() compute it on x86_64 with
    CONFIG_STRICT_MODULE_RWX and CONFIG_KALLSYMS_ALL (what coresize and /proc/modules show)."""

    def page(size: int) -> int:
        return -(-size // PAGE_SIZE) * PAGE_SIZE

    flags = [section.flags for section in image.sections]
    pcpu = next((i for i, s in enumerate(image.sections) if s.name == ".data..percpu" and s.flags & _SHF_ALLOC), 0)
    for index, section in enumerate(image.sections):
        if section.name in ("__versions", ".modinfo") or (pcpu and index == pcpu):
            flags[index] &= ~_SHF_ALLOC
        if section.name in (".data..ro_after_init", "__jump_table") and section.flags & _SHF_ALLOC:
            flags[index] |= _SHF_RO_AFTER_INIT
    masks = (
        (_SHF_EXECINSTR | _SHF_ALLOC, 0),
        (_SHF_ALLOC, _SHF_WRITE),
        (_SHF_RO_AFTER_INIT | _SHF_ALLOC, 0),
        (_SHF_WRITE | _SHF_ALLOC, 0),
        (_SHF_ALLOC, 0),
    )
    placed: set[int] = set()
    init: set[int] = set()
    size = 0
    for m, (want, avoid) in enumerate(masks):
        for index, section in enumerate(image.sections):
            if not index or index in placed or flags[index] & want != want or flags[index] & avoid:
                continue
            if section.name.startswith(".init"):
                continue
            size = -(-size // max(section.addralign, 1)) * max(section.addralign, 1) + section.size
            placed.add(index)
        if m in (0, 1, 2, 4):
            size = page(size)
    for index in range(1, len(image.sections)):
        if flags[index] & _SHF_ALLOC and index not in placed:
            init.add(index)
    # layout_symtab(): the core symbols and their names go at the end of the core part
    symtab = image.sections[image.symtab_index]
    entries = 0
    strtab_size = 0
    livepatch = image.get_modinfo("livepatch") is not None
    for i, sym in enumerate(image.symbols):
        core = i == 0 or livepatch
        if not core and sym.shndx != _SHN_UNDEF and sym.shndx < len(image.sections) and sym.name:
            if pcpu and sym.shndx == pcpu:
                core = True
            else:
                core = bool(flags[sym.shndx] & _SHF_ALLOC) and sym.shndx not in init
        if core:
            strtab_size += len(sym.name.encode("utf-8", "surrogateescape")) + 1
            entries += 1
    align = max(symtab.addralign, 1)
    symoffs = -(-size // align) * align
    size = symoffs + entries * (24 if image.is64 else 16) + strtab_size + entries
    return page(size)


_OPS_KINDS = {f"param_ops_{kind}": kind for kind in (*_INT_KINDS, "bool", "invbool", "charp", "bool_enable_only")}
_OPS_KINDS["param_ops_string"] = "string"
_PARMTYPE_KINDS = {
    "int": "int",
    "uint": "uint",
    "long": "long",
    "ulong": "ulong",
    "ullong": "ullong",
    "short": "short",
    "ushort": "ushort",
    "byte": "byte",
    "hexint": "hexint",
    "bool": "bool",
    "invbool": "invbool",
    "charp": "charp",
    "string": "string",
    "bint": "bint",
}


def _module_params(image: _Image) -> list[_Param]:
    """The module's ``struct kernel_param`` table (``__param``): name, ops, perm, flags and the
    initial value of its variable, resolved through the section's relocations. Falls back to
    the ``parmtype`` modinfo entries (mode unknown: shown read-only) when it cannot be read."""
    index = image.find_sec("__param")
    if not index:
        return []
    ptr = 8 if image.is64 else 4
    entry = 40 if image.is64 else 20
    perm_at, flags_at, arg_at = (24, 27, 32) if image.is64 else (12, 15, 16)
    data = image.section_bytes(index)
    params: list[_Param] = []
    for base in range(0, len(data) - entry + 1, entry):
        name = image.c_string(image.pointer_at(index, base))
        ops = image.pointer_at(index, base + 2 * ptr)
        arg = image.pointer_at(index, base + arg_at)
        if name is None:
            return _params_from_modinfo(image)
        perm = image._read_int(index, base + perm_at, 2) or 0
        unsafe = bool((image._read_int(index, base + flags_at, 1) or 0) & 1)
        kind = (
            _OPS_KINDS.get(ops, "array" if ops == "param_array_ops" else "custom") if isinstance(ops, str) else "custom"
        )
        param = _Param(name, kind, perm, None, unsafe)
        _initial_value(image, param, arg, ptr)
        params.append(param)
    return params


def _initial_value(image: _Image, param: _Param, arg: Union[str, tuple[int, int], None], ptr: int) -> None:
    if not isinstance(arg, tuple):
        param.value = "" if param.kind == "custom" else None
        return
    section, offset = arg
    if param.kind in _INT_KINDS:
        size, signed = _INT_KINDS[param.kind]
        param.value = image._read_int(section, offset, size if size != 8 else ptr, signed=signed) or 0
    elif param.kind in ("bool", "invbool", "bool_enable_only"):
        param.value = bool(image._read_int(section, offset, 1))
        if param.kind == "invbool":
            param.value = not param.value
    elif param.kind == "charp":
        param.value = image.c_string(image.pointer_at(section, offset))
    elif param.kind == "string":
        param.maxlen = image._read_int(section, offset, 4) or 0
        param.value = image.c_string(image.pointer_at(section, offset + ptr)) or ""
    elif param.kind == "array":
        param.max = image._read_int(section, offset, 4) or 0
        elemsize = image._read_int(section, offset + 4, 4) or 0
        num = image.pointer_at(section, offset + 8)
        ops = image.pointer_at(section, offset + 8 + ptr)
        elem = image.pointer_at(section, offset + 8 + 2 * ptr)
        param.elem = _OPS_KINDS.get(ops, "custom") if isinstance(ops, str) else "custom"
        count = param.max
        if isinstance(num, tuple):
            count = image._read_int(num[0], num[1], 4) or 0
        values: list[Any] = []
        if isinstance(elem, tuple) and param.elem in _INT_KINDS:
            size, signed = _INT_KINDS[param.elem]
            for i in range(count):
                values.append(
                    image._read_int(elem[0], elem[1] + i * elemsize, min(size, elemsize or size), signed=signed) or 0
                )
        elif isinstance(elem, tuple) and param.elem in ("bool", "invbool"):
            values = [bool(image._read_int(elem[0], elem[1] + i * elemsize, 1)) for i in range(count)]
        elif isinstance(elem, tuple) and param.elem == "charp":
            values = [image.c_string(image.pointer_at(elem[0], elem[1] + i * elemsize)) for i in range(count)]
        param.value = values
    else:
        # Module-defined ops: their get() is unknown. Most wrap an int variable, so show one
        # when the variable is a 4- or 8-byte object; else an empty value.
        variable = next(
            (
                sym
                for sym in image.symbols
                if sym.shndx == section and sym.value == offset and sym.info & 0xF == 1 and sym.size in (4, 8)
            ),
            None,
        )
        value = image._read_int(section, offset, variable.size, signed=True) if variable else None
        param.value = "" if value is None else str(value)


def _params_from_modinfo(image: _Image) -> list[_Param]:
    params = []
    for entry in image.modinfo_entries("parmtype"):
        name, _sep, kind = entry.partition(":")
        if kind.startswith("array of "):
            elem = _PARMTYPE_KINDS.get(kind[len("array of ") :], "custom")
            params.append(_Param(name, "array", 0o444, [], elem=elem))
        else:
            mapped = _PARMTYPE_KINDS.get(kind, "custom")
            default: Any = 0 if mapped in _INT_KINDS else False if mapped in ("bool", "invbool") else ""
            params.append(_Param(name, mapped, 0o444, None if mapped == "charp" else default))
    return params


def make_fake_kernel(
    root: str, release: str, *, symvers: Optional[str] = None, system_map: Optional[str] = None, **options: Any
) -> FakeKernel:
    """A fresh fake kernel root at ``root`` (see :meth:`FakeKernel.create`); point ``KVC_ROOT`` at
    it and set ``KVC_KERNEL=fake`` for the CLI to use it."""
    return FakeKernel.create(HostPaths(root), release, symvers=symvers, system_map=system_map, **options)
