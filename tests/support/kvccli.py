"""kvc's command line run as a separate process, as users and units run it."""

from __future__ import annotations

import os
import subprocess
import sys


def kvc(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m kvc ARGS`` with ``env`` over this process's environment; never raises on failure."""
    return subprocess.run(
        [sys.executable, "-m", "kvc", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
        check=False,
    )
