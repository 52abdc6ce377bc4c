"""The CI-sized concurrency run (scripts/concurrency.py runs three rounds): 20 kvc commands at once
(load, unload, status, build, verify) on one instance, then on two, on a fake-kernel host with real
podman and a fake qemu. Every command exits 0 or busy (11, only the impatient ones), the fake kernel
never gets a module twice, no exclusive lock hold overlaps another, and kvc status, the kernel and
podman agree at the end with nothing left behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.debian_kernel import DebianKernel

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.skipif(not shutil.which("podman"), reason="needs podman"),
]

CONCURRENCY = Path(__file__).resolve().parents[2] / "scripts" / "concurrency.py"
MIX = {"load": 5, "unload": 4, "status": 5, "build": 3, "verify": 3}


def test_twenty_commands_at_once_leave_every_instance_consistent(
    indexed_kernel_tree: DebianKernel, tmp_path: Path
) -> None:
    figures = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(CONCURRENCY), "--rounds", "1", "--seed", "15", "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(figures.read_text())
    assert data["problems"] == []
    for kind, count in MIX.items():
        row = data["kinds"][kind]
        assert row["runs"] == 2 * count, (kind, row)  # one instance, then two
        assert set(row["exits"]) <= ({"0", "11"} if kind in ("load", "unload") else {"0"}), (kind, row)
    assert data["inserts"] >= 3 and data["inserts"] == data["removes"], data
    assert data["verifications"] == data["vm_image_steady"] == 2 * MIX["verify"], data
