"""``rmmod``: remove modules from the kernel, with kmod's checks and messages."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from kvc.kmod.kernel import REMOVE_FORCE, KernelError, kernel_from_env, read_module_state
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.module import name_from_path
from kvc.kmod.paths import HostPaths
from kvc.kmod.tools._cli import log_error, parse_options, run_tool, write_out

PROG = "rmmod"
VERSION_TEXT = "kvc kmod rmmod (kmod version 30 compatible)\n"
HELP = """Usage:
\t{prog} [options] modulename ...
Options:
\t-f, --force       forces a module unload and may crash your
\t                  machine. This requires Forced Module Removal
\t                  option in your kernel. DANGEROUS
\t-s, --syslog      print to syslog, not stderr
\t-v, --verbose     enables more messages
\t-V, --version     show version
\t-h, --help        show this help
"""


def _in_use_problem(paths: HostPaths, name: str) -> Optional[str]:
    """kmod's check_module_inuse: why ``name`` must not be removed, or None."""
    moddir = ModuleDirectory(paths.module_dir(paths.kernel_release()))
    if moddir.is_builtin(name):
        return f"Module {name} is builtin."
    state = read_module_state(paths.sys_module, name)
    if state is None:
        return f"Module {name} is not currently loaded"
    if state.holders:
        return f"Module {name} is in use by: {' '.join(state.holders)}"
    if state.refcnt is None or state.refcnt != 0:
        return f"Module {name} is in use"
    return None


def _run(argv: list[str]) -> int:
    opts, args = parse_options(PROG, argv, "fsvVh", ("force", "syslog", "verbose", "version", "help"))
    force = False
    for opt, _value in opts:
        if opt in ("-f", "--force"):
            force = True
        elif opt in ("-h", "--help"):
            write_out(HELP.format(prog=PROG))
            return 0
        elif opt in ("-V", "--version"):
            write_out(VERSION_TEXT)
            return 0
    if not args:
        log_error(PROG, "missing module name.")
        return 1
    paths = HostPaths.from_env()
    kernel = kernel_from_env(paths)
    failures = 0
    for arg in args:
        name = name_from_path(arg) if os.path.exists(arg) else arg.split(".", 1)[0].replace("-", "_")
        if not force:
            problem = _in_use_problem(paths, name)
            if problem is not None:
                log_error(PROG, problem)
                failures += 1
                continue
        try:
            kernel.remove(name, REMOVE_FORCE if force else 0)
        except KernelError as exc:
            reason = os.strerror(exc.errno)
            # libkmod logs the failure itself before rmmod does; both lines are kmod's.
            log_error(PROG, f"../libkmod/libkmod-module.c:856 kmod_module_remove_module() could not remove "
                            f"'{name}': {reason}")
            log_error(PROG, f"could not remove module {arg}: {reason}")
            failures += 1
    return 0 if failures == 0 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
