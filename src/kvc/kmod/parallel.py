"""Work split over forked processes, results marshalled back through pipes (depmod's parsing,
modinfo's records): marshal is several times faster than pickle on tuples of bytes and strings, and
a fork costs about a millisecond where importing multiprocessing costs tens."""

from __future__ import annotations

import marshal
import os
from typing import Callable, Generic, TypeVar, cast

# Fewer tasks than this are done in one process: forking would cost more than it saves.
PARALLEL_MIN = 256


def worker_count(jobs: int, tasks: int) -> int:
    """Processes to use: ``jobs``, else one per CPU (at most 8); one for small trees, where
    forking costs more than it saves."""
    if jobs <= 0:
        jobs = min(os.cpu_count() or 1, 8)
    return 1 if tasks < PARALLEL_MIN else jobs


_T = TypeVar("_T")


class Forked(Generic[_T]):
    """``work()`` run in a forked child (when ``fork``), its result marshalled back through a
    pipe by :meth:`result`; run in this process instead without ``fork`` or when the child
    fails. ``work`` must only read what the parent no longer changes."""

    def __init__(self, work: Callable[[], _T], fork: bool) -> None:
        self._work = work
        self._pid = 0
        self._read = -1
        if not fork:
            return
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            status = 1
            try:
                payload = marshal.dumps(work())  # type: ignore[arg-type]
                with os.fdopen(write_end, "wb") as out:
                    out.write(payload)
                status = 0
            finally:
                # Never return into the parent's code, atexit handlers or stdio buffers.
                os._exit(status)
        os.close(write_end)
        self._pid, self._read = pid, read_end

    def result(self) -> _T:
        if self._pid:
            with os.fdopen(self._read, "rb") as handle:
                payload = handle.read()
            _pid, status = os.waitpid(self._pid, 0)
            self._pid = 0
            if status == 0:
                try:
                    return cast(_T, marshal.loads(payload))
                except (EOFError, ValueError, TypeError):
                    pass
        return self._work()
