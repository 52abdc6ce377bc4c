"""Talking to the kernel about modules: what is loaded, insert, remove.

One protocol, two implementations. :class:`LiveKernel` makes the real syscalls
(``finit_module``/``init_module``/``delete_module``) and reads ``/proc/modules`` and
``/sys/module``; :class:`~kvc.kmod.fakekernel.FakeKernel` keeps the same files under a directory
and refuses what Linux refuses. ``KVC_KERNEL=fake`` selects the fake one (:func:`kernel_from_env`).

Both share :class:`SyscallKernel.insert`, which loads a module the way libkmod does: an
uncompressed file (or one compressed the way the kernel itself decompresses, see
``/sys/module/compression``) goes to ``finit_module``; anything else, or a kernel without
``finit_module`` (ENOSYS), is decompressed here and handed to ``init_module`` -- stripped of
``__versions`` and/or ``vermagic`` first when the load is forced, like ``kmod_elf_strip``.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import os
import platform
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Protocol, Union

from kvc.kmod import compression as _compression
from kvc.kmod.elf import ElfFile
from kvc.kmod.errors import ModuleFormatError
from kvc.kmod.module import ModuleFile, strip_for_force
from kvc.kmod.paths import KERNEL_ENV, HostPaths

if TYPE_CHECKING:
    from kvc.kmod.fakekernel import FakeKernel

# finit_module(2) flags (include/uapi/linux/module.h).
MODULE_INIT_IGNORE_MODVERSIONS = 1
MODULE_INIT_IGNORE_VERMAGIC = 2
MODULE_INIT_COMPRESSED_FILE = 4
MODULE_INIT_FLAGS = MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC | MODULE_INIT_COMPRESSED_FILE
_FORCE_FLAGS = MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC

# delete_module(2) flags: O_NONBLOCK is what libkmod always passes (KMOD_REMOVE_NOWAIT),
# O_TRUNC forces the removal of a module in use (KMOD_REMOVE_FORCE, rmmod -f).
O_NONBLOCK = os.O_NONBLOCK
O_TRUNC = os.O_TRUNC
REMOVE_NONBLOCK = O_NONBLOCK
REMOVE_FORCE = O_TRUNC

# The longest magic libkmod reads before deciding how to open a file (xz: 6 bytes). A shorter
# file makes kmod_file_open fail with EINVAL before any syscall.
_MAGIC_SIZE = 6

# (init_module, delete_module, finit_module) by machine and pointer size, from the kernel's
# syscall tables (arch/*/entry/syscalls, arch/*/kernel/syscalls/syscall.tbl, asm-generic/unistd.h).
_GENERIC = (105, 106, 273)
_SYSCALLS: dict[tuple[str, int], tuple[int, int, int]] = {
    ("x86_64", 8): (175, 176, 313),
    ("x86_64", 4): (128, 129, 350),  # a 32-bit userland on a 64-bit kernel: the i386 table
    ("i386", 4): (128, 129, 350),
    ("i486", 4): (128, 129, 350),
    ("i586", 4): (128, 129, 350),
    ("i686", 4): (128, 129, 350),
    ("aarch64", 8): _GENERIC,
    ("arm64", 8): _GENERIC,
    ("aarch64", 4): (128, 129, 379),
    ("armv7l", 4): (128, 129, 379),
    ("armv6l", 4): (128, 129, 379),
    ("armv8l", 4): (128, 129, 379),
    ("riscv64", 8): _GENERIC,
    ("loongarch64", 8): _GENERIC,
    ("ppc64le", 8): (128, 129, 353),
    ("ppc64", 8): (128, 129, 353),
    ("ppc", 4): (128, 129, 353),
    ("s390x", 8): (128, 129, 344),
}


class KernelError(Exception):
    """The kernel refused a request. ``errno`` is its answer; ``log_lines`` what it logged
    (the fake kernel fills them in; the live kernel's log is not read)."""

    def __init__(self, err: int, message: str = "", log_lines: tuple[str, ...] = ()) -> None:
        super().__init__(message or os.strerror(err))
        self.errno = err
        self.log_lines = tuple(log_lines)

    @property
    def strerror(self) -> str:
        return os.strerror(self.errno)


@dataclass(frozen=True)
class LoadedModule:
    """One ``/proc/modules`` line (kernel/module/procfs.c). ``users`` are the modules using this
    one, newest first, as the kernel lists them. On a kernel without module unloading the line
    reads ``- -``: ``unload`` is False and ``refcnt`` 0."""

    name: str
    size: int
    refcnt: int
    users: tuple[str, ...]
    state: str
    address: str
    taints: str = ""
    permanent: bool = False
    unload: bool = True

    @property
    def holders(self) -> tuple[str, ...]:
        return self.users


@dataclass(frozen=True)
class ModuleState:
    """What ``/sys/module/NAME`` says about one module. ``initstate`` is None for a directory
    without that file (a built-in module with parameters); ``holders`` are in readdir order."""

    name: str
    initstate: Optional[str]
    refcnt: Optional[int]
    holders: tuple[str, ...]
    coresize: Optional[int]
    taint: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    initsize: Optional[int] = None
    version: Optional[str] = None
    srcversion: Optional[str] = None


ModuleSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, ModuleFile]


class Kernel(Protocol):
    """What kvc needs from a kernel."""

    REMOVE_FORCE: int

    def release(self) -> str: ...

    def loaded_modules(self) -> list[LoadedModule]: ...

    def module_state(self, name: str) -> Optional[ModuleState]: ...

    def compression(self) -> Optional[str]: ...

    def exported_symbols(self) -> Optional[Mapping[str, int]]: ...

    def insert(self, module: ModuleSource, params: str = "", flags: int = 0) -> None: ...

    def remove(self, name: str, flags: int = 0) -> None: ...


# -- reading /proc and /sys ----------------------------------------------------------------------


def parse_proc_modules(text: str) -> list[LoadedModule]:
    """``/proc/modules`` lines: ``name size refcnt deps state address[ (taints)]``; deps is
    ``a,b,`` (trailing comma), ``[permanent],`` or ``-``, and ``- -`` replaces refcnt and deps
    on kernels without module unloading."""
    modules = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or not fields[1].isdigit():
            continue
        unload = fields[2].lstrip("-").isdigit()
        refcnt = int(fields[2]) if unload else 0
        deps = [dep for dep in fields[3].split(",") if dep and dep != "-"]
        permanent = "[permanent]" in deps
        users = tuple(dep for dep in deps if dep != "[permanent]")
        taints = fields[6].strip("()") if len(fields) > 6 else ""
        modules.append(
            LoadedModule(fields[0], int(fields[1]), refcnt, users, fields[4], fields[5], taints, permanent, unload)
        )
    return modules


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read()
    except OSError:
        return None


def _int_or_none(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def read_module_state(sys_module: str, name: str) -> Optional[ModuleState]:
    """``/sys/module/NAME`` as a :class:`ModuleState`, or None when the directory is missing."""
    base = os.path.join(sys_module, name)
    if not os.path.isdir(base):
        return None
    initstate = _read(os.path.join(base, "initstate"))
    try:
        holders = tuple(os.listdir(os.path.join(base, "holders")))
    except OSError:
        holders = ()
    parameters: dict[str, str] = {}
    params_dir = os.path.join(base, "parameters")
    if os.path.isdir(params_dir):
        for param in sorted(os.listdir(params_dir)):
            value = _read(os.path.join(params_dir, param))
            if value is not None:
                parameters[param] = value[:-1] if value.endswith("\n") else value
    version = _read(os.path.join(base, "version"))
    srcversion = _read(os.path.join(base, "srcversion"))
    return ModuleState(
        name=name,
        initstate=initstate.strip() if initstate is not None else None,
        refcnt=_int_or_none(_read(os.path.join(base, "refcnt"))),
        holders=holders,
        coresize=_int_or_none(_read(os.path.join(base, "coresize"))),
        taint=(_read(os.path.join(base, "taint")) or "").strip(),
        parameters=parameters,
        initsize=_int_or_none(_read(os.path.join(base, "initsize"))),
        version=version.strip() if version is not None else None,
        srcversion=srcversion.strip() if srcversion is not None else None,
    )


@dataclass(frozen=True)
class Export:
    """One exported symbol: CRC (None when the kernel has none for it), GPL-only, namespace."""

    crc: Optional[int]
    gpl: bool = False
    namespace: str = ""


def read_symvers_exports(path: str) -> Optional[dict[str, dict[str, Export]]]:
    """``Module.symvers`` as {owner: {symbol: Export}}; the owner is ``vmlinux`` for the core
    kernel, else the module's path in the tree without ``.ko`` (``drivers/net/dummy``). Lines are
    ``crc<TAB>symbol<TAB>owner<TAB>EXPORT_SYMBOL[_GPL]<TAB>namespace``."""
    text = _read(path)
    if text is None:
        return None
    owners: dict[str, dict[str, Export]] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            crc = int(parts[0], 16)
        except ValueError:
            continue
        gpl = len(parts) > 3 and parts[3].endswith("_GPL")
        namespace = parts[4] if len(parts) > 4 else ""
        owners.setdefault(parts[2], {})[parts[1]] = Export(crc, gpl, namespace)
    return owners


def read_symvers(path: str, *, vmlinux_only: bool = True) -> Optional[dict[str, int]]:
    """``Module.symvers`` as {symbol: crc}: the core kernel's exports, or every line's."""
    owners = read_symvers_exports(path)
    if owners is None:
        return None
    exports: dict[str, int] = {}
    for owner, symbols in owners.items():
        if vmlinux_only and owner != "vmlinux":
            continue
        exports.update({name: export.crc or 0 for name, export in symbols.items()})
    return exports


def read_system_map_exports(path: str) -> Optional[dict[str, Export]]:
    """The core kernel's exports named by a System.map: ``__ksymtab_<sym>`` entries, with the
    CRC of an absolute ``__crc_<sym>`` symbol when there is one, and GPL-only when the entry
    lies between ``__start___ksymtab_gpl`` and ``__stop___ksymtab_gpl``."""
    text = _read(path)
    if text is None:
        return None
    entries: dict[str, int] = {}
    crcs: dict[str, int] = {}
    markers: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            value = int(parts[0], 16)
        except ValueError:
            continue
        name = parts[2]
        if name in ("__start___ksymtab_gpl", "__stop___ksymtab_gpl"):
            markers[name] = value
        elif name.startswith("__ksymtab_") and name != "__ksymtab_strings":
            entries[name[len("__ksymtab_") :]] = value
        elif name.startswith("__crc_"):
            crcs[name[len("__crc_") :]] = value & 0xFFFFFFFF
    start, stop = markers.get("__start___ksymtab_gpl"), markers.get("__stop___ksymtab_gpl")
    return {
        sym: Export(crcs.get(sym), start is not None and stop is not None and start <= addr < stop)
        for sym, addr in entries.items()
    }


# -- inserting like libkmod ----------------------------------------------------------------------


class SyscallKernel(abc.ABC):
    """The part shared by the live and the fake kernel: libkmod's insert and remove logic on
    top of three syscalls that subclasses provide. Each syscall returns 0 or an errno."""

    REMOVE_FORCE = REMOVE_FORCE

    @abc.abstractmethod
    def compression(self) -> Optional[str]: ...

    @abc.abstractmethod
    def sys_finit_module(self, fd: int, params: str, flags: int) -> int: ...

    @abc.abstractmethod
    def sys_init_module(self, image: bytes, params: str) -> int: ...

    @abc.abstractmethod
    def sys_delete_module(self, name: str, flags: int) -> int: ...

    def _raise(self, err: int, what: str) -> None:
        """Turn a syscall's errno into :class:`KernelError` (the fake kernel adds its log)."""
        if err:
            raise KernelError(err, f"{what}: {os.strerror(err)}")

    def insert(self, module: ModuleSource, params: str = "", flags: int = 0) -> None:
        """Load a module from a path, an open :class:`ModuleFile` or an in-memory image.
        ``flags`` are ``MODULE_INIT_IGNORE_*``. Raises :class:`KernelError` with the errno
        libkmod would report."""
        force = flags & _FORCE_FLAGS
        if isinstance(module, (bytes, bytearray, memoryview)):
            self._init_from_memory(bytes(module), "<memory>", params, force)
            return
        path = module.path if isinstance(module, ModuleFile) else os.fspath(module)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(exc.errno or errno.EIO, f"{path}: {exc.strerror}") from None
        try:
            try:
                head = os.pread(fd, _MAGIC_SIZE, 0)
            except OSError as exc:
                raise KernelError(exc.errno or errno.EIO, f"{path}: {exc.strerror}") from None
            if len(head) < _MAGIC_SIZE:
                raise KernelError(errno.EINVAL, f"{path}: too short to be a module")
            kind = _compression.detect(head)
            if kind is None or kind == self.compression():
                kernel_flags = force | (MODULE_INIT_COMPRESSED_FILE if kind else 0)
                err = self.sys_finit_module(fd, params, kernel_flags)
                if err != errno.ENOSYS:
                    self._raise(err, f"finit_module({path})")
                    return
            raw = _read_fd(fd)
        finally:
            os.close(fd)
        self._init_from_memory(raw, path, params, force)

    def _init_from_memory(self, raw: bytes, path: str, params: str, force: int) -> None:
        try:
            _kind, image = _compression.decompress(raw, path)
            data = bytes(image)
            if force:
                data = strip_for_force(
                    data,
                    ElfFile(data, path),
                    modversions=bool(force & MODULE_INIT_IGNORE_MODVERSIONS),
                    vermagic=bool(force & MODULE_INIT_IGNORE_VERMAGIC),
                )
        except (ModuleFormatError, struct.error) as exc:
            # libkmod fails to decompress or to parse for stripping: -EINVAL, nothing logged.
            raise KernelError(errno.EINVAL, f"{path}: {exc}") from None
        self._raise(self.sys_init_module(data, params), f"init_module({path})")

    def remove(self, name: str, flags: int = 0) -> None:
        """delete_module(name, O_NONBLOCK | (flags & O_TRUNC)), as kmod_module_remove_module."""
        self._raise(self.sys_delete_module(name, (flags & O_TRUNC) | O_NONBLOCK), f"delete_module({name})")


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


# -- the live kernel ----------------------------------------------------------------------------


def syscall_numbers(
    machine: Optional[str] = None, pointer_size: Optional[int] = None
) -> Optional[tuple[int, int, int]]:
    """(init_module, delete_module, finit_module) for this machine, or None when unknown."""
    return _SYSCALLS.get((machine or platform.machine(), pointer_size or struct.calcsize("P")))


# glibc's init_module and delete_module (it has no finit_module: that one goes through syscall()).
_INIT_MODULE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_char_p, use_errno=True)
_DELETE_MODULE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, use_errno=True)
_SyscallArgument = Union[int, bytes, "ctypes.Array[ctypes.c_char]"]


class LiveKernel(SyscallKernel):
    """The running kernel, through libc and ``/proc``/``/sys`` (under ``KVC_ROOT``).

    ``init_module`` and ``delete_module`` are libc's functions, found among the process's symbols
    (``libc``: another library to call instead), so an LD_PRELOAD library that defines them --
    kmod's testsuite traps exactly those -- sees the calls; a symbol libc lacks, and
    ``finit_module``, which glibc does not wrap, go through ``syscall()``."""

    def __init__(self, paths: Optional[HostPaths] = None, *, libc: Optional[ctypes.CDLL] = None) -> None:
        self.paths = paths or HostPaths()
        self._numbers = syscall_numbers()
        self._libc = libc if libc is not None else ctypes.CDLL(None, use_errno=True)

    def release(self) -> str:
        return self.paths.kernel_release()

    def loaded_modules(self) -> list[LoadedModule]:
        text = _read(os.path.join(self.paths.proc, "modules"))
        return parse_proc_modules(text) if text is not None else []

    def module_state(self, name: str) -> Optional[ModuleState]:
        return read_module_state(self.paths.sys_module, name)

    def compression(self) -> Optional[str]:
        value = _read(os.path.join(self.paths.sys_module, "compression"))
        value = value.strip() if value else None
        return {"gzip": "gzip", "xz": "xz", "zstd": "zstd"}.get(value or "")

    def exported_symbols(self) -> Optional[Mapping[str, int]]:
        """The core kernel's exports, from the kernel's Module.symvers or System.map when the
        host has one; None when neither is available (callers then leave it to the kernel)."""
        release = self.release()
        symvers = read_symvers(self.paths.host(f"/lib/modules/{release}/build/Module.symvers"))
        if symvers is not None:
            return symvers
        system_map = read_system_map_exports(self.paths.host(f"/boot/System.map-{release}"))
        if not system_map:
            return None
        return {name: export.crc or 0 for name, export in system_map.items()}

    def _call(self, function: Callable[..., int], *args: object) -> int:
        """0, or the errno of a failed call (EIO when the callee left errno unset)."""
        ctypes.set_errno(0)
        result = function(*args)
        return (ctypes.get_errno() or errno.EIO) if result != 0 else 0

    def _libc_function(
        self, name: str, prototype: Callable[[tuple[str, ctypes.CDLL]], Callable[..., int]]
    ) -> Optional[Callable[..., int]]:
        try:
            return prototype((name, self._libc))
        except AttributeError:
            return None

    def _syscall(self, which: int, *args: _SyscallArgument) -> int:
        if self._numbers is None:
            return errno.ENOSYS
        converted = [ctypes.c_long(arg) if isinstance(arg, int) else arg for arg in args]
        return self._call(self._libc.syscall, ctypes.c_long(self._numbers[which]), *converted)

    def sys_init_module(self, image: bytes, params: str) -> int:
        buffer = ctypes.create_string_buffer(image, len(image))
        function = self._libc_function("init_module", _INIT_MODULE)
        if function is None:
            return self._syscall(0, buffer, len(image), _c_string(params))
        return self._call(function, buffer, len(image), _c_string(params))

    def sys_delete_module(self, name: str, flags: int) -> int:
        function = self._libc_function("delete_module", _DELETE_MODULE)
        if function is None:
            return self._syscall(1, _c_string(name), flags)
        return self._call(function, _c_string(name), flags)

    def sys_finit_module(self, fd: int, params: str, flags: int) -> int:
        return self._syscall(2, fd, _c_string(params), flags)


def _c_string(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# -- choosing one -----------------------------------------------------------------------------


def fake_kernel_from_env(paths: Optional[HostPaths] = None, environ: Optional[Mapping[str, str]] = None) -> FakeKernel:
    """The fake kernel kept under ``KVC_ROOT``."""
    from kvc.kmod.fakekernel import FakeKernel

    return FakeKernel(paths or HostPaths.from_env(environ))


def kernel_from_env(paths: Optional[HostPaths] = None, environ: Optional[Mapping[str, str]] = None) -> Kernel:
    """The fake kernel under ``KVC_ROOT`` when ``KVC_KERNEL=fake``, else the live kernel."""
    env = os.environ if environ is None else environ
    host = paths or HostPaths.from_env(env)
    if env.get(KERNEL_ENV) == "fake":
        return fake_kernel_from_env(host)
    return LiveKernel(host)


# -- libkmod's view of /proc/modules and /sys/module (kmod 30) ----------------------------------

KMOD_MODULE_BUILTIN = 0
KMOD_MODULE_LIVE = 1
KMOD_MODULE_COMING = 2
KMOD_MODULE_GOING = 3

LOG_ERR = 3
LOG_INFO = 6


@dataclass(frozen=True)
class LibkmodLog:
    """One message libkmod logs: priority, source file, line and function (as kmod 30 built by
    Debian reports them) and the text, which ends with a newline like kmod's."""

    priority: int
    file: str
    line: int
    function: str
    message: str


def modname_normalize(name: str) -> str:
    """libkmod's modname_normalize: up to the first '.', with '-' as '_'."""
    return name.split(".", 1)[0].replace("-", "_")


def path_to_modname(path: str) -> Optional[str]:
    """libkmod's path_to_modname: the normalized basename; None for a path ending in '/'."""
    base = path.rsplit("/", 1)[-1]
    return modname_normalize(base) if base else None


def _strtol(text: str) -> tuple[Optional[int], str]:
    """C strtol(text, &end, 10): (value, rest at end), value None when no digits were read."""
    match = re.match(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    if match is None:
        return None, text
    return int(match.group(1)), text[match.end() :]


def _c_isspace(char: str) -> bool:
    return char != "" and char in " \t\n\v\f\r"


class LibkmodView:
    """What libkmod 30 reads about loaded modules, with the same results for odd files and the
    same log messages: used by lsmod and rmmod so that they print what kmod's print. Paths in
    messages are the host's (``/sys/module/...``); the files are read under ``paths.root``."""

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.logs: list[LibkmodLog] = []

    def _log(self, line: int, function: str, message: str) -> None:
        self.logs.append(LibkmodLog(LOG_ERR, "../libkmod/libkmod-module.c", line, function, message))

    def take_logs(self) -> list[LibkmodLog]:
        logs, self.logs = self.logs, []
        return logs

    def _host(self, path: str) -> str:
        return self.paths.host(path)

    def _read_str_safe(self, fd: int) -> str:
        data = b""
        while len(data) < 31:
            chunk = os.read(fd, 31 - len(data))
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "surrogateescape")

    def _read_str_long(self, path: str) -> tuple[int, int]:
        """(err, value) as read_str_long: err is 0 or -errno; value is 0 when it fails."""
        fd = os.open(self._host(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = self._read_str_safe(fd)
        except OSError as exc:
            return -(exc.errno or errno.EIO), 0
        finally:
            os.close(fd)
        value, rest = _strtol(text)
        if value is None or not _c_isspace(rest[:1]):
            return -errno.EINVAL, 0
        return 0, value

    def loaded_names(self) -> list[str]:
        """kmod_module_new_from_loaded: the first field of each /proc/modules line (split on
        spaces and tabs only, so a line without one keeps its newline). Raises OSError."""
        try:
            with open(os.path.join(self.paths.proc, "modules"), "rb") as handle:
                data = handle.read()
        except OSError as exc:
            self._log(
                1725,
                "kmod_module_new_from_loaded",
                f"could not open /proc/modules: {os.strerror(exc.errno or errno.EIO)}\n",
            )
            raise
        names = []
        for chunk in _fgets_chunks(data.decode("utf-8", "surrogateescape")):
            token = _strtok(chunk)
            if token is not None:
                names.append(modname_normalize(token))
        return names

    def initstate(self, name: str) -> int:
        """kmod_module_get_initstate without the built-in check: a KMOD_MODULE_* or -errno."""
        path = f"/sys/module/{name}/initstate"
        try:
            fd = os.open(self._host(path), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if os.path.isdir(self._host(f"/sys/module/{name}")):
                return KMOD_MODULE_COMING
            return -(exc.errno or errno.ENOENT)
        try:
            text = self._read_str_safe(fd)
        except OSError as exc:
            self._log(
                1835,
                "kmod_module_get_initstate",
                f"could not read from '{path}': {os.strerror(exc.errno or errno.EIO)}\n",
            )
            return -(exc.errno or errno.EIO)
        finally:
            os.close(fd)
        states = {"live\n": KMOD_MODULE_LIVE, "coming\n": KMOD_MODULE_COMING, "going\n": KMOD_MODULE_GOING}
        if text in states:
            return states[text]
        self._log(1847, "kmod_module_get_initstate", f"unknown {path}: '{text}'\n")
        return -errno.EINVAL

    def refcnt(self, name: str) -> int:
        """kmod_module_get_refcnt: the count, or -errno."""
        path = f"/sys/module/{name}/refcnt"
        try:
            err, value = self._read_str_long(path)
        except OSError as exc:
            return -(exc.errno or errno.ENOENT)
        if err < 0:
            self._log(1967, "kmod_module_get_refcnt", f"could not read integer from '{path}': '{os.strerror(-err)}'\n")
            return err
        return ctypes.c_int(value).value

    def size(self, name: str) -> int:
        """kmod_module_get_size: coresize, else the /proc/modules size field, else -errno."""
        directory = f"/sys/module/{name}"
        try:
            dfd = os.open(self._host(directory), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return -(exc.errno or errno.ENOENT)
        try:
            try:
                err, value = self._read_str_long(f"{directory}/coresize")
            except OSError:
                pass
            else:
                if err < 0:
                    self._log(1886, "kmod_module_get_size", f"failed to read coresize from {directory}\n")
                return ctypes.c_long(value).value
        finally:
            os.close(dfd)
        try:
            with open(os.path.join(self.paths.proc, "modules"), "rb") as handle:
                data = handle.read().decode("utf-8", "surrogateescape")
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        for lineno, chunk in enumerate(_fgets_chunks(data), start=1):
            rest = chunk
            token, rest = _strtok_rest(rest)
            if token is None or token != name:
                continue
            token, rest = _strtok_rest(rest)
            if token is None:
                self._log(1912, "kmod_module_get_size", f"invalid line format at /proc/modules:{lineno}\n")
                break
            number = re.fullmatch(r"[ \t\n\v\f\r]*[+-]?[0-9]+", token)
            if number is None:
                self._log(1919, "kmod_module_get_size", f"invalid line format at /proc/modules:{lineno}\n")
                break
            return int(token)
        return -errno.ENOENT

    def holders(self, name: str) -> list[str]:
        """kmod_module_get_holders: the names in /sys/module/NAME/holders, readdir order."""
        path = f"/sys/module/{name}/holders"
        try:
            entries = os.listdir(self._host(path))
        except OSError as exc:
            self._log(
                1998, "kmod_module_get_holders", f"could not open '{path}': {os.strerror(exc.errno or errno.EIO)}\n"
            )
            return []
        return [modname_normalize(entry) for entry in entries]


def _fgets_chunks(text: str) -> list[str]:
    """The pieces fgets(line, 4096, fp) returns: lines with their newline, at most 4095 chars."""
    chunks = []
    for line in text.splitlines(keepends=True):
        while len(line) > 4095:
            chunks.append(line[:4095])
            line = line[4095:]
        if line:
            chunks.append(line)
    return chunks


def _strtok_rest(text: str) -> tuple[Optional[str], str]:
    """strtok_r with the delimiters " \\t": (token or None, the rest after its delimiter)."""
    stripped = text.lstrip(" \t")
    if not stripped:
        return None, ""
    match = re.match(r"[^ \t]+", stripped)
    assert match is not None
    return match.group(0), stripped[match.end() + 1 :]


def _strtok(text: str) -> Optional[str]:
    return _strtok_rest(text)[0]
