"""The ``kmods-via-containers@.service`` template unit: install it, enable and disable instances.

The unit keeps the original framework's name, place (``/etc/systemd/system``, which every host,
OSTree ones included, reads) and semantics, so enabled instances and ``require-kvc-*`` units keep
working. Files are written atomically. ``systemctl`` runs only where systemd is the running init
and kvc manages the real host (no ``KVC_ROOT``); elsewhere the step is skipped with a message
saying what to run on the host.
"""

from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, TextIO

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
    from importlib import resources  # only for the unit's text: not on the boot path

    return resources.files("kvc").joinpath("data").joinpath(UNIT_NAME).read_text(encoding="utf-8")


def unit_path(layout: Layout) -> str:
    return os.path.join(layout.systemd_dir, UNIT_NAME)


def unit_is_current(layout: Layout) -> bool:
    """Whether the installed template unit is kvc's, with its mode."""
    try:
        with open(unit_path(layout), encoding="utf-8") as handle:
            return handle.read() == unit_text() and (os.fstat(handle.fileno()).st_mode & 0o7777) == UNIT_MODE
    except (OSError, UnicodeDecodeError):
        return False


def install_unit(layout: Layout) -> str:
    """Install the template unit into ``layout.systemd_dir`` (rewritten only when it differs);
    its path."""
    path = unit_path(layout)
    if not unit_is_current(layout):
        write_file(path, unit_text(), UNIT_MODE)
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


class UnitAction(enum.Enum):
    """What kvc asks systemctl to do; the value is the command's arguments before the unit."""

    DAEMON_RELOAD = ("daemon-reload",)
    ENABLE = ("enable",)
    # Stopping runs the unit's ExecStop, which unloads the instance's modules.
    DISABLE_NOW = ("disable", "--now")
    ENABLE_NOW = ("enable", "--now")


@dataclass(frozen=True)
class SystemctlCall:
    """One planned ``systemctl`` call."""

    action: UnitAction
    unit: str = ""

    @property
    def args(self) -> list[str]:
        return [*self.action.value, *([self.unit] if self.unit else [])]

    @property
    def hint(self) -> str:
        if self.action is UnitAction.DISABLE_NOW:
            return f"stopping {self.unit} runs its ExecStop (unload); see 'journalctl -u {self.unit}'"
        if self.unit:
            return f"see 'systemctl status {self.unit}' and 'journalctl -u {self.unit}'"
        return ""

    def describe(self) -> str:
        note = "  (stops the unit: its ExecStop unloads the modules)" if self.action is UnitAction.DISABLE_NOW else ""
        return "systemctl " + " ".join(self.args) + note


def enable_calls(name: str) -> tuple[SystemctlCall, ...]:
    """daemon-reload, then enable ``kmods-via-containers@NAME.service`` (it starts at next boot)."""
    return SystemctlCall(UnitAction.DAEMON_RELOAD), SystemctlCall(UnitAction.ENABLE, instance_unit(name))


def disable_calls(name: str) -> tuple[SystemctlCall, ...]:
    """Stop (which unloads) and disable ``kmods-via-containers@NAME.service``."""
    return (SystemctlCall(UnitAction.DISABLE_NOW, instance_unit(name)),)


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

    def skip_reason(self) -> str:
        """Why systemctl calls are skipped here, or "" when they run."""
        if self.layout.host.root not in ("", "/"):
            return "kvc is managing a root other than /"
        if not os.path.isdir(self.run_dir):
            return "systemd is not running here"
        return ""

    def available(self) -> bool:
        return not self.skip_reason()

    def run(self, calls: Sequence[SystemctlCall]) -> bool:
        """Run ``calls`` in order (a failure raises :class:`~kvc.errors.CommandError`); when
        systemctl cannot run here, say so once for all of them. False when skipped."""
        reason = self.skip_reason()
        if reason:
            wanted = " && ".join("systemctl " + " ".join(call.args) for call in calls)
            (self.out or sys.stdout).write(f"{reason}: skipped '{wanted}'; run it on the host\n")
            return False
        for call in calls:
            proc.run(["systemctl", *call.args], hint=call.hint)
        return True
