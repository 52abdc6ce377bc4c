"""kvc.kmod: a pure-Python kernel module library in the spirit of libkmod.

It reads module files, kmod's index files and the kernel's view of loaded modules, and talks to
the kernel. It imports nothing from the rest of kvc.

What a user needs is named in ``__all__``: the classes and functions below, and the modules
``depmod`` (kmod 30's depmod as a library: ``depmod.run``) and ``modprobe`` (``load_plan``, with
``load_modprobe_config`` to read modprobe.d). Each is imported when first used, so that starting
one kmod tool does not load the whole library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvc.kmod import depmod, modprobe
    from kvc.kmod.config import ModprobeConfig
    from kvc.kmod.config import load_config as load_modprobe_config
    from kvc.kmod.errors import IndexFormatError, KmodError, ModuleFormatError
    from kvc.kmod.kernel.environment import kernel_from_env
    from kvc.kmod.kernel.fake import FakeKernel
    from kvc.kmod.kernel.live import LiveKernel
    from kvc.kmod.kernel.protocol import Kernel, KernelError, LoadedModule, ModuleState
    from kvc.kmod.moddir import ModuleDirectory, ModuleEntry
    from kvc.kmod.modprobe import PlannedModule, load_plan
    from kvc.kmod.module import ModuleFile
    from kvc.kmod.names import modname_normalize
    from kvc.kmod.paths import HostPaths

# Each public name: the module that defines it, and its name there ("" for the module itself).
_PUBLIC = {
    "FakeKernel": ("kvc.kmod.kernel.fake", "FakeKernel"),
    "HostPaths": ("kvc.kmod.paths", "HostPaths"),
    "IndexFormatError": ("kvc.kmod.errors", "IndexFormatError"),
    "Kernel": ("kvc.kmod.kernel.protocol", "Kernel"),
    "KernelError": ("kvc.kmod.kernel.protocol", "KernelError"),
    "KmodError": ("kvc.kmod.errors", "KmodError"),
    "LiveKernel": ("kvc.kmod.kernel.live", "LiveKernel"),
    "LoadedModule": ("kvc.kmod.kernel.protocol", "LoadedModule"),
    "ModprobeConfig": ("kvc.kmod.config", "ModprobeConfig"),
    "ModuleDirectory": ("kvc.kmod.moddir", "ModuleDirectory"),
    "ModuleEntry": ("kvc.kmod.moddir", "ModuleEntry"),
    "ModuleFile": ("kvc.kmod.module", "ModuleFile"),
    "ModuleFormatError": ("kvc.kmod.errors", "ModuleFormatError"),
    "ModuleState": ("kvc.kmod.kernel.protocol", "ModuleState"),
    "PlannedModule": ("kvc.kmod.modprobe", "PlannedModule"),
    "depmod": ("kvc.kmod.depmod", ""),
    "kernel_from_env": ("kvc.kmod.kernel.environment", "kernel_from_env"),
    "load_modprobe_config": ("kvc.kmod.config", "load_config"),
    "load_plan": ("kvc.kmod.modprobe", "load_plan"),
    "modname_normalize": ("kvc.kmod.names", "modname_normalize"),
    "modprobe": ("kvc.kmod.modprobe", ""),
}

__all__ = [
    "FakeKernel",
    "HostPaths",
    "IndexFormatError",
    "Kernel",
    "KernelError",
    "KmodError",
    "LiveKernel",
    "LoadedModule",
    "ModprobeConfig",
    "ModuleDirectory",
    "ModuleEntry",
    "ModuleFile",
    "ModuleFormatError",
    "ModuleState",
    "PlannedModule",
    "depmod",
    "kernel_from_env",
    "load_modprobe_config",
    "load_plan",
    "modname_normalize",
    "modprobe",
]


def __getattr__(name: str) -> object:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _PUBLIC[name]
    module = importlib.import_module(module_name)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
