"""Files replaced in one step: a temporary file in the same directory, fsynced, renamed over the
target, then (unless told otherwise) the directory fsynced. Readers see the old file or the new
one, never a partial one, even across a crash."""

from __future__ import annotations

import os
import tempfile
from typing import Union


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str, data: Union[str, bytes], mode: int = 0o644, *, sync_directory: bool = True) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8, undecodable bytes kept by surrogateescape)
    and exactly ``mode``. ``sync_directory=False`` leaves the rename's durability to the file
    system, for state that need not survive a crash (the fake kernel's files, caches)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    if sync_directory:
        fsync_path(directory)
