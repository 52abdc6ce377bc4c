"""``modinfo``: show information about kernel modules, exactly as kmod's modinfo prints it."""

from __future__ import annotations

import os
import stat
import sys
from functools import partial
from typing import NamedTuple, Optional, Sequence

from kvc.kmod.errors import KmodError, ModuleFormatError
from kvc.kmod.module import ModinfoEntry, ModuleFile, is_module_filename
from kvc.kmod.parallel import Forked, worker_count
from kvc.kmod.paths import HostPaths
from kvc.kmod.tools._cli import ENCODING, ERRORS, log_error, parse_options, run_tool, write_err, write_out

PROG = "modinfo"
VERSION_TEXT = "kvc kmod modinfo (kmod version 30 compatible)\n+ZSTD +XZ +ZLIB +LIBCRYPTO -EXPERIMENTAL\n"
HELP = """Usage:
\t{prog} [options] <modulename|filename> [args]
Options:
\t-a, --author                Print only 'author'
\t-d, --description           Print only 'description'
\t-l, --license               Print only 'license'
\t-p, --parameters            Print only 'parm'
\t-n, --filename              Print only 'filename'
\t-0, --null                  Use \\0 instead of \\n
\t-m, --modname               Handle argument as module name instead of alias or filename
\t-F, --field=FIELD           Print only provided FIELD
\t-k, --set-version=VERSION   Use VERSION instead of `uname -r`
\t-b, --basedir=DIR           Use DIR as filesystem root for /lib/modules
\t-V, --version               Show version
\t-h, --help                  Show this help
"""
LONGOPTS = (
    "author",
    "description",
    "license",
    "parameters",
    "filename",
    "null",
    "modname",
    "field=",
    "set-version=",
    "basedir=",
    "version",
    "help",
)
FIELD_SHORTCUTS = {
    "-a": "author",
    "--author": "author",
    "-d": "description",
    "--description": "description",
    "-l": "license",
    "--license": "license",
    "-p": "parm",
    "--parameters": "parm",
    "-n": "filename",
    "--filename": "filename",
}
HEX_LINE_BYTES = 20


class Options(NamedTuple):
    field: Optional[str]
    separator: str
    by_name: bool
    module_dir: Optional[str]


def hex_bytes(data: bytes) -> str:
    """Bytes as kmod shows sig_key and signature: ``XX:XX:…`` with a line break every 20 bytes."""
    text = data.hex(":").upper()
    step = HEX_LINE_BYTES * 3
    return ":\n\t\t".join([text[i : i + step - 1] for i in range(0, len(text), step)])


def signature_entries(module: ModuleFile) -> list[ModinfoEntry]:
    sig = module.signature
    if sig is None:
        return []
    return [
        ModinfoEntry("sig_id", sig.id_type),
        ModinfoEntry("signer", sig.signer),
        ModinfoEntry("sig_key", hex_bytes(sig.key_id)),
        ModinfoEntry("sig_hashalgo", sig.hash_algo),
        ModinfoEntry("signature", hex_bytes(sig.signature)),
    ]


def _param_text(name: str, desc: Optional[str], kind: Optional[str], *, field_only: bool) -> str:
    """One parameter as modinfo prints it; a type without a description reads ``name: (type)``
    under ``-F parm`` and ``name:type`` in the full listing."""
    if desc is None:
        return f"{name}: ({kind})" if field_only else f"{name}:{kind}"
    return f"{name}:{desc} ({kind})" if kind is not None else f"{name}:{desc}"


class _Labels(dict[str, str]):
    """What modinfo prints before a value, per key, made on first use."""

    def __init__(self, separator: str) -> None:
        super().__init__()
        self.separator = separator

    def __missing__(self, key: str) -> str:
        # kmod pads with printf("%-*s", 15 - len(key)): a negative width still pads.
        label = f"{key}=" if self.separator == "\0" else f"{key}:{' ' * abs(15 - len(key))}"
        self[key] = label
        return label


_LABELS = _Labels("\n")
_NUL_LABELS = _Labels("\0")
_PARAM_KEYS = frozenset(("parm", "parmtype"))


class Printer:
    """Formats modinfo records into one output buffer, as modinfo_do does, and writes it to
    stdout before each error line and at the end."""

    def __init__(self, options: Options) -> None:
        self.field = options.field
        self.sep = options.separator
        self.out: list[str] = []

    def flush(self) -> None:
        if self.out:
            write_out("".join(self.out))
            self.out.clear()

    def error(self, message: str) -> None:
        self.flush()
        log_error(PROG, message)

    def record(self, name: str, filename: Optional[str], entries: Sequence[ModinfoEntry]) -> None:
        field, sep, out = self.field, self.sep, self.out
        if filename is None:
            if field is None:
                out.append(f"{'name:':<16}{name}{sep}")
            elif field == "name":
                out.append(f"{name}{sep}")
            filename = "(builtin)"
        if field == "filename":
            out.append(f"{filename}{sep}")
            return
        if field is None:
            out.append(f"{'filename:':<16}{filename}{sep}")
        if field == "parm":
            out.extend(f"{_param_text(*param, field_only=True)}{sep}" for param in self._params(entries))
            return
        if field is not None:
            out.extend(f"{entry.value}{sep}" for entry in entries if entry.key == field)
            return
        labels = _NUL_LABELS if sep == "\0" else _LABELS
        out.extend([f"{labels[key]}{value}{sep}" for key, value in entries if key not in _PARAM_KEYS])
        out.extend(f"{'parm:':<16}{_param_text(*param, field_only=False)}{sep}" for param in self._params(entries))

    def _params(self, entries: Sequence[ModinfoEntry]) -> list[tuple[str, Optional[str], Optional[str]]]:
        """parm/parmtype merged per name, newest name first (kmod keeps a prepend list)."""
        found: dict[str, list[Optional[str]]] = {}
        for entry in entries:
            if entry.key not in ("parm", "parmtype"):
                continue
            pname, colon, rest = entry.value.partition(":")
            if not colon:
                self.error(f"Found invalid \"{entry.key}={entry.value}\": missing ':'")
                continue
            slot = found.setdefault(pname, [None, None])
            slot[0 if entry.key == "parm" else 1] = rest
        return [(pname, desc, kind) for pname, (desc, kind) in reversed(list(found.items()))]


# Where captured output goes when replayed.
STDOUT, STDERR = 1, 2
Captured = list[tuple[int, bytes]]


class CapturingPrinter(Printer):
    """A Printer that keeps what it would write, in order, for a worker process to send back."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.events: Captured = []

    def flush(self) -> None:
        if self.out:
            self.events.append((STDOUT, "".join(self.out).encode(ENCODING, ERRORS)))
            self.out.clear()

    def error(self, message: str) -> None:
        self.flush()
        self.events.append((STDERR, f"{PROG}: ERROR: {message}\n".encode(ENCODING, ERRORS)))

    def take(self) -> Captured:
        self.flush()
        events, self.events = self.events, []
        return events


def _is_module_file(arg: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(arg).st_mode) and is_module_filename(arg)
    except OSError:
        return False


def _module_file_record(printer: Printer, module: ModuleFile) -> bool:
    field = printer.field
    if field == "filename":
        printer.record(module.name, module.path, ())
        return True
    try:
        entries = list(module.modinfo)
        if field is None or field.startswith("sig") or field == "signer":
            entries.extend(signature_entries(module))
    except ModuleFormatError as exc:
        if field is None:
            printer.record(module.name, module.path, ())
        printer.error(f"could not get modinfo from '{module.name}': {os.strerror(exc.errno)} ({exc.problem})")
        return False
    printer.record(module.name, module.path, entries)
    return True


def _absolute(path: str) -> str:
    """The path as libkmod keeps a module opened by path (path_make_absolute_cwd): the working
    directory (``$PWD`` when it names it, as get_current_dir_name(3) does), "/" and the path as
    given, not normalized."""
    if path.startswith("/"):
        return path
    cwd = os.getcwd()
    pwd = os.environ.get("PWD", "")
    try:
        if pwd.startswith("/") and os.path.samestat(os.stat(pwd), os.stat(".")):
            cwd = pwd
    except OSError:
        pass
    return f"{cwd.rstrip('/')}/{path}"


def _path_record(printer: Printer, path: str) -> bool:
    try:
        module = ModuleFile.open(_absolute(path))
    except ModuleFormatError as exc:
        if printer.field in (None, "filename"):
            printer.record(os.path.basename(path), _absolute(path), ())
        printer.error(f"could not get modinfo from '{path}': {os.strerror(exc.errno)} ({exc.problem})")
        return False
    except OSError:
        printer.error(f"Module file {path} not found.")
        return False
    return _module_file_record(printer, module)


def _lookup_records(printer: Printer, options: Options, paths: HostPaths, arg: str) -> bool:
    from kvc.kmod.moddir import ModuleDirectory

    directory = ModuleDirectory(options.module_dir or paths.module_dir(paths.kernel_release()), preload=False)
    try:
        found = directory.lookup_name(arg) if options.by_name else directory.resolve(arg)
    except KmodError as exc:
        printer.error(exc.brief)
        return False
    if not found:
        printer.error(f"Module name {arg} not found." if options.by_name else f"Module {arg} not found.")
        return False
    ok = True
    for entry in found:
        if entry.path is None:
            printer.record(entry.name, None, directory.builtin_modinfo(entry.name))
            continue
        try:
            module = ModuleFile.open(entry.path)
        except ModuleFormatError as exc:
            printer.record(entry.name, entry.path, ())
            printer.error(f"could not get modinfo from '{entry.name}': {os.strerror(exc.errno)} ({exc.problem})")
            ok = False
            continue
        except OSError as exc:
            printer.record(entry.name, entry.path, ())
            printer.error(f"could not get modinfo from '{entry.name}': {os.strerror(exc.errno or 2)}")
            ok = False
            continue
        ok = _module_file_record(printer, module) and ok
    return ok


def _run(argv: list[str]) -> int:
    opts, args = parse_options(PROG, argv, "adlpn0mF:k:b:Vh", LONGOPTS)
    field: Optional[str] = None
    separator = "\n"
    by_name = False
    kernel_version: Optional[str] = None
    basedir: Optional[str] = None
    for opt, value in opts:
        if opt in FIELD_SHORTCUTS:
            field = FIELD_SHORTCUTS[opt]
        elif opt in ("-0", "--null"):
            separator = "\0"
        elif opt in ("-m", "--modname"):
            by_name = True
        elif opt in ("-F", "--field"):
            field = value
        elif opt in ("-k", "--set-version"):
            kernel_version = value
        elif opt in ("-b", "--basedir"):
            basedir = value
        elif opt in ("-h", "--help"):
            write_out(HELP.format(prog=PROG))
            return 0
        elif opt in ("-V", "--version"):
            write_out(VERSION_TEXT)
            return 0
    if not args:
        log_error(PROG, "missing module or filename.")
        return 1
    paths = HostPaths.from_env()
    module_dir = None
    if basedir is not None or kernel_version is not None:
        release = kernel_version if kernel_version is not None else paths.kernel_release()
        # kmod concatenates: "-b DIR" gives "DIR/lib/modules/KVER" however DIR ends.
        module_dir = f"{basedir or ''}/lib/modules/{release}"
    options = Options(field, separator, by_name, module_dir)
    jobs = worker_count(0, len(args))
    if jobs > 1:
        return _parallel_records(options, paths, args, jobs)
    printer = Printer(options)
    ok = True
    for arg in args:
        ok = _arg_records(printer, options, paths, arg) and ok
    printer.flush()
    return 0 if ok else 1


def _arg_records(printer: Printer, options: Options, paths: HostPaths, arg: str) -> bool:
    if not options.by_name and _is_module_file(arg):
        return _path_record(printer, arg)
    return _lookup_records(printer, options, paths, arg)


def _captured_records(options: Options, paths: HostPaths, args: list[str]) -> list[tuple[bool, Captured]]:
    """(success, output) for each argument, kept rather than written."""
    printer = CapturingPrinter(options)
    return [(_arg_records(printer, options, paths, arg), printer.take()) for arg in args]


def _parallel_records(options: Options, paths: HostPaths, args: list[str], jobs: int) -> int:
    """The records of many arguments, read by ``jobs`` processes (xz decompression is most of
    modinfo's time on compressed trees, and one process does it one file at a time), each taking
    an interleaved share; the output is written in argument order once all are done."""
    sys.stdout.flush()
    children = [
        Forked(partial(_captured_records, options, paths, args[share::jobs]), fork=True) for share in range(1, jobs)
    ]
    results: list[tuple[bool, Captured]] = [(True, [])] * len(args)
    results[0::jobs] = _captured_records(options, paths, args[0::jobs])
    for share, child in enumerate(children, start=1):
        results[share::jobs] = child.result()
    stdout = sys.stdout.buffer
    pending: list[bytes] = []
    for _ok, events in results:
        for stream, data in events:
            if stream == STDOUT:
                pending.append(data)
                continue
            stdout.write(b"".join(pending))
            pending.clear()
            write_err(data.decode(ENCODING, ERRORS))
    stdout.write(b"".join(pending))
    return 0 if all(ok for ok, _events in results) else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_tool(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
