"""kvc verify's agent bundle (kvc.verify.agentbundle): the zip the guest's Python runs kvc's agent
and kvc's modprobe from. Built and run here with the Python running the tests, as the guest runs
it with the host's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import kvc
from kvc.verify.agentbundle import KMOD_ARGUMENT, agent_bundle, agent_command

SRC = Path(kvc.__file__).resolve().parent.parent


def test_the_bundle_runs_the_agent_and_modprobe_from_compiled_code_in_the_zip(tmp_path: Path) -> None:
    bundle = agent_bundle(str(tmp_path / "cache"))
    version = subprocess.run(
        [*agent_command(bundle), KMOD_ARGUMENT, "modprobe", "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert version.returncode == 0 and version.stdout.startswith("kmod version"), version.stderr
    usage = subprocess.run(agent_command(bundle), capture_output=True, text=True, cwd=tmp_path)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    where = subprocess.run(
        [
            *agent_command(bundle)[:-1],
            "-c",
            f"import sys; sys.path.insert(0, {bundle!r}); import kvc.verify.guest, json; "
            "print(kvc.verify.guest.__file__); print(json.__file__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where == [f"{bundle}/kvc/verify/guest.pyc", f"{bundle}/json/__init__.pyc"]
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
        header = archive.read("kvc/verify/guest.pyc")[:8]
    assert not [name for name in names if name.endswith(".py")]
    assert int.from_bytes(header[4:8], "little") == 1  # PEP 552: hash-based, never checked against a source


def test_the_bundle_is_made_again_when_a_source_changes(tmp_path: Path) -> None:
    copy = tmp_path / "src"
    shutil.copytree(SRC / "kvc", copy / "kvc", ignore=shutil.ignore_patterns("__pycache__"))
    make = [
        sys.executable,
        "-c",
        f"from kvc.verify.agentbundle import agent_bundle; print(agent_bundle({str(tmp_path / 'cache')!r}))",
    ]
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}

    def bundle() -> str:
        return subprocess.run(make, capture_output=True, text=True, check=True, env=env).stdout.strip()

    first = bundle()
    assert bundle() == first
    with open(copy / "kvc" / "verify" / "guest.py", "a", encoding="utf-8") as handle:
        handle.write("\nCHANGED = True\n")
    second = bundle()
    assert second != first and os.path.isfile(second)
    run = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {second!r}); import kvc.verify.guest as g; print(g.CHANGED)",
        ],
        capture_output=True,
        text=True,
    )
    assert run.stdout.strip() == "True", run.stderr
