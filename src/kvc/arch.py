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


def parse_arch(name: str) -> Arch:
    """``amd64``/``x86_64`` or ``arm64``/``aarch64`` (any case); UsageError otherwise."""
    arch = _BY_NAME.get(name.strip().lower())
    if arch is None:
        known = ", ".join(f"{a.value} ({a.machine})" for a in Arch)
        raise UsageError(f"unknown architecture {name!r}", hint=f"kvc builds and verifies for {known}")
    return arch


def arch_of_release(release: str) -> Optional[Arch]:
    """The architecture the release's name says, or None when it says none."""
    match = _DEBIAN_FLAVOUR.search(release) or _RPM_ARCH.search(release)
    return parse_arch(match.group(1)) if match else None


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
