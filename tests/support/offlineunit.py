"""Offline checks of kvc's systemd units: a root with what ``systemd-analyze verify --root`` needs
besides the unit (the programs its commands name, as stubs, and sysinit.target, which every
service depends on), and the verify itself (tests/framework/test_systemd.py, test_kvc_image.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import pytest

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def prepare_root(root: Path, programs: Sequence[str]) -> Path:
    """``root`` with stub executables ``/usr/bin/PROGRAM`` and sysinit.target."""
    for program in programs:
        path = root / "usr" / "bin" / program
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    target = root / "usr" / "lib" / "systemd" / "system" / "sysinit.target"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("[Unit]\nDescription=System Initialization\n")
    return root


def verify_unit(root: Path, unit: str) -> tuple[int, str]:
    """``systemd-analyze verify`` of ``unit`` inside ``root`` (offline: systemd need not be
    running); its status and everything it said. systemd reports most unit file mistakes as
    warnings, with status 0: a clean unit says nothing."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", unit], capture_output=True, text=True
    )
    return result.returncode, (result.stdout + result.stderr).strip()
