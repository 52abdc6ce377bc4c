"""A per-instance lock (``flock`` on ``/run/kvc/NAME.lock``) that serializes build, load and unload.

The kernel drops an flock when its holder dies, so a crashed run never leaves the lock behind.
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
def instance_lock(lock_dir: str, name: str, *, timeout: float = 600.0) -> Iterator[None]:
    os.makedirs(lock_dir, exist_ok=True)
    path = os.path.join(lock_dir, f"{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise StateError(
                        f"instance {name} is locked by another kvc run",
                        details=f"lock file: {path}",
                        hint="wait for the other run to finish",
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
