"""The single-file kvc and the root without Python it runs in, for the tests that use them
(tests/conftest.py's ``onefile_build`` fixture; tests/framework/test_onefile.py,
tests/verify/test_verify_onefile.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
SCRIPT = TOP / "scripts" / "build-onefile.sh"
CACHE = Path(os.environ.get("KVC_BUILD_CACHE", "/var/cache/kvc-build"))
RUN_SUITE = "bullseye"  # glibc 2.31, below the 2.35-2.36 a bookworm-built bundle would need
# Mounts made under this prefix vanish with the command, even when it is killed.
PRIVATE_MOUNTS = ("unshare", "--mount", "--propagation", "private", "--")


def build_onefile(output: Path) -> None:
    """One build-onefile.sh run into OUTPUT: kvc, kmods-via-containers and kvc-onedir/."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--onedir", "--output", str(output)], capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr


def minbase_root() -> Path:
    """A debootstrap --variant=minbase RUN_SUITE root from the host's mirror, made once into the
    build cache (in a private mount namespace, so debootstrap's /proc and /sys go with it)."""
    root = CACHE / "test-roots" / f"{RUN_SUITE}-minbase"
    if (root / ".kvc-ready").exists():
        return root
    mirror = subprocess.run(
        ["bash", "-c", '. "$1"; apt_mirror_for "$2"', "sh", str(TOP / "scripts/lib/apt-sources.sh"), RUN_SUITE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert mirror, f"no Debian mirror for {RUN_SUITE} in the host's apt sources"
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    proc = subprocess.run(
        [*PRIVATE_MOUNTS, "debootstrap", "--variant=minbase", RUN_SUITE, str(partial), mirror],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    (partial / ".kvc-ready").touch()
    partial.rename(root)
    return root
