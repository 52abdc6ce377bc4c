"""What kvc last learned from the container runtime about an instance's images, so that the boot
path (``kvc load`` of an instance whose extraction is current) and ``kvc status`` start no container
runtime.

``/var/lib/kvc/NAME/images.json`` maps kernel releases to what the runtime reported for the
instance's tag of that kernel (id, names, labels), or to null when the tag named no image. A load
that extracted from the tag records it once the modules are loaded; ``kvc status`` records the
runtime's whole answer for the instance (every kernel it has images for, and the running one) and
marks the record complete, which lets the next status answer from it. Every kvc command that may
move, replace or remove one of the instance's images (build, sign, push, pull, import, reload,
kernel-added) takes the instance's image lock exclusively through :func:`images_locked`, which
drops the record first: after any such command, even one killed half-way, the next load or status
asks the runtime again. A tag moved by hand outside kvc (``podman tag``, ``podman rmi``) is not seen
while the record stands: ``kvc load --force`` and ``kvc status --refresh`` ask the runtime.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack, contextmanager, suppress
from typing import Any, Callable, Iterator, Mapping, Optional

from kvc.atomic import write_json
from kvc.errors import BusyError
from kvc.layout import Layout
from kvc.lock import instance_lock
from kvc.runtime import ImageInfo

RECORD = "images.json"
SCHEMA = 1


def record_path(layout: Layout, name: str) -> str:
    return os.path.join(layout.instance_state(name), RECORD)


def _info(entry: object) -> ImageInfo:
    if not isinstance(entry, dict):
        raise ValueError("not an image")
    image_id, names, labels, created = entry["id"], entry["names"], entry["labels"], entry.get("created", "")
    if not isinstance(image_id, str) or not isinstance(names, list) or not isinstance(labels, dict):
        raise ValueError("not an image")
    return ImageInfo(image_id, tuple(str(n) for n in names), {str(k): str(v) for k, v in labels.items()}, str(created))


def _entry(info: Optional[ImageInfo]) -> Optional[dict[str, Any]]:
    if info is None:
        return None
    return {"id": info.id, "names": list(info.names), "labels": dict(info.labels), "created": info.created}


def _read(layout: Layout, name: str) -> tuple[dict[str, Optional[ImageInfo]], bool]:
    """(images by kernel, complete); empty when there is no readable record."""
    try:
        with open(record_path(layout, name), encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("images"), dict):
            return {}, False
        images = {str(k): None if v is None else _info(v) for k, v in data["images"].items()}
        return images, data.get("complete") is True
    except (OSError, ValueError, KeyError, TypeError):
        return {}, False


def _write(layout: Layout, name: str, images: Mapping[str, Optional[ImageInfo]], complete: bool) -> None:
    entries = {kernel: _entry(info) for kernel, info in sorted(images.items())}
    write_json(record_path(layout, name), {"schema": SCHEMA, "complete": complete, "images": entries})


def recorded_image(layout: Layout, name: str, kernel_release: str) -> Optional[ImageInfo]:
    """What the tag of the kernel named when kvc last asked, or None (no image, or no record)."""
    images, _complete = _read(layout, name)
    return images.get(kernel_release)


def recorded_images(layout: Layout, name: str) -> Optional[dict[str, Optional[ImageInfo]]]:
    """The runtime's whole answer for the instance as :func:`remember_images` recorded it (kernels
    without a tagged image map to None), or None when there is no complete record."""
    images, complete = _read(layout, name)
    return images if complete else None


def remember_image(layout: Layout, name: str, kernel_release: str, info: ImageInfo) -> None:
    """Record what the runtime just reported for the kernel's tag (the caller holds the instance
    lock); nothing is written when the record already says so."""
    images, complete = _read(layout, name)
    if kernel_release in images and _entry(images[kernel_release]) == _entry(info):
        return
    images[kernel_release] = info
    _write(layout, name, images, complete)


def remember_images(
    layout: Layout, name: str, ask: Callable[[], Mapping[str, Optional[ImageInfo]]]
) -> Mapping[str, Optional[ImageInfo]]:
    """``ask()``: the runtime's whole answer for the instance, recorded as complete when the
    instance's lock could be taken at once and held while asking (no kvc run changed the images
    meanwhile); with the lock busy, or the record not writable, it is only returned."""
    with ExitStack() as held:
        try:
            held.enter_context(instance_lock(layout.lock_dir, name, timeout=0, images=False))
        except (BusyError, OSError):
            return ask()
        images = ask()
        with suppress(OSError):
            if os.path.isdir(layout.instance_state(name)):
                _write(layout, name, images, True)
        return images


def forget_images(layout: Layout, name: str) -> None:
    """Drop the instance's record: its images are about to change."""
    with suppress(FileNotFoundError):
        os.unlink(record_path(layout, name))


@contextmanager
def images_locked(layout: Layout, name: str) -> Iterator[None]:
    """The instance's lock and its image lock, exclusively, for a command that may change its
    images: the record is dropped as soon as the locks are held."""
    with instance_lock(layout.lock_dir, name):
        forget_images(layout, name)
        yield
