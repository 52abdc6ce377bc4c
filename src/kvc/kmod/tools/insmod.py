"""``insmod``: insert one module file into the kernel, as kmod 30's insmod does.

The arguments after the file name are joined with single spaces and passed to the kernel as
they are (kmod 30 quotes nothing: ``insmod m.ko 'p=a b'`` gives the kernel ``p=a b``). ``-f``
ignores symbol versions and the version magic; ``-p`` and ``-s`` are accepted and ignored.
Errors are kmod's: ``could not load module F: <strerror>`` when the file cannot be used, and
``could not insert module F: <reason>`` with kmod's reading of the kernel's errno (ENOEXEC
"Invalid module format", ENOENT "Unknown symbol in module", ESRCH "Module has wrong symbol
version", EINVAL "Invalid parameters", anything else its strerror). Exit status 0 or 1.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Optional, Sequence

from kvc.kmod.kernel.environment import kernel_from_env
from kvc.kmod.kernel.protocol import MODULE_INIT_IGNORE_MODVERSIONS, MODULE_INIT_IGNORE_VERMAGIC, KernelError
from kvc.kmod.names import path_to_modname
from kvc.kmod.tools._cli import log_error, run_tool, write_out
from kvc.kmod.tools.rmmod import getopt_sequence

PROG = "insmod"
VERSION_TEXT = "kvc kmod insmod (kmod version 30 compatible)\n+ZSTD +XZ +ZLIB +LIBCRYPTO -EXPERIMENTAL\n"
HELP = """Usage:
\t{prog} [options] filename [args]
Options:
\t-V, --version     show version
\t-h, --help        show this help
"""
SHORT_OPTIONS = "psfVh"
LONG_OPTIONS = {"version": "V", "help": "h"}
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
    flags = 0
    args: list[str] = []
    for opt in getopt_sequence(PROG, argv, SHORT_OPTIONS, LONG_OPTIONS, args):
        if opt == "f":
            flags |= MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC
        elif opt == "h":
            write_out(HELP.format(prog=PROG))
            return 0
        elif opt == "V":
            write_out(VERSION_TEXT)
            return 0
        elif opt == "?":
            return 1
    if not args:
        log_error(PROG, "missing filename.")
        return 1
    filename = args[0]
    if filename == "-":
        log_error(PROG, "this tool does not support loading from stdin!")
        return 1
    params = " ".join(args[1:])
    try:
        os.stat(filename)
    except OSError as exc:
        log_error(PROG, f"could not load module {filename}: {os.strerror(exc.errno or errno.ENOENT)}")
        return 1
    if path_to_modname(filename) is None:
        log_error(PROG, f"could not load module {filename}: {os.strerror(errno.ENOENT)}")
        return 1
    try:
        kernel_from_env().insert(filename, params, flags)
    except KernelError as exc:
        log_error(PROG, f"could not insert module {filename}: {module_strerror(exc.errno)}")
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
