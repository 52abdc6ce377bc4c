"""``rmmod``: remove modules from the kernel, with kmod 30's checks, messages and exit codes.

Without ``-f`` each module is checked first (``check_module_inuse``): built-in (from
``modules.builtin.bin`` of the running release), not loaded, in use by other modules (their
names follow on stderr), in use, or on a kernel without module unloading. Then
``delete_module(name, O_NONBLOCK | (-f ? O_TRUNC : 0))``. ``-s`` sends kmod's own messages to
syslog (the holder names still go to stderr, as kmod's do); ``-v`` raises libkmod's log level.
Exit status: 0 when every module was removed, else 1.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Iterator, Optional, Sequence

from kvc.kmod.errors import KmodError
from kvc.kmod.kernel.environment import kernel_from_env
from kvc.kmod.kernel.libkmod import KMOD_MODULE_BUILTIN, LOG_ERR, LOG_INFO, LibkmodLog, LibkmodView
from kvc.kmod.kernel.protocol import REMOVE_FORCE, KernelError
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.names import modname_normalize, path_to_modname
from kvc.kmod.paths import HostPaths
from kvc.kmod.tools._cli import run_tool, write_err, write_out

PROG = "rmmod"
VERSION_TEXT = "kvc kmod rmmod (kmod version 30 compatible)\n+ZSTD +XZ +ZLIB +LIBCRYPTO -EXPERIMENTAL\n"
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
SHORT_OPTIONS = "fsvVwh"  # 'w' is accepted by getopt but handled by no case (kmod 30)
LONG_OPTIONS = {"force": "f", "syslog": "s", "verbose": "v", "version": "V", "help": "h"}
_PRIORITY_NAMES = {2: "FATAL", 3: "ERROR", 4: "WARNING", 5: "NOTICE", 6: "INFO", 7: "DEBUG"}


def getopt_sequence(
    prog: str, argv: Sequence[str], shortopts: str, longopts: dict[str, str], operands: list[str]
) -> Iterator[str]:
    """glibc's getopt_long for options without arguments, one option at a time: yields each
    option's short letter (or '?' after printing glibc's message), and fills ``operands`` with
    the non-options (argument permutation; everything after ``--``). A tool that stops at an
    option (``-h``) never sees the errors of later ones, as with glibc."""
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            operands.extend(argv[index:])
            return
        if arg.startswith("--"):
            text = arg[2:]
            name, has_value, _value = text.partition("=")
            matches = [long for long in longopts if long == name]
            matches = matches or [long for long in longopts if long.startswith(name)]
            if not matches:
                write_err(f"{prog}: unrecognized option '--{text}'\n")
                yield "?"
            elif len(matches) > 1:
                choices = "".join(f" '--{long}'" for long in matches)
                write_err(f"{prog}: option '--{text}' is ambiguous; possibilities:{choices}\n")
                yield "?"
            elif has_value:
                write_err(f"{prog}: option '--{matches[0]}' doesn't allow an argument\n")
                yield "?"
            else:
                yield longopts[matches[0]]
        elif arg.startswith("-") and arg != "-":
            for letter in arg[1:]:
                if letter not in shortopts or letter == ":":
                    write_err(f"{prog}: invalid option -- '{letter}'\n")
                    yield "?"
                else:
                    yield letter
        else:
            operands.append(arg)


class _Logger:
    """kmod's tools/log.c: ERR() for the tool's own messages, log_kmod() for libkmod's, to
    stderr or (``-s``) syslog; libkmod messages above ``priority`` are dropped."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.use_syslog = False
        self.priority = LOG_ERR

    def open(self, use_syslog: bool) -> None:
        self.use_syslog = use_syslog
        if use_syslog:
            import syslog

            syslog.openlog(self.prog, syslog.LOG_CONS, syslog.LOG_DAEMON)

    def close(self) -> None:
        if self.use_syslog:
            import syslog

            syslog.closelog()

    def _emit(self, priority: int, text: str, stderr_text: str) -> None:
        if self.use_syslog:
            import syslog

            syslog.syslog(priority, text)
        else:
            write_err(stderr_text)

    def error(self, message: str) -> None:
        self._emit(LOG_ERR, f"ERROR: {message}", f"{self.prog}: ERROR: {message}")

    def libkmod(self, log: LibkmodLog) -> None:
        if log.priority > self.priority:
            return
        name = _PRIORITY_NAMES.get(log.priority, f"LOG-{log.priority:03d}")
        text = f"{name}: {log.file}:{log.line} {log.function}() {log.message}"
        self._emit(log.priority, text, f"{self.prog}: {text}")


def _builtin(paths: HostPaths, name: str) -> bool:
    try:
        return ModuleDirectory(paths.module_dir(paths.kernel_release())).is_builtin(name)
    except (KmodError, OSError):
        return False


def check_module_inuse(paths: HostPaths, view: LibkmodView, logger: _Logger, name: str) -> int:
    """kmod 30's check_module_inuse(): 0 when the module may be removed, else -errno."""
    state = KMOD_MODULE_BUILTIN if _builtin(paths, name) else view.initstate(name)
    for log in view.take_logs():
        logger.libkmod(log)
    if state == KMOD_MODULE_BUILTIN:
        logger.error(f"Module {name} is builtin.\n")
        return -errno.ENOENT
    if state < 0:
        logger.error(f"Module {name} is not currently loaded\n")
        return -errno.ENOENT
    holders = view.holders(name)
    for log in view.take_logs():
        logger.libkmod(log)
    if holders:
        logger.error(f"Module {name} is in use by:")
        write_err("".join(f" {holder}" for holder in holders) + "\n")
        return -errno.EBUSY
    refcnt = view.refcnt(name)
    for log in view.take_logs():
        logger.libkmod(log)
    if refcnt > 0:
        logger.error(f"Module {name} is in use\n")
        return -errno.EBUSY
    if refcnt == -errno.ENOENT:
        logger.error("Module unloading is not supported\n")
    return refcnt


def _run(argv: list[str]) -> int:
    logger = _Logger(PROG)
    force = use_syslog = False
    verbose = LOG_ERR
    args: list[str] = []
    for opt in getopt_sequence(PROG, argv, SHORT_OPTIONS, LONG_OPTIONS, args):
        if opt == "f":
            force = True
        elif opt == "s":
            use_syslog = True
        elif opt == "v":
            verbose += 1
        elif opt == "h":
            write_out(HELP.format(prog=PROG))
            return 0
        elif opt == "V":
            write_out(VERSION_TEXT)
            return 0
        elif opt == "?":
            return 1
        else:
            logger.error(f"unexpected getopt_long() value '{opt}'.\n")
            return 1
    logger.open(use_syslog)
    try:
        if not args:
            logger.error("missing module name.\n")
            return 1
        return _remove_all(args, force, verbose, logger)
    finally:
        logger.close()


def _remove_all(args: list[str], force: bool, verbose: int, logger: _Logger) -> int:
    paths = HostPaths.from_env()
    view = LibkmodView(paths)
    kernel = kernel_from_env(paths)
    logger.priority = verbose
    context = f"0x{id(view) & 0xFFFFFFFFFFFF:x}"
    logger.libkmod(
        LibkmodLog(
            LOG_INFO,
            "../libkmod/libkmod.c",
            367,
            "kmod_set_log_fn",
            f"custom logging function 0x{id(logger) & 0xFFFFFFFFFFFF:x} registered\n",
        )
    )
    failures = 0
    for arg in args:
        if os.path.exists(arg):
            name = path_to_modname(arg)
            if name is None:
                logger.error(f"could not use module {arg}: {os.strerror(errno.ENOENT)}\n")
                break
        else:
            name = modname_normalize(arg)
        if not force and check_module_inuse(paths, view, logger, name) < 0:
            failures += 1
            continue
        try:
            kernel.remove(name, REMOVE_FORCE if force else 0)
        except KernelError as exc:
            reason = os.strerror(exc.errno)
            logger.libkmod(
                LibkmodLog(
                    LOG_ERR,
                    "../libkmod/libkmod-module.c",
                    856,
                    "kmod_module_remove_module",
                    f"could not remove '{name}': {reason}\n",
                )
            )
            logger.error(f"could not remove module {arg}: {reason}\n")
            failures += 1
    logger.libkmod(LibkmodLog(LOG_INFO, "../libkmod/libkmod.c", 334, "kmod_unref", f"context {context} released\n"))
    return 0 if failures == 0 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
