"""Benchmark: a host that pulls its prebuilt modules against a host that builds them.

Both hosts are fresh ``KVC_ROOT``s with a fake kernel of Debian's current release and a container
storage of their own (``KVC_RUNTIME_ARGS=--root ... --runroot ...``), both empty except for the
local Debian base image, which the building host needs and the pulling host does not have:

* **build**: ``kvc build`` of the simple-kmod example (compiler, headers from the mirror, every
  layer made anew: a host's first boot without a registry), then ``kvc load``;
* **pull**: ``kvc build`` with ``KVC_REGISTRY`` and ``KVC_REGISTRY_FALLBACK=fail`` (pull the image a
  build host pushed, check its labels and vermagic), then ``kvc load``.

The registry is Debian's docker-registry on 127.0.0.1 with TLS and basic auth
(tests/support/registry.py); the image is built and pushed once first from podman's default storage
(not timed). Prints each phase's wall time, the totals and the ratio build/pull, and the bytes each
host's storage holds afterwards. Exit status: 0 success; 1 a step failed; 2 a missing prerequisite.

Run as root after ``bash scripts/setup.sh --containers``:
``.venv/bin/python benchmarks/bench_distribute.py``
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.debian_kernel import indexed_debian_kernel
from support.example import write_example_conf
from support.registry import LocalRegistry

KVC = [sys.executable, "-m", "kvc"]


def run(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(f"bench: {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        sys.exit(1)
    return elapsed


def host(
    top: Path, label: str, name: str, release: str, symvers: str, registry: LocalRegistry, extra: str
) -> dict[str, str]:
    root = top / label
    storage = f"--root {top / (label + '-storage')} --runroot {top / (label + '-run')}"
    write_example_conf(root, name, extra)
    (root / "etc" / "kvc" / "kmods-via-containers.conf").write_text(
        f"KVC_RUNTIME_ARGS='{storage}'\nKVC_REGISTRY_AUTH_FILE={registry.auth_file}\n"
        f"KVC_REGISTRY_CERTS_DIR={registry.certs_dir}\n"
    )
    FakeKernel.create(HostPaths(str(root)), release, symvers=symvers)
    return {"KVC_ROOT": str(root), "KVC_KERNEL": "fake"}


def storage_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def copy_base_image(top: Path, label: str) -> None:
    """The local Debian base image into a host's own storage (a building host needs it)."""
    archive = top / "base.tar"
    if not archive.exists():
        subprocess.run(
            ["podman", "save", "-o", str(archive), "localhost/debian:bookworm"], check=True, capture_output=True
        )
    storage = ["--root", str(top / f"{label}-storage"), "--runroot", str(top / f"{label}-run")]
    subprocess.run(["podman", *storage, "load", "-i", str(archive)], check=True, capture_output=True)


def main() -> int:
    for program in ("podman", "docker-registry", "htpasswd", "openssl"):
        if not shutil.which(program):
            sys.stderr.write(f"bench: {program} is missing: run bash scripts/setup.sh --containers\n")
            return 2
    kernel = indexed_debian_kernel()
    name = f"kvcbench{os.getpid()}"
    with LocalRegistry() as registry, tempfile.TemporaryDirectory(prefix="kvc-bench-") as scratch:
        top = Path(scratch)
        repo = f"{registry.host}/kvc/{name}"
        publisher = host(
            top, "publisher", name, kernel.release, str(kernel.symvers), registry, f"KVC_REGISTRY={repo}\n"
        )
        (top / "publisher" / "etc" / "kvc" / "kmods-via-containers.conf").write_text(
            f"KVC_REGISTRY_AUTH_FILE={registry.auth_file}\nKVC_REGISTRY_CERTS_DIR={registry.certs_dir}\n"
        )
        run([*KVC, "build", name, "--push"], publisher)

        builder = host(top, "builder", name, kernel.release, str(kernel.symvers), registry, "")
        copy_base_image(top, "builder")
        build = run([*KVC, "build", name], builder)
        build_load = run([*KVC, "load", name], builder)

        puller = host(
            top,
            "puller",
            name,
            kernel.release,
            str(kernel.symvers),
            registry,
            f"KVC_REGISTRY={repo}\nKVC_REGISTRY_FALLBACK=fail\n",
        )
        pull = run([*KVC, "build", name], puller)
        pull_load = run([*KVC, "load", name], puller)

        print(f"simple-kmod for {kernel.release}, fresh storage on each host")
        print(
            f"  build host:  build {build:7.1f} s  load {build_load:5.2f} s  total {build + build_load:7.1f} s  "
            f"storage {storage_bytes(top / 'builder-storage') / 1e6:6.0f} MB"
        )
        print(
            f"  pull host:   pull  {pull:7.1f} s  load {pull_load:5.2f} s  total {pull + pull_load:7.1f} s  "
            f"storage {storage_bytes(top / 'puller-storage') / 1e6:6.0f} MB"
        )
        print(f"  build/pull: {(build + build_load) / (pull + pull_load):.1f}x")
        subprocess.run(["podman", "rmi", "-f", f"{name}-1.0.0:{kernel.release}"], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
