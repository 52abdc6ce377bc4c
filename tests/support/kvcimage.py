"""The kvc image and its unit, for the tests that use them (tests/framework/test_kvc_image.py,
tests/verify/test_container_load.py)."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
SCRIPT = TOP / "scripts" / "build-kvc-image.sh"
UNIT = TOP / "src" / "kvc" / "data" / "kvc-container@.service"


@functools.cache
def build_kvc_image() -> str:
    """The kvc image's name after scripts/build-kvc-image.sh, run once per test session: the tests
    that use it are meant to see the image of the tree as it is when they start."""
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def unit_commands() -> list[tuple[str, list[str]]]:
    """The unit's Exec lines (continuations joined), in order: [("ExecStart", argv), ...]."""
    joined = re.sub(r"\\\n\s*", " ", UNIT.read_text())
    return [
        (match.group(1), shlex.split(match.group(2)))
        for match in re.finditer(r"^(Exec\w+)=(.*)$", joined, re.MULTILINE)
    ]


def run_options(argv: list[str]) -> list[str]:
    """The options of a ``podman run ... IMAGE ARGS`` line: what lies between run and the image."""
    assert argv[:2] == ["/usr/bin/podman", "run"], argv
    return argv[2 : argv.index("${KVC_CONTAINER_IMAGE}")]
