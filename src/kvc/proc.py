"""The one place the framework starts external programs.

Commands are argv lists (never a shell). Each command is logged as it starts (``+ COMMAND``,
shell-quoted, at INFO on the ``kvc.proc`` logger: what ``kvc -v`` shows). A failing command is
logged once, with its full command line (:func:`log_failure`), and raised as
:class:`~kvc.errors.CommandError` carrying the last lines of its output.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import threading
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


def verbose() -> bool:
    """Whether commands are being logged (``kvc -v``)."""
    return log.isEnabledFor(logging.INFO)


def log_failure(argv: Sequence[str], returncode: int) -> None:
    """The one log line for a failed command (its output goes into the error raised for it)."""
    log.error("command failed (status %d): %s", returncode, shlex.join(argv))


def _run_echoing(
    args: list[str], env: Optional[Mapping[str, str]], cwd: Optional[str], timeout: Optional[float]
) -> tuple[int, str]:
    """Run with stdout and stderr merged into one pipe that is copied to our stderr line by line
    as it arrives and collected; (status, output). Raises TimeoutExpired after killing the child."""
    import subprocess  # here, as in run(): the boot path runs no command

    lines: list[str] = []
    with subprocess.Popen(
        args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as child:
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            child.kill()

        timer = threading.Timer(timeout, expire) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            assert child.stdout is not None
            for line in child.stdout:
                sys.stderr.write(line)
                sys.stderr.flush()
                lines.append(line)
            returncode = child.wait()
        finally:
            if timer is not None:
                timer.cancel()
    if expired.is_set():
        raise subprocess.TimeoutExpired(args, timeout or 0.0, output="".join(lines))
    return returncode, "".join(lines)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    capture: bool = True,
    echo: bool = False,
    input_text: Optional[str] = None,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str] = None,
    timeout: Optional[float] = None,
    hint: str = "",
) -> Completed:
    """Run ``argv``. With ``capture`` the output is collected (and its tail reported on failure);
    without it the program shares our stdin/stdout/stderr (interactive wrappers). With ``echo``
    (and ``capture``) stdout and stderr are merged, shown on our stderr as they arrive and collected
    in ``stdout`` (long builds: visible live, still there for the failure tail); no ``input_text``."""
    import subprocess  # here: the boot path's load and status run no command, and it costs them 1.5 ms

    args = [str(arg) for arg in argv]
    if echo and (input_text is not None or not capture):
        raise ValueError("echo needs capture and takes no input")
    full_env = None if env is None else {**os.environ, **env}
    log.info("+ %s", shlex.join(args))
    try:
        if echo:
            returncode, stdout = _run_echoing(args, full_env, cwd, timeout)
            completed = Completed(tuple(args), returncode, stdout, "")
        else:
            done = subprocess.run(
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
            completed = Completed(tuple(args), done.returncode, done.stdout or "", done.stderr or "")
    except FileNotFoundError:
        log.error("command not found: %s", shlex.join(args))
        raise CommandError(args, 127, "", hint=hint or f"install {args[0]} or put it on PATH") from None
    except subprocess.TimeoutExpired as exc:
        log.error("command timed out after %ss: %s", timeout, shlex.join(args))
        # Echoed output is on the screen already.
        output = exc.stdout if isinstance(exc.stdout, str) and not echo else ""
        raise CommandTimeout(args, -1, tail(output), hint=hint or "it did not finish in time") from None
    if check and completed.returncode != 0:
        log_failure(args, completed.returncode)
        raise CommandError(args, completed.returncode, tail(completed.stdout + completed.stderr), hint=hint)
    return completed


def run_bytes(argv: Sequence[str], data: bytes, *, timeout: Optional[float] = None, hint: str = "") -> bytes:
    """Run ``argv`` with ``data`` on its stdin and return its stdout as bytes (an external signer:
    binary in, binary out). Only the argv is logged, never ``data`` or the output; on failure the
    error carries the tail of stderr alone."""
    import subprocess  # here, as in run()

    args = [str(arg) for arg in argv]
    log.info("+ %s", shlex.join(args))
    try:
        done = subprocess.run(args, input=data, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError:
        log.error("command not found: %s", shlex.join(args))
        raise CommandError(args, 127, "", hint=hint or f"install {args[0]} or put it on PATH") from None
    except subprocess.TimeoutExpired:
        log.error("command timed out after %ss: %s", timeout, shlex.join(args))
        raise CommandTimeout(args, -1, "", hint=hint or "it did not finish in time") from None
    if done.returncode != 0:
        log_failure(args, done.returncode)
        raise CommandError(args, done.returncode, tail(done.stderr.decode("utf-8", "replace")), hint=hint)
    return done.stdout
