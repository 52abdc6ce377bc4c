"""``insmod``: insert one module file into the kernel, as kmod's insmod does."""

from __future__ import annotations

import errno
import os
import sys
from typing import Optional, Sequence

from kvc.kmod.errors import ModuleFormatError
from kvc.kmod.kernel import MODULE_INIT_IGNORE_MODVERSIONS, MODULE_INIT_IGNORE_VERMAGIC, KernelError, kernel_from_env
from kvc.kmod.tools._cli import log_error, parse_options, run_tool, write_out

PROG = "insmod"
VERSION_TEXT = "kvc kmod insmod (kmod version 30 compatible)\n+ZSTD +XZ +ZLIB +LIBCRYPTO -EXPERIMENTAL\n"
HELP = """Usage:
\t{prog} [options] filename [args]
Options:
\t-V, --version     show version
\t-h, --help        show this help
"""
# kmod's mod_strerror: the kernel's errno read as what it means for a module load.
MODULE_ERRORS = {
    errno.ENOEXEC: "Invalid module format",
    errno.ENOENT: "Unknown symbol in module",
    errno.ESRCH: "Module has wrong symbol version",
    errno.EINVAL: "Invalid parameters",
}


def module_strerror(err: int) -> str:
    return MODULE_ERRORS.get(err, os.strerror(err))


def _run(argv: list[str]) -> int:
    opts, args = parse_options(PROG, argv, "psfVh", ("version", "help"))
    flags = 0
    for opt, _value in opts:
        if opt == "-f":
            flags |= MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC
        elif opt in ("-h", "--help"):
            write_out(HELP.format(prog=PROG))
            return 0
        elif opt in ("-V", "--version"):
            write_out(VERSION_TEXT)
            return 0
    if not args:
        log_error(PROG, "missing filename.")
        return 1
    filename = args[0]
    if filename == "-":
        log_error(PROG, "this tool does not support loading from stdin!")
        return 1
    params = " ".join(args[1:])
    if not os.path.exists(filename):
        log_error(PROG, f"could not load module {filename}: {os.strerror(errno.ENOENT)}")
        return 1
    try:
        kernel_from_env().insert(filename, params, flags)
    except KernelError as exc:
        log_error(PROG, f"could not insert module {filename}: {module_strerror(exc.errno)}")
        return 1
    except ModuleFormatError as exc:
        log_error(PROG, f"could not insert module {filename}: {module_strerror(errno.ENOEXEC)} ({exc.problem})")
        return 1
    except OSError as exc:
        log_error(PROG, f"could not load module {filename}: {os.strerror(exc.errno or errno.EIO)}")
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
