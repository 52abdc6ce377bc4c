"""Per-instance locks (``flock`` under ``/run/kvc``). The kernel drops an flock when its holder dies,
so a crashed run never leaves a lock behind.

Two locks per instance, always taken in this order:

- ``NAME.lock`` serializes what changes the instance's state on the host: build, load, unload,
  delivery, install;
- ``NAME.images.lock`` guards its images: taken exclusively by the commands that retag, prune or
  replace them (with the first lock), and shared by ``kvc verify``, whose guest has the image
  mounted for the whole VM run. So a verification holds off a build, but not a boot-time load or
  unload, which never change an image.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from typing import Iterator

from kvc.errors import StateError


@contextmanager
def _flock(path: str, busy: str, *, shared: bool, timeout: float) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise StateError(
                        busy,
                        details=f"lock file: {path}",
                        hint="wait for the other run to finish",
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


@contextmanager
def instance_lock(lock_dir: str, name: str, *, timeout: float = 600.0, images: bool = True) -> Iterator[None]:
    """The instance's lock; with ``images`` (what may change its images) also its image lock, exclusively."""
    with _flock(
        os.path.join(lock_dir, f"{name}.lock"),
        f"instance {name} is locked by another kvc run",
        shared=False,
        timeout=timeout,
    ):
        if not images:
            yield
            return
        busy = f"the images of {name} are in use by another kvc run (a verification, or a build)"
        with _flock(image_lock_path(lock_dir, name), busy, shared=False, timeout=timeout):
            yield


@contextmanager
def images_in_use(lock_dir: str, name: str, *, timeout: float = 600.0) -> Iterator[None]:
    """The instance's image lock, shared: its images stay as they are while held."""
    busy = f"the images of {name} are being changed by another kvc run (a build, pull or prune)"
    with _flock(image_lock_path(lock_dir, name), busy, shared=True, timeout=timeout):
        yield


def image_lock_path(lock_dir: str, name: str) -> str:
    return os.path.join(lock_dir, f"{name}.images.lock")
