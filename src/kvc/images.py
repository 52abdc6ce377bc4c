"""An instance's images: their names, their labels, where their modules lie, and pruning.

Image naming follows KVC: ``NAME-VERSION:KVER`` with the label ``name=NAME``, so images of the
original framework and kvc's are found alike. Versions and kernel releases are mapped to what an
image reference can hold (:func:`repository_name`, :func:`kernel_tag`: ``0.0+git20231103`` gives
``NAME-0.0_git20231103``, ``1.2~rc1`` gives ``NAME-1.2-rc1``, ``6.12.9+bpo-amd64`` the tag
``6.12.9_bpo-amd64``); the labels ``kvc.version`` and ``kvc.kernel`` keep the exact strings.

Prebuilt images (``KVC_IMAGE``): the reference for a kernel is ``KVC_IMAGE`` with ``{kver}``
replaced by the kernel release when it contains ``{kver}``; else, when it already has a tag,
``-KVER`` appended to that tag (``reg/x:1.0`` -> ``reg/x:1.0-6.1.0-56-amd64``); else ``:KVER``
appended (``reg/x`` -> ``reg/x:6.1.0-56-amd64``); a digest reference (``@sha256:...``) is used as
is.

Architectures: a target is a kernel release and an architecture (:mod:`kvc.arch`). The label
``kvc.arch`` names the image's (the OCI config's platform says the same); the names of a target
whose release does not name its architecture and that is not amd64 get ``-ARCH`` after the kernel
part (:func:`kvc.arch.tag_suffix`: ``NAME-VERSION:6.8.0-45-generic-arm64``), locally and in a
registry; every other name is as it was.

Pruning removes kvc's own tags only (see :func:`prune_plan`): an untagged image is never removed
for carrying kvc's labels (podman gives ``--label`` to the build stages of a multi-stage build
too, and those images are the build cache), and an image someone else also tagged is only
untagged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from kvc.arch import Arch, default_arch, find_arch, tag_suffix
from kvc.config import InstanceConfig
from kvc.errors import CommandError, ConfigError, StateError
from kvc.kmod.module import is_module_filename
from kvc.kmod.names import modname_from_path as name_from_path
from kvc.kmod.names import modname_normalize as normalize_name
from kvc.runtime import ContainerRuntime, ImageInfo, normalize_ref

LABEL_NAME = "name"  # KVC's label: name=NAME
LABEL_KERNEL = "kvc.kernel"
LABEL_VERSION = "kvc.version"
LABEL_MODULES = "kvc.modules"
LABEL_DIGEST = "kvc.digest"
LABEL_ARCH = "kvc.arch"
CANDIDATE_SUFFIX = "-kvc-candidate"

_TAG_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_REPOSITORY_BAD = re.compile(r"[^a-z0-9_.-]")
_SEPARATORS = re.compile(r"[_.-]+")
_SEPARATORS_ALLOWED = re.compile(r"\.|_|__|-+")
_MAX_TAG = 128
# A whole name may have 255 characters; podman puts "localhost/" before a local one.
_MAX_REPOSITORY = 255 - len("localhost/")
_HASH_DIGITS = 8


# ---- names --------------------------------------------------------------------------------------------


def _common_characters(text: str) -> str:
    """``+`` -> ``_`` and ``~`` -> ``-``: Debian's and DKMS's version characters (``0.0+git20231103``,
    ``1.2~rc1``), mapped the same in tags and repositories."""
    return text.replace("+", "_").replace("~", "-")


def kernel_tag(kernel_release: str, suffix: str = "") -> str:
    """A valid tag for a kernel release (then ``suffix``): ``+`` -> ``_``, ``~`` -> ``-``, any other
    character but letters, digits, ``_ . -`` -> ``_``; a leading ``.`` or ``-`` (a tag begins with a
    letter, digit or ``_``) -> ``_``; cut to 128 characters, suffix included. Case is kept."""
    tag = _TAG_BAD.sub("_", _common_characters(kernel_release))
    if tag[:1] in (".", "-"):
        tag = "_" + tag[1:]
    return tag[: _MAX_TAG - len(suffix)] + suffix


def _separator_run(match: re.Match[str]) -> str:
    run = match.group(0)
    return run if _SEPARATORS_ALLOWED.fullmatch(run) else "-"


def repository_name(name: str, version: str) -> str:
    """``NAME-VERSION`` as a valid repository name (one path component of an image reference):
    lowercased; ``+`` -> ``_``, ``~`` -> ``-``, any other character but ``a-z 0-9 _ . -`` -> ``_``;
    a run of separators the reference grammar forbids (anything but one ``.``, one or two ``_``,
    or dashes, e.g. ``_.`` or ``___``) -> ``-``; separators at either end dropped. A result longer
    than 245 characters (255 for a whole name, less podman's ``localhost/``) is cut to 236 and
    ``-`` plus the first 8 hex digits of the sha256 of ``NAME-VERSION`` appended, so that long
    versions stay apart."""
    original = f"{name}-{version}"
    mapped = _REPOSITORY_BAD.sub("_", _common_characters(original.lower()))
    repository = _SEPARATORS.sub(_separator_run, mapped).strip("_.-")
    if len(repository) > _MAX_REPOSITORY:
        digest = hashlib.sha256(original.encode()).hexdigest()[:_HASH_DIGITS]
        repository = repository[: _MAX_REPOSITORY - _HASH_DIGITS - 1].rstrip("_.-") + "-" + digest
    return repository


def image_repository(instance: InstanceConfig) -> str:
    return repository_name(instance.name, instance.software_version)


def _suffix(kernel_release: str, arch: Optional[Arch]) -> str:
    return tag_suffix(kernel_release, arch or default_arch(kernel_release))


def image_tag(instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None) -> str:
    """KVC's image name for the instance and kernel: ``NAME-VERSION:KVER``, and the architecture's
    suffix where the release names none (``arch`` None: the release's, else the host's)."""
    return f"{image_repository(instance)}:{kernel_tag(kernel_release, _suffix(kernel_release, arch))}"


def candidate_tag(instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None) -> str:
    """Where a new build goes until it has been verified."""
    suffix = _suffix(kernel_release, arch) + CANDIDATE_SUFFIX
    return f"{image_repository(instance)}:{kernel_tag(kernel_release, suffix)}"


# ---- registry tags -------------------------------------------------------------------------------------------

_TAG_SIMPLE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_TAG_SIMPLE_UNSAFE = re.compile(r"__|_\+|\+_")
_TAG_PLAIN = re.compile(r"[A-Za-z0-9.-]")


def encode_tag(text: str) -> str:
    """``text`` as a tag, reversibly (:func:`decode_tag`). Kernel releases and versions as
    distributions write them keep their form with ``+`` written ``__`` (``6.1.0-57-amd64`` and
    ``5.14.0-427.13.1.el9_4.x86_64`` stay, ``6.12.9+bpo-amd64`` gives ``6.12.9__bpo-amd64``):
    a lone ``_`` stays ``_`` and a run of 2k underscores is k ``+``, so the two cannot be confused
    as long as no ``_`` touches another ``_`` or a ``+``. Anything else (such a ``_``, ``~``, any
    other character, a leading ``.`` or ``-``) gets the escaped form: ``_`` first (a simple form
    never starts with it), then every character but letters, digits, ``.`` and ``-`` as ``_HH``
    per UTF-8 byte (``1.2~rc1`` gives ``_1.2_7erc1``)."""
    if _TAG_SIMPLE.fullmatch(text) and not _TAG_SIMPLE_UNSAFE.search(text):
        return text.replace("+", "__")
    escaped = "".join(
        char if _TAG_PLAIN.fullmatch(char) else "".join(f"_{byte:02x}" for byte in char.encode()) for char in text
    )
    return "_" + escaped


def decode_tag(tag: str) -> str:
    """The text :func:`encode_tag` made ``tag`` from; ValueError when no text encodes to ``tag``."""
    if not tag.startswith("_"):
        text = tag.replace("__", "+")
    else:
        out = bytearray()
        index = 1
        while index < len(tag):
            if tag[index] == "_" and re.fullmatch(r"[0-9a-f]{2}", tag[index + 1 : index + 3]):
                out.append(int(tag[index + 1 : index + 3], 16))
                index += 3
            else:
                out += tag[index].encode()
                index += 1
        text = out.decode(errors="replace")
    if encode_tag(text) != tag:
        raise ValueError(f"{tag!r} is not a tag kvc encodes a kernel release or version as")
    return text


def registry_tags(instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None) -> tuple[str, str]:
    """(fixed, moving) registry tags of the instance's image for a kernel: ``VERSION-KERNEL`` and
    ``KERNEL``, each part :func:`encode_tag`-ed, then the architecture's suffix where the release
    names none (``-arm64``; ``arch`` None: the release's, else the host's). The moving tag is what a
    host or a node that knows only ``uname -r`` looks up; the fixed one names one version's build.
    ConfigError when the fixed tag would exceed the 128 characters a tag may have."""
    moving = encode_tag(kernel_release) + _suffix(kernel_release, arch)
    fixed = f"{encode_tag(instance.software_version)}-{moving}"
    if len(fixed) > _MAX_TAG:
        raise ConfigError(
            f"{instance.source}: the registry tag for version {instance.software_version!r} and kernel "
            f"{kernel_release} would have {len(fixed)} characters (at most {_MAX_TAG})",
            hint="shorten KMOD_SOFTWARE_VERSION",
        )
    return fixed, moving


def prebuilt_ref(image: str, kernel_release: str) -> str:
    """The reference to pull for a kernel from ``KVC_IMAGE`` (rules in the module docstring)."""
    if "{kver}" in image:
        return image.replace("{kver}", kernel_release)
    if "@" in image:
        return image
    if ":" in image.rsplit("/", 1)[-1]:
        return f"{image}-{kernel_tag(kernel_release)}"
    return f"{image}:{kernel_tag(kernel_release)}"


def built_image(
    runtime: ContainerRuntime, instance: InstanceConfig, kernel_release: str, arch: Optional[Arch] = None
) -> tuple[str, ImageInfo]:
    """(tag, image) of the instance's local image for the kernel (and ``arch``, see
    :func:`image_tag`); StateError when it is not built."""
    tag = image_tag(instance, kernel_release, arch)
    info = runtime.inspect(tag)
    if info is None:
        raise StateError(
            f"image {tag} does not exist: {instance.name} is not built for {kernel_release}",
            hint=f"run 'kvc build {instance.name} --kernel {kernel_release}' (or 'kvc pull') first",
        )
    return tag, info


# ---- labels ----------------------------------------------------------------------------------------------


def image_labels(
    instance: InstanceConfig, kernel_release: str, digest: str, arch: Optional[Arch] = None
) -> dict[str, str]:
    """kvc's labels; ``kvc.arch`` is ``arch``, else the release's or the host's architecture (left
    out on a host kvc does not build for)."""
    labels = {
        LABEL_NAME: instance.name,
        LABEL_KERNEL: kernel_release,
        LABEL_VERSION: instance.software_version,
        LABEL_MODULES: " ".join(instance.module_names),
        LABEL_DIGEST: digest,
    }
    target = arch or default_arch(kernel_release)
    if target is not None:
        labels[LABEL_ARCH] = target.value
    return labels


def labelled_arch(labels: Mapping[str, str]) -> Optional[Arch]:
    """The architecture the kvc.arch label names (None without one)."""
    return find_arch(labels.get(LABEL_ARCH, ""))


def image_arch(info: ImageInfo) -> Optional[Arch]:
    """The architecture an image is for: its kvc.arch label, else its OCI platform's (images made
    before the label, or by others); None when neither names one kvc knows."""
    return labelled_arch(info.labels) or find_arch(info.architecture)


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


def kvc_names(info: ImageInfo, instance: InstanceConfig) -> tuple[str, ...]:
    """The names of ``info`` that kvc gave it for ``instance``: ``NAME-VERSION:KVER`` or its
    candidate, KVER the image's ``kvc.kernel`` label and VERSION its ``kvc.version`` label (an
    earlier version's image) or the instance's version (a pulled image keeps the labels it was
    built with). Registry names and names other people gave the image are not kvc's."""
    kernel = image_kernel(info)
    if info.labels.get(LABEL_NAME) != instance.name or not kernel:
        return ()
    versions = {instance.software_version, info.labels.get(LABEL_VERSION, instance.software_version)}
    repositories = {repository_name(instance.name, version) for version in versions}
    suffix = _suffix(kernel, image_arch(info))
    tags = (kernel_tag(kernel, suffix), kernel_tag(kernel, suffix + CANDIDATE_SUFFIX))
    given = {f"{repository}:{tag}" for repository in repositories for tag in tags}
    return tuple(name for name in info.names if normalize_ref(name) in given)


@dataclass(frozen=True)
class PruneStep:
    """kvc's names to take off one image: the image goes with them unless ``untag_only`` (it has
    other names, which keep it)."""

    image: ImageInfo
    names: tuple[str, ...]
    untag_only: bool


def prune_plan(
    images: Sequence[ImageInfo], instance: InstanceConfig, *, keep_tag: Optional[str] = None
) -> tuple[list[ImageInfo], list[PruneStep]]:
    """(kept images, steps) among ``images``. Only images with a name kvc gave them
    (:func:`kvc_names`) count; untagged images and images with other names only are left alone.
    The image named ``keep_tag`` stays, and its kernel counts first; then the newest image (by
    creation time) of each of the newest ``keep_kernels`` kernels of each architecture stays (a
    build for arm64 never prunes the amd64 images). kvc's names come off older images of a kept
    kernel (earlier versions), images of older kernels and stale candidates; an image that has
    other names too is only untagged."""
    ours = [info for info in images if kvc_names(info, instance)]
    keep: list[ImageInfo] = []
    steps: list[PruneStep] = []
    kernels: dict[Optional[Arch], list[str]] = {}

    def target(info: ImageInfo) -> tuple[Optional[Arch], str]:
        kernel = image_kernel(info)
        return image_arch(info) or default_arch(kernel), kernel

    current = [info for info in ours if keep_tag is not None and info.has_name(keep_tag)]
    for info in current:
        keep.append(info)
        arch, kernel = target(info)
        if kernel not in kernels.setdefault(arch, []):
            kernels[arch].append(kernel)
    for info in sorted(ours, key=lambda i: (i.created_epoch, i.id), reverse=True):
        if info in current:
            continue
        names = kvc_names(info, instance)
        arch, kernel = target(info)
        kept = kernels.setdefault(arch, [])
        tagged = [name for name in names if not _is_candidate(name)]
        if tagged and kernel not in kept and len(kept) < instance.keep_kernels:
            kept.append(kernel)
            keep.append(info)
        else:
            steps.append(PruneStep(info, names, untag_only=len(names) < len(info.names)))
    return keep, steps


def prune_images(runtime: ContainerRuntime, instance: InstanceConfig, *, keep_tag: Optional[str] = None) -> list[str]:
    """Carry out :func:`prune_plan`; returns kvc's names taken off. A name that cannot be removed
    (the image is in use by a container) stays, and the failure is ignored."""
    _keep, steps = prune_plan(runtime.list_images(f"{LABEL_NAME}={instance.name}"), instance, keep_tag=keep_tag)
    removed: list[str] = []
    for step in steps:
        for name in step.names:
            try:
                if step.untag_only:
                    runtime.untag(step.image.id, name)
                else:
                    runtime.remove(name, missing_ok=True)
            except CommandError:
                continue
            removed.append(name)
    return removed


def remove_if_untagged(runtime: ContainerRuntime, image_id: str) -> bool:
    """Remove the image ``image_id`` if it has no names left (kvc moved its tag to a new build);
    whether it was removed. An image with a name, or in use by a container, stays."""
    info = runtime.inspect(image_id)
    if info is None or info.names:
        return False
    try:
        runtime.remove(image_id, missing_ok=True)
    except CommandError:
        return False
    return True
