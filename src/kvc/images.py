"""An instance's images: their names, their labels, where their modules lie, and pruning.

Image naming follows KVC: ``NAME-VERSION:KVER`` with the label ``name=NAME``, so images of the
original framework and kvc's are found alike. Characters a tag cannot hold (``+`` in Debian
backport kernels such as ``6.12.9+bpo-amd64``) become ``_`` in the tag and the repository is
lowercased; the ``kvc.kernel`` label keeps the exact release.

Prebuilt images (``KVC_IMAGE``): the reference for a kernel is ``KVC_IMAGE`` with ``{kver}``
replaced by the kernel release when it contains ``{kver}``; else, when it already has a tag,
``-KVER`` appended to that tag (``reg/x:1.0`` -> ``reg/x:1.0-6.1.0-56-amd64``); else ``:KVER``
appended (``reg/x`` -> ``reg/x:6.1.0-56-amd64``); a digest reference (``@sha256:...``) is used as
is.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from kvc.config import InstanceConfig
from kvc.errors import CommandError
from kvc.kmod.module import is_module_filename, name_from_path, normalize_name
from kvc.runtime import ContainerRuntime, ImageInfo, normalize_ref

LABEL_NAME = "name"  # KVC's label: name=NAME
LABEL_KERNEL = "kvc.kernel"
LABEL_VERSION = "kvc.version"
LABEL_MODULES = "kvc.modules"
LABEL_DIGEST = "kvc.digest"
CANDIDATE_SUFFIX = "-kvc-candidate"

_TAG_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_TAG = 128


# ---- names --------------------------------------------------------------------------------------------


def kernel_tag(kernel_release: str, suffix: str = "") -> str:
    """The tag for a kernel release: characters a tag cannot hold become '_' (at most 128 chars)."""
    tag = _TAG_BAD.sub("_", kernel_release)
    return tag[: _MAX_TAG - len(suffix)] + suffix


def image_repository(instance: InstanceConfig) -> str:
    return instance.image_repository.lower()


def image_tag(instance: InstanceConfig, kernel_release: str) -> str:
    """KVC's image name for the instance and kernel: ``NAME-VERSION:KVER``."""
    return f"{image_repository(instance)}:{kernel_tag(kernel_release)}"


def candidate_tag(instance: InstanceConfig, kernel_release: str) -> str:
    """Where a new build goes until it has been verified."""
    return f"{image_repository(instance)}:{kernel_tag(kernel_release, CANDIDATE_SUFFIX)}"


def prebuilt_ref(image: str, kernel_release: str) -> str:
    """The reference to pull for a kernel from ``KVC_IMAGE`` (rules in the module docstring)."""
    if "{kver}" in image:
        return image.replace("{kver}", kernel_release)
    if "@" in image:
        return image
    if ":" in image.rsplit("/", 1)[-1]:
        return f"{image}-{kernel_tag(kernel_release)}"
    return f"{image}:{kernel_tag(kernel_release)}"


# ---- labels ----------------------------------------------------------------------------------------------


def image_labels(instance: InstanceConfig, kernel_release: str, digest: str) -> dict[str, str]:
    return {
        LABEL_NAME: instance.name,
        LABEL_KERNEL: kernel_release,
        LABEL_VERSION: instance.software_version,
        LABEL_MODULES: " ".join(instance.module_names),
        LABEL_DIGEST: digest,
    }


def image_kernel(info: ImageInfo) -> str:
    """The kernel an image of kvc's is for: its kvc.kernel label."""
    return info.labels.get(LABEL_KERNEL, "")


# ---- modules in an image ------------------------------------------------------------------------------------


def _priority(path: str, directory: str) -> tuple[int, str]:
    relative = path[len(directory) :].lstrip("/")
    first = relative.split("/", 1)[0] if "/" in relative else ""
    return ({"updates": 0, "extra": 1}.get(first, 2), path)


def match_modules(paths: Sequence[str], kernel_release: str, names: Sequence[str]) -> dict[str, str]:
    """{module name: image path} for the wanted ``names`` ('-'/'_' alike) among ``paths`` under
    ``/lib/modules/KVER``. Several candidates: ``updates/`` wins, then ``extra/``, then the first path."""
    directory = f"/lib/modules/{kernel_release}"
    wanted = {normalize_name(name) for name in names}
    found: dict[str, str] = {}
    for path in sorted(paths, key=lambda p: _priority(p, directory)):
        if not path.startswith(directory + "/") or not is_module_filename(path):
            continue
        name = name_from_path(path)
        if name in wanted and name not in found:
            found[name] = path
    return found


# ---- pruning ------------------------------------------------------------------------------------------------


def _is_candidate(name: str) -> bool:
    return name.endswith(CANDIDATE_SUFFIX)


def _ours(instance: InstanceConfig, name: str) -> bool:
    return normalize_ref(name).split(":", 1)[0].startswith(f"{instance.name.lower()}-")


def prune_plan(
    images: Sequence[ImageInfo], instance: InstanceConfig, *, keep_tag: Optional[str] = None
) -> tuple[list[ImageInfo], list[ImageInfo]]:
    """(keep, remove) among the instance's images. Only images kvc built are considered (label
    name=NAME *and* a kvc.kernel label; KVC-library images are left alone). The image named
    ``keep_tag`` stays, and its kernel counts first; then the newest image (by creation time) of
    each of the newest ``keep_kernels`` kernels stays. Older images of a kept kernel (earlier
    versions), images of older kernels, stale candidates and dangling images go."""
    ours = [info for info in images if info.labels.get(LABEL_NAME) == instance.name and image_kernel(info)]
    keep: list[ImageInfo] = []
    remove: list[ImageInfo] = []
    kernels: list[str] = []
    current = [info for info in ours if keep_tag is not None and info.has_name(keep_tag)]
    for info in current:
        keep.append(info)
        if image_kernel(info) not in kernels:
            kernels.append(image_kernel(info))
    for info in sorted(ours, key=lambda i: (i.created_epoch, i.id), reverse=True):
        if info in current:
            continue
        tagged = [name for name in info.names if not _is_candidate(name)]
        kernel = image_kernel(info)
        if tagged and kernel not in kernels and len(kernels) < instance.keep_kernels:
            kernels.append(kernel)
            keep.append(info)
        else:
            remove.append(info)
    return keep, remove


def prune_images(runtime: ContainerRuntime, instance: InstanceConfig, *, keep_tag: Optional[str] = None) -> list[str]:
    """Remove what :func:`prune_plan` says goes; returns the names (or ids) removed. Only the
    instance's own tags are removed from an image (another tag keeps it alive), and an image in
    use by a container stays (the failure is ignored)."""
    _keep, remove = prune_plan(runtime.list_images(f"{LABEL_NAME}={instance.name}"), instance, keep_tag=keep_tag)
    removed: list[str] = []
    for info in remove:
        refs = [name for name in info.names if _ours(instance, name)] if info.names else [info.id]
        for ref in refs:
            try:
                runtime.remove(ref, missing_ok=True)
            except CommandError:
                continue
            removed.append(ref)
    return removed
