"""kmod-compatible command-line tools over kvc.kmod: same flags, same output, same exit codes."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional, Sequence

TOOLS = ("lsmod", "modinfo", "insmod", "rmmod", "depmod", "modprobe")


def run(tool: str, argv: Sequence[str]) -> int:
    """Run one tool with its arguments (without the tool name); returns the exit status."""
    if tool not in TOOLS:
        sys.stderr.write(f"kvc kmod: unknown tool '{tool}'; choose one of: {', '.join(TOOLS)}\n")
        return 2
    module = importlib.import_module(f"kvc.kmod.tools.{tool}")
    entry: Callable[[Sequence[str]], int] = module.main
    return entry(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(f"usage: kvc kmod TOOL [ARG...]; TOOL is one of: {', '.join(TOOLS)}\n")
        return 2
    return run(args[0], args[1:])
