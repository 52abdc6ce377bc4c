"""kvc's command line: a thin layer over kvc.kmod and the framework."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """usage: kvc COMMAND [ARG...]

commands:
  kmod TOOL [ARG...]   kmod-compatible tools: lsmod, modinfo, insmod, rmmod
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "kmod":
        from kvc.kmod import tools

        return tools.main(rest)
    sys.stderr.write(f"kvc: unknown command '{command}'; run 'kvc --help' for the list\n")
    return 2


def legacy_main(argv: Optional[Sequence[str]] = None) -> int:
    sys.stderr.write("kmods-via-containers: not available yet in this version\n")
    return 1
