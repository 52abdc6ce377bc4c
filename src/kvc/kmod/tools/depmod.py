"""``depmod``: generate modules.dep and the module indexes, exactly as Debian's kmod 30 does.

Beyond kmod's flags: ``--cache-dir=DIR`` moves the parse cache, ``--no-cache`` disables it
(``KVC_DEPMOD_CACHE`` does either from the environment, see :mod:`kvc.kmod.depmod`), and
``--jobs=N`` sets the number of parsing processes (with 1, nothing is forked: the cache write and
three of the indexes, otherwise built in children, are done in the one process).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional, Sequence

from kvc.kmod import depmod as engine
from kvc.kmod.tools._cli import parse_options, run_tool, write_err, write_out

PROG = "depmod"
VERSION_TEXT = "kmod version 30\n+ZSTD +XZ -ZLIB +LIBCRYPTO -EXPERIMENTAL\n"
HELP = """Usage:
\t{prog} -[aA] [options] [forced_version]

If no arguments (except options) are given, "depmod -a" is assumed

depmod will output a dependency list suitable for the modprobe utility.

Options:
\t-a, --all            Probe all modules
\t-A, --quick          Only does the work if there's a new module
\t-e, --errsyms        Report not supplied symbols
\t-n, --show           Write the dependency file on stdout only
\t-P, --symbol-prefix  Architecture symbol prefix
\t-C, --config=PATH    Read configuration from PATH
\t-v, --verbose        Enable verbose mode
\t-w, --warn           Warn on duplicates
\t-V, --version        show version
\t-h, --help           show this help

The following options are useful for people managing distributions:
\t-b, --basedir=DIR    Use an image of a module tree.
\t-F, --filesyms=FILE  Use the file instead of the
\t                     current kernel symbols.
\t-E, --symvers=FILE   Use Module.symvers file to check
\t                     symbol versions.
"""
SHORTOPTS = "aAb:C:E:F:euqrvnP:wmVh"
LONGOPTS = (
    "all",
    "quick",
    "basedir=",
    "config=",
    "symvers=",
    "filesyms=",
    "errsyms",
    "unresolved-error",
    "quiet",
    "root",
    "verbose",
    "show",
    "dry-run",
    "symbol-prefix=",
    "warn",
    "map",
    "version",
    "help",
    "cache-dir=",
    "no-cache",
    "jobs=",
)
DEPRECATED = {
    "-u": "u",
    "-q": "q",
    "-r": "r",
    "-m": "m",
    "--unresolved-error": "-unresolved-error",
    "--quiet": "-quiet",
    "--root": "-root",
    "--map": "-map",
}
# is_version_number: sscanf("%u.%u") succeeds.
_VERSION = re.compile(r"\s*[+-]?\d+\.\s*[+-]?\d+")


def _emit(level: int, message: str) -> None:
    if level == engine.STDOUT:
        write_out(message)
        sys.stdout.flush()
    elif level == engine.ABORT:
        write_err(f"{PROG}: {message}")
    else:
        write_err(f"{PROG}: {engine.LEVEL_NAMES[level]}: {message}")


def _run(argv: list[str]) -> int:
    opts, args = parse_options(PROG, argv, SHORTOPTS, LONGOPTS)
    log = engine.Log(_emit)
    scan_all = quick = show = print_unknown = warn_dups = False
    basedir = ""
    config_paths: list[str] = []
    symvers: Optional[str] = None
    system_map: Optional[str] = None
    prefix = ""
    cache_dir = engine.default_cache_dir()
    jobs = 0
    for opt, value in opts:
        if opt in ("-a", "--all"):
            scan_all = True
        elif opt in ("-A", "--quick"):
            quick = True
        elif opt in ("-b", "--basedir"):
            basedir = value if value.startswith("/") else f"{os.getcwd()}/{value}"
        elif opt in ("-C", "--config"):
            config_paths.append(value)
        elif opt in ("-E", "--symvers"):
            symvers = value
        elif opt in ("-F", "--filesyms"):
            system_map = value
        elif opt in ("-e", "--errsyms"):
            print_unknown = True
        elif opt in ("-v", "--verbose"):
            log.verbosity += 1
        elif opt in ("-n", "--show", "--dry-run"):
            show = True
        elif opt in ("-P", "--symbol-prefix"):
            if len(value) != 1:
                log(engine.FATAL, "-P only takes a single char\n")
                return 1
            prefix = value
        elif opt in ("-w", "--warn"):
            warn_dups = True
        elif opt in DEPRECATED:
            log(engine.WARNING, f"Ignored deprecated option -{DEPRECATED[opt]}\n")
        elif opt in ("-h", "--help"):
            write_out(HELP.format(prog=PROG))
            return 0
        elif opt in ("-V", "--version"):
            write_out(VERSION_TEXT)
            return 0
        elif opt == "--cache-dir":
            cache_dir = value
        elif opt == "--no-cache":
            cache_dir = None
        elif opt == "--jobs":
            if not (value.isascii() and value.isdigit()):
                log(engine.FATAL, f"--jobs needs a number, not '{value}'\n")
                return 1
            jobs = int(value)
    if args:
        if not _VERSION.match(args[0]):
            log(engine.ERROR, f"Bad version passed {args[0]}\n")
            return 1
        kernel_version = args.pop(0)
    else:
        kernel_version = os.uname().release
    module_paths = () if scan_all or not args else tuple(args)
    options = engine.DepmodOptions(
        kernel_version=kernel_version,
        basedir=basedir,
        config_paths=tuple(config_paths) if config_paths else None,
        module_paths=module_paths,
        symvers=symvers,
        system_map=system_map,
        print_unknown=print_unknown,
        warn_dups=warn_dups,
        symbol_prefix=prefix,
        cache_dir=cache_dir,
        jobs=jobs,
    )
    if quick and (show or engine.modules_dep_up_to_date(options.dirname, log)):
        return 0
    try:
        result = engine.run(options, log, show=show)
    except engine.DepmodError:
        return 1
    if show:
        write_out("".join(data.decode(engine.ENCODING, engine.ERRORS) for _name, data in result.files))
        return result.status
    changed = _touch_unchanged(options.dirname, result.files)
    if changed and not engine.write_outputs(options.dirname, changed, log):
        return 1
    return result.status


def _touch_unchanged(dirname: str, files: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The outputs that differ from the files already there. A file that holds exactly the bytes,
    as the only link to a regular file this user owns with the mode depmod would create, gets its
    times set to now instead (modules.dep newer than every module, as after a rewrite): an
    unchanged tree costs no writes and no fsyncs, which were most of a replayed run. After a killed
    run (its temporary files still there) everything is written."""
    try:
        leftovers = [entry for entry in os.listdir(dirname) if entry.startswith(".modules.") and ".kvc-" in entry]
    except OSError:
        leftovers = []
    if leftovers:
        return list(files)  # a killed writer's temporary files: write_outputs removes them
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o100644 & ~umask
    changed = []
    for name, data in files:
        path = f"{dirname}/{name}"
        try:
            info = os.lstat(path)
            same = (
                info.st_mode == mode
                and info.st_nlink == 1
                and info.st_uid == os.geteuid()
                and info.st_size == len(data)
            )
            if same:
                with open(path, "rb") as handle:
                    same = handle.read(len(data) + 1) == data
            if same:
                os.utime(path)
                continue
        except OSError:
            pass
        changed.append((name, data))
    return changed


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
