"""``lsmod``: show the loaded modules, exactly as kmod's lsmod prints them."""

from __future__ import annotations

import errno
import os
import sys
from typing import Optional, Sequence

from kvc.kmod.paths import HostPaths
from kvc.kmod.tools._cli import run_tool, write_err, write_out

PROG = "lsmod"


def _read_long(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def _run(argv: list[str]) -> int:
    if argv:
        write_err(f"Usage: {PROG}\n")
        return 1
    paths = HostPaths.from_env()
    proc_modules = os.path.join(paths.proc, "modules")
    try:
        with open(proc_modules, encoding="utf-8", errors="surrogateescape") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        reason = os.strerror(exc.errno or errno.ENOENT)
        write_err("libkmod: ERROR ../libkmod/libkmod-module.c:1725 kmod_module_new_from_loaded: "
                  f"could not open /proc/modules: {reason}\n"
                  f"Error: could not get list of modules: {reason}\n")
        return 1
    out = ["Module                  Size  Used by\n"]
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        name = fields[0]
        base = os.path.join(paths.sys_module, name)
        size = _read_long(os.path.join(base, "coresize"))
        if size is None:
            size = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else -errno.ENOENT
        refcnt = _read_long(os.path.join(base, "refcnt"))
        if refcnt is None:
            refcnt = -errno.ENOENT
        row = f"{name:<19} {size:>8}  {refcnt}"
        try:
            holders = os.listdir(os.path.join(base, "holders"))
        except OSError:
            holders = []
        if holders:
            row += " " + ",".join(holders)
        out.append(row + "\n")
    write_out("".join(out))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
