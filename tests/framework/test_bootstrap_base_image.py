"""scripts/bootstrap-base-image.sh takes its Debian mirror from the host's apt sources (one-line
``.list`` entries and deb822 ``.sources`` stanzas, disabled ones skipped), so the tree names no
mirror and an air-gapped host's own mirror is used; ``--mirror`` still overrides. The runtime and
debootstrap are recording fakes: the image is missing, and debootstrap fails once it has been
called, which ends the script after it has shown which mirror it chose."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from support import fakeprog

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bootstrap-base-image.sh"
MIRROR = "http://mirror.example.org/debian"
SECURITY = "http://mirror.example.org/debian-security"


def run_script(tmp_path: Path, apt_etc: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    log = tmp_path / "calls.jsonl"
    fakeprog.install(tmp_path / "bin", "podman", log, default_code=125)
    fakeprog.install(tmp_path / "bin", "debootstrap", log, default_code=1)
    env = {
        **os.environ,
        "PATH": fakeprog.path_with(tmp_path / "bin"),
        "APT_ETC": str(apt_etc),
        "KVC_CONTAINER_RUNTIME": "podman",
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)
    return proc, fakeprog.calls(log, "debootstrap")


def sources(tmp_path: Path, main_list: str = "", **parts: str) -> Path:
    apt_etc = tmp_path / "apt"
    (apt_etc / "sources.list.d").mkdir(parents=True)
    if main_list:
        (apt_etc / "sources.list").write_text(main_list)
    for name, text in parts.items():
        (apt_etc / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return apt_etc


@pytest.mark.skipif(os.geteuid() != 0, reason="the script refuses to debootstrap as non-root")
def test_the_mirror_comes_from_deb822_sources_skipping_disabled_and_other_suites(tmp_path: Path) -> None:
    apt_etc = sources(
        tmp_path,
        a_sources="Types: deb\nURIs: http://off.example.org/debian\nSuites: bookworm\nComponents: main\n"
        "Enabled: no\n\nTypes: deb-src\nURIs: http://src.example.org/debian\nSuites: bookworm\n"
        "Components: main\n",
        b_sources=f"Types: deb\nURIs: {MIRROR}\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        f"Types: deb\nURIs: {SECURITY}\nSuites: bookworm-security\nComponents: main\n",
        c_list_disabled="deb http://never.example.org/debian bookworm main\n",
    )
    proc, calls = run_script(tmp_path, apt_etc)
    assert proc.returncode == 1, proc.stderr
    assert f"debootstrap --variant=minbase bookworm from {MIRROR}\n" in proc.stderr
    assert calls and calls[0][-1] == MIRROR
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the script refuses to debootstrap as non-root")
def test_the_mirror_comes_from_a_one_line_entry_with_options(tmp_path: Path) -> None:
    apt_etc = sources(
        tmp_path,
        f"# deb http://old.example.org/debian bookworm main\n"
        f"deb [arch=amd64 signed-by=/k.gpg] {MIRROR} bookworm contrib main\n",
    )
    proc, calls = run_script(tmp_path, apt_etc)
    assert calls and calls[0][-1] == MIRROR, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the script refuses to debootstrap as non-root")
def test_mirror_overrides_the_host_sources(tmp_path: Path) -> None:
    apt_etc = sources(tmp_path, f"deb {MIRROR} bookworm main\n")
    proc, calls = run_script(tmp_path, apt_etc, "--mirror", "http://local.example.org/debian/")
    assert calls and calls[0][-1] == "http://local.example.org/debian", proc.stderr


def test_no_source_for_the_suite_is_a_usage_error_that_says_what_to_do(tmp_path: Path) -> None:
    apt_etc = sources(tmp_path, f"deb {MIRROR} trixie main\n")
    proc, calls = run_script(tmp_path, apt_etc)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bootstrap-base-image: error: no apt source for 'bookworm' (main) in {apt_etc}/sources.list{{,.d}}: "
        "give --mirror URL (see --help)"
    ]
    assert calls == []
