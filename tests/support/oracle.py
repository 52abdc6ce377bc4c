"""Run a real kmod tool and ours side by side on the same arguments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def run_kvc(tool: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "kvc", "kmod", tool, *args], capture_output=True, env=dict(env or os.environ)
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)
