"""The real Debian kernel the tests run against: its module tree, vmlinuz and Module.symvers.

The version is the one Debian's ``linux-image-amd64`` metapackage names. The package is fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` once, into a cache directory
(``KVC_TEST_CACHE``, default ``~/.cache/kvc-test``) that later runs reuse. The arm64 package of
the same ABI comes the same way, through a private apt state (:func:`private_apt`).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Optional

MODULE_SUFFIXES = (".ko", ".ko.gz", ".ko.xz", ".ko.zst")


@dataclass(frozen=True)
class DebianKernel:
    release: str
    root: Path  # a root directory holding boot/ and lib/modules/RELEASE/

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def symvers(self) -> Path:
        return Path("/usr/src") / f"linux-headers-{self.release}" / "Module.symvers"

    @property
    def system_map(self) -> Path:
        return self.root / "boot" / f"System.map-{self.release}"

    def modules(self) -> list[Path]:
        """Every module file of the tree, plain (``.ko``) or compressed (6.12's ``.ko.xz``)."""
        return sorted(path for path in self.moddir.rglob("*.ko*") if path.name.endswith(MODULE_SUFFIXES))


def cache_dir() -> Path:
    return Path(os.environ.get("KVC_TEST_CACHE") or Path.home() / ".cache" / "kvc-test")


def current_release() -> str:
    """The kernel release (e.g. 6.1.0-56-amd64) that linux-image-amd64 depends on."""
    out = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"Depends: linux-image-(\d+\.\d+\.\d+-\d+-amd64)\b", out)
    if not match:
        raise RuntimeError(f"linux-image-amd64 names no kernel image: {out!r}")
    return match.group(1)


def private_apt(state: Path, architecture: str) -> dict[str, str]:
    """An environment in which apt reads the host's sources for ``architecture`` as well as the
    host's own, into lists and caches of its own under ``state`` (kvc verify's own apt
    configuration, :func:`kvc.verify.debarch.apt_environment`): the system's dpkg architectures
    and apt state stay untouched."""
    from kvc.arch import parse_arch
    from kvc.verify.debarch import apt_environment

    return {**os.environ, **apt_environment(str(state), parse_arch(architecture))}


def unpacked_packages(base: Path, packages: list[str], architecture: Optional[str] = None) -> Path:
    """``base/tree``: Debian's ``packages`` fetched with ``apt-get download`` and unpacked there
    with ``dpkg-deb -x``, once (under a lock; a ``.complete`` mark says it was done). Packages of
    a foreign ``architecture`` (named ``PACKAGE:ARCH``) come through a private apt state."""
    root = base / "tree"
    done = base / ".complete"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            download = base / "download"
            shutil.rmtree(download, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
            download.mkdir()
            env = private_apt(download / "apt", architecture) if architecture else None
            subprocess.run(
                ["apt-get", "download", "-q", *packages], cwd=download, check=True, capture_output=True, env=env
            )
            debs = sorted(download.glob("*.deb"))
            assert len(debs) == len(packages), debs
            for deb in debs:
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            shutil.rmtree(download)
            done.touch()
    return root


@cache
def kernel_package(release: str) -> DebianKernel:
    """Debian's ``linux-image-RELEASE``, downloaded and unpacked (not installed) into the cache."""
    return DebianKernel(release, unpacked_packages(cache_dir() / release, [f"linux-image-{release}"]))


@cache
def debian_kernel() -> DebianKernel:
    return kernel_package(current_release())


@cache
def arm64_kernel() -> DebianKernel:
    """Debian's ``linux-image-ABI-arm64`` of the ABI linux-image-amd64 names, unpacked."""
    release = current_release().rsplit("-", 1)[0] + "-arm64"
    return DebianKernel(
        release, unpacked_packages(cache_dir() / release, [f"linux-image-{release}:arm64"], architecture="arm64")
    )


@cache
def indexed_debian_kernel() -> DebianKernel:
    """The same tree with kmod's own depmod output (modules.dep, *.bin, ...) written into it."""
    return _indexed(debian_kernel())


@cache
def indexed_kernel_package(release: str) -> DebianKernel:
    """Debian's ``linux-image-RELEASE`` (another release than the current one), unpacked and
    indexed the same way."""
    return _indexed(kernel_package(release))


def _indexed(kernel: DebianKernel) -> DebianKernel:
    base = kernel.root.parent
    done = base / ".indexed"
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            subprocess.run(
                ["depmod", "-C", "/dev/null", "-b", str(kernel.root), kernel.release], check=True, capture_output=True
            )
            done.touch()
    return kernel


def dependency_chain(kernel: DebianKernel, name: str) -> list[str]:
    """A module and its dependencies as the kernel's modules.dep lists them, deepest first."""
    from kvc.kmod.moddir import ModuleDirectory

    entry = ModuleDirectory(str(kernel.moddir)).lookup_module(name)
    assert entry is not None and entry.path is not None
    return [*reversed(entry.dependencies), entry.path]


def module_path(kernel: DebianKernel, name: str) -> str:
    return dependency_chain(kernel, name)[-1]
