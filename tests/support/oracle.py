"""Run a real kmod tool and ours side by side on the same arguments."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes


def kmod_tool(tool: str) -> str:
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        candidate = os.path.join(directory, tool)
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(tool)
    if found is None:
        raise RuntimeError(f"kmod's {tool} is not installed (apt-get install kmod)")
    return found


def run_kmod(tool: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None) -> Result:
    # argv[0] is the bare name, as from PATH: glibc's getopt messages print it.
    proc = subprocess.run([tool, *args], executable=kmod_tool(tool), capture_output=True, env=dict(env or os.environ))
    return Result(proc.returncode, proc.stdout, proc.stderr)


@dataclass(frozen=True)
class BoundedResult:
    """A run cut short: ``returncode`` is None when the tool was still running at the deadline
    or past the output limit (and was killed); ``stderr`` is then what it had printed so far."""

    returncode: Optional[int]
    stdout: bytes
    stderr: bytes


def run_kmod_bounded(tool: str, args: Sequence[str], seconds: float, limit: int = 1 << 16) -> BoundedResult:
    """run_kmod for runs that may never end, or print without end: at most ``seconds`` and
    ``limit`` bytes of stderr (stdout goes to a file and is read when the tool exits)."""
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryFile() as stdout:
        proc = subprocess.Popen([tool, *args], executable=kmod_tool(tool), stdout=stdout, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        stderr = b""
        ended = False
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stderr, selectors.EVENT_READ)
            while len(stderr) < limit and time.monotonic() < deadline:
                if not selector.select(deadline - time.monotonic()):
                    continue
                chunk = os.read(proc.stderr.fileno(), limit - len(stderr))
                if not chunk:
                    ended = True
                    break
                stderr += chunk
        if not ended:
            proc.kill()
        returncode = proc.wait()
        proc.stderr.close()
        stdout.seek(0)
        return BoundedResult(returncode if ended else None, stdout.read(), stderr)


def run_kvc(tool: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "kvc", "kmod", tool, *args], capture_output=True, env=dict(env or os.environ)
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)
