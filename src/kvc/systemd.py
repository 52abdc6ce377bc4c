"""The ``kmods-via-containers@.service`` template unit: install it, enable and disable instances.

The unit keeps the original framework's name, place (``/etc/systemd/system``, which every host,
OSTree ones included, reads) and semantics, so enabled instances and ``require-kvc-*`` units keep
working. Files are written atomically. ``systemctl`` runs only where systemd is the running init
and kvc manages the real host (no ``KVC_ROOT``); elsewhere the step is skipped with a message
saying what to run on the host.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from typing import Optional, TextIO

from kvc import proc
from kvc.atomic import write_file
from kvc.errors import ConfigError
from kvc.layout import Layout

UNIT_NAME = "kmods-via-containers@.service"
UNIT_MODE = 0o644
# systemd creates this directory when it boots as init (sd_booted(3)).
SYSTEMD_RUN_DIR = "/run/systemd/system"
_UNIT_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.-")


def unit_text() -> str:
    """The template unit, as installed."""
    return resources.files("kvc").joinpath("data").joinpath(UNIT_NAME).read_text(encoding="utf-8")


def unit_path(layout: Layout) -> str:
    return os.path.join(layout.systemd_dir, UNIT_NAME)


def install_unit(layout: Layout) -> str:
    """Install the template unit into ``layout.systemd_dir`` (rewritten only when it differs);
    its path."""
    path = unit_path(layout)
    text = unit_text()
    try:
        with open(path, encoding="utf-8") as handle:
            unchanged = handle.read() == text and (os.fstat(handle.fileno()).st_mode & 0o7777) == UNIT_MODE
    except (OSError, UnicodeDecodeError):
        unchanged = False
    if not unchanged:
        write_file(path, text, UNIT_MODE)
    return path


def instance_unit(name: str) -> str:
    """``kmods-via-containers@NAME.service``. The unit passes ``%i`` on unescaped, so NAME must
    already be a valid unit instance name."""
    if not name or not set(name) <= _UNIT_NAME_CHARS:
        raise ConfigError(
            f"instance name {name!r} cannot be a systemd unit instance",
            hint="use letters, digits and . _ - : in names of instances run by systemd",
        )
    return UNIT_NAME.replace("@", f"@{name}")


class Systemctl:
    """``systemctl`` for kvc's unit, through kvc.proc. Every call is skipped, with a message on
    ``out`` giving the command to run on the host, unless systemd is running here and the layout
    is the real host's."""

    def __init__(
        self, layout: Optional[Layout] = None, *, run_dir: str = SYSTEMD_RUN_DIR, out: Optional[TextIO] = None
    ) -> None:
        self.layout = layout or Layout.from_env()
        self.run_dir = run_dir
        self.out = out

    def available(self) -> bool:
        return self.layout.host.root in ("", "/") and os.path.isdir(self.run_dir)

    def skip(self, *commands: list[str]) -> None:
        """Say that ``systemctl COMMAND`` was not run, and why."""
        reason = (
            "kvc is managing a root other than /"
            if self.layout.host.root not in ("", "/")
            else "systemd is not running here"
        )
        wanted = " && ".join("systemctl " + " ".join(args) for args in commands)
        (self.out or sys.stdout).write(f"{reason}: skipped '{wanted}'; run it on the host\n")

    def _run(self, args: list[str], hint: str = "") -> bool:
        if not self.available():
            self.skip(args)
            return False
        proc.run(["systemctl", *args], hint=hint)
        return True

    def daemon_reload(self) -> bool:
        return self._run(["daemon-reload"])

    def enable(self, name: str, *, now: bool = False) -> bool:
        unit = instance_unit(name)
        return self._run(
            ["enable", *(["--now"] if now else []), unit],
            hint=f"see 'systemctl status {unit}' and 'journalctl -u {unit}'",
        )

    def disable(self, name: str, *, now: bool = True) -> bool:
        unit = instance_unit(name)
        return self._run(
            ["disable", *(["--now"] if now else []), unit],
            hint=f"stopping {unit} runs its ExecStop (unload); see 'journalctl -u {unit}'",
        )


def systemd_running(layout: Optional[Layout] = None) -> bool:
    return Systemctl(layout).available()


def enable_instance(name: str, layout: Optional[Layout] = None) -> bool:
    """daemon-reload, then enable ``kmods-via-containers@NAME.service`` (it starts at next boot);
    False when skipped."""
    systemctl = Systemctl(layout)
    unit = instance_unit(name)
    if not systemctl.available():
        systemctl.skip(["daemon-reload"], ["enable", unit])
        return False
    systemctl.daemon_reload()
    return systemctl.enable(name)


def disable_instance(name: str, layout: Optional[Layout] = None) -> bool:
    """Stop (which unloads) and disable ``kmods-via-containers@NAME.service``; False when skipped.
    A failure raises :class:`~kvc.errors.CommandError`."""
    return Systemctl(layout).disable(name, now=True)
