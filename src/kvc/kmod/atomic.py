"""Files replaced in one step: a temporary file in the same directory, fsynced, renamed over the
target, then (unless told otherwise) the directory fsynced. Readers see the old file or the new
one, never a partial one, even across a crash.

A temporary file is named ``.BASENAME.kvc-PID-RANDOM``: a writer killed before its rename leaves
it behind, and the next writer of the same file removes it once no process of that id is alive
(:func:`remove_stale`); nothing else is ever removed."""

from __future__ import annotations

import errno
import os
import re
from typing import Union


def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_prefix(path: str) -> str:
    """The name prefix of this process's temporary files for ``path`` (in its directory)."""
    return f".{os.path.basename(path)}.kvc-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:  # EPERM: it exists, as another user's
        return exc.errno == errno.EPERM
    return True


def remove_stale(path: str) -> list[str]:
    """Remove the temporary files that writers of ``path`` killed before their rename left beside
    it (only regular files named as :func:`temporary_prefix` names them, of processes no longer
    alive); the paths removed."""
    directory = os.path.dirname(path) or "."
    pattern = re.compile(re.escape(f".{os.path.basename(path)}.kvc-") + r"([0-9]+)-[A-Za-z0-9_]+")
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        if entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:  # gone meanwhile, or a read-only directory: best effort
                continue
            removed.append(entry.path)
    return removed


def _create_temporary(directory: str, prefix: str) -> tuple[int, str]:
    """A new file ``prefix`` + random hex digits in ``directory``, open for writing with mode 0600,
    as tempfile.mkstemp makes it: tempfile's imports (shutil, random, bz2, lzma) were most of a
    short-lived writer's exit under emulation (kvc verify's guest agent writing its result)."""
    while True:
        tmp = os.path.join(directory, prefix + os.urandom(6).hex())
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue


def write_file(
    path: str, data: Union[str, bytes], mode: int = 0o644, *, sync_directory: bool = True, volatile: bool = False
) -> None:
    """Replace ``path`` with ``data`` (text as UTF-8, undecodable bytes kept by surrogateescape)
    and exactly ``mode``. ``sync_directory=False`` leaves the rename's durability to the file
    system, for state that need not survive a crash intact (caches), and skips
    looking for stale temporary files. ``volatile=True`` syncs nothing at all, for state a reboot
    discards anyway (the fake kernel's /proc and /sys): the rename still keeps a killed writer's
    half-written file out of sight."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    sync_directory = sync_directory and not volatile
    if sync_directory:
        remove_stale(path)
    tmp = ""
    try:
        fd, tmp = _create_temporary(directory, temporary_prefix(path))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if not volatile:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            # Named after the file being written (not its temporary, nor none: a failed write()).
            raise OSError(exc.errno, exc.strerror, path) from None
        raise
    if sync_directory:
        fsync_path(directory)
