"""The template unit passes systemd-analyze verify, and verify can fail."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kvc.kmod.paths import HostPaths
from kvc.layout import Layout
from kvc.systemd import UNIT_NAME, install_unit, unit_text


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"./{path.name}"], cwd=path.parent,
                          capture_output=True, text=True)


def test_installed_unit_verifies_cleanly(tmp_path: Path) -> None:
    installed = Path(install_unit(Layout(HostPaths(str(tmp_path)))))
    assert installed == tmp_path / "etc/systemd/system" / UNIT_NAME
    instance = tmp_path / "kmods-via-containers@simple-kmod.service"
    instance.write_text(installed.read_text())
    result = verify(instance)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_unit_keeps_the_original_contract() -> None:
    text = unit_text()
    for line in ("Type=oneshot", "RemainAfterExit=true", "TimeoutStartSec=25m",
                 'ExecStartPre=/usr/bin/bash -c "kmods-via-containers build %i %v"',
                 'ExecStart=/usr/bin/bash -c "kmods-via-containers load %i %v"',
                 'ExecReload=/usr/bin/bash -c "kmods-via-containers reload %i %v"',
                 'ExecStop=/usr/bin/bash -c "kmods-via-containers unload %i %v"',
                 "Before=kubelet.service", "After=network-online.target", "WantedBy=default.target"):
        assert line in text.splitlines()


def test_a_broken_unit_fails_verification(tmp_path: Path) -> None:
    broken = tmp_path / "kmods-via-containers@x.service"
    broken.write_text(unit_text().replace("/usr/bin/bash", "/nonexistent/bash"))
    assert verify(broken).returncode != 0
