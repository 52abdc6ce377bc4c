"""The template unit: the original's contract, ``systemd-analyze verify`` on an installed
instance (and verify failing on broken units), atomic installation, and the systemctl adapter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvc.errors import CommandError, ConfigError
from kvc.kmod.paths import HostPaths
from kvc.layout import Layout
from kvc.systemd import (
    UNIT_NAME,
    Systemctl,
    UnitAction,
    disable_calls,
    enable_calls,
    install_unit,
    instance_unit,
    unit_text,
)
from support import fakeprog
from support.offlineunit import needs_systemd_analyze, prepare_root, verify_unit

INSTANCE = "kmods-via-containers@simple-kmod.service"


def unit_root(tmp_path: Path) -> Path:
    """A root with the unit installed by kvc, the executables its commands name, and the one unit
    every service depends on (sysinit.target): enough for an offline verify."""
    root = tmp_path / "root"
    install_unit(Layout(HostPaths(str(root))))
    return prepare_root(root, ("bash",))


def verify(root: Path, unit: str = INSTANCE) -> tuple[int, str]:
    return verify_unit(root, unit)


@needs_systemd_analyze
def test_the_installed_instance_verifies_cleanly(tmp_path: Path) -> None:
    root = unit_root(tmp_path)
    assert verify(root) == (0, "")


@needs_systemd_analyze
def test_verify_checks_the_commands_exist(tmp_path: Path) -> None:
    root = unit_root(tmp_path)
    (root / "usr" / "bin" / "bash").unlink()
    status, said = verify(root)
    assert status != 0
    assert "Command /usr/bin/bash is not executable" in said


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("old", "new", "fatal"),
    [
        ("ExecStart=/usr/bin/bash", "ExecStart=/usr/bin/nosuch", True),
        ('unload %i %v"', "unload %i %v", True),  # unbalanced quoting
        ("[Service]", "[Servic]", True),
        ("Type=oneshot", "Type=oneshots", False),
        ("TimeoutStartSec=25m", "TimeoutStartSec=25 fortnights", False),
        ("RemainAfterExit=true", "RemainAfterExit=maybe", False),
        ("StandardOutput=journal+console", "StandardOutput=journal+konsole", False),
    ],
)
def test_a_broken_unit_fails_verification(tmp_path: Path, old: str, new: str, fatal: bool) -> None:
    root = unit_root(tmp_path)
    unit = root / "etc" / "systemd" / "system" / UNIT_NAME
    assert old in unit.read_text()
    unit.write_text(unit.read_text().replace(old, new))
    status, said = verify(root)
    assert said != ""
    assert (status != 0) == fatal, said


def settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of each setting, in order."""
    section = ""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, value = line.split("=", 1)
        found.append((section, key, value))
    return found


def test_the_unit_keeps_the_original_contract() -> None:
    command = '/usr/bin/bash -c "kmods-via-containers {} %i %v"'
    assert settings(unit_text()) == [
        ("Unit", "Description", "Kmods Via Containers - %i"),
        ("Unit", "Wants", "network-online.target"),
        ("Unit", "After", "network-online.target"),
        ("Unit", "After", "docker.service"),
        ("Unit", "Before", "kubelet.service"),
        ("Unit", "Before", "systemd-user-sessions.service"),
        ("Service", "Type", "oneshot"),
        ("Service", "TimeoutStartSec", "25m"),
        ("Service", "RemainAfterExit", "true"),
        ("Service", "ExecStartPre", command.format("build")),
        ("Service", "ExecStart", command.format("load")),
        ("Service", "ExecReload", command.format("reload")),
        ("Service", "ExecStop", command.format("unload")),
        ("Service", "StandardOutput", "journal+console"),
        ("Install", "WantedBy", "default.target"),
    ]


# --- installation --------------------------------------------------------------------------------


def test_install_writes_the_unit_atomically_and_only_when_it_changed(tmp_path: Path) -> None:
    layout = Layout(HostPaths(str(tmp_path)))
    path = Path(install_unit(layout))
    assert path == tmp_path / "etc" / "systemd" / "system" / UNIT_NAME
    assert path.read_text() == unit_text()
    assert path.stat().st_mode & 0o7777 == 0o644
    first = path.stat()
    assert install_unit(layout) == str(path)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    path.write_text("[Unit]\nDescription=an older unit\n")
    path.chmod(0o600)
    install_unit(layout)
    assert path.read_text() == unit_text()
    assert path.stat().st_mode & 0o7777 == 0o644
    assert sorted(os.listdir(path.parent)) == [UNIT_NAME]  # no temporary files left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "etc" / "systemd" / "system" / UNIT_NAME
    target.parent.mkdir(parents=True)
    target.write_text("old\n")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        install_unit(Layout(HostPaths(str(tmp_path))))
    assert target.read_text() == "old\n"
    assert os.listdir(target.parent) == [UNIT_NAME]


def test_instance_unit_names() -> None:
    assert instance_unit("simple-kmod") == INSTANCE
    assert instance_unit("nvidia_470.1") == "kmods-via-containers@nvidia_470.1.service"
    for bad in ("", "a+b", "a/b", "a b"):
        with pytest.raises(ConfigError):
            instance_unit(bad)


# --- systemctl -----------------------------------------------------------------------------------


@pytest.fixture
def systemctl_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "systemctl.jsonl"
    fakeprog.install(tmp_path / "bin", "systemctl", log)
    monkeypatch.setenv("PATH", fakeprog.path_with(tmp_path / "bin"))
    monkeypatch.delenv("KVC_ROOT", raising=False)
    return log


def test_systemctl_runs_when_systemd_is_running(tmp_path: Path, systemctl_log: Path) -> None:
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    systemctl = Systemctl(Layout(HostPaths("/")), run_dir=str(booted))
    assert systemctl.available() and systemctl.skip_reason() == ""
    assert systemctl.run(enable_calls("simple-kmod"))
    assert systemctl.run(disable_calls("simple-kmod"))
    assert fakeprog.calls(systemctl_log) == [["daemon-reload"], ["enable", INSTANCE], ["disable", "--now", INSTANCE]]


def test_planned_calls_say_what_they_do() -> None:
    assert [call.describe() for call in enable_calls("simple-kmod")] == [
        "systemctl daemon-reload",
        f"systemctl enable {INSTANCE}",
    ]
    (disable,) = disable_calls("simple-kmod")
    assert disable.action is UnitAction.DISABLE_NOW
    assert (
        disable.describe() == f"systemctl disable --now {INSTANCE}  (stops the unit: its ExecStop unloads the modules)"
    )


def test_a_failing_systemctl_raises_with_a_hint(tmp_path: Path, systemctl_log: Path) -> None:
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    fakeprog.install(tmp_path / "bin", "systemctl", systemctl_log, default_code=1)
    with pytest.raises(CommandError) as failed:
        Systemctl(Layout(HostPaths("/")), run_dir=str(booted)).run(disable_calls("simple-kmod"))
    assert failed.value.argv == ["systemctl", "disable", "--now", INSTANCE]
    assert "journalctl -u " + INSTANCE in failed.value.hint


def test_systemctl_is_skipped_with_a_message_without_systemd(
    tmp_path: Path, systemctl_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    systemctl = Systemctl(Layout(HostPaths("/")), run_dir=str(tmp_path / "absent"))
    assert not systemctl.available()
    assert not systemctl.run(enable_calls("simple-kmod"))
    assert capsys.readouterr().out == (
        "systemd is not running here: skipped 'systemctl daemon-reload && "
        f"systemctl enable {INSTANCE}'; run it on the host\n"
    )
    assert fakeprog.calls(systemctl_log) == []


def test_systemctl_is_skipped_under_kvc_root(
    tmp_path: Path, systemctl_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    systemctl = Systemctl(Layout(HostPaths(str(tmp_path))), run_dir=str(booted))
    assert systemctl.skip_reason() == "kvc is managing a root other than /"
    assert not systemctl.run(enable_calls("simple-kmod"))
    assert not systemctl.run(disable_calls("simple-kmod"))
    assert capsys.readouterr().out.splitlines() == [
        f"kvc is managing a root other than /: skipped 'systemctl daemon-reload && systemctl enable {INSTANCE}'; "
        "run it on the host",
        f"kvc is managing a root other than /: skipped 'systemctl disable --now {INSTANCE}'; run it on the host",
    ]
    assert fakeprog.calls(systemctl_log) == []
