from __future__ import annotations

from pathlib import Path

import pytest

from kvc.kmod.fakekernel import FakeKernel
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel, debian_kernel, indexed_debian_kernel


@pytest.fixture(scope="session")
def kernel_tree() -> DebianKernel:
    """Debian's current 6.1 kernel package, unpacked (module tree without depmod output)."""
    return debian_kernel()


@pytest.fixture(scope="session")
def indexed_kernel_tree() -> DebianKernel:
    """The same tree with kmod's depmod output written into it."""
    return indexed_debian_kernel()


@pytest.fixture
def fake(indexed_kernel_tree: DebianKernel, tmp_path: Path) -> FakeKernel:
    """A fresh fake kernel of the Debian release, its exports from the headers' Module.symvers."""
    return FakeKernel.create(HostPaths(str(tmp_path / "root")), indexed_kernel_tree.release,
                             symvers=str(indexed_kernel_tree.symvers))
