"""The one place the framework starts external programs.

Commands are argv lists (never a shell). A failing command is logged once, with its full command
line, and raised as :class:`~kvc.errors.CommandError` carrying the last lines of its output.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from kvc.errors import CommandError, CommandTimeout

log = logging.getLogger("kvc.proc")

OUTPUT_TAIL_LINES = 20


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def tail(text: str, lines: int = OUTPUT_TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = True,
    input_text: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    timeout: Optional[float] = None,
    hint: str = "",
) -> Completed:
    """Run ``argv``. With ``capture`` the output is collected (and its tail reported on failure);
    without it the program shares our stdin/stdout/stderr (interactive wrappers, build logs)."""
    args = [str(arg) for arg in argv]
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            args,
            input=input_text,
            text=True,
            env=full_env,
            cwd=cwd,
            timeout=timeout,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            check=False,
        )
    except FileNotFoundError:
        log.error("command not found: %s", shlex.join(args))
        raise CommandError(args, 127, "", hint=hint or f"install {args[0]} or put it on PATH") from None
    except subprocess.TimeoutExpired as exc:
        log.error("command timed out after %ss: %s", timeout, shlex.join(args))
        output = exc.stdout if isinstance(exc.stdout, str) else ""
        raise CommandTimeout(args, -1, tail(output), hint=hint or "it did not finish in time") from None
    completed = Completed(tuple(args), proc.returncode, proc.stdout or "", proc.stderr or "")
    if check and proc.returncode != 0:
        log.error("command failed (status %d): %s", proc.returncode, shlex.join(args))
        raise CommandError(args, proc.returncode, tail(completed.stdout + completed.stderr), hint=hint)
    return completed
