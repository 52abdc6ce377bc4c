"""Choosing a kernel: ``KVC_KERNEL=fake`` selects the fake one kept under ``KVC_ROOT``
(:mod:`kvc.kmod.kernel.fake`, imported only then), anything else the live one."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Mapping, Optional

from kvc.kmod.kernel.live import LiveKernel
from kvc.kmod.kernel.protocol import Kernel
from kvc.kmod.paths import KERNEL_ENV, HostPaths

if TYPE_CHECKING:
    from kvc.kmod.kernel.fake import FakeKernel


def fake_kernel_from_env(paths: Optional[HostPaths] = None, environ: Optional[Mapping[str, str]] = None) -> FakeKernel:
    """The fake kernel kept under ``KVC_ROOT``."""
    from kvc.kmod.kernel.fake import FakeKernel

    return FakeKernel(paths or HostPaths.from_env(environ))


def kernel_from_env(paths: Optional[HostPaths] = None, environ: Optional[Mapping[str, str]] = None) -> Kernel:
    """The fake kernel under ``KVC_ROOT`` when ``KVC_KERNEL=fake``, else the live kernel."""
    env = os.environ if environ is None else environ
    host = paths or HostPaths.from_env(env)
    if env.get(KERNEL_ENV) == "fake":
        return fake_kernel_from_env(host)
    return LiveKernel(host)
