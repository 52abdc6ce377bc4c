"""Targets' architectures: from the release's name, --arch, or the host."""

from __future__ import annotations

import os

import pytest

from kvc.arch import Arch, arch_of_release, host_arch, parse_arch, target_arch
from kvc.errors import UsageError


@pytest.mark.parametrize(
    ("release", "arch"),
    [
        ("6.1.0-57-amd64", Arch.AMD64),
        ("6.1.0-57-cloud-amd64", Arch.AMD64),
        ("6.1.0-57-rt-arm64", Arch.ARM64),
        ("6.1.0-57-arm64", Arch.ARM64),
        ("6.12.9+bpo-arm64", Arch.ARM64),
        ("6.12.38+deb13-arm64-16k", Arch.ARM64),
        ("6.11.4-301.fc41.aarch64", Arch.ARM64),
        ("5.14.0-427.13.1.el9_4.x86_64", Arch.AMD64),
        ("5.14.0-427.13.1.el9_4.x86_64+debug", Arch.AMD64),
        ("6.8.0-45-generic", None),
        ("6.1.0-57-amd64x", None),
        ("6.6.0-custom", None),
    ],
)
def test_the_release_names_the_architecture(release: str, arch: Arch) -> None:
    assert arch_of_release(release) is arch


def test_spellings_and_properties() -> None:
    assert parse_arch("AArch64") is Arch.ARM64 and parse_arch("x86_64") is Arch.AMD64
    assert (Arch.ARM64.elf_machine, Arch.ARM64.gnu_triplet, Arch.ARM64.kernel_arch) == (
        183,
        "aarch64-linux-gnu",
        "arm64",
    )
    assert (Arch.AMD64.elf_machine, Arch.AMD64.machine, Arch.AMD64.kernel_arch) == (62, "x86_64", "x86")
    with pytest.raises(UsageError, match="unknown architecture 'riscv64'"):
        parse_arch("riscv64")


def test_the_target_is_the_release_then_arch_then_the_host() -> None:
    assert target_arch("6.1.0-57-arm64") is Arch.ARM64
    assert target_arch("6.8.0-45-generic", "arm64") is Arch.ARM64
    assert target_arch("6.8.0-45-generic") is host_arch() is parse_arch(os.uname().machine)
    assert target_arch("6.1.0-57-arm64", "aarch64") is Arch.ARM64
    with pytest.raises(UsageError, match=r"contradicts kernel 6\.1\.0-57-arm64") as refused:
        target_arch("6.1.0-57-arm64", "amd64")
    assert "name an amd64 kernel release" in refused.value.hint
