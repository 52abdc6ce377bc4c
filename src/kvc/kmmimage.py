"""The layout the Kernel Module Management operator (KMM) reads, added to every image kvc publishes.

KMM's worker pod copies ``DIRNAME/lib/modules/KVER`` out of the module image with the image's own
``/bin/sh -c 'mkdir -p ...; cp -R ...'`` and runs ``modprobe -vd DIRNAME MODULE`` on the copy; the
firmware below the Module's ``firmwarePath`` is copied the same way. So a published image keeps
kvc's own ``/lib/modules/KVER`` (what kvc's pull, verify and extract read) and gains one layer:

* ``/opt/lib/modules/KVER/<the same relative path>`` for each KMOD_NAMES module only, with all of
  depmod's outputs for that tree written by kvc's depmod (as ``depmod -b /opt KVER`` with no
  depmod.d configuration, what KMM's documented Containerfile runs);
* ``/opt/lib/firmware/<the same path>`` for each KVC_FIRMWARE file below ``/lib/firmware``;
* the labels ``kvc.kmm.dir-name=/opt`` and, with firmware, ``kvc.kmm.firmware-path=/opt/lib/firmware``.

The layer is built FROM the local image with a fixed timestamp (the local image's creation
time): the same image gives the same layer, so publishing it twice gives the same digest.
An image without ``/bin/sh``, ``mkdir``, ``rm`` or ``cp`` is refused: KMM's worker (and kvc's own
DaemonSet, :mod:`kvc.k8s`) could not copy out of it.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass

from kvc import tree
from kvc.config import InstanceConfig
from kvc.errors import BuildError, CommandError, StateError
from kvc.extract import ShippedKind, copy_instance_modules, copy_shipped_files
from kvc.kmod import depmod
from kvc.runtime import ContainerRuntime, ImageFiles

DIR_NAME = "/opt"
FIRMWARE_PATH = f"{DIR_NAME}/lib/firmware"
LABEL_DIR_NAME = "kvc.kmm.dir-name"
LABEL_FIRMWARE_PATH = "kvc.kmm.firmware-path"
SHELL = "/bin/sh"
# What the init containers run besides the shell (KMM's: mkdir and cp; kvc's DaemonSet: rm and cp),
# found through the default PATH; its directories in the order that finds them soonest (each miss
# is a copy attempt, a podman call when the image cannot be mounted).
COPY_PROGRAMS = ("mkdir", "rm", "cp")
DEFAULT_PATH = ("/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/local/sbin")
_CONTEXT_DIR = "opt"


@dataclass(frozen=True)
class KmmLayout:
    """What the layer adds: image paths of the modules, the depmod outputs and the firmware files."""

    kernel_release: str
    modules: tuple[str, ...]
    indexes: tuple[str, ...]
    firmware: tuple[str, ...]

    @property
    def labels(self) -> dict[str, str]:
        labels = {LABEL_DIR_NAME: DIR_NAME}
        if self.firmware:
            labels[LABEL_FIRMWARE_PATH] = FIRMWARE_PATH
        return labels


def _present(files: ImageFiles, path: str, scratch: str) -> bool:
    """Whether the image has a regular file at ``path`` (symlinks followed inside the image, as
    /bin -> usr/bin on merged-/usr images and busybox's links are; a link loop is no file)."""
    try:
        copied = files.copy([path], scratch)
    except (BuildError, CommandError, OSError):
        return False
    os.unlink(copied[path])
    return True


def missing_programs(files: ImageFiles) -> list[str]:
    """Of /bin/sh and the programs the init containers' copy commands run, those the image lacks."""
    with tempfile.TemporaryDirectory(prefix="kvc-kmm-check-") as scratch:
        missing = [] if _present(files, SHELL, scratch) else [SHELL]
        for program in COPY_PROGRAMS:
            if not any(_present(files, posixpath.join(directory, program), scratch) for directory in DEFAULT_PATH):
                missing.append(program)
    return missing


def write_indexes(basedir: str, kernel_release: str) -> tuple[str, ...]:
    """kvc's depmod over ``basedir/lib/modules/KVER`` (no depmod.d configuration); the files written."""
    options = depmod.DepmodOptions(kernel_release, basedir=basedir, config_paths=())
    written, _messages = tree.write_indexes(options, f"the KMM layout of {kernel_release}")
    for name in written:
        os.chmod(os.path.join(options.dirname, name), 0o644)
    return written


def lay_out(files: ImageFiles, instance: InstanceConfig, kernel_release: str, what: str, root: str) -> KmmLayout:
    """Copy the instance's modules and firmware out of open image files (``what`` names them) into
    ``root/opt/...`` as the image will hold them, and index the modules."""
    top = os.path.join(root, _CONTEXT_DIR)
    moddir = os.path.join(top, "lib", "modules", kernel_release)
    staging = os.path.join(root, "staging")
    os.makedirs(moddir)
    os.makedirs(staging)
    base = f"/lib/modules/{kernel_release}/"
    modules = []
    for image_path, local in copy_instance_modules(files, instance, kernel_release, what, staging).values():
        relative = image_path[len(base) :]
        target = os.path.join(moddir, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(local, target)
        modules.append(posixpath.join(DIR_NAME, "lib", "modules", kernel_release, relative))
    firmware = []
    for shipped in copy_shipped_files(files, instance, what, staging):
        if shipped.kind != ShippedKind.FIRMWARE:
            continue
        target = os.path.join(top, "lib", "firmware", *shipped.place.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staging, shipped.file), target)
        firmware.append(posixpath.join(FIRMWARE_PATH, shipped.place))
    shutil.rmtree(staging)
    indexes = write_indexes(top, kernel_release)
    # Modes as the layer should carry them, whatever this process's umask.
    for current, _dirs, names in os.walk(top):
        os.chmod(current, 0o755)
        for name in names:
            os.chmod(os.path.join(current, name), 0o644)
    return KmmLayout(kernel_release, tuple(modules), indexes, tuple(firmware))


def add_kmm_layout(
    runtime: ContainerRuntime, instance: InstanceConfig, kernel_release: str, image: str, tag: str, *, timestamp: int
) -> KmmLayout:
    """Build ``tag`` FROM ``image`` (an id or a name) with the KMM layout added, created at
    ``timestamp``; StateError when the image lacks what KMM's init container runs."""
    with tempfile.TemporaryDirectory(prefix="kvc-kmm-") as context:
        with runtime.open_image(image) as files:
            missing = missing_programs(files)
            if missing:
                raise StateError(
                    f"image {image} of {instance.name} for {kernel_release} has no {', '.join(missing)}: KMM's "
                    "init container copies the modules out of it with /bin/sh, mkdir and cp (kvc's DaemonSet: rm)",
                    hint="build the image from a base with a shell and coreutils or busybox (the final stage "
                    f"of {instance.build_file or 'the Containerfile'})",
                )
            layout = lay_out(files, instance, kernel_release, f"image {image}", context)
        build_file = os.path.join(context, "Containerfile")
        with open(build_file, "w", encoding="utf-8") as handle:
            handle.write(f"FROM {image}\nCOPY {_CONTEXT_DIR} {DIR_NAME}\n")
        runtime.build(context, build_file, tag, (), {}, pull="never", timestamp=timestamp)
    return layout
