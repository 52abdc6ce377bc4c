"""``lsmod``: show the loaded modules, exactly as kmod 30's lsmod prints them.

kmod 30's lsmod takes no options at all (any argument prints ``Usage: lsmod``). For each
``/proc/modules`` line it prints ``%-19s %8ld  %d`` (name, size, refcnt) and the holders after
a space, comma-separated. Size, refcount and holders come from libkmod's readers
(:class:`~kvc.kmod.kernel.libkmod.LibkmodView`), whose errors are logged by libkmod's default logger
(``libkmod: ERROR file:line function: message``) and show up as negative numbers.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from kvc.kmod.kernel.libkmod import LibkmodLog, LibkmodView
from kvc.kmod.paths import HostPaths
from kvc.kmod.tools._cli import run_tool, write_err, write_out

PROG = "lsmod"
HEADER = "Module                  Size  Used by\n"


def format_default_log(log: LibkmodLog) -> str:
    """libkmod's default logger (log_filep), used by tools that set none."""
    return f"libkmod: ERROR {log.file}:{log.line} {log.function}: {log.message}"


def _pad(text: str, width: int) -> str:
    """printf's %-Ns: pads to N bytes, not characters."""
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


def _run(argv: list[str]) -> int:
    if argv:
        write_err(f"Usage: {PROG}\n")
        return 1
    view = LibkmodView(HostPaths.from_env())
    try:
        names = view.loaded_names()
    except OSError as exc:
        for log in view.take_logs():
            write_err(format_default_log(log))
        write_err(f"Error: could not get list of modules: {exc.strerror}\n")
        return 1
    out = [HEADER]
    for name in names:
        refcnt = view.refcnt(name)
        size = view.size(name)
        holders = view.holders(name)
        for log in view.take_logs():
            write_err(format_default_log(log))
        row = f"{_pad(name, 19)} {size:>8}  {refcnt}"
        if holders:
            row += " " + ",".join(holders)
        out.append(row + "\n")
        if len(out) > 256:
            write_out("".join(out))
            out = []
    write_out("".join(out))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
