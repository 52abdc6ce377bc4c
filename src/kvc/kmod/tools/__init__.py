"""kmod-compatible command-line tools over kvc.kmod: same flags, same output, same exit codes."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Optional, Sequence

TOOLS = ("lsmod", "modinfo", "insmod", "rmmod", "depmod", "modprobe", "sign-file")


def _stdio_present() -> None:
    """The kernel starts ``/proc/sys/kernel/modprobe`` (``request_module()``) without standard
    input, output or error, and Python then has None for them: reads see end of file and writes
    go nowhere, as C's calls on a closed descriptor fail quietly."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))  # noqa: SIM115 (open for the process's life)


def run(tool: str, argv: Sequence[str]) -> int:
    """Run one tool with its arguments (without the tool name); returns the exit status."""
    _stdio_present()
    if tool not in TOOLS:
        sys.stderr.write(f"kvc kmod: unknown tool '{tool}'; choose one of: {', '.join(TOOLS)}\n")
        return 2
    module = importlib.import_module(f"kvc.kmod.tools.{tool.replace('-', '')}")
    entry: Callable[[Sequence[str]], int] = module.main
    return entry(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(f"usage: kvc kmod TOOL [ARG...]; TOOL is one of: {', '.join(TOOLS)}\n")
        return 2
    return run(args[0], args[1:])
