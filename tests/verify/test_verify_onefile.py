"""``kvc verify`` from the single-file kvc, with a guest whose root has no Python: the Debian 11
minbase root (tests/support/onefile.py) shared as the guest's root (``--guest-root``), the
one-file kvc (tests/conftest.py's ``onefile_build``) shared from its own directory and run as the
guest agent, simple-kmod built with podman and verified on Debian's real kernel under qemu (TCG);
its smoke test runs chrooted into the image, so nothing in the guest needs Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from kvc.verify.initramfs import find_busybox
from support.debian_kernel import DebianKernel
from support.example import unique_prefix, write_example_conf
from support.onefile import minbase_root

pytestmark = [
    pytest.mark.vm,
    pytest.mark.podman,
    pytest.mark.onefile,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap needs root"),
]

SHARED_CACHE = Path(os.environ.get("KVC_TEST_CACHE") or Path.home() / ".cache" / "kvc-test") / "kvc"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique instance name prefix; its images are removed afterwards."""
    with unique_prefix("kvcof") as prefix:
        yield prefix


def test_simple_kmod_verified_by_the_single_file_kvc_in_a_guest_without_python(
    onefile_build: Path, indexed_kernel_tree: DebianKernel, prefix: str, tmp_path: Path
) -> None:
    for program in ("qemu-system-x86_64", "podman"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    find_busybox()
    guest_root = minbase_root()
    pythons = [p for pattern in ("usr/bin/python*", "usr/lib/python3*") for p in guest_root.glob(pattern)]
    assert not pythons, pythons
    assert not (guest_root / "usr" / "bin" / "python3").exists() and not (guest_root / "usr/local/bin/kvc").exists()
    release = indexed_kernel_tree.release
    env = {**os.environ, "KVC_ROOT": str(tmp_path / "root"), "KVC_CACHE_DIR": str(SHARED_CACHE)}
    name = f"{prefix}-simple"
    write_example_conf(tmp_path / "root", name)
    built = subprocess.run(
        [sys.executable, "-m", "kvc", "build", name, "--kernel", release],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    args = ["verify", name, "--kernel", release, "--kernel-dir", str(indexed_kernel_tree.root), "--accel", "tcg"]
    proc = subprocess.run(
        [str(onefile_build / "kvc"), *args, "--guest-root", str(guest_root), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert proc.stdout, proc.stderr
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, json.dumps(report, indent=2)
    assert report["status"] == "verified" and report["vm"]["guest_root"] == str(guest_root)
    modules = {m["name"]: m for m in report["modules"]}
    assert list(modules) == ["simple_kmod", "simple_procfs_kmod"]
    assert all(m["loaded"] and m["origin"] == "instance" for m in modules.values())
    smoke = report["smoke"]
    assert smoke["exit_code"] == 0 and smoke["in_image"], smoke
    assert "simple-procfs-kmod number = 44" in smoke["stdout"]
    assert [(u["name"], u["removed"]) for u in report["unload"]] == [
        ("simple_procfs_kmod", True),
        ("simple_kmod", True),
    ]
    timings = report["timings"]
    print(
        f"\nsingle-file kvc verify: boot {timings['boot_seconds']} s, agent {timings['guest_seconds']} s, "
        f"VM {timings['vm_seconds']} s, total {timings['total_seconds']} s"
    )
