"""The instance's modules, extracted from its image into ``/var/lib/kvc/NAME/KVER`` for loading.

Extraction is atomic: the module files (and the files the conf says ship with them: firmware,
modprobe.d files, udev rules, below ``shipped/``) are copied out of the image into a temporary
directory beside the target, described by ``manifest.json`` (schema 1: the image, its id and
``kvc.digest`` label, the kernel, per module its name, file, sha256, vermagic and depends, and per
shipped file its kind, image path, file, place and sha256), fsynced, and the
directory then replaces the old one in one step (``renameat2(RENAME_EXCHANGE)``; where that is not
available: rename the old one away, rename the new one in, remove the old one). Other files in the
old directory that are not part of its extraction (the loader's ``loaded.json``) are carried over.
A failure at any point leaves the previous extraction as it was.

It is redone only when the image id changed (or the module list, or a file no longer matches its
digest); loaders and ``status`` read :func:`read_manifest` and check files with
:meth:`Manifest.verify` before use.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import glob
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Mapping, Optional

from kvc.atomic import fsync_path
from kvc.config import InstanceConfig
from kvc.errors import BuildError, CommandError, StateError
from kvc.imagerecord import recorded_image
from kvc.images import LABEL_DIGEST, match_modules
from kvc.kmod.digest import file_sha256
from kvc.kmod.errors import KmodError
from kvc.kmod.module import ModuleFile
from kvc.kmod.names import modname_normalize as normalize_name
from kvc.layout import Layout
from kvc.runtime import ContainerRuntime, DirectoryFiles, ImageFiles, ImageInfo

MANIFEST = "manifest.json"
SCHEMA = 1
SHIPPED_DIR = "shipped"
FIRMWARE_DIR = "/lib/firmware"


class ShippedKind(str, enum.Enum):
    """Files that ship with the modules; the value names their directory in the extraction."""

    FIRMWARE = "firmware"  # KVC_FIRMWARE: place is the path below the firmware directory
    MODPROBE = "modprobe.d"  # KVC_MODPROBE_CONF: place is the file name in /etc/modprobe.d
    UDEV = "udev"  # KVC_UDEV_RULES: place is the file name in /etc/udev/rules.d


@dataclass(frozen=True)
class ShippedFile:
    kind: ShippedKind
    image_path: str
    file: str  # relative to the extraction directory: shipped/KIND/PLACE
    place: str  # where it goes, relative to the kind's host directory
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "image_path": self.image_path,
            "file": self.file,
            "place": self.place,
            "sha256": self.sha256,
        }


def shipped_declaration(instance: InstanceConfig) -> dict[str, list[str]]:
    """What the conf asks to ship (kept in the manifest: a changed conf means a new extraction)."""
    return {
        ShippedKind.FIRMWARE.value: list(instance.firmware),
        ShippedKind.MODPROBE.value: list(instance.modprobe_conf),
        ShippedKind.UDEV.value: list(instance.udev_rules),
    }


@dataclass(frozen=True)
class ExtractedModule:
    name: str  # kmod's name (with '_')
    file: str  # relative to the extraction directory
    sha256: str
    vermagic: str
    depends: tuple[str, ...]
    image_path: str = ""  # where it was in the image

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "vermagic": self.vermagic,
            "depends": list(self.depends),
            "image_path": self.image_path,
        }


@dataclass(frozen=True)
class Manifest:
    directory: str
    image: str
    image_id: str
    image_digest: str  # the image's kvc.digest label ("" for images kvc did not build)
    kernel: str
    modules: tuple[ExtractedModule, ...]
    extracted_at: float = 0.0
    shipped: tuple[ShippedFile, ...] = ()
    declared: Mapping[str, list[str]] = field(default_factory=dict)

    def path_of(self, name: str) -> str:
        wanted = normalize_name(name)
        for module in self.modules:
            if module.name == wanted:
                return os.path.join(self.directory, module.file)
        raise KeyError(name)

    def problems(self) -> list[str]:
        """Files that are missing or no longer match their recorded sha256."""
        found = []
        for file, sha256 in [*((m.file, m.sha256) for m in self.modules), *((s.file, s.sha256) for s in self.shipped)]:
            path = os.path.join(self.directory, file)
            try:
                digest = file_sha256(path).hex()
            except OSError as exc:
                found.append(f"{path}: {exc.strerror or exc}")
                continue
            if digest != sha256:
                found.append(f"{path}: sha256 {digest} differs from the extracted {sha256}")
        return found

    def verify(self) -> None:
        """The files still are what was extracted; StateError otherwise."""
        problems = self.problems()
        if problems:
            raise StateError(
                f"the extracted modules in {self.directory} changed since extraction",
                details="\n".join(problems),
                hint="run the load again with --force to extract them from the image again",
            )


def _parse_manifest(directory: str, data: object) -> Optional[Manifest]:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return None
    try:
        modules = tuple(
            ExtractedModule(
                str(m["name"]),
                str(m["file"]),
                str(m["sha256"]),
                str(m["vermagic"]),
                tuple(str(d) for d in m["depends"]),
                str(m.get("image_path", "")),
            )
            for m in data["modules"]
        )
        shipped = tuple(
            ShippedFile(ShippedKind(f["kind"]), str(f["image_path"]), str(f["file"]), str(f["place"]), str(f["sha256"]))
            for f in data.get("shipped", [])
        )
        relative = [m.file for m in modules] + [p for f in shipped for p in (f.file, f.place)]
        if any(os.path.isabs(path) or ".." in path.split("/") for path in relative):
            return None
        declared = {str(k): [str(v) for v in values] for k, values in dict(data.get("shipped_declared", {})).items()}
        return Manifest(
            directory,
            str(data["image"]),
            str(data["image_id"]),
            str(data.get("image_digest", "")),
            str(data["kernel"]),
            modules,
            float(data.get("extracted_at", 0.0)),
            shipped,
            declared,
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def read_manifest(layout: Layout, name: str, kernel_release: str) -> Optional[Manifest]:
    """The manifest of the current extraction, or None when there is none (or it is unreadable)."""
    directory = layout.kernel_state(name, kernel_release)
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return _parse_manifest(directory, data)


def verify_extraction(layout: Layout, name: str, kernel_release: str) -> Manifest:
    """The current extraction, checked against its manifest; StateError when missing or changed."""
    manifest = read_manifest(layout, name, kernel_release)
    if manifest is None:
        raise StateError(
            f"{name} has no extracted modules for kernel {kernel_release}",
            hint=f"run 'kvc load {name}' (it extracts them from the image)",
        )
    manifest.verify()
    return manifest


def is_current(manifest: Optional[Manifest], instance: InstanceConfig, image_id: str) -> bool:
    """Whether an extraction can be reused for the image ``image_id``: same image, same modules,
    files intact."""
    if manifest is None or manifest.image_id != image_id:
        return False
    if [m.name for m in manifest.modules] != [normalize_name(n) for n in instance.module_names]:
        return False
    if not _same_declaration(manifest, instance):
        return False
    return not manifest.problems()


def _same_declaration(manifest: Manifest, instance: InstanceConfig) -> bool:
    """Whether the extraction shipped what the conf asks for (nothing, in manifests from before)."""
    wanted = {kind: paths for kind, paths in shipped_declaration(instance).items() if paths}
    return {kind: paths for kind, paths in manifest.declared.items() if paths} == wanted


# ---- the directory swap ---------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    import ctypes  # only here: the CLI's start-up stays small

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a)


def replace_dir(staging: str, target: str) -> None:
    """Put ``staging`` in place of ``target`` (which may not exist) so that ``target`` is always
    either the old or the new directory; the old one is removed afterwards."""
    parent = os.path.dirname(target)
    base = os.path.basename(target)
    if not os.path.exists(target):
        os.rename(staging, target)
        fsync_path(parent)
        return
    if _exchange(staging, target):
        fsync_path(parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the old directory
        return
    old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_path(parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover(target: str) -> None:
    """Undo what an interrupted extraction left: temporary directories, or (after a crash between
    the two renames of the fallback swap) an old directory that must become the target again."""
    parent = os.path.dirname(target)
    base = os.path.basename(target)
    olds = sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.old-*")))
    if not os.path.exists(target) and olds:
        os.rename(olds.pop(), target)
    for leftover in [*olds, *glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.new-*"))]:
        shutil.rmtree(leftover, ignore_errors=True)


DIRECTORY_HINT = "give the root of a file system that holds the instance's modules for this kernel"


def copy_instance_modules(
    files: ImageFiles,
    instance: InstanceConfig,
    kernel_release: str,
    what: str,
    destination: str,
    *,
    missing_hint: str = "",
) -> dict[str, tuple[str, str]]:
    """Copy the instance's modules for ``kernel_release`` out of open image files (``what`` names
    them: "image NAME", or a directory) into the existing directory ``destination``: {module name:
    (image path, local path)} in KMOD_NAMES order. Missing modules: StateError with
    ``missing_hint`` (default: rebuild the image)."""
    directory = f"/lib/modules/{kernel_release}"
    found = match_modules(files.list(directory), kernel_release, instance.module_names)
    names = [normalize_name(name) for name in instance.module_names]
    missing = [name for name in instance.module_names if normalize_name(name) not in found]
    if missing:
        raise StateError(
            f"{what} has no module(s) {', '.join(missing)} below {directory}",
            hint=missing_hint or f"rebuild it: 'kvc build {instance.name} --kernel {kernel_release} --force'",
        )
    copies = files.copy([found[name] for name in names], destination)
    return {name: (found[name], copies[found[name]]) for name in names}


def _shipped_sources(files: ImageFiles, instance: InstanceConfig) -> list[tuple[ShippedKind, str, str]]:
    """(kind, image path, place) of every file the conf ships; a KVC_FIRMWARE directory gives the
    regular files below it."""
    sources = []
    for item in instance.firmware:
        path = posixpath.join(FIRMWARE_DIR, item)
        try:
            below = files.list(path)
        except CommandError:  # find in a container refuses a file as the start: copied as a file
            below = []
        for found in below or [path]:
            sources.append((ShippedKind.FIRMWARE, found, posixpath.relpath(found, FIRMWARE_DIR)))
    for kind, paths in ((ShippedKind.MODPROBE, instance.modprobe_conf), (ShippedKind.UDEV, instance.udev_rules)):
        sources += [(kind, path, posixpath.basename(path)) for path in paths]
    return sources


_SHIPPED_KEYS = {
    ShippedKind.FIRMWARE: "KVC_FIRMWARE",
    ShippedKind.MODPROBE: "KVC_MODPROBE_CONF",
    ShippedKind.UDEV: "KVC_UDEV_RULES",
}


def copy_shipped_files(
    files: ImageFiles, instance: InstanceConfig, what: str, destination: str
) -> tuple[ShippedFile, ...]:
    """Copy the files the conf ships with the modules out of open image files (``what`` names
    them) into ``destination/shipped/KIND/PLACE``; a file the image lacks is a StateError."""
    shipped = []
    for kind, image_path, place in _shipped_sources(files, instance):
        relative = posixpath.join(SHIPPED_DIR, kind.value, place)
        directory = os.path.dirname(os.path.join(destination, relative))
        os.makedirs(directory, exist_ok=True)
        try:
            local = files.copy([image_path], directory)[image_path]
        except (BuildError, CommandError):
            raise StateError(
                f"{what} has no file {image_path} ({_SHIPPED_KEYS[kind]} in {instance.source})",
                hint=f"correct {_SHIPPED_KEYS[kind]}, or rebuild the image with the file in it",
            ) from None
        os.chmod(local, 0o644)
        fsync_path(local)
        shipped.append(ShippedFile(kind, image_path, relative, place, file_sha256(local).hex()))
    return tuple(shipped)


# ---- extraction ---------------------------------------------------------------------------------------------


def extract(
    layout: Layout,
    instance: InstanceConfig,
    kernel_release: str,
    runtime: ContainerRuntime,
    image: str,
    *,
    force: bool = False,
) -> Manifest:
    """Extract the instance's modules from ``image`` into ``layout.kernel_state(NAME, KVER)`` and
    return the manifest; reuse the current extraction when it came from the same image id (unless
    ``force``). The caller holds the instance lock."""
    return extract_image(layout, instance, kernel_release, runtime, image, force=force)[0]


def extract_image(
    layout: Layout,
    instance: InstanceConfig,
    kernel_release: str,
    runtime: ContainerRuntime,
    image: str,
    *,
    force: bool = False,
) -> tuple[Manifest, ImageInfo]:
    """:func:`extract`, and what the runtime said of ``image`` (for kvc's record of it)."""
    info = runtime.inspect(image)
    if info is None:
        raise StateError(
            f"image {image} does not exist", hint=f"run 'kvc build {instance.name} --kernel {kernel_release}' first"
        )
    manifest = _extract(
        layout,
        instance,
        kernel_release,
        Source(image, info.id, info.labels.get(LABEL_DIGEST, ""), f"image {image}"),
        lambda: runtime.open_image(image),
        force=force,
    )
    return manifest, info


def recorded_extraction(
    layout: Layout, instance: InstanceConfig, kernel_release: str, image: str
) -> Optional[Manifest]:
    """The current extraction when kvc's record says ``image`` still names the image it came from
    (:mod:`kvc.imagerecord`), files intact; else None. The boot path's load then starts no
    container runtime. What an interrupted extraction left is undone first, as an extraction
    does (the caller holds the instance lock)."""
    record = recorded_image(layout, instance.name, kernel_release)
    if record is None or not record.has_name(image):
        return None
    _recover(layout.kernel_state(instance.name, kernel_release))
    manifest = read_manifest(layout, instance.name, kernel_release)
    return manifest if is_current(manifest, instance, record.id) else None


def directory_files(directory: str, kernel_release: str) -> DirectoryFiles:
    """The files of ``directory``, a root file system that must hold ``lib/modules/KVER``."""
    if not os.path.isdir(os.path.join(directory, "lib", "modules", kernel_release)):
        raise StateError(
            f"{directory} has no lib/modules/{kernel_release}",
            hint="give the root of the modules' file system: DIR/lib/modules/KVER/... (an image's root)",
        )
    return DirectoryFiles(directory)


def extract_from_directory(
    layout: Layout, instance: InstanceConfig, kernel_release: str, directory: str, *, force: bool = False
) -> Manifest:
    """Extract the instance's modules from ``directory``, a root file system holding
    ``lib/modules/KVER/`` (an image mounted or copied by someone else: ``podman run --mount
    type=image``, a Kubernetes image volume, an init container's copy). Its id is the digest of the
    module files found, so an unchanged directory is not extracted again."""
    files = directory_files(directory, kernel_release)
    names = [normalize_name(name) for name in instance.module_names]
    found = match_modules(files.list(f"/lib/modules/{kernel_release}"), kernel_release, instance.module_names)
    content = hashlib.sha256()
    for name in names:
        if name in found:
            content.update(f"{found[name]}\0".encode() + file_sha256(files.host_path(found[name])) + b"\0")
    for _kind, image_path, _place in _shipped_sources(files, instance):
        with contextlib.suppress(OSError):  # a missing file is the extraction's error to report
            content.update(f"{image_path}\0".encode() + file_sha256(files.host_path(image_path)) + b"\0")
    top = os.path.abspath(directory)
    source = Source(f"dir:{top}", f"dir-{content.hexdigest()}", "", top, DIRECTORY_HINT)
    return _extract(layout, instance, kernel_release, source, lambda: contextlib.nullcontext(files), force=force)


@dataclass(frozen=True)
class Source:
    """Where modules are extracted from: an image (name, id, kvc.digest) or a directory."""

    name: str
    id: str
    digest: str
    what: str  # for messages: "image NAME", or the directory
    missing_hint: str = ""  # what to do when modules are missing ("": rebuild the image)


def _extract(
    layout: Layout,
    instance: InstanceConfig,
    kernel_release: str,
    source: Source,
    open_files: Callable[[], ContextManager[ImageFiles]],
    *,
    force: bool,
) -> Manifest:
    target = layout.kernel_state(instance.name, kernel_release)
    parent = os.path.dirname(target)
    made = not os.path.isdir(parent)
    os.makedirs(parent, exist_ok=True)
    _recover(target)
    current = read_manifest(layout, instance.name, kernel_release)
    if not force and current is not None and is_current(current, instance, source.id):
        return current
    staging = ""
    try:
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.new-", dir=parent)
        with open_files() as files:
            copies = copy_instance_modules(
                files, instance, kernel_release, source.what, staging, missing_hint=source.missing_hint
            )
            shipped = copy_shipped_files(files, instance, source.what, staging)
        modules = []
        for name, (image_path, local) in copies.items():
            os.chmod(local, 0o644)
            fsync_path(local)
            try:
                module = ModuleFile.open(local)
                vermagic, depends = (module.vermagic or "").strip(), tuple(module.depends)
            except KmodError as exc:
                raise StateError(
                    f"{image_path} in {source.what} is not a readable module: {exc}", hint="rebuild the image"
                ) from None
            modules.append(
                ExtractedModule(name, os.path.basename(local), file_sha256(local).hex(), vermagic, depends, image_path)
            )
        if current is not None:
            _carry_over(current, staging)
        manifest = {
            "schema": SCHEMA,
            "image": source.name,
            "image_id": source.id,
            "image_digest": source.digest,
            "kernel": kernel_release,
            "extracted_at": time.time(),
            "modules": [m.to_json() for m in modules],
            "shipped": [f.to_json() for f in shipped],
            "shipped_declared": shipped_declaration(instance),
        }
        manifest_path = os.path.join(staging, MANIFEST)
        with open(manifest_path, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(manifest_path, 0o644)
        os.chmod(staging, 0o755)
        fsync_path(staging)
        replace_dir(staging, target)
    except BaseException as exc:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(parent)
        if isinstance(exc, OSError) and exc.errno in _DESTINATION_ERRORS:
            # Named after the extraction, not the image file or the staging directory it was copying.
            raise OSError(exc.errno, f"cannot extract the modules there: {exc.strerror}", target) from None
        raise
    result = read_manifest(layout, instance.name, kernel_release)
    if result is None:
        raise StateError(f"{os.path.join(target, MANIFEST)} cannot be read back after extraction")
    return result


# Errors only the extraction's own file system gives (no space, a quota, read-only).
_DESTINATION_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _carry_over(previous: Manifest, staging: str) -> None:
    """Copy files the old extraction directory holds besides its modules and manifest (state
    written by others, such as the loader's record) into the new one."""
    extracted = {m.file for m in previous.modules} | {MANIFEST}
    try:
        entries = os.listdir(previous.directory)
    except OSError:
        return
    for entry in entries:
        source = os.path.join(previous.directory, entry)
        if entry in extracted or not os.path.isfile(source) or os.path.islink(source):
            continue
        target = os.path.join(staging, entry)
        if not os.path.exists(target):
            shutil.copy2(source, target)
            fsync_path(target)
