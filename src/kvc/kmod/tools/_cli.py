"""What the kmod tools share: GNU getopt_long parsing with glibc's messages, kmod's log lines,
and output written as bytes (module strings are arbitrary bytes, kept via surrogateescape)."""

from __future__ import annotations

import getopt
import sys
from typing import Callable, Optional, Sequence

ToolBody = Callable[[list[str]], int]

ENCODING = "utf-8"
ERRORS = "surrogateescape"


class UsageError(Exception):
    """A command-line error already reported on stderr; the tool exits with ``status``."""

    def __init__(self, status: int = 1) -> None:
        super().__init__(status)
        self.status = status


def parse_options(
    prog: str, argv: Sequence[str], shortopts: str, longopts: Sequence[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """getopt_long with argument permutation; errors are printed as glibc prints them.

    gnu_getopt copies the rest of the list at each argument, which is quadratic in modinfo's
    thousands of file names: what follows the last option (and the value it may take) is operands
    in order whatever the mode, so only the part up to there goes through it."""
    args = list(argv)
    last = max((index for index, arg in enumerate(args) if arg.startswith("-") and arg != "-"), default=-1)
    try:
        opts, operands = getopt.gnu_getopt(args[: last + 2], shortopts, list(longopts))
        return opts, operands + args[last + 2 :]
    except getopt.GetoptError as exc:
        write_err(f"{prog}: {_glibc_message(exc, argv)}\n")
        raise UsageError(1) from None


def _glibc_message(exc: getopt.GetoptError, argv: Sequence[str]) -> str:
    opt = exc.opt
    msg = exc.msg
    if len(opt) == 1:
        if "requires argument" in msg:
            return f"option requires an argument -- '{opt}'"
        return f"invalid option -- '{opt}'"
    if "requires argument" in msg:
        return f"option '--{opt}' requires an argument"
    if "must not have an argument" in msg:
        return f"option '--{opt}' doesn't allow an argument"
    if "not a unique prefix" in msg:
        return f"option '--{opt}' is ambiguous"
    return f"unrecognized option '--{opt}'"


def write_out(text: str) -> None:
    sys.stdout.buffer.write(text.encode(ENCODING, ERRORS))


def write_err(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.buffer.write(text.encode(ENCODING, ERRORS))
    sys.stderr.flush()


def log_error(prog: str, message: str) -> None:
    """kmod's ERR(): ``prog: ERROR: message``."""
    write_err(f"{prog}: ERROR: {message}\n")


def log_warning(prog: str, message: str) -> None:
    write_err(f"{prog}: WARNING: {message}\n")


def run_tool(body: ToolBody, argv: Optional[Sequence[str]]) -> int:
    """Run a tool body, turning usage errors into their exit status and flushing output."""
    try:
        status = body(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        status = exc.status
    except BrokenPipeError:
        status = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = 1
    return status
