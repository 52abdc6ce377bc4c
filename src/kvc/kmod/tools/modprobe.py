"""``modprobe``: load or remove modules with their dependencies, as kmod 30's modprobe does.

Flags, messages and exit codes are kmod 30's (tools/modprobe.c, tools/log.c). The tool's own
messages are ``modprobe: LEVEL: text``; a FATAL one ends the run at once with status 1 (kmod's
log_printf exits on LOG_CRIT), ``-a`` turns them into WARNINGs, ``-q`` silences them (and the
run goes on). libkmod's messages read while the configuration is parsed use libkmod's default
logger (``libkmod: ERROR file:line function: text``, shown even with ``-q``); later ones use
modprobe's (``modprobe: ERROR: file:line function() text``). ``MODPROBE_OPTIONS`` is prepended
to the arguments, and ``-C``/``-s``/``-q``/``-v`` are appended to it for install and remove
commands. ``-n`` prints nothing unless ``-v`` is given (kmod 30). The module directory is
``-d DIR`` + ``/lib/modules/`` + ``-S KVER`` (or the running release), read under ``KVC_ROOT``.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Optional, Sequence

from kvc.kmod.config import ModprobeConfig, load_config
from kvc.kmod.errors import KmodError
from kvc.kmod.kernel.environment import kernel_from_env
from kvc.kmod.kernel.libkmod import KMOD_MODULE_BUILTIN, LOG_ERR, LOG_INFO, LibkmodLog, LibkmodView
from kvc.kmod.moddir import ALIAS_BIN, SYMBOLS_BIN, ModuleDirectory
from kvc.kmod.modprobe import Modprobe, ModuleObject
from kvc.kmod.module import ModuleFile
from kvc.kmod.paths import HostPaths
from kvc.kmod.tools._cli import ENCODING, ERRORS, run_tool, write_out

PROG = "modprobe"
VERSION_TEXT = "kmod version 30\n+ZSTD +XZ -ZLIB +LIBCRYPTO -EXPERIMENTAL\n"
LOG_EMERG = 0
LOG_CRIT = 2
LOG_WARNING = 4
_STDIO_BLOCK = 4096
_LIBKMOD_C = "../libkmod/libkmod.c"
_PRIORITY_NAMES = {2: "FATAL", 3: "ERROR", 4: "WARNING", 5: "NOTICE", 6: "INFO", 7: "DEBUG"}
SHORT_OPTIONS = "arw:RibfDcnC:d:S:sqvVh"
# (name, takes an argument, value) in kmod's order; getopt_long resolves abbreviations on it.
LONG_OPTIONS: tuple[tuple[str, bool, str], ...] = (
    ("all", False, "a"),
    ("remove", False, "r"),
    ("remove-dependencies", False, "5"),
    ("remove-holders", False, "5"),
    ("wait", True, "w"),
    ("resolve-alias", False, "R"),
    ("first-time", False, "3"),
    ("ignore-install", False, "i"),
    ("ignore-remove", False, "i"),
    ("use-blacklist", False, "b"),
    ("force", False, "f"),
    ("force-modversion", False, "2"),
    ("force-vermagic", False, "1"),
    ("show-depends", False, "D"),
    ("showconfig", False, "c"),
    ("show-config", False, "c"),
    ("show-modversions", False, "4"),
    ("dump-modversions", False, "4"),
    ("show-exports", False, "6"),
    ("dry-run", False, "n"),
    ("show", False, "n"),
    ("config", True, "C"),
    ("dirname", True, "d"),
    ("set-version", True, "S"),
    ("syslog", False, "s"),
    ("quiet", False, "q"),
    ("verbose", False, "v"),
    ("version", False, "V"),
    ("help", False, "h"),
)
HELP = """Usage:
\t{p} [options] [-i] [-b] modulename
\t{p} [options] -a [-i] [-b] modulename [modulename...]
\t{p} [options] -r [-i] modulename
\t{p} [options] -r -a [-i] modulename [modulename...]
\t{p} [options] -c
\t{p} [options] --dump-modversions filename
Management Options:
\t-a, --all                   Consider every non-argument to
\t                            be a module name to be inserted
\t                            or removed (-r)
\t-r, --remove                Remove modules instead of inserting
\t    --remove-dependencies   Deprecated: use --remove-holders
\t    --remove-holders        Also remove module holders (use together with -r)
\t-w, --wait <MSEC>           When removing a module, wait up to MSEC for
\t                            module's refcount to become 0 so it can be
\t                            removed (use together with -r)
\t    --first-time            Fail if module already inserted or removed
\t-i, --ignore-install        Ignore install commands
\t-i, --ignore-remove         Ignore remove commands
\t-b, --use-blacklist         Apply blacklist to resolved alias.
\t-f, --force                 Force module insertion or removal.
\t                            implies --force-modversions and
\t                            --force-vermagic
\t    --force-modversion      Ignore module's version
\t    --force-vermagic        Ignore module's version magic

Query Options:
\t-R, --resolve-alias         Only lookup and print alias and exit
\t-D, --show-depends          Only print module dependencies and exit
\t-c, --showconfig            Print out known configuration and exit
\t-c, --show-config           Same as --showconfig
\t    --show-modversions      Dump module symbol version and exit
\t    --dump-modversions      Same as --show-modversions
\t    --show-exports          Only print module exported symbol versions and exit

General Options:
\t-n, --dry-run               Do not execute operations, just print out
\t-n, --show                  Same as --dry-run
\t-C, --config=FILE           Use FILE instead of default search paths
\t-d, --dirname=DIR           Use DIR as filesystem root for /lib/modules
\t-S, --set-version=VERSION   Use VERSION instead of `uname -r`
\t-s, --syslog                print to syslog, not stderr
\t-q, --quiet                 disable messages
\t-v, --verbose               enables more messages
\t-V, --version               show version
\t-h, --help                  show this help
"""


class _Exit(Exception):
    """log_printf at LOG_CRIT: kmod's modprobe exits with status 1 right after the message."""


def _err_bytes(text: str) -> None:
    # C's stderr is unbuffered and does not flush stdout first: keep stdout's order with
    # commands' output as kmod has it.
    sys.stderr.buffer.write(text.encode(ENCODING, ERRORS))
    sys.stderr.flush()


class _Log:
    """tools/log.c: the tool's messages at ``priority`` or above, libkmod's too once set up."""

    def __init__(self) -> None:
        self.priority = LOG_WARNING
        self.syslog = False
        self.kmod_ready = False

    def _emit(self, priority: int, syslog_text: str, stderr_text: str) -> None:
        if self.syslog:
            import syslog

            syslog.syslog(priority, syslog_text)
        else:
            _err_bytes(stderr_text)

    def printf(self, priority: int, message: str) -> None:
        if priority > self.priority:
            return
        name = _PRIORITY_NAMES.get(priority, f"LOG-{priority:03d}")
        self._emit(priority, f"{name}: {message}", f"{PROG}: {name}: {message}")
        if priority <= LOG_CRIT:
            raise _Exit()

    def kmod(self, record: LibkmodLog) -> None:
        if not self.kmod_ready:
            # libkmod's default logger (before modprobe installs its own), priority LOG_ERR.
            if record.priority <= LOG_ERR:
                name = {3: "ERROR", 4: "WARNING"}.get(record.priority, "")
                _err_bytes(f"libkmod: {name} {record.file}:{record.line} {record.function}: {record.message}")
            return
        if record.priority > self.priority:
            return
        name = _PRIORITY_NAMES.get(record.priority, f"LOG-{record.priority:03d}")
        text = f"{name}: {record.file}:{record.line} {record.function}() {record.message}"
        self._emit(record.priority, text, f"{PROG}: {text}")


class _Getopt:
    """glibc getopt_long with argument permutation over SHORT_OPTIONS/LONG_OPTIONS."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.index = 0
        self.pending = ""
        self.operands: list[str] = []

    def next(self) -> Optional[tuple[str, str]]:
        """(option value, argument) or None at the end; ('?', '') after printing an error."""
        if self.pending:
            return self._short()
        while self.index < len(self.argv):
            arg = self.argv[self.index]
            self.index += 1
            if arg == "--":
                self.operands += self.argv[self.index :]
                self.index = len(self.argv)
                return None
            if arg.startswith("--"):
                return self._long(arg[2:])
            if arg.startswith("-") and arg != "-":
                self.pending = arg[1:]
                return self._short()
            self.operands.append(arg)
        return None

    def _short(self) -> tuple[str, str]:
        letter, self.pending = self.pending[0], self.pending[1:]
        at = SHORT_OPTIONS.find(letter)
        if letter == ":" or at < 0:
            _err_bytes(f"{PROG}: invalid option -- '{letter}'\n")
            return "?", ""
        if SHORT_OPTIONS[at + 1 : at + 2] != ":":
            return letter, ""
        if self.pending:
            value, self.pending = self.pending, ""
            return letter, value
        if self.index < len(self.argv):
            self.index += 1
            return letter, self.argv[self.index - 1]
        _err_bytes(f"{PROG}: option requires an argument -- '{letter}'\n")
        return "?", ""

    def _long(self, text: str) -> tuple[str, str]:
        name, has_value, value = text.partition("=")
        exact = [opt for opt in LONG_OPTIONS if opt[0] == name]
        matches = exact or [opt for opt in LONG_OPTIONS if opt[0].startswith(name)]
        if not matches:
            _err_bytes(f"{PROG}: unrecognized option '--{text}'\n")
            return "?", ""
        first = matches[0]
        if any(opt[1:] != first[1:] for opt in matches[1:]):
            choices = "".join(f" '--{opt[0]}'" for opt in matches)
            _err_bytes(f"{PROG}: option '--{name}' is ambiguous; possibilities:{choices}\n")
            return "?", ""
        long_name, takes_arg, letter = first
        if not takes_arg:
            if has_value:
                _err_bytes(f"{PROG}: option '--{long_name}' doesn't allow an argument\n")
                return "?", ""
            return letter, ""
        if has_value:
            return letter, value
        if self.index < len(self.argv):
            self.index += 1
            return letter, self.argv[self.index - 1]
        _err_bytes(f"{PROG}: option '--{long_name}' requires an argument\n")
        return "?", ""


def split_modprobe_options(env: str) -> list[str]:
    """prepend_options_from_env: MODPROBE_OPTIONS split on spaces; a word in quotes loses them,
    a quoted part inside a word loses its quote characters."""
    words: list[str] = []
    current = ""
    quote = ""
    started_quoted = False
    for char in env:
        if not quote:
            if char == " ":
                words.append(current)
                current = ""
                started_quoted = False
            elif char in "\"'":
                quote = char
                started_quoted = current == ""
            else:
                current += char
        elif char == quote:
            quote = ""
            if started_quoted:
                words.append(current)
                current = ""
                started_quoted = False
        else:
            current += char
    if current or quote:
        words.append(current)
    return words


def options_from_array(args: Sequence[str]) -> Optional[str]:
    """The module options after the name: joined by spaces, a value with a space (and not
    starting with a quote) put in double quotes. None without any."""
    parts = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and value[:1] not in ('"', "'") and " " in value:
            parts.append(f'{key}="{value}"')
        else:
            parts.append(arg)
    return " ".join(parts) if parts else None


class _Run:
    """One modprobe invocation's settings and its libkmod context."""

    def __init__(self) -> None:
        self.log = _Log()
        self.verbose = LOG_WARNING
        self.log_priority = LOG_CRIT
        self.do_show = self.dry_run = self.ignore_loaded = self.lookup_only = False
        self.first_time = self.ignore_commands = self.use_blacklist = self.force = False
        self.strip_modversion = self.strip_vermagic = self.remove_holders = False
        self.wait_msec = 0
        self.modprobe_options: Optional[str] = os.environ.get("MODPROBE_OPTIONS")
        self.engine: Optional[Modprobe] = None
        self.dirname = ""
        self.pending = bytearray()

    def note(self, message: str) -> None:
        """kmod's LOG(): FATAL, or WARNING with -a."""
        self.log.printf(self.log_priority, message)

    def error(self, message: str) -> None:
        self.log.printf(LOG_ERR, message)

    def append_env(self, value: str) -> None:
        self.modprobe_options = value if self.modprobe_options is None else f"{self.modprobe_options} {value}"

    def out(self, text: str) -> None:
        """printf to C's stdout: fully buffered in 4096-byte blocks unless it is a terminal, so
        that install and remove commands' output lands where it lands with kmod."""
        self.pending += text.encode(ENCODING, ERRORS)
        if sys.stdout.isatty():
            self.flush()
        while len(self.pending) >= _STDIO_BLOCK:
            sys.stdout.buffer.write(self.pending[:_STDIO_BLOCK])
            sys.stdout.buffer.flush()
            del self.pending[:_STDIO_BLOCK]

    def flush(self) -> None:
        if self.pending:
            sys.stdout.buffer.write(bytes(self.pending))
            self.pending.clear()
        sys.stdout.buffer.flush()

    def show(self, text: str) -> None:
        """kmod's SHOW(): printed with -D or -v, then flushed."""
        if self.do_show or self.verbose > LOG_WARNING:
            self.out(text)
            self.flush()


def _run(argv: list[str]) -> int:
    run = _Run()
    try:
        return _modprobe(run, argv)
    except _Exit:
        return 1
    except KmodError as exc:
        _err_bytes(f"{PROG}: ERROR: {exc.brief}\n")
        return 1
    finally:
        run.flush()


def _modprobe(run: _Run, argv: list[str]) -> int:
    env = os.environ.get("MODPROBE_OPTIONS")
    if env is not None:
        argv = [*split_modprobe_options(env), *argv]
    config_paths: list[str] = []
    root: Optional[str] = None
    kversion: Optional[str] = None
    use_all = do_remove = show_config = show_modversions = show_exports = False
    getopt = _Getopt(argv)
    while True:
        item = getopt.next()
        if item is None:
            break
        opt, value = item
        if opt == "a":
            run.log_priority = LOG_WARNING
            use_all = True
        elif opt == "r":
            do_remove = True
        elif opt == "5":
            run.remove_holders = True
        elif opt == "w":
            try:
                run.wait_msec = int(value, 0) if value else -1
            except ValueError:
                run.wait_msec = -1
            if run.wait_msec < 0:
                run.error(f"unexpected wait value '{value}'.\n")
                return 1
        elif opt == "3":
            run.first_time = True
        elif opt == "i":
            run.ignore_commands = True
        elif opt == "b":
            run.use_blacklist = True
        elif opt == "f":
            run.force = True
        elif opt == "2":
            run.strip_modversion = True
        elif opt == "1":
            run.strip_vermagic = True
        elif opt == "D":
            run.ignore_loaded = run.dry_run = run.do_show = True
        elif opt == "R":
            run.lookup_only = True
        elif opt == "c":
            show_config = True
        elif opt == "4":
            show_modversions = True
        elif opt == "6":
            show_exports = True
        elif opt == "n":
            run.dry_run = True
        elif opt == "C":
            config_paths.append(value)
            run.append_env("-C")
            run.append_env(value)
        elif opt == "d":
            root = value
        elif opt == "S":
            kversion = value
        elif opt == "s":
            run.append_env("-s")
            run.log.syslog = True
        elif opt == "q":
            run.append_env("-q")
            run.verbose = LOG_EMERG
        elif opt == "v":
            run.append_env("-v")
            run.verbose += 1
        elif opt == "V":
            write_out(VERSION_TEXT)
            return 0
        elif opt == "h":
            write_out(HELP.format(p=PROG))
            return 0
        else:
            return 1
    args = getopt.operands
    if run.log.syslog:
        import syslog

        syslog.openlog(PROG, syslog.LOG_CONS, syslog.LOG_DAEMON)
    if not show_config and not args:
        run.error("missing parameters. See -h.\n")
        return 1
    paths = HostPaths.from_env()
    if root is not None or kversion is not None:
        release = kversion if kversion is not None else paths.kernel_release()
        # snprintf("%s/lib/modules/%s") then libkmod's path_make_absolute_cwd.
        run.dirname = f"{root or ''}/lib/modules/{release}"
        if not run.dirname.startswith("/"):
            run.dirname = f"{os.getcwd()}/{run.dirname}"
        moddir_path = run.dirname if root else paths.module_dir(release)
    else:
        release = paths.kernel_release()
        run.dirname = f"/lib/modules/{release}"
        moddir_path = paths.module_dir(release)
    directory = ModuleDirectory(moddir_path)
    config = load_config(config_paths or None, module_dir=moddir_path, paths=paths)
    for record in config.logs:
        run.log.kmod(record)
    run.log.priority = run.verbose
    run.log.kmod_ready = True
    environ = dict(os.environ)
    if run.modprobe_options is not None:
        environ["MODPROBE_OPTIONS"] = run.modprobe_options
    run.engine = Modprobe(
        directory, config, view=LibkmodView(paths), kernel=kernel_from_env(paths), log=run.log.kmod, environ=environ
    )
    run.log.kmod(
        LibkmodLog(
            LOG_INFO,
            _LIBKMOD_C,
            367,
            "kmod_set_log_fn",
            f"custom logging function 0x{id(run.log) & 0xFFFFFFFFFFFF:x} registered\n",
        )
    )
    status = _dispatch(
        run,
        args,
        config,
        directory,
        show_config=show_config,
        show_modversions=show_modversions,
        show_exports=show_exports,
        do_remove=do_remove,
        use_all=use_all,
    )
    run.log.kmod(
        LibkmodLog(LOG_INFO, _LIBKMOD_C, 334, "kmod_unref", f"context 0x{id(run.engine) & 0xFFFFFFFFFFFF:x} released\n")
    )
    return status


def _dispatch(
    run: _Run,
    args: list[str],
    config: ModprobeConfig,
    directory: ModuleDirectory,
    *,
    show_config: bool,
    show_modversions: bool,
    show_exports: bool,
    do_remove: bool,
    use_all: bool,
) -> int:
    if show_config:
        return _show_config(run, config, directory)
    if show_modversions or show_exports:
        return _show_symbols(run, args[0], exports=show_exports)
    if do_remove:
        failed = False
        for arg in args:
            failed = _rmmod(run, arg) < 0 or failed
        return 1 if failed else 0
    if use_all:
        failed = False
        for arg in args:
            failed = _insmod(run, arg, None) < 0 or failed
        return 1 if failed else 0
    return 1 if _insmod(run, args[0], options_from_array(args[1:])) < 0 else 0


def _show_config(run: _Run, config: ModprobeConfig, directory: ModuleDirectory) -> int:
    run.out("".join(f"{line}\n" for line in config.show_lines()))
    run.out("\n# End of configuration files. Dumping indexes now:\n\n")
    run.flush()
    for name in (ALIAS_BIN, SYMBOLS_BIN):
        index = directory.index(name)
        if index is not None:
            write_out("".join(f"{line}\n" for line in index.dump("alias ")))
    return 0


def _show_symbols(run: _Run, filename: str, *, exports: bool) -> int:
    try:
        module = ModuleFile.open(filename)
        symbols = module.exported_symbols if exports else module.modversions
    except (OSError, KmodError):
        run.note(f"Module {filename} not found.\n")
        return 1
    run.out("".join(f"0x{symbol.crc:08x}\t{symbol.name}\n" for symbol in symbols))
    return 0


def _insmod(run: _Run, alias: str, extra_options: Optional[str]) -> int:
    engine = run.engine
    assert engine is not None
    # kmod 30 looks every argument up, paths too (loading from a path came in kmod 31).
    mods = engine.lookup(alias)
    if not mods:
        run.note(f"Module {alias} not found in directory {run.dirname}\n")
        return -errno.ENOENT
    err = 0
    for mod in mods:
        err = _insmod_insert(run, mod, extra_options)
    return err


def _print_action(run: _Run, mod: ModuleObject, install: bool, options: str) -> None:
    engine = run.engine
    assert engine is not None
    if install:
        run.out(f"install {engine.install_command(mod)} {options}\n")
    elif mod.path is None:
        if engine.initstate(mod) == KMOD_MODULE_BUILTIN:
            run.out(f"builtin {mod.name}\n")
    else:
        run.out(f"insmod {mod.path} {options}\n")


def _insmod_insert(run: _Run, mod: ModuleObject, extra_options: Optional[str]) -> int:
    engine = run.engine
    assert engine is not None
    if run.lookup_only:
        run.out(f"{mod.name}\n")
        return 0
    show = (lambda m, i, o: _print_action(run, m, i, o)) if run.do_show or run.verbose > LOG_WARNING else None
    err = engine.probe_insert(
        mod,
        extra_options=extra_options,
        force_vermagic=run.strip_vermagic or run.force,
        force_modversion=run.strip_modversion or run.force,
        ignore_commands=run.ignore_commands,
        ignore_loaded=run.ignore_loaded,
        dry_run=run.dry_run,
        fail_on_loaded=run.first_time,
        blacklist=run.use_blacklist,
        show=show,
    )
    if err >= 0:
        return 0
    if err == -errno.EEXIST:
        run.error(f"could not insert '{mod.name}': Module already in kernel\n")
    elif err == -errno.ENOENT:
        run.error(f"could not insert '{mod.name}': Unknown symbol in module, or unknown parameter (see dmesg)\n")
    else:
        run.error(f"could not insert '{mod.name}': {os.strerror(-err)}\n")
    return err


# -- removal -------------------------------------------------------------------------------------


def _rmmod(run: _Run, alias: str) -> int:
    engine = run.engine
    assert engine is not None
    mods = engine.lookup(alias)
    if mods is None:
        return -errno.EINVAL
    err = 0
    if not mods:
        run.note(f"Module {alias} not found.\n")
        err = -errno.ENOENT
    for mod in mods:
        err = _rmmod_do_module(run, mod, remove_holders=run.remove_holders, ignore_builtin=False)
        if err < 0:
            break
    return err


def _rmmod_do_modlist(run: _Run, mods: Sequence[ModuleObject], stop_on_errors: bool) -> int:
    for mod in reversed(mods):
        err = _rmmod_do_module(run, mod, remove_holders=False, ignore_builtin=True)
        if err < 0 and stop_on_errors:
            return err
    return 0


def _rmmod_do_module(run: _Run, mod: ModuleObject, *, remove_holders: bool, ignore_builtin: bool) -> int:
    engine = run.engine
    assert engine is not None
    pre: list[ModuleObject] = []
    post: list[ModuleObject] = []
    cmd: Optional[str] = None
    if not run.ignore_commands:
        pre, post = engine.softdeps(mod)
        cmd = engine.config.remove_command(mod.name)
    if cmd is None and not run.ignore_loaded:
        state = engine.initstate(mod)
        if state < 0:
            if run.first_time:
                run.note(f"Module {mod.name} is not in kernel.\n")
                return -errno.ENOENT
            return 0
        if state == KMOD_MODULE_BUILTIN:
            if ignore_builtin:
                return 0
            run.note(f"Module {mod.name} is builtin.\n")
            return -errno.ENOENT
    _rmmod_do_modlist(run, post, False)
    if remove_holders:
        err = _rmmod_do_modlist(run, engine.holders(mod), True)
        if err < 0:
            return err
    if cmd is None and not run.ignore_loaded and not run.wait_msec and engine.refcnt(mod) > 0:
        run.note(f"Module {mod.name} is in use.\n")
        return -errno.EBUSY
    if cmd is None:
        err = _rmmod_do_remove_module(run, mod)
    else:
        run.show(f"remove {cmd}\n")
        err = 0
        if not run.dry_run:
            err = engine.run_command(mod, cmd)
            if err:
                run.note(f"Error running remove command for {mod.name}\n")
    if err < 0:
        return err
    if cmd is None:
        for dep in engine.dependencies(mod):
            if engine.refcnt(dep) == 0:
                _rmmod_do_remove_module(run, dep)
    _rmmod_do_modlist(run, pre, False)
    return err


def _rmmod_do_remove_module(run: _Run, mod: ModuleObject) -> int:
    engine = run.engine
    assert engine is not None
    run.show(f"rmmod {mod.name}\n")
    if run.dry_run:
        return 0
    err = engine.remove_module(mod, run.force)
    if err == -errno.EEXIST:
        if not run.first_time:
            return 0
        run.note(f"Module {mod.name} is not in kernel.\n")
    return err


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
