"""Talking to the kernel about modules: what is loaded, insert, remove.

One protocol, two implementations: :class:`LiveKernel` makes the real syscalls
(``finit_module``/``init_module``/``delete_module``) and reads ``/proc/modules`` and
``/sys/module``; :class:`~kvc.kmod.fakekernel.FakeKernel` keeps the same files under a directory
and refuses what the real kernel refuses. ``KVC_KERNEL=fake`` selects the fake one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol

from kvc.kmod.module import ModuleFile, strip_for_force
from kvc.kmod.paths import KERNEL_ENV, HostPaths

MODULE_INIT_IGNORE_MODVERSIONS = 1
MODULE_INIT_IGNORE_VERMAGIC = 2
MODULE_INIT_COMPRESSED_FILE = 4
REMOVE_NONBLOCK = os.O_NONBLOCK
REMOVE_FORCE = os.O_TRUNC

# (init_module, delete_module, finit_module) per machine, from the kernel's syscall tables.
_SYSCALLS = {
    "x86_64": (175, 176, 313),
    "aarch64": (105, 106, 273),
    "riscv64": (105, 106, 273),
    "ppc64le": (128, 129, 353),
    "s390x": (128, 129, 344),
    "i686": (128, 129, 350),
    "armv7l": (128, 129, 379),
}


class KernelError(Exception):
    """The kernel refused a request; ``errno`` is its answer, ``log_lines`` what it logged."""

    def __init__(self, err: int, message: str, log_lines: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.errno = err
        self.log_lines = log_lines


@dataclass(frozen=True)
class LoadedModule:
    """A ``/proc/modules`` line."""

    name: str
    size: int
    refcnt: int
    users: tuple[str, ...]
    state: str
    address: str
    taints: str = ""


@dataclass(frozen=True)
class ModuleState:
    """What ``/sys/module/NAME`` says about one module."""

    name: str
    initstate: Optional[str]
    refcnt: Optional[int]
    holders: tuple[str, ...]
    coresize: Optional[int]
    taint: str
    parameters: Mapping[str, str] = field(default_factory=dict)


class Kernel(Protocol):
    REMOVE_FORCE: int

    def release(self) -> str: ...

    def loaded_modules(self) -> list[LoadedModule]: ...

    def module_state(self, name: str) -> Optional[ModuleState]: ...

    def exported_symbols(self) -> Optional[Mapping[str, int]]: ...

    def insert(self, path: str, params: str, flags: int) -> None: ...

    def remove(self, name: str, flags: int) -> None: ...


def parse_proc_modules(text: str) -> list[LoadedModule]:
    modules = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        users = tuple(user for user in fields[3].split(",") if user and user != "-")
        taints = fields[6].strip("()") if len(fields) > 6 else ""
        refcnt = int(fields[2]) if fields[2].lstrip("-").isdigit() else 0
        modules.append(LoadedModule(fields[0], int(fields[1]), refcnt, users, fields[4], fields[5], taints))
    return modules


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read()
    except OSError:
        return None


def read_module_state(sys_module: str, name: str) -> Optional[ModuleState]:
    base = os.path.join(sys_module, name)
    if not os.path.isdir(base):
        return None
    initstate = _read(os.path.join(base, "initstate"))
    refcnt = _read(os.path.join(base, "refcnt"))
    coresize = _read(os.path.join(base, "coresize"))
    try:
        holders = tuple(os.listdir(os.path.join(base, "holders")))
    except OSError:
        holders = ()
    parameters = {}
    params_dir = os.path.join(base, "parameters")
    if os.path.isdir(params_dir):
        for param in sorted(os.listdir(params_dir)):
            value = _read(os.path.join(params_dir, param))
            if value is not None:
                parameters[param] = value.rstrip("\n")
    return ModuleState(
        name=name,
        initstate=initstate.strip() if initstate is not None else None,
        refcnt=int(refcnt) if refcnt is not None and refcnt.strip().lstrip("-").isdigit() else None,
        holders=holders,
        coresize=int(coresize) if coresize is not None and coresize.strip().isdigit() else None,
        taint=(_read(os.path.join(base, "taint")) or "").strip(),
        parameters=parameters,
    )


def read_system_map_exports(path: str) -> Optional[dict[str, int]]:
    """Exported symbols named by a System.map (``__ksymtab_<sym>`` entries), CRCs unknown (0)."""
    text = _read(path)
    if text is None:
        return None
    exports = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("__ksymtab_"):
            exports[parts[2][len("__ksymtab_"):]] = 0
    return exports


def read_symvers(path: str, *, vmlinux_only: bool = True) -> Optional[dict[str, int]]:
    """``Module.symvers`` (``crc<TAB>symbol<TAB>module<TAB>export<TAB>namespace``) as {symbol: crc}."""
    text = _read(path)
    if text is None:
        return None
    exports = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        if vmlinux_only and parts[2] != "vmlinux":
            continue
        try:
            exports[parts[1]] = int(parts[0], 16)
        except ValueError:
            continue
    return exports


class LiveKernel:
    """The running kernel, through real syscalls and ``/proc``/``/sys`` (under ``KVC_ROOT``)."""

    REMOVE_FORCE = REMOVE_FORCE

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths

    def release(self) -> str:
        return self.paths.kernel_release()

    def loaded_modules(self) -> list[LoadedModule]:
        text = _read(os.path.join(self.paths.proc, "modules"))
        return parse_proc_modules(text) if text is not None else []

    def module_state(self, name: str) -> Optional[ModuleState]:
        return read_module_state(self.paths.sys_module, name)

    def exported_symbols(self) -> Optional[Mapping[str, int]]:
        """The core kernel's exports, from the kernel's Module.symvers or System.map when the
        host has one; None when neither is available (preflight then leaves it to the kernel)."""
        release = self.release()
        symvers = read_symvers(self.paths.host(f"/lib/modules/{release}/build/Module.symvers"))
        if symvers is not None:
            return symvers
        return read_system_map_exports(self.paths.host(f"/boot/System.map-{release}"))

    def compression(self) -> Optional[str]:
        value = _read(os.path.join(self.paths.sys_module, "compression"))
        return value.strip() if value else None

    def insert(self, path: str, params: str, flags: int) -> None:
        module = ModuleFile.open(path)
        force = flags & (MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC)
        kernel_compression = self.compression()
        names = {"xz": "xz", "zstd": "zstd", "gzip": "gzip"}
        if not force and (module.compression is None or names[module.compression] == kernel_compression):
            extra = MODULE_INIT_COMPRESSED_FILE if module.compression else 0
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                result = _syscall(2, fd, params.encode(), flags | extra)
            finally:
                os.close(fd)
            if result != errno.ENOSYS:
                _raise_for(result, f"finit_module({path})")
                return
        image = bytes(module.image)
        if force:
            image = strip_for_force(image, module.elf, modversions=bool(flags & MODULE_INIT_IGNORE_MODVERSIONS),
                                    vermagic=bool(flags & MODULE_INIT_IGNORE_VERMAGIC))
        buffer = ctypes.create_string_buffer(image, len(image))
        _raise_for(_syscall(0, buffer, len(image), params.encode()), f"init_module({path})")

    def remove(self, name: str, flags: int) -> None:
        _raise_for(_syscall(1, name.encode(), flags | REMOVE_NONBLOCK), f"delete_module({name})")


def _raise_for(err: int, what: str) -> None:
    if err:
        raise KernelError(err, f"{what}: {os.strerror(err)}")


def _syscall(which: int, *args: object) -> int:
    """Run init_module (0), delete_module (1) or finit_module (2); returns 0 or the errno."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    converted = [ctypes.c_long(arg) if isinstance(arg, int) else arg for arg in args]
    result = libc.syscall(ctypes.c_long(numbers[which]), *converted)
    return ctypes.get_errno() if result != 0 else 0


def kernel_from_env(paths: Optional[HostPaths] = None, environ: Optional[Mapping[str, str]] = None) -> Kernel:
    """The fake kernel under ``KVC_ROOT`` when ``KVC_KERNEL=fake``, else the live kernel."""
    env = os.environ if environ is None else environ
    host = paths or HostPaths.from_env(env)
    if env.get(KERNEL_ENV) == "fake":
        from kvc.kmod.fakekernel import FakeKernel

        return FakeKernel(host)
    return LiveKernel(host)

