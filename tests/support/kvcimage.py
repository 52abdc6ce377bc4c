"""The kvc image and its unit, for the tests that use them (tests/framework/test_kvc_image.py,
tests/verify/test_container_load.py)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
SCRIPT = TOP / "scripts" / "build-kvc-image.sh"
UNIT = TOP / "src" / "kvc" / "data" / "kvc-container@.service"


def build_kvc_image() -> str:
    """The kvc image's name after one scripts/build-kvc-image.sh run (cheap when up to date)."""
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def unit_run_options() -> list[str]:
    """The podman run options the unit gives every command (its KVC_CONTAINER_RUN)."""
    match = re.search(r'^Environment="KVC_CONTAINER_RUN=([^"]*)"$', UNIT.read_text(), re.MULTILINE)
    assert match, "the unit sets no KVC_CONTAINER_RUN"
    return shlex.split(match.group(1))
