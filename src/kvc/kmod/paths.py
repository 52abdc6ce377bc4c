"""Where host files live. ``KVC_ROOT=DIR`` makes every host path resolve under DIR, so tests and
image builds can point kvc at a fake ``/proc``, ``/sys``, ``/lib/modules`` and ``/etc``."""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple, Optional

ROOT_ENV = "KVC_ROOT"
KERNEL_ENV = "KVC_KERNEL"


class HostPaths(NamedTuple):
    root: str = "/"

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> HostPaths:
        env = os.environ if environ is None else environ
        return cls(env.get(ROOT_ENV) or "/")

    def host(self, path: str) -> str:
        """An absolute host path, resolved under the root."""
        if self.root in ("", "/"):
            return path
        return os.path.join(self.root, path.lstrip("/"))

    @property
    def proc(self) -> str:
        return self.host("/proc")

    @property
    def sys_module(self) -> str:
        return self.host("/sys/module")

    @property
    def lib_modules(self) -> str:
        return self.host("/lib/modules")

    def module_dir(self, kernel_release: str) -> str:
        return os.path.join(self.lib_modules, kernel_release)

    @property
    def etc(self) -> str:
        return self.host("/etc")

    def kernel_release(self) -> str:
        """The running kernel's release; under a root, the root's ``proc/sys/kernel/osrelease``
        when it exists (a fake kernel keeps its release there)."""
        if self.root not in ("", "/"):
            try:
                with open(self.host("/proc/sys/kernel/osrelease"), encoding="utf-8") as handle:
                    release = handle.read().strip()
                if release:
                    return release
            except OSError:
                pass
        return os.uname().release
