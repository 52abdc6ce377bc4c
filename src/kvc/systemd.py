"""The ``kmods-via-containers@.service`` template unit: install it, enable instances.

The unit keeps the original framework's name, place (``/etc/systemd/system``, which every host,
OSTree ones included, reads) and semantics, so enabled instances and ``require-kvc-*`` units
keep working. systemctl is only called when systemd is running.
"""

from __future__ import annotations

import os
import sys
import tempfile
from importlib import resources

from kvc import proc
from kvc.layout import Layout

UNIT_NAME = "kmods-via-containers@.service"


def unit_text() -> str:
    return resources.files("kvc").joinpath("data", UNIT_NAME).read_text(encoding="utf-8")


def write_atomic(path: str, text: str, mode: int) -> None:
    """Write via a temporary file in the same directory, fsync, rename: never a half file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def install_unit(layout: Layout) -> str:
    path = os.path.join(layout.systemd_dir, UNIT_NAME)
    write_atomic(path, unit_text(), 0o644)
    return path


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and not os.environ.get("KVC_ROOT")


def instance_unit(name: str) -> str:
    return f"kmods-via-containers@{name}.service"


def enable_instance(name: str) -> None:
    if not systemd_running():
        sys.stdout.write(f"systemd is not running here: enable {instance_unit(name)} on the host\n")
        return
    proc.run(["systemctl", "daemon-reload"])
    proc.run(["systemctl", "enable", instance_unit(name)])


def disable_instance(name: str) -> None:
    if systemd_running():
        proc.run(["systemctl", "disable", "--now", instance_unit(name)], check=False)
