"""What kvc needs from a kernel (:class:`Kernel`), what it says about loaded modules, the flags
of the module syscalls, and :class:`KernelError`, the kernel's refusal."""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Mapping, NamedTuple, Optional, Protocol, Union

from kvc.kmod.module import ModuleFile

# finit_module(2) flags (include/uapi/linux/module.h).
MODULE_INIT_IGNORE_MODVERSIONS = 1
MODULE_INIT_IGNORE_VERMAGIC = 2
MODULE_INIT_COMPRESSED_FILE = 4
MODULE_INIT_FLAGS = MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC | MODULE_INIT_COMPRESSED_FILE
MODULE_INIT_FORCE_FLAGS = MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC

# delete_module(2) flags: O_NONBLOCK is what libkmod always passes (KMOD_REMOVE_NOWAIT),
# O_TRUNC forces the removal of a module in use (KMOD_REMOVE_FORCE, rmmod -f).
O_NONBLOCK = os.O_NONBLOCK
O_TRUNC = os.O_TRUNC
REMOVE_NONBLOCK = O_NONBLOCK
REMOVE_FORCE = O_TRUNC


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


class LoadedModule(NamedTuple):
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


class ModuleState(NamedTuple):
    """What ``/sys/module/NAME`` says about one module. ``initstate`` is None for a directory
    without that file (a built-in module with parameters); ``holders`` are in readdir order."""

    name: str
    initstate: Optional[str]
    refcnt: Optional[int]
    holders: tuple[str, ...]
    coresize: Optional[int]
    taint: str
    parameters: Mapping[str, str] = MappingProxyType({})
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

    def elf_machine(self) -> Optional[int]:
        """The ELF ``e_machine`` of the modules this kernel takes (EM_X86_64 62, EM_AARCH64 183),
        or None when unknown."""
        ...

    def boot_id(self) -> Optional[str]:
        """This boot's id (``/proc/sys/kernel/random/boot_id``), or None when unknown: a record
        of what this kernel loaded is stale in another boot."""
        ...

    def insert(self, module: ModuleSource, params: str = "", flags: int = 0) -> None: ...

    def remove(self, name: str, flags: int = 0) -> None: ...
