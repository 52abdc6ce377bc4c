"""Where the framework keeps things on a host, all under ``KVC_ROOT`` when it is set."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from kvc.errors import ConfigError
from kvc.kmod.paths import HostPaths

# The original framework's library directories; later entries are sourced later and win.
LEGACY_LIBRARY_DIRS = ("/usr/local/lib/kvc", "/usr/lib/kvc")
# tigera's layout keeps everything under /etc; sourced after the others when present.
ETC_LIBRARY_DIR = "/etc/kvc/lib/kvc"


CACHE_ENV = "KVC_CACHE_DIR"
INSTALL_MANIFEST = "install.json"


def _component(value: str, what: str) -> str:
    """``value`` if it is one path component: names from confs and the command line become paths
    below kvc's directories and must not leave them (callers check names first; this is the
    backstop)."""
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise ConfigError(f"{what} {value!r} cannot name a file", hint="use letters, digits and . _ -")
    return value


@dataclass(frozen=True)
class Layout:
    host: HostPaths
    cache_override: str = ""  # KVC_CACHE_DIR: a cache shared by several KVC_ROOTs (tests, CI)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> Layout:
        env = os.environ if environ is None else environ
        return cls(HostPaths.from_env(env), env.get(CACHE_ENV, ""))

    @property
    def cache_dir(self) -> str:
        """Downloaded kernels and probe results: ``/var/cache/kvc`` unless ``KVC_CACHE_DIR`` is set."""
        return self.cache_override or self.host.host("/var/cache/kvc")

    @property
    def conf_dir(self) -> str:
        return self.host.host("/etc/kvc")

    def instance_conf(self, name: str) -> str:
        return os.path.join(self.conf_dir, f"{_component(name, 'instance name')}.conf")

    def bundle_dir(self, name: str) -> str:
        """Where ``kvc install`` copies an instance's bundle (its build context)."""
        return os.path.join(self.conf_dir, "bundles", _component(name, "instance name"))

    def etc_library(self, name: str) -> str:
        """Where ``kvc install`` puts a bundle's ``NAME-lib.sh``."""
        return os.path.join(self.host.host(ETC_LIBRARY_DIR), f"{_component(name, 'instance name')}-lib.sh")

    def wrapper(self, tool: str) -> str:
        return os.path.join(self.bin_dir, _component(tool, "wrapper tool"))

    @property
    def state_dir(self) -> str:
        return self.host.host("/var/lib/kvc")

    def instance_state(self, name: str) -> str:
        return os.path.join(self.state_dir, _component(name, "instance name"))

    def install_manifest(self, name: str) -> str:
        """What ``kvc install`` wrote for the instance (``kvc uninstall`` removes only that)."""
        return os.path.join(self.instance_state(name), INSTALL_MANIFEST)

    def kernel_state(self, name: str, kernel_release: str) -> str:
        """Extracted modules of one instance for one kernel: ``/var/lib/kvc/NAME/KVER``."""
        return os.path.join(self.instance_state(name), _component(kernel_release, "kernel release"))

    def verify_dir(self, name: str, kernel_release: str) -> str:
        """What ``kvc verify`` keeps of a failed (or ``--keep-artifacts``) run."""
        return os.path.join(self.state_dir, name, "verify", kernel_release)

    def verify_record(self, name: str, kernel_release: str) -> str:
        """The outcome of the last ``kvc verify`` of the instance for a kernel (read by status)."""
        return os.path.join(self.state_dir, name, "verify", f"{kernel_release}.json")

    def skip_record(self, name: str, kernel_release: str) -> str:
        """Why the instance's build skipped a kernel (a DKMS source's BUILD_EXCLUSIVE_*)."""
        return os.path.join(
            self.instance_state(name), "skipped", f"{_component(kernel_release, 'kernel release')}.json"
        )

    @property
    def lock_dir(self) -> str:
        return self.host.host("/run/kvc")

    @property
    def library_dirs(self) -> tuple[str, ...]:
        return tuple(self.host.host(path) for path in (*LEGACY_LIBRARY_DIRS, ETC_LIBRARY_DIR))

    @property
    def systemd_dir(self) -> str:
        return self.host.host("/etc/systemd/system")

    @property
    def bin_dir(self) -> str:
        return self.host.host("/usr/local/bin")
