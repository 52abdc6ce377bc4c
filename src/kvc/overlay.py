"""kvc's writable module tree over a read-only ``/lib/modules/KVER`` (ostree, bootc, Flatcar).

The tree kvc writes lives in ``/var/lib/kvc/modules/KVER/{upper,work}``; an overlay mount with
the read-only tree as its lower layer makes it visible at the tree's own path, so the host's
modprobe, udev and the kernel's ``request_module()`` see the read-only tree plus what kvc added.
On a host where systemd is the init the mount is a ``.mount`` unit kvc writes into
``/etc/systemd/system`` and enables (it mounts again at every boot, before udev and
systemd-modules-load); elsewhere, and under ``KVC_ROOT``, kvc mounts it itself through
:class:`MountProgram`, the one adapter for ``mount``/``umount`` (after a reboot, the next
``kvc load`` or ``kvc deliver`` mounts it again).

Read-only is what the file system says (``statvfs``' ``ST_RDONLY``), never a guess from the
distribution; "mounted" is what ``/proc/self/mountinfo`` says.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Optional

from kvc import proc
from kvc.errors import StateError
from kvc.layout import Layout
from kvc.runtime import resolve_in_root

MOUNTINFO = "/proc/self/mountinfo"
OVERLAY_DIR = "/var/lib/kvc/modules"
UNIT_MODE = 0o644
# Characters systemd-escape --path keeps as they are (besides '/', which becomes '-').
_UNIT_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
# Characters the overlay's mount options cannot carry in a path.
_OPTION_UNSAFE = frozenset(",:\\\n ")


def escape_path(path: str) -> str:
    """``systemd-escape --path PATH``: the name systemd gives the unit of a mount point."""
    trimmed = path.strip("/")
    if not trimmed:
        return "-"
    out = []
    for index, char in enumerate(trimmed):
        if char == "/":
            out.append("-")
        elif char in _UNIT_SAFE and not (char == "." and index == 0):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def mount_unit_name(where: str) -> str:
    return f"{escape_path(where)}.mount"


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mount_point: str
    fstype: str
    source: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    out, index = [], 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1 : index + 4].isdigit():
            out.append(chr(int(field[index + 1 : index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def read_mounts(path: str = MOUNTINFO) -> list[MountEntry]:
    """The mounts this process sees, in mount order (the last one of a mount point is on top)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields or len(fields) < 5:
            continue
        tail = fields[fields.index("-") + 1 :]
        if len(tail) < 3:
            continue
        entries.append(MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]), tuple(tail[2].split(","))))
    return entries


def top_mount(path: str, mountinfo: str = MOUNTINFO) -> Optional[MountEntry]:
    """The mount on top at exactly ``path`` (None when nothing is mounted there)."""
    found = [entry for entry in read_mounts(mountinfo) if entry.mount_point == path]
    return found[-1] if found else None


def read_only(path: str) -> bool:
    """Whether ``path`` (or, when it does not exist, its nearest existing parent) is on a file
    system mounted read-only."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def in_container() -> bool:
    """Whether kvc runs in a container (podman and docker leave these marks)."""
    return os.path.exists("/run/.containerenv") or os.path.exists("/.dockerenv")


class MountManager(str, enum.Enum):
    """Who mounts the overlay."""

    SYSTEMD = "systemd"  # a .mount unit kvc writes and enables: mounted again at every boot
    KVC = "kvc"  # kvc runs mount(8) itself (no systemd as init, or KVC_ROOT)


@dataclass(frozen=True)
class Overlay:
    """The overlay of one kernel's module tree."""

    kernel_release: str
    target: str  # the tree's own directory, links resolved: both the lower layer and the mount point
    base: str  # /var/lib/kvc/modules/KVER
    manager: MountManager
    unit_path: str = ""  # the .mount unit (systemd only)
    where: str = ""  # the mount point as the host's systemd names it (systemd only)

    @property
    def upper(self) -> str:
        return os.path.join(self.base, "upper")

    @property
    def work(self) -> str:
        return os.path.join(self.base, "work")

    @property
    def options(self) -> str:
        return f"lowerdir={self.target},upperdir={self.upper},workdir={self.work}"

    @property
    def unit_name(self) -> str:
        return os.path.basename(self.unit_path)

    def mounted(self, mountinfo: str = MOUNTINFO) -> bool:
        """Whether kvc's overlay is on top at the tree's directory now."""
        entry = top_mount(self.target, mountinfo)
        return entry is not None and entry.fstype == "overlay" and f"upperdir={self.upper}" in entry.super_options

    def unit_text(self) -> str:
        """The .mount unit. Its ordering: before udev's coldplug and systemd-modules-load (they
        must see the modules), and, being a local mount, before local-fs.target, which every
        service (kvc's units too) starts after."""
        return (
            f"# Written by kvc: its writable module tree for kernel {self.kernel_release} over the read-only one.\n"
            f"# 'kvc deliver NAME --remove' or 'kvc uninstall NAME' removes it with the last delivery.\n"
            "[Unit]\n"
            f"Description=kvc module tree for kernel {self.kernel_release}\n"
            f"RequiresMountsFor={os.path.dirname(os.path.dirname(self.base))}\n"
            "Before=systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service\n"
            "\n"
            "[Mount]\n"
            "What=overlay\n"
            f"Where={self.where}\n"
            "Type=overlay\n"
            f"Options={self.options}\n"
            "# Released when the last reader lets go (udev keeps kmod's indexes mapped).\n"
            "LazyUnmount=yes\n"
            "\n"
            "[Install]\n"
            "WantedBy=local-fs.target\n"
        )


def overlay_for(layout: Layout, kernel_release: str, *, systemd: bool) -> Overlay:
    """The overlay kvc uses for ``kernel_release``'s tree on this host: a systemd unit where
    ``systemd`` (systemd is the init and kvc manages the real root), else kvc's own mount."""
    root = layout.host.root
    target = resolve_in_root(root, f"/lib/modules/{kernel_release}")
    base = os.path.join(layout.host.host(OVERLAY_DIR), kernel_release)
    for path in (target, base):
        if set(path) & _OPTION_UNSAFE:
            raise StateError(
                f"{path} cannot be named in an overlay mount's options (it holds one of , : \\ or a space)",
                hint="kvc's read-only-tree support needs plain paths; use KVC_ROOT without such characters",
            )
    if not systemd:
        return Overlay(kernel_release, target, base, MountManager.KVC)
    where = target if root in ("", "/") else "/" + os.path.relpath(target, root)
    return Overlay(
        kernel_release,
        target,
        base,
        MountManager.SYSTEMD,
        os.path.join(layout.systemd_dir, mount_unit_name(where)),
        where,
    )


class MountProgram:
    """``mount``/``umount`` for kvc's own overlay mounts, through kvc.proc."""

    def mount(self, overlay: Overlay) -> None:
        proc.run(
            ["mount", "-t", "overlay", "overlay", "-o", overlay.options, overlay.target],
            hint="mounting an overlay needs root (CAP_SYS_ADMIN) and a kernel with overlayfs",
        )

    def unmount(self, overlay: Overlay) -> None:
        # Lazy: udev (and any modprobe running now) may hold kmod's indexes; they keep the old view.
        proc.run(["umount", "--lazy", overlay.target], hint=f"see what holds {overlay.target} (fuser -m)")
