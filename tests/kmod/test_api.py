"""kvc.kmod's public API: every name in ``__all__`` resolves to the object its module defines,
and importing the package loads none of them until used."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import kvc.kmod

# Where each public name is defined (a module maps to itself), as a user could import it directly.
DEFINED_IN = {
    "FakeKernel": "kvc.kmod.kernel.fake",
    "HostPaths": "kvc.kmod.paths",
    "IndexFormatError": "kvc.kmod.errors",
    "Kernel": "kvc.kmod.kernel.protocol",
    "KernelError": "kvc.kmod.kernel.protocol",
    "KmodError": "kvc.kmod.errors",
    "LiveKernel": "kvc.kmod.kernel.live",
    "LoadedModule": "kvc.kmod.kernel.protocol",
    "ModprobeConfig": "kvc.kmod.config",
    "ModuleDirectory": "kvc.kmod.moddir",
    "ModuleEntry": "kvc.kmod.moddir",
    "ModuleFile": "kvc.kmod.module",
    "ModuleFormatError": "kvc.kmod.errors",
    "ModuleState": "kvc.kmod.kernel.protocol",
    "PlannedModule": "kvc.kmod.modprobe",
    "kernel_from_env": "kvc.kmod.kernel.environment",
    "load_plan": "kvc.kmod.modprobe",
    "modname_normalize": "kvc.kmod.names",
}


def test_all_lists_each_public_name_once() -> None:
    assert len(set(kvc.kmod.__all__)) == len(kvc.kmod.__all__)
    assert set(DEFINED_IN) | {"depmod", "modprobe", "load_modprobe_config"} == set(kvc.kmod.__all__)


@pytest.mark.parametrize("name", sorted(DEFINED_IN))
def test_public_names_are_their_modules_objects(name: str) -> None:
    assert getattr(kvc.kmod, name) is getattr(importlib.import_module(DEFINED_IN[name]), name)


def test_public_modules_and_renamed_functions() -> None:
    assert kvc.kmod.depmod is importlib.import_module("kvc.kmod.depmod")
    assert kvc.kmod.modprobe is importlib.import_module("kvc.kmod.modprobe")
    assert kvc.kmod.load_modprobe_config is importlib.import_module("kvc.kmod.config").load_config
    assert set(kvc.kmod.__all__) <= set(dir(kvc.kmod))


def test_unknown_names_are_attribute_errors() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        kvc.kmod.nothing_here  # noqa: B018


def test_importing_the_package_loads_nothing_else_until_used() -> None:
    code = (
        "import sys, kvc.kmod\n"
        "print(sorted(m for m in sys.modules if m.startswith('kvc.')))\n"
        "from kvc.kmod import *\n"
        "print(sorted(n for n in kvc.kmod.__all__ if n not in globals()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.splitlines() == ["['kvc.kmod']", "[]"]
