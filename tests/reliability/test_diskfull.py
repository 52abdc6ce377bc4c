"""The disk-full and read-only run (scripts/diskfull.py): ENOSPC from a tiny tmpfs and EROFS from a
read-only bind, in a private mount namespace, under kvc's extraction, tree delivery, depmod
output, load record, delivery record and depmod cache. Every fault ends with one error line,
exit 10 and the host as it was; a cache that cannot be written does not fail the command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.debian_kernel import DebianKernel

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("podman", "unshare", "nsenter", "mount")),
        reason="needs root, podman, unshare, nsenter and mount",
    ),
]

DISKFULL = Path(__file__).resolve().parents[2] / "scripts" / "diskfull.py"


def test_no_space_and_read_only_give_one_error_and_leave_the_host_as_it_was(
    indexed_kernel_tree: DebianKernel, tmp_path: Path
) -> None:
    figures = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(DISKFULL), "--json", str(figures)], capture_output=True, text=True, timeout=900
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    cases = json.loads(figures.read_text())["cases"]
    assert all(case["passed"] for case in cases), [case["text"] for case in cases if not case["passed"]]
    faults = {(case["fault"], case["where"]) for case in cases}
    # Both faults under kvc's state, ENOSPC under the module tree, EROFS under /etc.
    assert {("ENOSPC", "var/lib/kvc"), ("EROFS", "var/lib/kvc"), ("ENOSPC", "lib/modules/KVER")} <= faults
    assert ("EROFS", "etc/modprobe.d") in faults
    assert any("depmod cannot write the indexes" in case["text"] for case in cases)
