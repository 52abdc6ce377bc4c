"""Air gap: instance images in one OCI archive (``kvc export``) and back (``kvc import``).

The archive is a tar of an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/*``):
one manifest per instance and kernel, named as the local image, ``NAME-VERSION:KVER`` (OCI tools
refuse the registry tags' ``__`` in a ref name), in ``org.opencontainers.image.ref.name``, each
image labelled with what it holds as a push labels it (:func:`kvc.distribute.labelled_image`). Any
OCI tool reads it (``skopeo copy oci-archive:FILE:NAME-VERSION:KVER ...``). The tar is written
beside the output file and renamed into place, so a failed export leaves no partial archive.

Import unpacks only the layout's own files (no links, no paths outside it), checks that every blob's
sha256 is its name and that every manifest's config and layers are present with their sizes,
then takes each image in as a pull would: the instance must be installed with the image's version,
the image's labels must name its kernel exactly, its id must be its config's digest, and the build
verification (modules under ``/lib/modules/KVER`` with vermagic KVER) runs before the local tag
``NAME-VERSION:KVER`` moves.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from kvc.build import ACTION_PULL, BuildPlan, execute_build
from kvc.config import InstanceConfig
from kvc.distribute import labelled_image
from kvc.errors import StateError
from kvc.imagerecord import images_locked
from kvc.images import LABEL_DIGEST, LABEL_KERNEL, LABEL_NAME, LABEL_VERSION, image_labels, image_tag, labelled_arch
from kvc.kmod.digest import file_sha256
from kvc.layout import Layout
from kvc.runtime import ContainerRuntime

REF_NAME = "org.opencontainers.image.ref.name"
_BLOB = re.compile(r"blobs/sha256/[0-9a-f]{64}")
_LAYOUT_FILES = ("oci-layout", "index.json")
_MAX_JSON = 4 << 20


@dataclass(frozen=True)
class ArchivedImage:
    """One image of an archive: its ref name, manifest digest, image id (config digest) and labels."""

    ref_name: str
    manifest_digest: str
    image_id: str
    labels: dict[str, str]

    @property
    def summary(self) -> str:
        labels = self.labels
        return (
            f"{self.ref_name}: {labels.get(LABEL_NAME, '?')} {labels.get(LABEL_VERSION, '?')} for kernel "
            f"{labels.get(LABEL_KERNEL, '?')}, manifest {self.manifest_digest}, image {self.image_id[:12]}"
        )


def _invalid(path: str, what: str) -> StateError:
    return StateError(
        f"{path}: not a kvc archive: {what}",
        hint="give a file written by 'kvc export' (an OCI archive), whole and unchanged",
    )


def _read_json(path: str, archive: str) -> Any:
    try:
        if os.path.getsize(path) > _MAX_JSON:
            raise _invalid(archive, f"{os.path.basename(path)} is larger than {_MAX_JSON} bytes")
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise _invalid(archive, f"{os.path.relpath(path, os.path.dirname(path))} is missing") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise _invalid(archive, f"{os.path.basename(path)} is not JSON ({exc})") from None


def _blob_path(layout_dir: str, digest: str) -> str:
    algorithm, _sep, hexdigest = digest.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise ValueError(digest)
    return os.path.join(layout_dir, "blobs", "sha256", hexdigest)


def read_layout(layout_dir: str, archive: str, *, check_blobs: bool = True) -> list[ArchivedImage]:
    """The images of an unpacked layout, after checking it: every manifest's config and layers are
    there with the sizes it gives, and (``check_blobs``) every blob hashes to its name."""
    blobs = os.path.join(layout_dir, "blobs", "sha256")
    for name in sorted(os.listdir(blobs)) if check_blobs and os.path.isdir(blobs) else []:
        digest = file_sha256(os.path.join(blobs, name)).hex()
        if digest != name:
            raise _invalid(archive, f"blob sha256:{name} has the digest sha256:{digest} (damaged)")
    index = _read_json(os.path.join(layout_dir, "index.json"), archive)
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise _invalid(archive, "index.json lists no images")
    images = []
    for entry in manifests:
        try:
            ref_name = str(entry["annotations"][REF_NAME])
            manifest_digest = str(entry["digest"])
            manifest = _read_json(_blob_path(layout_dir, manifest_digest), archive)
            descriptors = [manifest["config"], *manifest["layers"]]
            for descriptor in descriptors:
                path = _blob_path(layout_dir, str(descriptor["digest"]))
                if not os.path.isfile(path) or os.path.getsize(path) != int(descriptor["size"]):
                    raise _invalid(archive, f"{ref_name}: blob {descriptor['digest']} is missing or truncated")
            config = _read_json(_blob_path(layout_dir, str(manifest["config"]["digest"])), archive)
            labels = (config.get("config") or {}).get("Labels") or {}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            if isinstance(exc, StateError):
                raise
            raise _invalid(archive, f"an index or manifest entry lacks {exc}") from None
        image_id = str(manifest["config"]["digest"]).split(":", 1)[1]
        images.append(ArchivedImage(ref_name, manifest_digest, image_id, {str(k): str(v) for k, v in labels.items()}))
    return images


# ---- export -------------------------------------------------------------------------------------------------


def _tar_layout(layout_dir: str, output: str) -> None:
    """``layout_dir`` as a tar at ``output``, written beside it and renamed into place."""
    directory = os.path.dirname(os.path.abspath(output))
    handle, partial = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", dir=directory)
    try:
        with os.fdopen(handle, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for relative in _layout_members(layout_dir):
                info = tar.gettarinfo(os.path.join(layout_dir, relative), arcname=relative)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                info.mode = 0o755 if info.isdir() else 0o644
                if info.isdir():
                    tar.addfile(info)
                else:
                    with open(os.path.join(layout_dir, relative), "rb") as member:
                        tar.addfile(info, member)
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, output)
    except BaseException:
        os.unlink(partial)
        raise


def _layout_members(layout_dir: str) -> Iterator[str]:
    yield from _LAYOUT_FILES
    yield "blobs"
    yield "blobs/sha256"
    for name in sorted(os.listdir(os.path.join(layout_dir, "blobs", "sha256"))):
        yield f"blobs/sha256/{name}"


def export_images(
    runtime: ContainerRuntime,
    layout: Layout,
    items: Sequence[tuple[InstanceConfig, str]],
    output: str,
    say: Callable[[str], None],
) -> list[ArchivedImage]:
    """Write the images of ``items`` (instance, kernel release) into the OCI archive ``output``."""
    with tempfile.TemporaryDirectory(prefix="kvc-export-") as scratch:
        layout_dir = os.path.join(scratch, "layout")
        for instance, kernel_release in items:
            publish_tag = labelled_image(runtime, layout, instance, kernel_release)
            try:
                ref_name = image_tag(instance, kernel_release)
                runtime.push(publish_tag, f"oci:{layout_dir}:{ref_name}")
            finally:
                runtime.remove(publish_tag, missing_ok=True)
            say(f"exported {image_tag(instance, kernel_release)} as {ref_name}")
        # podman has just written every blob under its digest: hashing them all again proves nothing.
        images = read_layout(layout_dir, output, check_blobs=False)
        _tar_layout(layout_dir, output)
    return images


# ---- import -------------------------------------------------------------------------------------------------


def _unpack(archive: str, destination: str) -> None:
    """The layout's own files out of ``archive`` (nothing else: no links, devices or other paths)."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in tar:
                name = member.name.lstrip("./") if member.name.startswith("./") else member.name
                if member.isdir() and name.rstrip("/") in ("blobs", "blobs/sha256", ""):
                    continue
                if not member.isfile() or not (name in _LAYOUT_FILES or _BLOB.fullmatch(name)):
                    raise _invalid(archive, f"unexpected member {member.name!r}")
                target = os.path.join(destination, *name.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise _invalid(archive, f"cannot read {member.name!r}")
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
    except tarfile.TarError as exc:
        raise _invalid(archive, f"not a readable tar ({exc})") from None


@contextlib.contextmanager
def _import_scratch(state_dir: str) -> Iterator[str]:
    """A fresh directory for the unpacked layout, removed afterwards. Beside kvc's state, not in
    /tmp (often a small tmpfs): images are hundreds of MB. Its name is only lowercase letters,
    digits and "-" (no leading "."; not tempfile's random "_"): podman names an image pulled from the
    layout after its path, which must then be a valid image name."""
    path = os.path.join(state_dir, f"kvc-import-{secrets.token_hex(8)}")
    os.mkdir(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def import_archive(
    runtime: ContainerRuntime,
    layout: Layout,
    archive: str,
    load_instance: Callable[[str], InstanceConfig],
    say: Callable[[str], None],
) -> list[ArchivedImage]:
    """Take every image of ``archive`` in as ``NAME-VERSION:KVER`` (see the module docstring)."""
    if not os.path.isfile(archive):
        raise StateError(f"{archive}: no such file", hint="give the path of a file written by 'kvc export'")
    if not tarfile.is_tarfile(archive):
        raise _invalid(archive, "not a tar file")
    os.makedirs(layout.state_dir, exist_ok=True)
    with _import_scratch(layout.state_dir) as scratch:
        layout_dir = os.path.join(scratch, "layout")
        _unpack(archive, layout_dir)
        images = read_layout(layout_dir, archive)
        plans = []
        for image in images:
            name, kernel = image.labels.get(LABEL_NAME, ""), image.labels.get(LABEL_KERNEL, "")
            if not name or not kernel:
                raise _invalid(archive, f"{image.ref_name} has no {LABEL_NAME} and {LABEL_KERNEL} labels")
            instance = load_instance(name)
            if image.labels.get(LABEL_VERSION) != instance.software_version:
                raise StateError(
                    f"{archive}: {image.ref_name} is {name} {image.labels.get(LABEL_VERSION)}, but "
                    f"{instance.source} has version {instance.software_version}",
                    hint="install the instance's matching bundle first, or export the installed version",
                )
            plans.append(
                BuildPlan(
                    instance,
                    kernel,
                    image_tag(instance, kernel),
                    image_labels(instance, kernel, image.labels.get(LABEL_DIGEST, ""), labelled_arch(image.labels)),
                    ACTION_PULL,
                    f"imported from {archive}",
                    source=f"oci:{layout_dir}:{image.ref_name}",
                    expected_id=image.image_id,
                    expected_labels={LABEL_KERNEL: kernel, LABEL_NAME: name},
                )
            )
        for image, plan in zip(images, plans):
            with images_locked(layout, plan.instance.name):
                execute_build(plan, runtime)
                _drop_layout_names(runtime, image.image_id, layout_dir)
            say(f"imported {plan.tag}: {image.summary}")
    return images


def _drop_layout_names(runtime: ContainerRuntime, image_id: str, layout_dir: str) -> None:
    """The name podman gives an image pulled from an OCI layout (``localhost/<layout path>``) is
    kvc's doing, not the user's: take it off."""
    info = runtime.inspect(image_id)
    for name in info.names if info is not None else ():
        if name.split(":", 1)[0] in (f"localhost{layout_dir}", layout_dir.lstrip("/")):
            runtime.untag(image_id, name)
