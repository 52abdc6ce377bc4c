"""The CI-sized kill -9 run (scripts/kill9.py runs 200): kvc's build, pull, extract, tree install,
load and sign killed at random points on a fake-kernel host, then run again. Every run recovers,
no half-written module is ever loaded, and the host's files, kvc status and podman's names are
those of a clean run."""

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

KILL9 = Path(__file__).resolve().parents[2] / "scripts" / "kill9.py"
RUNS = 18
SEED = 20261205
COMMANDS = ("build", "pull", "extract", "tree install", "load", "sign")


def test_every_killed_command_recovers_and_leaves_the_host_consistent(
    indexed_kernel_tree: DebianKernel, tmp_path: Path
) -> None:
    figures = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, str(KILL9), "--runs", str(RUNS), "--seed", str(SEED), "--json", str(figures)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = json.loads(figures.read_text())["commands"]
    assert set(counts) == set(COMMANDS)
    for command, tally in counts.items():
        assert tally["runs"] == RUNS // len(COMMANDS), (command, tally)
        assert tally["recovered"] == tally["runs"] and tally["inconsistent"] == 0, (command, tally)
    # The delays reach into the commands, not only past their end.
    assert sum(tally["killed"] for tally in counts.values()) >= RUNS // 2, counts
