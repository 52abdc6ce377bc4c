"""Architectures: a target is a kernel release *and* an architecture.

Most distributions name the architecture in the release: Debian's flavour (``6.1.0-57-arm64``,
``6.1.0-57-cloud-amd64``, ``6.1.0-57-rt-arm64``), Fedora's and RHEL's suffix
(``6.11.4-301.fc41.aarch64``, ``5.14.0-427.13.1.el9_4.x86_64+debug``). Where it does not
(Ubuntu's ``6.8.0-45-generic``, a custom build), the architecture is the host's unless the user
names one (``--arch``). One :class:`Arch` carries every spelling the tools around a module use.
"""

from __future__ import annotations

import enum
import os
import re
from typing import Optional

from kvc.errors import UsageError


class Arch(enum.Enum):
    """A Linux architecture kvc builds and verifies for; the value is Debian's (and Go's, OCI's)
    name."""

    AMD64 = "amd64"
    ARM64 = "arm64"

    @property
    def machine(self) -> str:
        """``uname -m`` on a host of this architecture, and RPM's name for it."""
        return _MACHINES[self]

    @property
    def elf_machine(self) -> int:
        """``e_machine`` of its modules: EM_X86_64 or EM_AARCH64."""
        return _ELF_MACHINES[self]

    @property
    def gnu_triplet(self) -> str:
        """The GNU triplet; ``TRIPLET-`` is the cross toolchain's prefix (``CROSS_COMPILE``)."""
        return f"{self.machine}-linux-gnu"

    @property
    def kernel_arch(self) -> str:
        """The kernel's ``ARCH=`` for kbuild."""
        return _KERNEL_ARCHES[self]

    @property
    def platform(self) -> str:
        """The OCI platform of its images (``podman build --platform``)."""
        return f"linux/{self.value}"

    def cross_compile(self, build: Arch) -> str:
        """kbuild's ``CROSS_COMPILE`` for building for this architecture on ``build``: empty for a
        native build, else the cross toolchain's prefix (``aarch64-linux-gnu-``)."""
        return "" if self is build else f"{self.gnu_triplet}-"


_MACHINES = {Arch.AMD64: "x86_64", Arch.ARM64: "aarch64"}
_ELF_MACHINES = {Arch.AMD64: 62, Arch.ARM64: 183}
_KERNEL_ARCHES = {Arch.AMD64: "x86", Arch.ARM64: "arm64"}
_BY_NAME = {
    **{arch.value: arch for arch in Arch},
    **{machine: arch for arch, machine in _MACHINES.items()},
}
# Debian: the flavour ends the release (-amd64, -cloud-amd64, -rt-arm64, -arm64-16k); Fedora and
# RHEL: .x86_64 or .aarch64 before an optional +variant (+debug, +rt, +64k).
_DEBIAN_FLAVOUR = re.compile(r"-(?:[a-z0-9]+-)?(amd64|arm64)(?:-16k)?$")
_RPM_ARCH = re.compile(r"\.(x86_64|aarch64)(?:\+[a-z0-9]+)?$")


def find_arch(name: str) -> Optional[Arch]:
    """The architecture ``name`` spells (``amd64``/``x86_64``, ``arm64``/``aarch64``, any case), or
    None."""
    return _BY_NAME.get(name.strip().lower())


def parse_arch(name: str) -> Arch:
    """:func:`find_arch`, with UsageError for a name it does not know."""
    arch = find_arch(name)
    if arch is None:
        known = ", ".join(f"{a.value} ({a.machine})" for a in Arch)
        raise UsageError(f"unknown architecture {name!r}", hint=f"kvc builds and verifies for {known}")
    return arch


def arch_of_release(release: str) -> Optional[Arch]:
    """The architecture the release's name says, or None when it says none."""
    match = _DEBIAN_FLAVOUR.search(release) or _RPM_ARCH.search(release)
    return parse_arch(match.group(1)) if match else None


def arch_of_elf_machine(machine: int) -> Optional[Arch]:
    """The architecture whose modules have ``e_machine`` ``machine``; None for any other."""
    return next((arch for arch, number in _ELF_MACHINES.items() if number == machine), None)


def known_host_arch() -> Optional[Arch]:
    """This host's architecture, or None on a host of one kvc does not build for."""
    return find_arch(os.uname().machine)


def default_arch(release: str) -> Optional[Arch]:
    """The architecture a target named only by its release has: what the release says, else the
    host's (None on a host kvc does not build for)."""
    return arch_of_release(release) or known_host_arch()


def tag_suffix(release: str, arch: Optional[Arch]) -> str:
    """What keeps a target's image names apart from other architectures' (local and registry tags):
    nothing when the release names its architecture (Debian's flavour, RPM's suffix) or when the
    target is amd64 (every image kvc and KVC made before architectures existed is an amd64 one, and
    keeps its name); ``-ARCH`` (``-arm64``) for another architecture of a release that names none,
    such as Ubuntu's ``6.8.0-45-generic``. It depends on the target only, never on the host, so the
    build host, the registry and the loading host agree on it."""
    if arch is None or arch is Arch.AMD64 or arch_of_release(release) is not None:
        return ""
    return f"-{arch.value}"


def host_arch() -> Arch:
    """This host's architecture; UsageError on one kvc does not build for."""
    machine = os.uname().machine
    try:
        return parse_arch(machine)
    except UsageError:
        raise UsageError(
            f"this host's architecture {machine} is not one kvc builds for",
            hint="name the target with --arch (amd64 or arm64) and a kernel release",
        ) from None


def target_arch(release: str, given: Optional[str] = None) -> Arch:
    """The target's architecture: ``given`` (``--arch``) if any, which must agree with what the
    release says; else what the release says; else the host's."""
    named = arch_of_release(release)
    if given is None:
        return named or host_arch()
    arch = parse_arch(given)
    if named is not None and named is not arch:
        raise UsageError(
            f"--arch {given} contradicts kernel {release}, which is an {named.value} kernel",
            hint=f"drop --arch, or name an {arch.value} kernel release",
        )
    return arch
