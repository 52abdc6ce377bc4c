"""Per-instance locks (``flock`` under ``/run/kvc``). The kernel drops an flock when its holder dies,
so a crashed run never leaves a lock behind.

Two locks per instance, always taken in this order:

- ``NAME.lock`` serializes what changes the instance's state on the host: build, load, unload,
  delivery, install;
- ``NAME.images.lock`` guards its images: taken exclusively by the commands that retag, prune or
  replace them (with the first lock), and shared by ``kvc verify``, whose guest has the image
  mounted for the whole VM run. So a verification holds off a build, but not a boot-time load or
  unload, which never change an image.

A command that cannot take a lock waits for it, ``KVC_LOCK_TIMEOUT`` seconds (600 unless set;
0 does not wait), then stops with :class:`BusyError` (exit 11) before changing what the lock
guards. Readers (``kvc status``) take no lock: every file kvc writes is replaced whole.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from typing import Iterator

from kvc.errors import BusyError, ConfigError

TIMEOUT_ENV = "KVC_LOCK_TIMEOUT"
DEFAULT_TIMEOUT = 600.0


def lock_timeout() -> float:
    """How long a command waits for a lock: ``KVC_LOCK_TIMEOUT`` seconds, or 600."""
    value = os.environ.get(TIMEOUT_ENV, "")
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value) if value.isascii() else -1.0
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(
            f"{TIMEOUT_ENV}={value!r} is not a number of seconds",
            hint=f"set {TIMEOUT_ENV} to how long kvc waits for another run, e.g. 600, or unset it",
        )
    return seconds


@contextmanager
def _flock(path: str, busy: str, *, shared: bool, deadline: float) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise BusyError(
                        busy,
                        details=f"lock file: {path}",
                        hint=f"run it again when the other run is done ({TIMEOUT_ENV} sets how long kvc waits)",
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _deadline(timeout: float | None) -> float:
    return time.monotonic() + (lock_timeout() if timeout is None else timeout)


@contextmanager
def instance_lock(lock_dir: str, name: str, *, timeout: float | None = None, images: bool = True) -> Iterator[None]:
    """The instance's lock; with ``images`` (what may change its images) also its image lock,
    exclusively. ``timeout`` (``KVC_LOCK_TIMEOUT`` unless given) bounds the wait for both."""
    deadline = _deadline(timeout)
    busy = f"instance {name} is locked by another kvc run"
    with _flock(os.path.join(lock_dir, f"{name}.lock"), busy, shared=False, deadline=deadline):
        if not images:
            yield
            return
        busy = f"the images of {name} are in use by another kvc run (a verification, or a build)"
        with _flock(image_lock_path(lock_dir, name), busy, shared=False, deadline=deadline):
            yield


@contextmanager
def images_in_use(lock_dir: str, name: str, *, timeout: float | None = None) -> Iterator[None]:
    """The instance's image lock, shared: its images stay as they are while held."""
    busy = f"the images of {name} are being changed by another kvc run (a build, pull or prune)"
    with _flock(image_lock_path(lock_dir, name), busy, shared=True, deadline=_deadline(timeout)):
        yield


def image_lock_path(lock_dir: str, name: str) -> str:
    return os.path.join(lock_dir, f"{name}.images.lock")
