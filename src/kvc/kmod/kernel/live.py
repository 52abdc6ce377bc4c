"""The running kernel: module syscalls through libc, and ``/proc``/``/sys`` read through
:mod:`kvc.kmod.kernel.readers`."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Callable, Mapping, Optional, Union

from kvc.kmod.kernel.libkmod import SyscallKernel
from kvc.kmod.kernel.protocol import LoadedModule, ModuleState
from kvc.kmod.kernel.readers import (
    parse_proc_modules,
    read_boot_id,
    read_module_state,
    read_symvers,
    read_system_map_exports,
    read_text,
)
from kvc.kmod.paths import HostPaths

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


# uname's machine -> the e_machine of that architecture's kernel modules (elf.h).
_ELF_MACHINES = {
    "x86_64": 62,
    "i386": 3,
    "i486": 3,
    "i586": 3,
    "i686": 3,
    "aarch64": 183,
    "arm64": 183,
    "armv6l": 40,
    "armv7l": 40,
    "riscv64": 243,
    "ppc64le": 21,
    "ppc64": 21,
    "ppc": 20,
    "s390x": 22,
    "loongarch64": 258,
}


def syscall_numbers(
    machine: Optional[str] = None, pointer_size: Optional[int] = None
) -> Optional[tuple[int, int, int]]:
    """(init_module, delete_module, finit_module) for this machine, or None when unknown."""
    return _SYSCALLS.get((machine or os.uname().machine, pointer_size or struct.calcsize("P")))


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

    def boot_id(self) -> Optional[str]:
        return read_boot_id(self.paths)

    def elf_machine(self) -> Optional[int]:
        return _ELF_MACHINES.get(os.uname().machine)

    def loaded_modules(self) -> list[LoadedModule]:
        text = read_text(os.path.join(self.paths.proc, "modules"))
        return parse_proc_modules(text) if text is not None else []

    def module_state(self, name: str) -> Optional[ModuleState]:
        return read_module_state(self.paths.sys_module, name)

    def compression(self) -> Optional[str]:
        value = read_text(os.path.join(self.paths.sys_module, "compression"))
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
