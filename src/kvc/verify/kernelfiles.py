"""Where the files of a kernel to verify against come from: its ``vmlinuz`` and its module tree
``lib/modules/KVER`` (with kmod's indexes).

A source is anything with a ``description`` and ``find(release)`` answering the files or what it
lacks (:class:`KernelSource`). The default sources, tried in order: a directory the user names
(``--kernel-dir``, then the only source), else the host's own ``/boot`` and ``/lib/modules`` (also
``/lib/modules/KVER/vmlinuz``, as Fedora, CoreOS and bootc keep it), else the distribution's
package: on Debian ``apt-get download linux-image-KVER`` and ``dpkg-deb -x`` into the cache,
indexed with kvc's own depmod (a kernel of another architecture, ``linux-image-KVER:arm64`` on an
amd64 host, through kvc's own apt configuration: :mod:`kvc.verify.debarch`). Unpacked packages
are kept in the cache (``/var/cache/kvc/kernels/KVER``), so only the first verification of a
kernel downloads it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from kvc import proc
from kvc.arch import arch_of_release, host_arch
from kvc.errors import CommandError, KernelMissingError
from kvc.kmod import depmod
from kvc.verify import debarch

INDEX_FILES = ("modules.dep.bin", "modules.dep")


@dataclass(frozen=True)
class KernelFiles:
    release: str
    vmlinuz: str
    moddir: str  # .../lib/modules/KVER
    source: str  # where they came from, for people


class KernelSource(Protocol):
    @property
    def description(self) -> str: ...

    def find(self, release: str) -> tuple[Optional[KernelFiles], str]:
        """The kernel's files, or None and what this source lacks."""


def _first_existing(paths: Sequence[str]) -> Optional[str]:
    return next((path for path in paths if os.path.isfile(path)), None)


def _indexed(moddir: str) -> bool:
    return any(os.path.isfile(os.path.join(moddir, name)) for name in INDEX_FILES)


def find_in_tree(root: str, release: str) -> tuple[Optional[KernelFiles], str]:
    """The kernel's files in a root directory laid out like a system (or holding them directly),
    and, when they are not all there, what is missing."""
    moddirs = [os.path.join(root, sub, release) for sub in ("lib/modules", "usr/lib/modules", "modules")]
    moddir = next((path for path in moddirs if os.path.isdir(os.path.join(path, "kernel"))), None)
    vmlinuz = _first_existing(
        [
            os.path.join(root, "boot", f"vmlinuz-{release}"),
            os.path.join(root, f"vmlinuz-{release}"),
            *([os.path.join(moddir, "vmlinuz")] if moddir else []),
            os.path.join(root, "vmlinuz"),
        ]
    )
    if vmlinuz is None:
        return None, f"no vmlinuz-{release} in {os.path.join(root, 'boot')}"
    if moddir is None:
        return None, f"no module tree {moddirs[0]}"
    if not _indexed(moddir):
        return None, f"{moddir} has no modules.dep (run 'depmod -b {root} {release}')"
    return KernelFiles(release, vmlinuz, moddir, root), ""


def _debian_package(cache_dir: str, release: str) -> tuple[str, Optional[dict[str, str]]]:
    """The package's name and, for a kernel of another architecture than the host's, the
    environment of kvc's own apt configuration that knows that architecture."""
    arch = arch_of_release(release)
    if arch is None or arch is host_arch():
        return f"linux-image-{release}", None
    return f"linux-image-{release}:{arch.value}", debarch.apt_environment(cache_dir, arch)


def _known(package: str, env: Optional[dict[str, str]]) -> bool:
    if env is not None:
        return debarch.known(env, package)
    shown = proc.run(["apt-cache", "show", "--no-all-versions", package], check=False)
    return shown.returncode == 0 and bool(shown.stdout.strip())


def fetch_debian_kernel(cache_dir: str, release: str) -> tuple[Optional[KernelFiles], str]:
    """Debian's package for ``release``, unpacked (once) under ``cache_dir/kernels/KVER``."""
    base = os.path.join(cache_dir, "kernels", release)
    root = os.path.join(base, "tree")
    package = f"linux-image-{release}"
    if not os.path.isfile(os.path.join(base, debarch.COMPLETE_MARK)):
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            return None, "no apt-get and dpkg-deb here to fetch a Debian kernel package"
        try:
            wanted, env = _debian_package(cache_dir, release)
            known = _known(wanted, env)
        except CommandError as exc:
            return None, f"kvc's apt configuration for {release}: {exc.brief}"
        if not known:
            return None, f"no package {wanted} in this machine's apt sources (apt-cache show {wanted})"
        # Debian's package carries no indexes (its postinst runs depmod on install): kvc's depmod.
        unpacked, problem = debarch.unpack(base, [wanted], env, lambda tree: index_module_tree(tree, release))
        if unpacked is None:
            return None, problem
    found, problem = find_in_tree(root, release)
    if found is None:
        return None, f"the unpacked {package} is incomplete: {problem}"
    return dataclasses.replace(found, source=f"Debian package {package} (cached in {base})"), ""


@dataclass(frozen=True)
class DirectorySource:
    """A root directory laid out like a system (the host's own root, too), or holding the files
    directly; ``label`` says where the files came from in reports (default: the root)."""

    root: str
    description: str = "directory"
    label: str = ""

    def find(self, release: str) -> tuple[Optional[KernelFiles], str]:
        found, problem = find_in_tree(self.root, release)
        if found is None or not self.label:
            return found, problem
        return dataclasses.replace(found, source=f"{self.label} ({found.vmlinuz})"), ""


@dataclass(frozen=True)
class DebianPackageSource:
    cache_dir: str
    description: str = "distribution package"

    def find(self, release: str) -> tuple[Optional[KernelFiles], str]:
        return fetch_debian_kernel(self.cache_dir, release)


def default_sources(*, kernel_dir: Optional[str], host_root: str, cache_dir: str) -> list[KernelSource]:
    if kernel_dir is not None:
        return [DirectorySource(os.path.abspath(kernel_dir), f"--kernel-dir {kernel_dir}")]
    return [DirectorySource(host_root, "host", "this host"), DebianPackageSource(cache_dir)]


def index_module_tree(root: str, release: str) -> str:
    """Write kmod's indexes into ``root/lib/modules/RELEASE`` with kvc's depmod (no depmod.d
    configuration, as ``depmod -C /dev/null -b ROOT RELEASE``); "" or what went wrong."""
    messages: list[str] = []
    log = depmod.Log(lambda level, text: messages.append(text.strip()))
    options = depmod.DepmodOptions(release, basedir=root, config_paths=())
    try:
        result = depmod.run(options, log)
        written = depmod.write_outputs(options.dirname, result.files, log)
    except depmod.DepmodError:
        written = False
    return "" if written else f"depmod for {options.dirname} failed: {messages[-1] if messages else 'no output'}"


def find_kernel(release: str, sources: Sequence[KernelSource]) -> KernelFiles:
    """The kernel's files from the first source that has them; KernelMissingError naming what
    each source lacked otherwise."""
    problems = []
    for source in sources:
        found, problem = source.find(release)
        if found is not None:
            return found
        problems.append(f"{source.description}: {problem}")
    raise KernelMissingError(
        f"kernel {release} not found",
        details="\n".join(problems),
        hint=f"pass --kernel-dir DIR, a directory holding boot/vmlinuz-{release} and an "
        f"indexed lib/modules/{release} (e.g. the kernel package unpacked)",
    )
