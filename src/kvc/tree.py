"""Delivery: an instance's modules installed into a kernel's module tree, with the files that ship
with them, so that the host's modprobe, udev and the kernel's ``request_module()`` find them.

``plan_deliver`` works out everything a delivery for one kernel does and ``execute_deliver`` does
exactly that; ``plan_remove``/``execute_remove`` undo it. What goes where:

* modules: ``/lib/modules/KVER/updates/kvc/NAME/`` (depmod's default search order puts
  ``updates`` first), then the tree is indexed by kvc's own depmod (:mod:`kvc.kmod.depmod`: every
  output kmod's depmod writes, byte for byte the same);
* firmware (``KVC_FIRMWARE``): ``/lib/firmware/updates/PATH`` (searched before ``/lib/firmware``);
  where ``/lib/firmware`` is read-only, ``/var/lib/kvc/firmware/PATH`` plus the kernel's one custom
  firmware path, ``firmware_class.path``, set at run time through
  ``/sys/module/firmware_class/parameters/path``;
* modprobe.d files from the image (``KVC_MODPROBE_CONF``) and ``/etc/modprobe.d/kvc-NAME.conf``
  (``options MOD PARAMS`` from ``KVC_MODULE_PARAMS_*``); ``/etc/modules-load.d/kvc-NAME.conf``
  (``KVC_MODULES_LOAD=yes``); udev rules (``KVC_UDEV_RULES``) into ``/etc/udev/rules.d``.

A direct delivery (``KVC_DELIVERY=direct``, kvc inserting the modules itself) installs only what a
driver needs however it was loaded: firmware (a driver requests it from the kernel's firmware
paths) and udev rules (they act on the devices). Options, modprobe.d files and modules-load.d
entries are for modprobe and systemd-modules-load, which only a tree delivery serves.

Where ``/lib/modules/KVER`` is read-only the tree is written through kvc's overlay
(:mod:`kvc.overlay`), never into its upper layer directly while it is mounted.

Every file written is listed, with its sha256, in the delivery record
``/var/lib/kvc/NAME/tree/KVER.json``, written before the files (listing the earlier delivery's too)
and again after them. A file kvc did not write is never overwritten or removed; a file kvc wrote
and someone changed since is kept. Directories kvc created go once empty; the overlay, its mount
unit and kvc's upper tree go with the last delivery that uses them, and only when the upper tree
holds nothing kvc did not write. After a removal depmod runs again: on an unchanged tree it writes
the same indexes, so the tree is as it was before the delivery.

Files outside the module tree (firmware, /etc) are the instance's, shared by the deliveries of
its kernels: they hold what the last delivery wrote and go with the last delivery that lists them.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Callable, Iterator, Mapping, Optional, Sequence

from kvc import systemd
from kvc.atomic import fsync_path, remove_stale, temporary_prefix, write_file, write_json
from kvc.config import Delivery, InstanceConfig, check_kernel_release
from kvc.errors import HostFileError, KvcError, LoadError, StateError
from kvc.extract import (
    FIRMWARE_DIR,
    Manifest,
    ShippedFile,
    ShippedKind,
    copy_instance_modules,
    copy_shipped_files,
    extract,
)
from kvc.extract import is_current as extraction_is_current
from kvc.extract import read_manifest as read_extraction
from kvc.images import image_tag
from kvc.kmod import depmod
from kvc.kmod.config import DEFAULT_CONFIG_DIRS, ModprobeConfig, load_config
from kvc.kmod.digest import file_sha256
from kvc.kmod.kernel.protocol import Kernel
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.modprobe import ACTION_BUILTIN, ACTION_INSTALL, load_plan
from kvc.kmod.names import modname_normalize as normalize_name
from kvc.layout import Layout
from kvc.loader import LoadPlan, LoadStep, Origin, plan_load
from kvc.lock import instance_lock
from kvc.overlay import OVERLAY_DIR, MountManager, MountProgram, Overlay, in_container, overlay_for, read_only
from kvc.pathkind import Kind, kind_of
from kvc.runtime import ContainerRuntime, ImageFiles

RECORD_SCHEMA = 1
TREE_DIR = "updates/kvc"  # below /lib/modules/KVER
FIRMWARE_UPDATES = "/lib/firmware/updates"
KVC_FIRMWARE_DIR = "/var/lib/kvc/firmware"
FIRMWARE_PARAMETER = "/sys/module/firmware_class/parameters/path"
MODPROBE_DIR = "/etc/modprobe.d"
MODULES_LOAD_DIR = "/etc/modules-load.d"
UDEV_DIR = "/etc/udev/rules.d"
FILE_MODE = 0o644


class FileKind(str, enum.Enum):
    MODULE = "module"
    FIRMWARE = "firmware"
    MODPROBE = "modprobe.d"
    MODULES_LOAD = "modules-load.d"
    UDEV = "udev rule"


# What a direct delivery installs: what a driver needs however it was loaded.
DIRECT_KINDS = frozenset({FileKind.FIRMWARE, FileKind.UDEV})
_SHIPPED_KINDS = {
    ShippedKind.FIRMWARE: FileKind.FIRMWARE,
    ShippedKind.MODPROBE: FileKind.MODPROBE,
    ShippedKind.UDEV: FileKind.UDEV,
}


def record_path(layout: Layout, name: str, kernel_release: str) -> str:
    """``/var/lib/kvc/NAME/tree/KVER.json``."""
    return os.path.join(layout.instance_state(name), "tree", f"{check_kernel_release(kernel_release)}.json")


def module_dir(layout: Layout, name: str, kernel_release: str) -> str:
    """Where the instance's modules go: ``/lib/modules/KVER/updates/kvc/NAME``."""
    return os.path.join(layout.host.module_dir(kernel_release), TREE_DIR, name)


# ---- the record ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedFile:
    path: str
    kind: FileKind
    digests: tuple[str, ...]  # the contents kvc wrote there (several while files are replaced)


@dataclass(frozen=True)
class FirmwarePath:
    """kvc's firmware directory as the kernel's custom firmware path, and what was there before."""

    value: str
    previous: str


@dataclass(frozen=True)
class Record:
    path: str
    name: str
    kernel_release: str
    delivery: Delivery
    image_id: str
    files: tuple[RecordedFile, ...]
    dirs: tuple[str, ...]  # directories kvc created (or shares with another delivery that did)
    overlay: Optional[Overlay] = None
    firmware_path: Optional[FirmwarePath] = None

    def get(self, path: str) -> Optional[RecordedFile]:
        return next((entry for entry in self.files if entry.path == path), None)

    def to_json(self) -> dict[str, object]:
        overlay = self.overlay
        return {
            "schema": RECORD_SCHEMA,
            "name": self.name,
            "kernel": self.kernel_release,
            "delivery": self.delivery.value,
            "image_id": self.image_id,
            "files": [{"path": f.path, "kind": f.kind.value, "sha256": list(f.digests)} for f in self.files],
            "dirs": list(self.dirs),
            "overlay": None
            if overlay is None
            else {
                "target": overlay.target,
                "base": overlay.base,
                "manager": overlay.manager.value,
                "unit": overlay.unit_path,
                "where": overlay.where,
            },
            "firmware_path": None
            if self.firmware_path is None
            else {"value": self.firmware_path.value, "previous": self.firmware_path.previous},
        }


def _unreadable(path: str, why: str) -> StateError:
    return StateError(
        f"{path}: the delivery record is unreadable ({why})",
        hint="kvc removes only what its record lists; remove the delivered files by hand, then the record",
    )


def _parse_record(path: str, data: object, layout: Layout) -> Record:
    if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA:
        raise _unreadable(path, "another schema")
    try:
        name, kernel = str(data["name"]), str(data["kernel"])
        files = tuple(
            RecordedFile(str(f["path"]), FileKind(f["kind"]), tuple(str(d) for d in f["sha256"])) for f in data["files"]
        )
        dirs = tuple(str(d) for d in data["dirs"])
        raw = data.get("overlay")
        overlay = (
            None
            if raw is None
            else Overlay(
                kernel,
                str(raw["target"]),
                str(raw["base"]),
                MountManager(raw["manager"]),
                str(raw.get("unit", "")),
                str(raw.get("where", "")),
            )
        )
        fw = data.get("firmware_path")
        firmware_path = None if fw is None else FirmwarePath(str(fw["value"]), str(fw["previous"]))
        record = Record(
            path,
            name,
            kernel,
            Delivery(data["delivery"]),
            str(data.get("image_id", "")),
            files,
            dirs,
            overlay,
            firmware_path,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable(path, str(exc)) from None
    if record_path(layout, name, kernel) != path:
        raise _unreadable(path, f"it describes {name} for {kernel}")
    strays = [p for p in [*(f.path for f in files), *dirs] if not _in_kvc_places(layout, name, kernel, p)]
    if overlay is not None and overlay.base != os.path.join(layout.host.host(OVERLAY_DIR), kernel):
        strays.append(overlay.base)
    if strays:
        raise StateError(
            f"{path}: the delivery record lists {strays[0]}, outside the places kvc delivers to",
            hint="kvc never writes there, so the record was altered: remove the delivered files by hand",
        )
    return record


def _below(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _in_kvc_places(layout: Layout, name: str, kernel: str, path: str) -> bool:
    path = os.path.normpath(path)
    places = [
        layout.host.module_dir(kernel),
        layout.host.host(FIRMWARE_DIR),
        layout.host.host(KVC_FIRMWARE_DIR),
        layout.host.host(OVERLAY_DIR),
        *(layout.host.host(d) for d in (MODPROBE_DIR, MODULES_LOAD_DIR, UDEV_DIR, "/etc/udev")),
    ]
    return any(_below(path, place) for place in places)


def read_record(layout: Layout, name: str, kernel_release: str) -> Optional[Record]:
    """The instance's delivery record for the kernel; None when there is none. An unreadable
    record is a StateError: guessing would risk removing files that are not kvc's."""
    path = record_path(layout, name, kernel_release)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _unreadable(path, str(exc)) from None
    return _parse_record(path, data, layout)


def read_records(layout: Layout, name: str = "*") -> list[Record]:
    """Every delivery record (of one instance, or of all with ``*``)."""
    pattern = os.path.join(glob.escape(layout.state_dir), name if name == "*" else glob.escape(name), "tree", "*.json")
    records = []
    for path in sorted(glob.glob(pattern)):
        kernel = os.path.basename(path)[: -len(".json")]
        instance = os.path.basename(os.path.dirname(os.path.dirname(path)))
        try:
            found = read_record(layout, instance, kernel)
        except KvcError:
            if name != "*":
                raise
            continue  # another instance's damaged record is its own problem, reported when it is used
        if found is not None:
            records.append(found)
    return records


# ---- what is delivered -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """The files a delivery copies, in an extraction directory (or a scratch copy of the image)."""

    directory: str
    image_id: str
    modules: tuple[tuple[str, str, str], ...]  # (module name, file relative to directory, sha256)
    shipped: tuple[ShippedFile, ...]

    @classmethod
    def of(cls, manifest: Manifest) -> Payload:
        return cls(
            manifest.directory,
            manifest.image_id,
            tuple((m.name, m.file, m.sha256) for m in manifest.modules),
            manifest.shipped,
        )

    def path(self, file: str) -> str:
        return os.path.join(self.directory, file)


def read_image_payload(
    files: ImageFiles,
    instance: InstanceConfig,
    kernel_release: str,
    what: str,
    scratch: str,
    image_id: str,
    *,
    missing_hint: str = "",
) -> Payload:
    """Copies of the instance's modules and shipped files out of open image files into
    ``scratch``, laid out as an extraction lays them out."""
    copies = copy_instance_modules(files, instance, kernel_release, what, scratch, missing_hint=missing_hint)
    shipped = copy_shipped_files(files, instance, what, scratch)
    modules = tuple(
        (name, os.path.relpath(local, scratch), file_sha256(local).hex()) for name, (_path, local) in copies.items()
    )
    return Payload(scratch, image_id, modules, shipped)


class Fate(enum.Enum):
    WRITE = "write"
    REPLACE = "replace"
    CURRENT = "current"


@dataclass(frozen=True)
class Placement:
    """One file the delivery puts on the host: a copy of ``source`` or ``data``."""

    path: str
    kind: FileKind
    sha256: str
    fate: Fate
    source: str = ""
    data: bytes = b""
    owned: tuple[str, ...] = ()  # the contents kvc wrote there before (this instance's records)

    def describe(self) -> str:
        if self.fate is Fate.CURRENT:
            return f"keep {self.path} ({self.kind.value}, up to date)"
        return f"{self.fate.value} {self.path} ({self.kind.value})"


@dataclass(frozen=True)
class Extraction:
    """The extraction a delivery starts with (the image's modules are not extracted yet)."""

    image: str
    image_id: str
    directory: str
    digests: tuple[str, ...]  # of the files the plan read from the image: the extraction must give them


class Leaving(enum.Enum):
    """What happens to a recorded file when a delivery no longer has it."""

    REMOVE = "remove"
    KEEP_CHANGED = "keep"  # changed since kvc wrote it: no longer kvc's
    GONE = "gone"  # someone removed it already
    SHARED = "shared"  # another kernel's delivery of the instance still has it


@dataclass(frozen=True)
class Removal:
    """One recorded file a delivery or removal takes away (or keeps, saying why)."""

    entry: RecordedFile
    fate: Leaving

    def describe(self) -> str:
        path = self.entry.path
        return {
            Leaving.REMOVE: f"remove {path} ({self.entry.kind.value})",
            Leaving.KEEP_CHANGED: f"keep {path} (changed since kvc wrote it)",
            Leaving.GONE: f"skip {path} (already gone)",
            Leaving.SHARED: f"keep {path} (another kernel's delivery of the instance has it)",
        }[self.fate]


@dataclass(frozen=True)
class DeliverPlan:
    instance: InstanceConfig
    kernel_release: str
    delivery: Delivery
    record_path: str
    moddir: str  # /lib/modules/KVER
    previous: Optional[Record]
    extraction: Optional[Extraction]
    image_id: str
    overlay: Optional[Overlay]
    overlay_mounted: bool
    directories: tuple[str, ...]  # to create, parents first
    claimed: tuple[str, ...]  # directories another delivery created, listed here too
    files: tuple[Placement, ...]
    obsolete: tuple[Removal, ...]
    depmod: bool
    firmware_path: Optional[FirmwarePath]
    firmware_path_set: bool  # the kernel's parameter must be written

    @property
    def name(self) -> str:
        return self.instance.name

    @property
    def empty(self) -> bool:
        """Nothing to deliver and nothing delivered before (a direct instance shipping nothing)."""
        return not self.files and self.previous is None

    @property
    def up_to_date(self) -> bool:
        previous = self.previous
        return (
            previous is not None
            and self.extraction is None
            and (self.overlay is None or self.overlay_mounted)
            and not self.directories
            and all(p.fate is Fate.CURRENT for p in self.files)
            and not self.obsolete
            and not self.depmod
            and not self.firmware_path_set
            and (previous.delivery, previous.image_id, previous.overlay, previous.firmware_path)
            == (self.delivery, self.image_id, self.overlay, self.firmware_path)
            # Digests too: a delivery killed before its last record write left the pending one.
            and [(e.path, e.kind, e.digests) for e in previous.files]
            == [(p.path, p.kind, (p.sha256,)) for p in self.files]
            and set(self.claimed) <= set(previous.dirs)
        )

    def record(self) -> Record:
        """The record once the delivery is done."""
        return Record(
            self.record_path,
            self.name,
            self.kernel_release,
            self.delivery,
            self.image_id,
            tuple(RecordedFile(p.path, p.kind, (p.sha256,)) for p in self.files),
            tuple(dict.fromkeys([*(self.previous.dirs if self.previous else ()), *self.claimed, *self.directories])),
            self.overlay,
            self.firmware_path,
        )

    def describe(self) -> str:
        where = f"the module tree of {self.kernel_release}" if self.delivery is Delivery.TREE else "the host"
        head = f"deliver {self.name} ({self.delivery.value}) into {where}"
        if self.up_to_date:
            return f"{head}: up to date ({len(self.files)} files, listed in {self.record_path})"
        lines = [f"{head}:"]
        if self.extraction is not None:
            lines.append(
                f"  extract the modules from image {self.extraction.image} (id {self.extraction.image_id[:12]}) "
                f"into {self.extraction.directory}"
            )
        if self.overlay is not None:
            lines += [f"  {line}" for line in _overlay_lines(self.overlay, self.overlay_mounted)]
        lines.append(f"  write the delivery record {self.record_path}")
        lines += [f"  create directory {path}" for path in self.directories]
        lines += [f"  {placement.describe()}" for placement in self.files]
        lines += [f"  {removal.describe()} (no longer delivered)" for removal in self.obsolete]
        if self.depmod:
            lines.append(
                f"  depmod {self.kernel_release}: kvc's depmod writes {', '.join(depmod.OUTPUTS)} in {self.moddir}"
            )
        if self.firmware_path_set and self.firmware_path is not None:
            lines.append(f"  {_firmware_path_line(self.firmware_path.value)}")
        return "\n".join(lines)


def _overlay_lines(overlay: Overlay, mounted: bool) -> list[str]:
    head = f"overlay at {overlay.target}: lower the read-only tree, upper {overlay.upper}"
    if mounted:
        return [f"{head} (mounted)"]
    if overlay.manager is MountManager.SYSTEMD:
        return [
            f"{head}:",
            f"  write the mount unit {overlay.unit_path} (mounts it at every boot, before udev)",
            f"  systemctl daemon-reload && systemctl enable --now {overlay.unit_name}",
        ]
    return [
        f"{head}:",
        f"  mount -t overlay overlay -o {overlay.options} {overlay.target}"
        " (kvc mounts it: after a reboot, the next 'kvc load' or 'kvc deliver' mounts it again)",
    ]


def _firmware_path_line(value: str) -> str:
    return (
        f"set firmware_class.path={value} (the kernel's one custom firmware directory; for boot, "
        f"add firmware_class.path={value} to the kernel command line)"
    )


# ---- planning a delivery -------------------------------------------------------------------------------


def plan_deliver(
    instance: InstanceConfig,
    kernel_release: str,
    layout: Layout,
    runtime: ContainerRuntime,
    *,
    delivery: Delivery = Delivery.TREE,
) -> DeliverPlan:
    """The delivery of the instance's modules for ``kernel_release`` (any kernel: the running one
    or the next) from its image ``NAME-VERSION:KVER``: the current extraction when it came from
    that image, else an extraction first (planned from a copy of the image's files)."""
    kernel_release = check_kernel_release(kernel_release)
    tag = image_tag(instance, kernel_release)
    manifest = read_extraction(layout, instance.name, kernel_release)
    info = runtime.inspect(tag)
    if info is None:
        if manifest is not None and not manifest.problems():
            return plan_deliver_extracted(instance, kernel_release, layout, manifest, delivery=delivery)
        raise StateError(
            f"image {tag} does not exist: {instance.name} is not built for {kernel_release}",
            hint=f"run 'kvc build {instance.name} --kernel {kernel_release}' (or 'kvc pull') first",
        )
    if manifest is not None and extraction_is_current(manifest, instance, info.id):
        return plan_deliver_extracted(instance, kernel_release, layout, manifest, delivery=delivery)
    target = layout.kernel_state(instance.name, kernel_release)
    with tempfile.TemporaryDirectory(prefix="kvc-deliver-") as scratch:
        with runtime.open_image(tag) as files:
            payload = read_image_payload(files, instance, kernel_release, f"image {tag}", scratch, info.id)
        plan = _plan(instance, kernel_release, layout, replace(payload, directory=target), delivery)
    return replace(plan, extraction=Extraction(tag, info.id, target, _digests(payload)))


def plan_deliver_extracted(
    instance: InstanceConfig, kernel_release: str, layout: Layout, manifest: Manifest, *, delivery: Delivery
) -> DeliverPlan:
    """The delivery of an extraction that is already there (``kvc load`` extracts first)."""
    manifest.verify()
    return _plan(instance, kernel_release, layout, Payload.of(manifest), delivery)


def plan_deliver_payload(
    instance: InstanceConfig, kernel_release: str, layout: Layout, payload: Payload, *, delivery: Delivery
) -> DeliverPlan:
    """The delivery of files read from the image into a scratch directory (a dry run that has
    nothing extracted yet): what the real run does after its extraction."""
    target = layout.kernel_state(instance.name, kernel_release)
    plan = _plan(instance, kernel_release, layout, replace(payload, directory=target), delivery)
    sources = {os.path.join(target, rel): os.path.join(payload.directory, rel) for rel in _payload_files(payload)}
    files = tuple(replace(p, source=sources.get(p.source, p.source)) for p in plan.files)
    return replace(plan, files=files)


def _digests(payload: Payload) -> tuple[str, ...]:
    return tuple(sorted([sha for _name, _file, sha in payload.modules] + [f.sha256 for f in payload.shipped]))


def _payload_files(payload: Payload) -> list[str]:
    return [file for _name, file, _sha in payload.modules] + [f.file for f in payload.shipped]


def _generated(instance: InstanceConfig) -> list[tuple[str, FileKind, bytes]]:
    """The files kvc writes itself for a tree delivery: (host path below /, kind, content)."""
    header = f"# Written by kvc for {instance.name}; 'kvc deliver {instance.name} --remove' removes it.\n"
    found = []
    options = [f"options {module} {params}\n" for module, params in sorted(instance.module_params.items()) if params]
    if options:
        found.append(
            (f"{MODPROBE_DIR}/kvc-{instance.name}.conf", FileKind.MODPROBE, (header + "".join(options)).encode())
        )
    if instance.modules_load:
        names = "".join(f"{normalize_name(name)}\n" for name in instance.module_names)
        found.append((f"{MODULES_LOAD_DIR}/kvc-{instance.name}.conf", FileKind.MODULES_LOAD, (header + names).encode()))
    return found


def firmware_home(layout: Layout) -> tuple[str, bool]:
    """Where firmware goes on this host, and whether that is kvc's own directory (``/lib/firmware``
    is read-only: the kernel then needs firmware_class.path)."""
    if read_only(layout.host.host(FIRMWARE_DIR)):
        return layout.host.host(KVC_FIRMWARE_DIR), True
    return layout.host.host(FIRMWARE_UPDATES), False


def _plan(
    instance: InstanceConfig, kernel_release: str, layout: Layout, payload: Payload, delivery: Delivery
) -> DeliverPlan:
    name = instance.name
    path = record_path(layout, name, kernel_release)
    previous = read_record(layout, name, kernel_release)
    if previous is not None and previous.delivery is Delivery.TREE:
        delivery = Delivery.TREE  # a tree delivery stays until 'kvc deliver --remove'
    siblings = [r for r in read_records(layout, name) if r.kernel_release != kernel_release]
    others = [r for r in read_records(layout) if r.path != path]
    kinds = set(FileKind) if delivery is Delivery.TREE else DIRECT_KINDS
    wanted: list[tuple[str, FileKind, str, str, bytes]] = []  # (path, kind, sha256, source, data)
    overlay: Optional[Overlay] = None
    mounted = False
    if delivery is Delivery.TREE:
        overlay, mounted = _tree_overlay(layout, kernel_release, previous)
        destination = module_dir(layout, name, kernel_release)
        for _module, file, sha256 in payload.modules:
            wanted.append(
                (os.path.join(destination, os.path.basename(file)), FileKind.MODULE, sha256, payload.path(file), b"")
            )
        for host_path, kind, data in _generated(instance):
            wanted.append((layout.host.host(host_path), kind, _sha256(data), "", data))
    firmware_dir, own_firmware_dir = firmware_home(layout)
    homes = {
        ShippedKind.FIRMWARE: firmware_dir,
        ShippedKind.MODPROBE: layout.host.host(MODPROBE_DIR),
        ShippedKind.UDEV: layout.host.host(UDEV_DIR),
    }
    for shipped in payload.shipped:
        kind = _SHIPPED_KINDS[shipped.kind]
        if kind in kinds:
            wanted.append(
                (
                    os.path.join(homes[shipped.kind], shipped.place),
                    kind,
                    shipped.sha256,
                    payload.path(shipped.file),
                    b"",
                )
            )
    owned = _owned(previous, siblings)
    view = _View(overlay, mounted)
    placements = tuple(
        Placement(p, kind, sha, _fate(view, p, sha, owned.get(p, ()), name), source, data, tuple(owned.get(p, ())))
        for p, kind, sha, source, data in wanted
    )
    wanted_paths = {p.path for p in placements}
    obsolete = tuple(
        Removal(entry, _removal_fate(view, entry, siblings))
        for entry in (previous.files if previous else ())
        if entry.path not in wanted_paths
    )
    claimed_by_others = {d for record in others for d in record.dirs}
    directories: list[str] = []
    claimed: list[str] = []

    def inside(directory: str) -> bool:
        return _in_kvc_places(layout, name, kernel_release, directory) and directory != layout.host.module_dir(
            kernel_release
        )

    for placement in placements:
        for directory in _parents(os.path.dirname(placement.path), inside):
            if directory in directories or directory in claimed:
                continue
            if not view.isdir(directory):
                directories.append(directory)
            elif directory in claimed_by_others:
                claimed.append(directory)
    if overlay is not None and not mounted:  # kvc's overlay directory (the tree itself goes at its teardown)
        directories += [d for d in _parents(os.path.dirname(overlay.base), inside) if not os.path.isdir(d)]
    firmware_path, firmware_path_set = None, False
    if own_firmware_dir and any(p.kind is FileKind.FIRMWARE for p in placements):
        firmware_path, firmware_path_set = _plan_firmware_path(
            layout, firmware_dir, [*others, *([previous] if previous else [])]
        )
    elif previous is not None and previous.firmware_path is not None:
        firmware_path = previous.firmware_path  # set back when the last delivery using it goes
    modules_changed = any(p.kind is FileKind.MODULE and p.fate is not Fate.CURRENT for p in placements) or any(
        r.entry.kind is FileKind.MODULE for r in obsolete
    )
    moddir = layout.host.module_dir(kernel_release)
    delivered = [p for p in placements if p.kind is FileKind.MODULE]
    depmod_needed = delivery is Delivery.TREE and (modules_changed or not _indexed(view, moddir, delivered))
    return DeliverPlan(
        instance=instance,
        kernel_release=kernel_release,
        delivery=delivery,
        record_path=path,
        moddir=moddir,
        previous=previous,
        extraction=None,
        image_id=payload.image_id,
        overlay=overlay,
        overlay_mounted=mounted,
        directories=tuple(directories),
        claimed=tuple(claimed),
        files=placements,
        obsolete=obsolete,
        depmod=depmod_needed,
        firmware_path=firmware_path,
        firmware_path_set=firmware_path_set,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parents(directory: str, inside: Callable[[str], bool]) -> list[str]:
    """``directory`` and its parents while ``inside`` says they are in kvc's places, outermost
    first."""
    found = []
    while inside(directory) and os.path.dirname(directory) != directory:
        found.append(directory)
        directory = os.path.dirname(directory)
    return list(reversed(found))


def _owned(previous: Optional[Record], siblings: Sequence[Record]) -> dict[str, tuple[str, ...]]:
    """Per path, the contents this instance's deliveries wrote there."""
    owned: dict[str, tuple[str, ...]] = {}
    for record in [*([previous] if previous else []), *siblings]:
        for entry in record.files:
            owned[entry.path] = tuple(dict.fromkeys([*owned.get(entry.path, ()), *entry.digests]))
    return owned


class _View:
    """What a path holds in the tree as the delivery will see it: through the overlay when it is
    mounted; when it is not, kvc's upper layer over the read-only tree."""

    def __init__(self, overlay: Optional[Overlay], mounted: bool) -> None:
        self.overlay = overlay if overlay is not None and not mounted else None

    def real(self, path: str) -> str:
        if self.overlay is None:
            return path
        relative = _in_target(path, self.overlay.target)
        if relative is None:
            return path
        upper = os.path.join(self.overlay.upper, relative)
        return upper if os.path.lexists(upper) else path

    def isdir(self, path: str) -> bool:
        return os.path.isdir(self.real(path))

    def kind(self, path: str) -> Optional[Kind]:
        return kind_of(self.real(path))

    def sha256(self, path: str) -> str:
        return file_sha256(self.real(path)).hex()


def _fate(view: _View, path: str, sha256: str, owned: Sequence[str], name: str) -> Fate:
    kind = view.kind(path)
    if kind is None:
        return Fate.WRITE
    current = view.sha256(path) if kind is Kind.FILE else ""
    if kind is Kind.FILE and current in owned:
        return Fate.CURRENT if current == sha256 else Fate.REPLACE
    raise StateError(
        f"{path} exists and was not written by kvc for {name} (or was changed since); not overwriting it",
        hint="kvc never overwrites files it did not write: move it away, then deliver again",
    )


def _in_target(path: str, target: str) -> Optional[str]:
    """``path`` relative to the tree ``target`` (links in ``path`` resolved), or None outside it."""
    for candidate in (path, os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))):
        if _below(candidate, target):
            return os.path.relpath(candidate, target)
    return None


def _removal_fate(view: _View, entry: RecordedFile, siblings: Sequence[Record]) -> Leaving:
    if entry.kind is not FileKind.MODULE and any(r.get(entry.path) for r in siblings):
        return Leaving.SHARED
    kind = view.kind(entry.path)
    if kind is None:
        return Leaving.GONE
    if kind is Kind.FILE and view.sha256(entry.path) in entry.digests:
        return Leaving.REMOVE
    return Leaving.KEEP_CHANGED


def _tree_overlay(layout: Layout, kernel_release: str, previous: Optional[Record]) -> tuple[Optional[Overlay], bool]:
    """Whether the tree needs kvc's overlay (and whether it is mounted)."""
    moddir = layout.host.module_dir(kernel_release)
    if previous is not None and previous.overlay is not None:
        return previous.overlay, previous.overlay.mounted()
    shared = next((r.overlay for r in read_records(layout) if r.kernel_release == kernel_release and r.overlay), None)
    if shared is not None:
        return shared, shared.mounted()
    if not os.path.isdir(moddir):
        raise StateError(
            f"there is no module tree for kernel {kernel_release} ({moddir})",
            hint="install the kernel's modules first (on ostree hosts the next deployment's tree is not "
            "visible before it boots: 'kvc load' delivers at boot)",
        )
    if not read_only(moddir):
        return None, False
    if layout.host.root in ("", "/") and in_container():
        raise StateError(
            f"{moddir} is read-only in this container: kvc cannot deliver into the host's tree from here",
            hint="run kvc on the host for tree delivery (KVC_DELIVERY=direct works in a container)",
        )
    overlay = overlay_for(layout, kernel_release, systemd=systemd.Systemctl(layout).available())
    return overlay, overlay.mounted()


def _listed(view: _View, moddir: str) -> Optional[set[str]]:
    """The module paths modules.dep lists (None: it cannot be read). kvc's depmod writes
    modules.dep after every other index, so what it lists every index has."""
    try:
        dep = view.real(os.path.join(moddir, "modules.dep"))
        with open(dep, encoding="utf-8", errors="surrogateescape") as handle:
            return {line.split(":", 1)[0] for line in handle}
    except OSError:
        return None


def _indexed(view: _View, moddir: str, modules: Sequence[Placement]) -> bool:
    """Whether modules.dep lists every delivered module (depmod ran since they were written)."""
    if not modules:
        return True
    listed = _listed(view, moddir)
    return listed is not None and all(os.path.relpath(p.path, moddir) in listed for p in modules)


def _plan_firmware_path(layout: Layout, firmware_dir: str, records: Sequence[Record]) -> tuple[FirmwarePath, bool]:
    """kvc's firmware directory as firmware_class.path: (what to record, whether to write it)."""
    value = (
        "/" + os.path.relpath(firmware_dir, layout.host.host("/"))
        if layout.host.root not in ("", "/")
        else firmware_dir
    )
    parameter = layout.host.host(FIRMWARE_PARAMETER)
    try:
        with open(parameter, encoding="utf-8") as handle:
            current = handle.read().strip()
    except OSError:
        current = None
    known = next((r.firmware_path for r in records if r.firmware_path is not None), None)
    if current is None:
        return FirmwarePath(value, known.previous if known else ""), False
    if current == value:
        return FirmwarePath(value, known.previous if known else ""), False
    if current:
        raise StateError(
            f"firmware_class.path is {current}: the kernel takes one custom firmware directory, and "
            f"{layout.host.host(FIRMWARE_DIR)} is read-only",
            hint=f"put the firmware of {current} and of the instance into one directory, or clear "
            f"{FIRMWARE_PARAMETER} if nothing needs it",
        )
    return FirmwarePath(value, current), True


# ---- executing a delivery ----------------------------------------------------------------------------------


def tree_lock(layout: Layout, kernel_release: str) -> contextlib.AbstractContextManager[None]:
    """Serializes everything that changes one kernel's tree (its files, indexes, overlay)."""
    return instance_lock(os.path.join(layout.lock_dir, "tree"), kernel_release, images=False)


def execute_deliver(
    plan: DeliverPlan,
    layout: Layout,
    runtime: Optional[ContainerRuntime],
    say: Callable[[str], None],
) -> None:
    """Do what ``plan`` says (the caller holds the instance lock). Files are written atomically;
    the record lists them before they are written."""
    if plan.up_to_date or plan.empty:
        return
    if plan.extraction is not None:
        if runtime is None:
            raise StateError(f"the delivery of {plan.name} needs its image extracted first")
        manifest = extract(layout, plan.instance, plan.kernel_release, runtime, plan.extraction.image)
        if manifest.image_id != plan.extraction.image_id or _digests(Payload.of(manifest)) != plan.extraction.digests:
            raise StateError(
                f"image {plan.extraction.image} changed while kvc planned the delivery", hint="run the delivery again"
            )
    with tree_lock(layout, plan.kernel_release):
        if plan.overlay is not None and not plan.overlay.mounted():
            _mount(plan.overlay, layout, say)
        done = _Progress()
        try:
            _write_record(_pending(plan))
            done.recorded = True
            for directory in plan.directories:
                if not os.path.isdir(directory):
                    os.mkdir(directory)
                    done.directories.append(directory)
            for placement in plan.files:
                if placement.fate is Fate.CURRENT:
                    continue
                _check_still(placement, plan.name)
                _install_file(placement)
                done.files.append(placement)
            removed = 0
            for removal in plan.obsolete:
                if removal.fate is Leaving.REMOVE and _still_owned(removal.entry):
                    os.unlink(removal.entry.path)
                    removed += 1
                    done.final = True
            if plan.depmod:
                done.indexed = True  # even a failed depmod may have renamed some index
                run_depmod(layout, plan.kernel_release)
            if plan.firmware_path_set and plan.firmware_path is not None:
                _set_firmware_path(layout, plan.firmware_path.value)
            _write_record(plan.record())
        except BaseException:
            _undo(plan, layout, done)
            raise
        _share_digests(layout, plan)
    written = sum(1 for p in plan.files if p.fate is not Fate.CURRENT)
    indexed = ", indexes written" if plan.depmod else ""
    say(f"delivered {plan.name} for {plan.kernel_release}: {written} files written, {removed} removed{indexed}")


@dataclass
class _Progress:
    """What a delivery did so far, for :func:`_undo`."""

    recorded: bool = False  # the pending record is written
    directories: list[str] = field(default_factory=list)  # created, parents first
    files: list[Placement] = field(default_factory=list)  # written
    indexed: bool = False  # depmod started
    final: bool = False  # something done that cannot be undone (an obsolete file removed)


def _undo(plan: DeliverPlan, layout: Layout, done: _Progress) -> None:
    """After a failure (no space, a read-only file system): take back the files this delivery
    created and the directories it made, index the tree again if depmod ran, and put the earlier
    record back, so the host is as before. Files it replaced cannot get their old content back:
    they stay, listed in the pending record as kvc's, and the next delivery completes them. Best
    effort: the failure being reported is the one that caused the undo."""
    for placement in reversed(done.files):
        if placement.fate is Fate.WRITE and _still_owned(
            RecordedFile(placement.path, placement.kind, (placement.sha256,))
        ):
            with contextlib.suppress(OSError):
                os.unlink(placement.path)
    for directory in reversed(done.directories):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    if done.indexed:
        with contextlib.suppress(KvcError, OSError):
            run_depmod(layout, plan.kernel_release)
    if done.final or any(p.fate is not Fate.WRITE for p in done.files):
        return
    with contextlib.suppress(OSError):
        if plan.previous is not None:
            if done.recorded:
                _write_record(plan.previous)
            return
        if done.recorded:
            os.unlink(plan.record_path)
        os.rmdir(os.path.dirname(plan.record_path))  # kvc's own, when no other record is in it


def _pending(plan: DeliverPlan) -> Record:
    """The record while the delivery runs: the new files, accepting their earlier content too,
    and the earlier delivery's files (so that a crash leaves nothing unlisted)."""
    done = plan.record()
    earlier = {entry.path: entry for entry in (plan.previous.files if plan.previous else ())}
    files = [
        RecordedFile(
            e.path, e.kind, tuple(dict.fromkeys([*e.digests, *(earlier[e.path].digests if e.path in earlier else ())]))
        )
        for e in done.files
    ]
    listed = {entry.path for entry in files}
    files += [entry for path, entry in earlier.items() if path not in listed]
    return replace(done, files=tuple(files))


def _share_digests(layout: Layout, plan: DeliverPlan) -> None:
    """The instance's other kernels' records that list a host-wide file this delivery rewrote
    learn its new content (so the last of them to go still knows the file is kvc's)."""
    written = {p.path: p.sha256 for p in plan.files if p.kind is not FileKind.MODULE}
    for record in read_records(layout, plan.name):
        if record.kernel_release == plan.kernel_release:
            continue
        files = tuple(
            RecordedFile(e.path, e.kind, tuple(dict.fromkeys([*e.digests, written[e.path]])))
            if e.path in written
            else e
            for e in record.files
        )
        if files != record.files:
            _write_record(replace(record, files=files))


def _write_record(record: Record) -> None:
    write_json(record.path, record.to_json())


def _check_still(placement: Placement, name: str) -> None:
    kind = kind_of(placement.path)
    if placement.fate is Fate.WRITE and kind is None:
        return
    if placement.fate is Fate.REPLACE and kind is Kind.FILE and file_sha256(placement.path).hex() in placement.owned:
        return
    raise StateError(f"{placement.path} changed while kvc delivered {name}", hint="run the delivery again")


def _still_owned(entry: RecordedFile) -> bool:
    return kind_of(entry.path) is Kind.FILE and file_sha256(entry.path).hex() in entry.digests


def _install_file(placement: Placement) -> None:
    """Write the file atomically (a temporary file beside it, renamed over it), checking that
    what was written is what the plan says."""
    directory = os.path.dirname(placement.path)
    remove_stale(placement.path)
    temporary = ""
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=temporary_prefix(placement.path))
        with os.fdopen(fd, "wb") as out:
            if placement.source:
                with open(placement.source, "rb") as source:
                    shutil.copyfileobj(source, out)
            else:
                out.write(placement.data)
            out.flush()
            os.fchmod(out.fileno(), FILE_MODE)
            os.fsync(out.fileno())
        if file_sha256(temporary).hex() != placement.sha256:
            raise StateError(
                f"{placement.source or placement.path} changed while kvc delivered it", hint="run the delivery again"
            )
        os.replace(temporary, placement.path)
    except BaseException as exc:
        if temporary:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename != placement.source:
            raise OSError(exc.errno, exc.strerror, placement.path) from None  # not the temporary's name
        raise
    fsync_path(directory)


def write_indexes(options: depmod.DepmodOptions, what: str) -> tuple[tuple[str, ...], list[str]]:
    """kvc's depmod with ``options``, its outputs written: (the files written, depmod's messages).
    KvcError naming ``what`` with the messages when depmod stops or cannot write."""
    messages: list[str] = []

    def emit(level: int, text: str) -> None:
        messages.append(f"depmod: {depmod.LEVEL_NAMES.get(level, 'INFO')}: {text.rstrip()}")

    log = depmod.Log(emit)
    try:
        result = depmod.run(options, log)
    except depmod.DepmodError:
        raise KvcError(
            f"depmod failed for {what}",
            details="\n".join(messages),
            hint="depmod's messages say what is wrong with the modules",
        ) from None
    if not depmod.write_outputs(options.dirname, result.files, log, strict=True):
        raise HostFileError(
            f"{options.dirname}: depmod cannot write the indexes; they are left as they were",
            details="\n".join(messages),
            hint="free space on that file system, or make it writable, then run the command again",
        )
    return tuple(name for name, _data in result.files), messages


def run_depmod(layout: Layout, kernel_release: str, *, basedir: Optional[str] = None, cache: bool = True) -> None:
    """kvc's depmod over the host's tree for the kernel (``basedir``: another root holding
    ``lib/modules/KVER``), with the host's depmod.d configuration."""
    root = layout.host.root
    cache_dir = (
        (depmod.default_cache_dir() if os.environ.get(depmod.CACHE_ENV) else os.path.join(layout.cache_dir, "depmod"))
        if cache
        else None
    )
    options = depmod.DepmodOptions(
        kernel_release,
        basedir=basedir if basedir is not None else ("" if root in ("", "/") else root.rstrip("/")),
        config_paths=tuple(layout.host.host(path) for path in depmod.CONFIG_DIRS),
        cache_dir=cache_dir,
    )
    _written, messages = write_indexes(options, options.dirname)
    for message in messages:  # warnings, as depmod prints them
        sys.stderr.write(message + "\n")


def _set_firmware_path(layout: Layout, value: str) -> None:
    # The kernel (6.0 and later) drops the newline echo would add; a lone newline clears it.
    with open(layout.host.host(FIRMWARE_PARAMETER), "w", encoding="utf-8") as handle:
        handle.write(value + "\n")


def _mount(overlay: Overlay, layout: Layout, say: Callable[[str], None]) -> None:
    os.makedirs(overlay.upper, exist_ok=True)
    os.makedirs(overlay.work, exist_ok=True)
    if overlay.manager is MountManager.SYSTEMD:
        text = overlay.unit_text()
        if kind_of(overlay.unit_path) is not None and not _unit_is_kvcs(overlay):
            raise StateError(
                f"{overlay.unit_path} exists and was not written by kvc; not replacing it",
                hint="kvc never overwrites files it did not write: move it away, then deliver again",
            )
        write_file(overlay.unit_path, text, systemd.UNIT_MODE)
        systemd.Systemctl(layout).run(
            [
                systemd.SystemctlCall(systemd.UnitAction.DAEMON_RELOAD),
                systemd.SystemctlCall(systemd.UnitAction.ENABLE_NOW, overlay.unit_name),
            ]
        )
    else:
        MountProgram().mount(overlay)
    if not overlay.mounted():
        raise StateError(
            f"the overlay at {overlay.target} is not mounted after mounting it",
            hint="see 'findmnt " + overlay.target + "' and the kernel log",
        )
    say(f"mounted the overlay at {overlay.target}")


def _unit_is_kvcs(overlay: Overlay) -> bool:
    try:
        with open(overlay.unit_path, encoding="utf-8") as handle:
            return handle.read() == overlay.unit_text()
    except (OSError, UnicodeDecodeError):
        return False


# ---- removal -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemovePlan:
    name: str
    kernel_release: str
    record: Record
    removals: tuple[Removal, ...]
    dirs: tuple[str, ...]  # to remove once empty, deepest first
    depmod: bool
    overlay_teardown: bool  # the last delivery that uses the overlay: unmount it, remove its unit and upper tree
    overlay_strangers: tuple[str, ...]  # files in the upper tree no delivery wrote: the overlay stays
    firmware_path_restore: Optional[str]
    needs_mount: bool  # the overlay must be mounted to remove files through it

    def describe(self) -> str:
        """In the order execute_remove does it."""
        lines = [f"remove the delivery of {self.name} for {self.kernel_release}:"]
        overlay = self.record.overlay
        if self.needs_mount and overlay is not None:
            lines += [f"  {line}" for line in _overlay_lines(overlay, False)]
        for removal in self.removals:
            if self.overlay_teardown and removal.entry.kind is FileKind.MODULE:
                continue
            lines.append(f"  {removal.describe()}")
        if overlay is not None and self.overlay_teardown:
            lines.append(
                f"  remove kvc's overlay at {overlay.target} (the last delivery using it), and with its tree "
                f"{overlay.base} the modules and indexes written into it:"
            )
            if overlay.manager is MountManager.SYSTEMD:
                lines.append(
                    f"    systemctl disable --now {overlay.unit_name}; remove {overlay.unit_path}; "
                    "systemctl daemon-reload"
                )
            else:
                lines.append(f"    umount --lazy {overlay.target}")
        elif overlay is not None and self.overlay_strangers:
            lines.append(
                f"  keep the overlay at {overlay.target}: {overlay.upper} holds files kvc did not write "
                f"({', '.join(self.overlay_strangers[:5])})"
            )
        lines += [f"  remove directory {path} (if empty)" for path in self.dirs]
        if self.depmod:
            lines.append(f"  depmod {self.kernel_release} (the indexes without the instance's modules)")
        if self.firmware_path_restore is not None:
            lines.append(f"  set firmware_class.path back to {self.firmware_path_restore!r}")
        lines.append(f"  remove the delivery record {self.record.path}")
        return "\n".join(lines)


def plan_remove(layout: Layout, name: str, kernel_release: str) -> RemovePlan:
    record = read_record(layout, name, kernel_release)
    if record is None:
        raise StateError(
            f"{name} has no delivery for kernel {kernel_release} ({record_path(layout, name, kernel_release)})",
            hint=f"'kvc status {name}' shows its deliveries",
        )
    return _plan_remove(layout, record)


def plan_remove_all(layout: Layout, name: str) -> list[RemovePlan]:
    """Every delivery of the instance, for ``kvc uninstall``."""
    return [_plan_remove(layout, record) for record in read_records(layout, name)]


def _plan_remove(layout: Layout, record: Record) -> RemovePlan:
    others = [r for r in read_records(layout) if r.path != record.path]
    siblings = [r for r in others if r.name == record.name]
    overlay = record.overlay
    teardown = False
    strangers: tuple[str, ...] = ()
    mounted = overlay.mounted() if overlay is not None else False
    if overlay is not None and not any(r.overlay and r.kernel_release == record.kernel_release for r in others):
        strangers = tuple(_strangers(overlay, record))
        teardown = not strangers
    view = _View(overlay, mounted)
    removals = tuple(Removal(entry, _removal_fate(view, entry, siblings)) for entry in record.files)
    claimed = {d for r in others for d in r.dirs}
    dirs = tuple(sorted((d for d in record.dirs if d not in claimed), key=lambda d: -d.count("/")))
    if teardown and overlay is not None:
        dirs = tuple(d for d in dirs if not _below(d, overlay.target))
    moddir = layout.host.module_dir(record.kernel_release)
    removes_modules = any(r.entry.kind is FileKind.MODULE and r.fate is Leaving.REMOVE for r in removals)
    if not removes_modules and record.delivery is Delivery.TREE and not teardown:
        # A removal killed after deleting the modules, before depmod: the indexes still list them.
        listed = _listed(view, moddir) or set()
        removes_modules = any(
            os.path.relpath(e.path, moddir) in listed for e in record.files if e.kind is FileKind.MODULE
        )
    depmod_needed = not teardown and record.delivery is Delivery.TREE and removes_modules and os.path.isdir(moddir)
    restore = None
    if record.firmware_path is not None and not any(r.firmware_path for r in others):
        restore = record.firmware_path.previous
    needs_mount = overlay is not None and not teardown and not mounted
    return RemovePlan(
        record.name,
        record.kernel_release,
        record,
        removals,
        dirs,
        depmod_needed,
        teardown,
        tuple(strangers),
        restore,
        needs_mount,
    )


def _strangers(overlay: Overlay, record: Record) -> list[str]:
    """Files in the overlay's upper tree that no delivery (nor depmod) wrote, or that were changed
    since: removing the upper tree would take them away."""
    ours = {_in_target(f.path, overlay.target): f.digests for f in record.files if f.kind is FileKind.MODULE}
    indexes = set(depmod.OUTPUTS)
    found = []
    for directory, _dirs, files in os.walk(overlay.upper):
        for name in files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, overlay.upper)
            if relative in indexes:
                continue
            if relative in ours and os.path.isfile(path) and file_sha256(path).hex() in ours[relative]:
                continue
            found.append(os.path.join(overlay.target, relative))
    return sorted(found)


def execute_remove(plan: RemovePlan, layout: Layout, say: Callable[[str], None]) -> None:
    """Do what ``plan`` says (the caller holds the instance lock)."""
    overlay = plan.record.overlay
    with tree_lock(layout, plan.kernel_release):
        # The record is rewritten first: where it cannot be written (no space, read-only), it could
        # not be removed at the end either, and nothing has been taken out yet.
        _write_record(plan.record)
        if plan.needs_mount and overlay is not None and not overlay.mounted():
            _mount(overlay, layout, say)
        for removal in plan.removals:
            entry = removal.entry
            if plan.overlay_teardown and entry.kind is FileKind.MODULE:
                continue  # they go with kvc's upper tree
            remove_stale(entry.path)  # what a delivery killed mid-write left beside it
            if removal.fate is Leaving.REMOVE and _still_owned(entry):
                os.unlink(entry.path)
                say(f"removed {entry.path}")
            elif removal.fate is Leaving.KEEP_CHANGED:
                say(f"kept {entry.path}: changed since kvc wrote it")
        if plan.overlay_teardown and overlay is not None:
            _teardown(overlay, layout, say)
        for directory in plan.dirs:
            try:
                os.rmdir(directory)
                say(f"removed {directory}")
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                say(f"kept {directory}: holds files kvc did not deliver")
        if plan.depmod:
            run_depmod(layout, plan.kernel_release)
            say(f"depmod {plan.kernel_release}: indexes written")
        if plan.firmware_path_restore is not None:
            with contextlib.suppress(FileNotFoundError):
                _set_firmware_path(layout, plan.firmware_path_restore)
        os.unlink(plan.record.path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(plan.record.path))
        say(f"removed the delivery of {plan.name} for {plan.kernel_release}")


def _teardown(overlay: Overlay, layout: Layout, say: Callable[[str], None]) -> None:
    if overlay.manager is MountManager.SYSTEMD:
        systemd.Systemctl(layout).run([systemd.SystemctlCall(systemd.UnitAction.DISABLE_NOW, overlay.unit_name)])
        if _unit_is_kvcs(overlay):
            os.unlink(overlay.unit_path)
        systemd.Systemctl(layout).run([systemd.SystemctlCall(systemd.UnitAction.DAEMON_RELOAD)])
    elif overlay.mounted():
        MountProgram().unmount(overlay)
    if overlay.mounted():
        raise StateError(f"the overlay at {overlay.target} is still mounted", hint=f"umount {overlay.target}")
    shutil.rmtree(overlay.base)
    say(f"removed the overlay at {overlay.target} and {overlay.base}")
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(overlay.base))


# ---- loading from the tree ---------------------------------------------------------------------------------


def plan_tree_load(
    instance: InstanceConfig,
    kernel_release: str,
    tree: ModuleDirectory,
    config: ModprobeConfig,
    kernel: Kernel,
    module_paths: Sequence[str],
    *,
    unloaded_first: AbstractSet[str] = frozenset(),
    translate: Callable[[str], str] = lambda path: path,
) -> LoadPlan:
    """Load the instance by name from the indexed tree, as modprobe does: the load's preflight on
    ``module_paths`` (the instance's module files), then for each in-tree module the instance
    names (KVC_INTREE_MODULES) and each instance module (in dependency order) what ``modprobe
    NAME`` would insert (its dependencies, softdeps and configured options), each once, leaving
    out what is loaded (but for ``unloaded_first``, which a reload unloads before).
    ``translate`` maps paths of ``tree`` to the host's (a preview of the tree)."""
    checked = plan_load(
        instance.name,
        kernel_release,
        module_paths,
        {},
        kernel,
        tree,
        modprobe_config=config,
        unloaded_first=unloaded_first,
        intree_modules=instance.intree_modules,
    )
    loaded = {entry.name for entry in kernel.loaded_modules()} - set(unloaded_first)
    ours = {normalize_name(name) for name in instance.module_names}
    order = [step.name for step in checked.steps if step.origin is Origin.INSTANCE]
    steps: list[LoadStep] = []
    seen: set[str] = set(loaded)
    for name in [*instance.intree_modules, *order]:
        try:
            planned = load_plan(tree, config, name)
        except LookupError:
            raise LoadError(
                f"module {name} is not found in {tree.path}",
                hint=f"the tree's indexes are out of date: run 'kvc deliver {instance.name}' again",
            ) from None
        for item in planned:
            if item.action == ACTION_BUILTIN or item.name in seen:
                continue
            if item.action == ACTION_INSTALL or item.path is None:
                raise LoadError(
                    f"module {item.name} has an install command in the modprobe configuration: {item.command}",
                    hint=f"kvc does not run install commands: load it with 'modprobe {item.name}', or remove the line",
                )
            seen.add(item.name)
            origin = Origin.INSTANCE if item.name in ours else Origin.IN_TREE
            steps.append(LoadStep(item.name, translate(item.path), item.options.strip(), origin, item.required))
    return LoadPlan(instance.name, kernel_release, tuple(steps), checked.already_loaded)


def tree_load_plan(
    layout: Layout,
    instance: InstanceConfig,
    kernel_release: str,
    kernel: Kernel,
    *,
    unloaded_first: AbstractSet[str] = frozenset(),
) -> LoadPlan:
    """The load of a delivered instance from the host's tree (modprobe.d included, kvc-NAME.conf
    too)."""
    record = read_record(layout, instance.name, kernel_release)
    if record is None or record.delivery is not Delivery.TREE:
        raise StateError(
            f"{instance.name} is not delivered into the module tree of {kernel_release}",
            hint=f"run 'kvc deliver {instance.name}' (or 'kvc load {instance.name} --delivery tree')",
        )
    tree = ModuleDirectory(layout.host.module_dir(kernel_release))
    config = load_config(None, module_dir=tree.path, paths=layout.host)
    paths = [entry.path for entry in record.files if entry.kind is FileKind.MODULE]
    return plan_tree_load(instance, kernel_release, tree, config, kernel, paths, unloaded_first=unloaded_first)


def preview_load_plan(
    layout: Layout,
    plan: DeliverPlan,
    kernel: Kernel,
    *,
    unloaded_first: AbstractSet[str] = frozenset(),
) -> LoadPlan:
    """The load that follows the tree delivery ``plan``, planned on a preview of the tree and with
    the modprobe.d files the delivery writes (the host is not touched)."""
    modules = {os.path.basename(p.path): p.source for p in plan.files if p.kind is FileKind.MODULE}
    with previewed_tree(layout, plan.kernel_release, plan.name, modules) as (tree, translate):
        configs = os.path.join(os.path.dirname(tree.path), "modprobe.d")
        os.makedirs(configs)
        planned = []
        for placement in plan.files:
            if placement.kind is FileKind.MODPROBE:
                planned.append(os.path.join(configs, os.path.basename(placement.path)))
                if placement.source:
                    shutil.copyfile(placement.source, planned[-1])
                else:
                    with open(planned[-1], "wb") as handle:
                        handle.write(placement.data)
        # The delivery's files first: they are /etc/modprobe.d's, which comes before the others.
        search = [*planned, *(layout.host.host(d) for d in DEFAULT_CONFIG_DIRS)]
        config = load_config(search, module_dir=tree.path, paths=layout.host)
        return plan_tree_load(
            plan.instance,
            plan.kernel_release,
            tree,
            config,
            kernel,
            list(modules.values()),
            unloaded_first=unloaded_first,
            translate=translate,
        )


@contextlib.contextmanager
def previewed_tree(
    layout: Layout, kernel_release: str, name: str, modules: Mapping[str, str]
) -> Iterator[tuple[ModuleDirectory, Callable[[str], str]]]:
    """The host's tree for the kernel as it will be after a delivery, indexed, in a scratch
    directory (links to the tree's files, plus ``modules`` {file name: local file} in
    ``updates/kvc/NAME``); and the map from its paths to the host's. A dry run plans the
    tree-mode load on it without touching the host."""
    moddir = layout.host.module_dir(kernel_release)
    with tempfile.TemporaryDirectory(prefix="kvc-preview-") as scratch:
        shadow = os.path.join(scratch, "lib", "modules", kernel_release)
        _mirror(moddir, shadow, [*TREE_DIR.split("/"), name])
        for file_name, local in modules.items():
            os.symlink(local, os.path.join(shadow, TREE_DIR, name, file_name))
        run_depmod(layout, kernel_release, basedir=scratch, cache=False)

        def translate(path: str) -> str:
            return moddir + path[len(shadow) :] if _below(path, shadow) else path

        yield ModuleDirectory(shadow), translate


def _mirror(source: str, target: str, down: Sequence[str]) -> None:
    """``target`` as a directory of links to ``source``'s entries (depmod's outputs left out),
    except the path ``down``, made of real directories (its last one empty)."""
    os.makedirs(target)
    if not down:
        return
    try:
        entries = os.listdir(source)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if entry == down[0] or entry in depmod.OUTPUTS:
            continue
        os.symlink(os.path.join(source, entry), os.path.join(target, entry))
    _mirror(os.path.join(source, down[0]), os.path.join(target, down[0]), down[1:])


# ---- status ----------------------------------------------------------------------------------------------------


def delivery_status(layout: Layout, name: str, kernel_release: str) -> Optional[dict[str, object]]:
    """What ``kvc status`` shows of the instance's delivery for the kernel (None: none)."""
    try:
        record = read_record(layout, name, kernel_release)
    except KvcError as exc:
        return {"error": exc.brief}
    if record is None:
        return None
    overlay = record.overlay
    return {
        "mode": record.delivery.value,
        "path": module_dir(layout, name, kernel_release) if record.delivery is Delivery.TREE else None,
        "files": len(record.files),
        "record": record.path,
        "overlay": None
        if overlay is None
        else {
            "upper": overlay.upper,
            "mounted": overlay.mounted(),
            "by": overlay.manager.value,
            "unit": overlay.unit_path or None,
        },
        "firmware_path": record.firmware_path.value if record.firmware_path else None,
    }
