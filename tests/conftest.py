from __future__ import annotations

import pytest

from support.debian_kernel import DebianKernel, debian_kernel, indexed_debian_kernel


@pytest.fixture(scope="session")
def kernel_tree() -> DebianKernel:
    """Debian's current 6.1 kernel package, unpacked (module tree without depmod output)."""
    return debian_kernel()


@pytest.fixture(scope="session")
def indexed_kernel_tree() -> DebianKernel:
    """The same tree with kmod's depmod output written into it."""
    return indexed_debian_kernel()
