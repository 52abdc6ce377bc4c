"""Shared fixtures, and the test tiers: plain ``pytest`` runs the fast set; ``--all`` (what
scripts/test.sh and CI pass) or an explicit ``-m`` adds the slow tiers: ``oracle`` (Debian's kernel
package and kmod side by side), ``podman`` (real image builds), ``vm`` (real kernels under qemu),
``onefile`` (the single-file kvc built in a Debian 11 root and run where there is no Python),
``registry`` (push and pull through a local TLS registry with basic auth), ``k8s`` (a real
Kubernetes control plane built from Debian's sources, tests/support/controlplane.py) and
``reliability`` (the CI-sized runs of the fault scripts; today the fuzzer, scripts/fuzz.py).
A test that needs Debian's kernel tree is in the oracle tier whether or not it says so."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel, arm64_kernel, debian_kernel, indexed_debian_kernel
from support.onefile import build_onefile
from support.registry import LocalRegistry

SLOW_TIERS = ("oracle", "podman", "vm", "onefile", "registry", "k8s", "reliability")
NEEDS_DEBIAN_KERNEL = {"kernel_tree", "indexed_kernel_tree", "arch_tree"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", help=f"also run the slow tiers ({', '.join(SLOW_TIERS)})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if NEEDS_DEBIAN_KERNEL & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.oracle)
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    slow = [item for item in items if any(item.get_closest_marker(tier) for tier in SLOW_TIERS)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


@pytest.fixture(scope="session")
def kernel_tree() -> DebianKernel:
    """Debian's current 6.1 kernel package, unpacked (module tree without depmod output)."""
    return debian_kernel()


@pytest.fixture(scope="session", params=["amd64", "arm64"])
def arch_tree(request: pytest.FixtureRequest) -> DebianKernel:
    """Debian's current 6.1 kernel package for each architecture the whole-tree comparisons run
    on: the host's amd64 one and the arm64 one of the same ABI (ELF64 little-endian, EM_AARCH64;
    first compared on 6.1.0-57-arm64, 6.1.192-3, with kmod 30+20221128-1). Unpacked, not indexed."""
    return debian_kernel() if request.param == "amd64" else arm64_kernel()


@pytest.fixture(scope="session")
def indexed_kernel_tree() -> DebianKernel:
    """The same tree with kmod's depmod output written into it."""
    return indexed_debian_kernel()


@pytest.fixture
def fake(indexed_kernel_tree: DebianKernel, tmp_path: Path) -> FakeKernel:
    """A fresh fake kernel of the Debian release, its exports from the headers' Module.symvers."""
    return FakeKernel.create(
        HostPaths(str(tmp_path / "root")), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers)
    )


@pytest.fixture(scope="session")
def onefile_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of one scripts/build-onefile.sh run: kvc, kmods-via-containers and kvc-onedir/."""
    output = tmp_path_factory.mktemp("onefile")
    build_onefile(output)
    return output


@pytest.fixture(scope="session")
def local_registry() -> Iterator[LocalRegistry]:
    """Debian's docker-registry on 127.0.0.1 with TLS (a test CA) and basic auth, for the session."""
    with LocalRegistry() as registry:
        yield registry
