"""depmod as Debian's kmod 30 runs it: find the modules of ``$BASEDIR/lib/modules/$KVER`` (and
depmod.d ``external`` directories), resolve symbols into dependencies, and write modules.dep,
modules.alias, modules.softdep, modules.symbols, modules.devname and the five binary indexes.

Orders follow kmod exactly: the module array starts in the iteration order of depmod's
512-bucket name hash and is then stably sorted by modules.order; symbols come out in the order
of its 2048-bucket symbol hash; dependencies are ranked by a LIFO topological sort. Messages
are reported through a :class:`Log` with kmod's wording; the caller prints them.

Per-module parse results are cached (see :class:`ParseCache`), keyed by path, size, mtime,
ctime, inode and device, so a changed file is always re-read. A run whose every input (config,
module files, modules.order, modules.builtin*, symbol files, options) is unchanged replays the
previous outputs and messages from the same cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import marshal
import os
import re
import stat
import time
from functools import partial
from typing import Callable, Iterable, Iterator, NamedTuple, NoReturn, Optional, Sequence, TypeVar

from kvc.kmod.atomic import remove_stale, temporary_prefix, write_file
from kvc.kmod.depmodparse import EMPTY_RECORD, ModuleRecord, hash_superfast, read_module, unpack_imports
from kvc.kmod.digest import file_sha256
from kvc.kmod.names import modname_normalize
from kvc.kmod.parallel import Forked, worker_count

ENCODING = "utf-8"
ERRORS = "surrogateescape"
# Debian's kmod 30 is built with xz and zstd but without zlib.
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst")
CONFIG_DIRS = ("/etc/depmod.d", "/run/depmod.d", "/usr/local/lib/depmod.d", "/lib/depmod.d")
TEXT_OUTPUTS = ("modules.dep", "modules.alias", "modules.softdep", "modules.symbols", "modules.devname")
OUTPUTS = (
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.devname",
)
CACHE_ENV = "KVC_DEPMOD_CACHE"
CACHE_FORMAT = 2
_NAME_BUCKETS = 512
_SYMBOL_BUCKETS = 2048
_FAKE_SYMBOLS = (b"__this_module", b"_GLOBAL_OFFSET_TABLE_", b"TOC.")

# kmod's syslog priorities and their names in messages.
FATAL, ERROR, WARNING, NOTICE, INFO, DEBUG = 2, 3, 4, 5, 6, 7
LEVEL_NAMES = {FATAL: "FATAL", ERROR: "ERROR", WARNING: "WARNING", NOTICE: "NOTICE", INFO: "INFO", DEBUG: "DEBUG"}
STDOUT = -1  # a "level" for the -v lines depmod prints on stdout
ABORT = -2  # a "level" for the failed assertion that kills kmod's depmod, as glibc prints it
_STACK_ASSERTION = "../tools/depmod.c:1851: depmod_report_cycles_from_root: Assertion `is < stack_size' failed.\n"


class DepmodError(Exception):
    """depmod stops: the FATAL/ERROR message is already logged."""


class Log:
    """Collects kmod's messages in order. ``verbosity`` is kmod's (LOG_WARNING + the number of
    -v): a message is shown when its priority is at most that. Events after :meth:`record`
    are also kept for the replay cache."""

    def __init__(self, emit: Callable[[int, str], None], verbosity: int = WARNING) -> None:
        self._emit = emit
        self.verbosity = verbosity
        self.recorded: Optional[list[tuple[int, str]]] = None

    def __call__(self, level: int, message: str) -> None:
        if level != STDOUT and level > self.verbosity:
            return
        if self.recorded is not None:
            self.recorded.append((level, message))
        self._emit(level, message)

    def record(self) -> None:
        self.recorded = []


# ---- configuration ---------------------------------------------------------------------------


class Search(NamedTuple):
    kind: str  # "path", "built-in" or "external"
    path: str = ""


class DepmodConfig(NamedTuple):
    """depmod.d, in the order depmod consults it: ``searches`` and ``overrides`` are kept the way
    kmod's prepend lists hold them (the last line of the last file first); ``externals`` in
    file order."""

    searches: tuple[Search, ...] = (Search("path", "updates"),)
    overrides: tuple[str, ...] = ()
    externals: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()


def _kernel_matches(pattern: str, kernel_version: str) -> bool:
    """depmod's cfg_kernel_matches: ``*`` or an unanchored extended regex (Python's re stands in
    for POSIX ERE; an invalid pattern matches nothing)."""
    if pattern == "*":
        return True
    try:
        return re.search(pattern, kernel_version) is not None
    except re.error:
        return False


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """kmod's getline_wrapped: a backslash before the newline joins the next line; the number is
    that of the last physical line."""
    number = 0
    pending = ""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        number += 1
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        yield number, pending + line
        pending = ""
    if pending:
        yield number, pending


class _ConfigBuilder:
    def __init__(self, kernel_version: str) -> None:
        self.kernel_version = kernel_version
        self.searches: list[Search] = []
        self.overrides: list[str] = []
        self.externals: list[str] = []
        self.excludes: list[str] = []

    def parse(self, text: str, filename: str, log: Log) -> None:
        for number, whole in logical_lines(text):
            # depmod parses the line as a C string: a NUL ends it.
            line = whole.partition("\0")[0]
            if not line or line[0] == "#":
                continue
            words = line.replace("\t", " ").split()
            if not words:
                continue
            command, args = words[0], words[1:]
            if command == "search":
                for word in args:
                    kind = word if word in ("built-in", "external") else "path"
                    self.searches.insert(0, Search(kind, "" if kind != "path" else word))
            elif command == "override" and len(args) >= 3:
                if not _kernel_matches(args[1], self.kernel_version):
                    log(INFO, f"{filename}:{number}: override kernel did not match {args[1]}\n")
                    continue
                self.overrides.insert(0, f"{args[2]}/{args[0]}")
            elif command == "external" and len(args) >= 2:
                if not _kernel_matches(args[0], self.kernel_version):
                    log(INFO, f"{filename}:{number}: external directory did not match {args[0]}\n")
                    continue
                self.externals.append(args[1])
            elif command == "exclude":
                self.excludes.extend(args)
            elif command in ("include", "make_map_files"):
                log(INFO, f"{filename}:{number}: command {command} not implemented yet\n")
            else:
                log(ERROR, f"{filename}:{number}: ignoring bad line starting with '{command}'\n")

    def build(self) -> DepmodConfig:
        searches = tuple(self.searches) or (Search("path", "updates"),)
        return DepmodConfig(searches, tuple(self.overrides), tuple(self.externals), tuple(self.excludes))


def config_files(paths: Sequence[str], log: Log) -> list[str]:
    """The config files depmod reads from ``paths``: every ``*.conf`` of a directory (not dot
    files), any other path as a file, merged and sorted by basename; the first of a repeated
    basename wins."""
    chosen: dict[str, str] = {}
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if not stat.S_ISDIR(mode):
            chosen.setdefault(os.path.basename(path), path)
            continue
        try:
            names = [entry.name for entry in os.scandir(path)]
        except OSError as exc:
            log(ERROR, f"files list {path}: {os.strerror(exc.errno or errno.EIO)}\n")
            continue
        for name in names:
            if name.startswith("."):
                continue
            if len(name) < 6 or not name.endswith(".conf"):
                log(INFO, f"All cfg files need .conf: {path}/{name}\n")
                continue
            if os.path.isdir(os.path.join(path, name)):
                log(ERROR, f"Directories inside directories are not supported: {path}/{name}\n")
                continue
            chosen.setdefault(name, f"{path}/{name}")
    return [chosen[name] for name in sorted(chosen, key=lambda n: n.encode(ENCODING, ERRORS))]


def load_config(paths: Optional[Sequence[str]], kernel_version: str, log: Log) -> tuple[DepmodConfig, bytes]:
    """The merged depmod.d configuration and a digest of the files read (for the replay cache)."""
    builder = _ConfigBuilder(kernel_version)
    digest = hashlib.sha256()
    for path in config_files(CONFIG_DIRS if paths is None else paths, log):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            log(ERROR, f"file parse {path}: {os.strerror(exc.errno or errno.EIO)}\n")
            continue
        digest.update(path.encode(ENCODING, ERRORS) + b"\0" + data + b"\0")
        builder.parse(data.decode(ENCODING, ERRORS), path, log)
    return builder.build(), digest.digest()


# ---- options and modules ---------------------------------------------------------------------


class DepmodOptions(NamedTuple):
    kernel_version: str
    basedir: str = ""
    config_paths: Optional[tuple[str, ...]] = None
    module_paths: tuple[str, ...] = ()  # explicit modules; empty means all
    symvers: Optional[str] = None
    system_map: Optional[str] = None
    print_unknown: bool = False
    warn_dups: bool = False
    symbol_prefix: str = ""
    cache_dir: Optional[str] = None
    jobs: int = 0  # worker processes for parsing; 0 picks from the CPU count

    @property
    def dirname(self) -> str:
        return f"{self.basedir}/lib/modules/{self.kernel_version}"


class _Module:
    __slots__ = ("dep_sort_idx", "deps", "idx", "name", "path", "record", "relpath", "sort_idx", "users", "visited")

    def __init__(self, name: str, path: str, relpath: Optional[str]) -> None:
        self.name = name
        self.path = path
        self.relpath = relpath
        self.record: ModuleRecord = EMPTY_RECORD
        self.sort_idx = 1
        self.idx = 0
        self.users = 0
        self.deps: list[_Module] = []
        self.dep_sort_idx = 0
        self.visited = False

    @property
    def shown_path(self) -> str:
        return self.relpath if self.relpath is not None else self.path


def _is_module_file(name: str) -> bool:
    """A name ending in a module suffix, longer than the suffix."""
    return name.endswith(MODULE_SUFFIXES) and name not in MODULE_SUFFIXES


class _Discovery:
    """depmod_modules_search: the module directory, then each external directory, readdir order,
    keeping per name the file depmod_module_is_higher_priority prefers."""

    def __init__(self, dirname: str, config: DepmodConfig, log: Log) -> None:
        self.dirname = dirname
        self.config = config
        self.log = log
        self.by_name: dict[str, _Module] = {}

    def _relative(self, path: str) -> Optional[str]:
        base = self.dirname
        return path[len(base) + 1 :] if path.startswith(base) and path[len(base) : len(base) + 1] == "/" else None

    def search_path(self, top: str) -> bool:
        try:
            entries = os.scandir(top)
        except OSError as exc:
            self.log(ERROR, f"could not open directory {top}: {os.strerror(exc.errno or errno.EIO)}\n")
            return False
        self._walk(top + "/", self._relative(top + "/"), entries)
        return True

    def _walk(self, prefix: str, relprefix: Optional[str], entries: Iterable[os.DirEntry[str]]) -> None:
        """The entries of directory ``prefix``, which is ``relprefix`` relative to the module
        directory (None outside it)."""
        excludes = self.config.excludes
        for entry in list(entries):
            name = entry.name
            if name in ("build", "source") or name in excludes:
                continue
            path = prefix + name
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue
            if is_dir:
                try:
                    children = os.scandir(path)
                except OSError as exc:
                    self.log(ERROR, f"openat({path}, O_RDONLY): {os.strerror(exc.errno or errno.EIO)}\n")
                    continue
                self._walk(path + "/", None if relprefix is None else f"{relprefix}{name}/", children)
            elif is_file:
                if _is_module_file(name):
                    self._add(path, None if relprefix is None else relprefix + name, prefix, name)
            else:
                self.log(ERROR, f"unsupported file type {path}: 0\n")

    def _add(self, path: str, relpath: Optional[str], prefix: str, filename: str) -> None:
        name = modname_normalize(filename)
        old = self.by_name.get(name)
        if old is not None and self._keeps(old, relpath, prefix, name):
            return
        self.by_name[name] = _Module(name, path, relpath)

    def _keeps(self, old: _Module, relpath: Optional[str], prefix: str, name: str) -> bool:
        """Whether the module already found has priority over a new file of the same name."""
        new_key = None
        if relpath is not None:
            new_key = prefix[len(self.dirname) + 1 :] + name
        old_key = None
        if old.relpath is not None:
            old_key = old.relpath[: old.relpath.rfind("/") + 1] + old.name
        for override in self.config.overrides:
            # depmod compares the override with the path bytes, not with the normalized name.
            if new_key is not None and override == _raw_key(relpath, new_key):
                return False
            if old_key is not None and override == _raw_key(old.relpath, old_key):
                return True
        builtin = new_prio = old_prio = -1
        for position, search in enumerate(self.config.searches):
            if search.kind == "built-in":
                builtin = position
            elif _search_matches(search, relpath, new_key):
                new_prio = position
            elif _search_matches(search, old.relpath, old_key):
                old_prio = position
        if new_prio < 0:
            new_prio = builtin
        if old_prio < 0:
            old_prio = builtin
        return new_prio <= old_prio


def _raw_key(relpath: Optional[str], key: str) -> str:
    """The first len(key) characters of the relative path: directory plus as many characters
    of the file name as the module name has."""
    return (relpath or "")[: len(key)]


def _search_matches(search: Search, relpath: Optional[str], key: Optional[str]) -> bool:
    if search.kind == "external":
        return relpath is None
    return key is not None and _raw_key(relpath, key).startswith(search.path)


# ---- the parse cache -------------------------------------------------------------------------


def default_cache_dir() -> Optional[str]:
    """``$KVC_DEPMOD_CACHE`` (``off`` disables the cache), else ``$XDG_CACHE_HOME/kvc/depmod``,
    else ``~/.cache/kvc/depmod``."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return None if configured in ("", "off", "0", "none") else configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvc", "depmod")


StatKey = tuple[int, int, int, int, int]


def stat_key(path: str) -> Optional[StatKey]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class ParseCache:
    """Parse results of one module directory in ``DIR/<sha256 of dirname>.modules``, and the
    last run's outputs in ``.outputs`` next to it. Unreadable or foreign files count as empty;
    writes go through a temp file and rename, so a crash leaves the old cache."""

    def __init__(self, directory: str, dirname: str) -> None:
        tag = hashlib.sha256(dirname.encode(ENCODING, ERRORS)).hexdigest()[:24]
        self.modules_path = os.path.join(directory, f"{tag}.modules")
        self.outputs_path = os.path.join(directory, f"{tag}.outputs")

    @staticmethod
    def _load(path: str) -> object:
        try:
            with open(path, "rb") as handle:
                data = marshal.loads(handle.read())  # load(handle) reads in small pieces: several times slower
        except (OSError, EOFError, ValueError, TypeError):
            return None
        if isinstance(data, tuple) and len(data) == 2 and data[0] == CACHE_FORMAT:
            return data[1]
        return None

    @staticmethod
    def _store(path: str, payload: object) -> None:
        try:
            write_file(path, marshal.dumps((CACHE_FORMAT, payload)), sync_directory=False)  # type: ignore[arg-type]
        except (OSError, ValueError):
            return

    def modules(self) -> dict[str, tuple[StatKey, ModuleRecord]]:
        data = self._load(self.modules_path)
        return data if isinstance(data, dict) else {}

    def store_modules(self, entries: dict[str, tuple[StatKey, ModuleRecord]]) -> None:
        self._store(self.modules_path, entries)

    def outputs(self, key: bytes) -> Optional[tuple[list[tuple[int, str]], list[tuple[str, bytes]], int]]:
        data = self._load(self.outputs_path)
        if isinstance(data, tuple) and len(data) == 4 and data[0] == key:
            return data[1], data[2], data[3]
        return None

    def store_outputs(
        self, key: bytes, messages: list[tuple[int, str]], files: list[tuple[str, bytes]], status: int
    ) -> None:
        self._store(self.outputs_path, (key, messages, files, status))


def _parse_chunk(paths: list[str]) -> list[ModuleRecord]:
    return [read_module(path) for path in paths]


_T = TypeVar("_T")


def parse_modules(paths: list[str], jobs: int) -> list[ModuleRecord]:
    """Records for ``paths``, parsed by ``jobs`` processes when that pays off: the parent takes
    one interleaved share (which balances big and small modules) and each forked child another
    (marshal is several times faster than pickle on these tuples of bytes)."""
    jobs = worker_count(jobs, len(paths))
    if jobs == 1:
        return _parse_chunk(paths)
    children = [Forked(partial(_parse_chunk, paths[share::jobs]), fork=True) for share in range(1, jobs)]
    records = [EMPTY_RECORD] * len(paths)
    records[0::jobs] = _parse_chunk(paths[0::jobs])
    for share, child in enumerate(children, start=1):
        records[share::jobs] = child.result()
    return records


# ---- the computation -------------------------------------------------------------------------


class DepmodResult(NamedTuple):
    """Outputs in kmod's order as (file name, bytes); text outputs only with ``-n``."""

    files: tuple[tuple[str, bytes], ...]
    status: int


class _Symbol:
    __slots__ = ("crc", "hash", "name", "owner")

    def __init__(self, name: bytes, crc: int, owner: Optional[_Module], hashed: int) -> None:
        self.name = name
        self.crc = crc
        self.owner = owner
        self.hash = hashed


class Depmod:
    def __init__(self, options: DepmodOptions, log: Log) -> None:
        self.options = options
        self.log = log
        self.dirname = options.dirname
        self.symbols: dict[bytes, _Symbol] = {}
        self.inputs = hashlib.sha256(repr(options).encode(ENCODING, ERRORS))
        prefix = options.symbol_prefix.encode(ENCODING, ERRORS)
        self.prefix = prefix[:1]
        # Whether independent work (the cache, modules.alias.bin) goes to forked children.
        self.parallel = False
        self._background: list[Forked[None]] = []
        # Each module's stat key as input_key took it, so that read_records stats no file twice.
        self.stat_keys: dict[str, Optional[StatKey]] = {}

    def wait(self) -> None:
        """Wait for the background children (the cache written)."""
        for job in self._background:
            job.result()
        self._background.clear()

    def _strip(self, name: bytes) -> bytes:
        return name[1:] if self.prefix and name[:1] == self.prefix else name

    def _add_symbol(self, name: bytes, crc: int, owner: Optional[_Module], hashed: Optional[int] = None) -> None:
        stripped = self._strip(name)
        if stripped is not name:
            hashed = None
        self.symbols[stripped] = _Symbol(stripped, crc, owner, hash_superfast(stripped) if hashed is None else hashed)

    def _read_input(self, path: str) -> bytes:
        with open(path, "rb") as handle:
            data = handle.read()
        self.inputs.update(path.encode(ENCODING, ERRORS) + b"\0" + hashlib.sha256(data).digest())
        return data

    def load_symvers(self, path: str) -> None:
        """Module.symvers: ``0xCRC<TAB>symbol<TAB>vmlinux<TAB>...`` lines give owner-less symbols."""
        data = self._read_input(path)
        for number, line in enumerate(data.split(b"\n"), start=1):
            fields = line.replace(b"\t", b" ").split()
            if len(fields) < 3 or fields[2] != b"vmlinux":
                continue
            try:
                crc = int(fields[0], 16)
            except ValueError:
                self.log(
                    ERROR, f"{path}:{number} Invalid symbol version {fields[0].decode(ENCODING, ERRORS)}: Success\n"
                )
                continue
            self._add_symbol(fields[1], crc, None)
        self._fake_symbols()

    def load_system_map(self, path: str) -> None:
        """System.map: only ``__ksymtab_<sym>`` entries count."""
        data = self._read_input(path)
        for number, line in enumerate(data.split(b"\n"), start=1):
            first = line.find(b" ")
            second = line.find(b" ", first + 1) if first >= 0 else -1
            if second < 0:
                if line:
                    self.log(ERROR, f"{path}:{number}: invalid line: {line.decode(ENCODING, ERRORS)}\n")
                continue
            name = line[second + 1 :]
            if name.startswith(b"__ksymtab_"):
                self._add_symbol(name[len(b"__ksymtab_") :], 0, None)
        self._fake_symbols()

    def _fake_symbols(self) -> None:
        for name in _FAKE_SYMBOLS:
            self._add_symbol(name, 0, None)

    def discover(self, config: Optional[DepmodConfig]) -> list[_Module]:
        if config is None:
            return self._explicit()
        found = _Discovery(self.dirname, config, self.log)
        if not found.search_path(self.dirname):
            self.log(FATAL, "could not search modules: No such file or directory\n")
            raise DepmodError
        for external in config.externals:
            found.search_path(external)
        return list(found.by_name.values())

    def _explicit(self) -> list[_Module]:
        modules: dict[str, _Module] = {}
        finder = _Discovery(self.dirname, DepmodConfig(), self.log)
        for path in self.options.module_paths:
            if not path.startswith("/"):
                self.log(FATAL, f"{path}: not absolute path.\n")
                raise DepmodError
            if not os.path.exists(path):
                self.log(FATAL, f"could not create module {path}: No such file or directory\n")
                raise DepmodError
            name = modname_normalize(os.path.basename(path))
            if name in modules:
                self.log(FATAL, f"could not add module {path}: File exists\n")
                raise DepmodError
            modules[name] = _Module(name, path, finder._relative(path))
        return list(modules.values())

    def read_records(self, modules: list[_Module], cache: Optional[ParseCache]) -> None:
        stored = cache.modules() if cache is not None else {}
        fresh: dict[str, tuple[StatKey, ModuleRecord]] = {}
        missing: list[tuple[_Module, Optional[StatKey]]] = []
        for module in modules:
            # Taken before the file is read: a change made while it is read shows as a
            # different key next time, so the record is never kept under a newer key.
            path = module.path
            key = self.stat_keys[path] if path in self.stat_keys else stat_key(path)
            hit = stored.get(path)
            if key is not None and hit is not None and tuple(hit[0]) == key:
                module.record = hit[1]
                fresh[module.path] = hit
            else:
                missing.append((module, key))
        self.parallel = worker_count(self.options.jobs, len(missing)) > 1
        if missing:
            records = parse_modules([module.path for module, _key in missing], self.options.jobs)
            for (module, key), record in zip(missing, records):
                module.record = record
                if key is not None:
                    fresh[module.path] = (key, record)
        if cache is not None and (missing or len(fresh) != len(stored)):
            self._background.append(Forked(partial(cache.store_modules, fresh), fork=self.parallel))

    def input_key(self, modules: list[_Module], config_digest: bytes) -> bytes:
        digest = self.inputs.copy()
        digest.update(config_digest)
        # One marshalled list rather than one update per module: this is most of a warm run.
        keys = [(module.path, stat_key(module.path)) for module in modules]
        self.stat_keys = dict(keys)
        digest.update(marshal.dumps(keys))
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            path = f"{self.dirname}/{name}"
            digest.update(f"{name}\0{stat_key(path)}\0".encode())
            try:
                digest.update(file_sha256(path))
            except OSError:
                digest.update(b"-")
        return digest.digest()

    # -- ordering --------------------------------------------------------------------------

    def order(self, modules: list[_Module]) -> list[_Module]:
        """The module array: name-hash iteration order, then modules.order (stable)."""

        def bucket_and_name(module: _Module) -> tuple[int, bytes]:
            name = module.name.encode(ENCODING, ERRORS)
            return hash_superfast(name) & (_NAME_BUCKETS - 1), name

        array = sorted(modules, key=bucket_and_name)
        order_file = f"{self.dirname}/modules.order"
        try:
            with open(order_file, "rb") as handle:
                lines = handle.read().split(b"\n")
        except OSError as exc:
            self.log(
                WARNING, f"could not open modules.order at {self.dirname}: {os.strerror(exc.errno or errno.EIO)}\n"
            )
            return self._indexed(array)
        if lines[-1] != b"":
            self.log(ERROR, f"{order_file}:{len(lines)} corrupted line misses '\\n'\n")
            return self._indexed(array)
        lines.pop()
        by_relpath = {_uncompressed(m.relpath): m for m in array if m.relpath is not None}
        total = len(lines) + 1
        for number, line in enumerate(lines, start=1):
            module = by_relpath.get(line.decode(ENCODING, ERRORS))
            if module is not None:
                module.sort_idx = number - total
        array.sort(key=lambda m: m.sort_idx)
        return self._indexed(array)

    @staticmethod
    def _indexed(array: list[_Module]) -> list[_Module]:
        for position, module in enumerate(array):
            module.idx = position
        return array

    def load_symbols(self, array: list[_Module]) -> None:
        for module in array:
            error = module.record[0]
            if error is not None:
                self.log(ERROR, f"failed to load symbols from {module.path}: {error}\n")
                continue
            for name, crc, hashed in module.record[1]:
                self._add_symbol(name, crc, module, hashed)

    def load_dependencies(self, array: list[_Module]) -> None:
        symbols = self.symbols
        # Without -e or -v only the owners matter: look the names up at C speed unless a
        # symbol prefix or a leading dot has to be stripped first.
        detailed = self.options.print_unknown or self.log.verbosity > WARNING or bool(self.prefix)
        for module in array:
            names = module.record[2][0]
            if not names:
                continue
            if detailed or names[:1] == b"." or b"\0." in names:
                self._resolve_each(module)
                continue
            deps = module.deps
            for symbol in filter(None, map(symbols.get, names.split(b"\0"))):
                owner = symbol.owner
                if owner is None or owner in deps:
                    continue
                deps.append(owner)
                owner.users += 1

    def _resolve_each(self, module: _Module) -> None:
        print_unknown = self.options.print_unknown
        check_crcs = self.options.symvers is not None
        symbols = self.symbols
        show = self.log.verbosity > WARNING
        deps = module.deps
        for name, crc, weak in unpack_imports(module.record[2]):
            key = name[1:] if name[:1] == b"." else name
            symbol = symbols.get(self._strip(key))
            if symbol is None:
                if print_unknown and not weak:
                    self.log(WARNING, f"{module.path} needs unknown symbol {_text(name)}\n")
                continue
            if check_crcs and symbol.crc != crc and not weak and print_unknown:
                self.log(WARNING, f"{module.path} disagrees about version of symbol {_text(name)}\n")
            owner = symbol.owner
            if owner is None or owner in deps:
                continue
            deps.append(owner)
            owner.users += 1
            if show:
                self.log(STDOUT, f'{module.path} needs "{_text(symbol.name)}": {owner.path}\n')

    def sort_dependencies(self, array: list[_Module]) -> None:
        users = [module.users for module in array]
        roots = [module.idx for module in array if module.users == 0]
        sorted_count = 0
        while roots:
            source = array[roots.pop()]
            source.dep_sort_idx = sorted_count
            sorted_count += 1
            for dep in source.deps:
                users[dep.idx] -= 1
                if users[dep.idx] == 0:
                    roots.append(dep.idx)
        if sorted_count < len(array):
            self._report_cycles(array, users)

    def _report_cycles(self, array: list[_Module], users: list[int]) -> NoReturn:
        """depmod_report_cycles: a depth-first walk from each module left with users; a walk that
        comes back to its start reports that cycle and drops its members from the roots. The
        roots are kmod's circular list, whose head moves on with every removal (see
        :func:`_remove_rotating`): that decides where the next walk, and so its report, starts.
        Raises DepmodError after logging."""
        roots = [module for module in array if users[module.idx] > 0]
        stack_size = len(roots)
        in_cycles: set[str] = set()
        while roots:
            root = roots.pop(0)
            visited_count = sum(module.visited for module in array)
            # kmod's walk never ends when it enters a cycle that does not contain its root: it
            # comes back to a state it was in (modules on the stack, roots left, visited count).
            seen: set[tuple[tuple[int, ...], int, int]] = set()
            stack: list[tuple[_Module, Optional[tuple[object, ...]]]] = [(root, None)]
            while stack:
                state = (tuple(module.idx for module, _ in stack), len(roots), visited_count)
                if state in seen:
                    self.log(ERROR, f"Cycles reached from {root.name} cannot be reported (kmod 30 loops forever)\n")
                    raise DepmodError
                seen.add(state)
                module, parents = stack.pop()
                if module.visited and module is root:
                    chain: list[_Module] = []
                    link = parents
                    while link is not None:
                        member = link[0]
                        assert isinstance(member, _Module)
                        chain.append(member)
                        link = link[1]  # type: ignore[assignment]
                    chain.reverse()
                    for member in chain:
                        in_cycles.add(member.name)
                        roots = _remove_rotating(roots, member)
                    self.log(ERROR, f"Cycle detected: {' -> '.join([*(m.name for m in chain), module.name])}\n")
                    continue
                if not module.visited:
                    module.visited = True
                    visited_count += 1
                if not module.deps:
                    roots = _remove_rotating(roots, module)
                    continue
                for dep in module.deps:
                    if len(stack) >= stack_size:
                        # kmod sized its stack by the number of roots and asserts it is not overrun.
                        self.log(ABORT, _STACK_ASSERTION)
                        raise DepmodError
                    stack.append((dep, (module, parents)))
        self.log(ERROR, f"Found {len(in_cycles)} modules in dependency cycles!\n")
        raise DepmodError

    # -- outputs ---------------------------------------------------------------------------

    @staticmethod
    def _closure(module: _Module, memo: dict[int, list[_Module]]) -> list[_Module]:
        found = memo.get(module.idx)
        if found is not None:
            return found
        seen: dict[int, _Module] = {}
        for dep in module.deps:
            seen[dep.idx] = dep
            for indirect in Depmod._closure(dep, memo):
                seen[indirect.idx] = indirect
        found = sorted(seen.values(), key=lambda m: m.dep_sort_idx)
        memo[module.idx] = found
        return found

    def dep_lines(self, array: list[_Module]) -> list[str]:
        memo: dict[int, list[_Module]] = {}
        # Walk deepest first so the memoized closures never recurse far.
        for module in sorted(array, key=lambda m: -m.dep_sort_idx):
            self._closure(module, memo)
        return [module.shown_path + ":" + "".join(" " + dep.shown_path for dep in memo[module.idx]) for module in array]

    def _index(self, name: str, entries: Iterable[tuple[bytes, bytes, int]], duplicate_label: Optional[str]) -> bytes:
        # Imported here: a replayed run writes no index.
        from kvc.kmod.indexwrite import IndexBuilder, IndexCharacterError

        builder = IndexBuilder()
        try:
            for key, value, priority in entries:
                if builder.add(key, value, priority) and duplicate_label is not None and self.options.warn_dups:
                    if duplicate_label == "deps":
                        self.log(WARNING, f"duplicate module deps:\n{_text(value)}\n")
                    else:
                        self.log(WARNING, f"duplicate module {duplicate_label}:\n{_text(key)} {_text(value)}\n")
        except IndexCharacterError:
            self.log(ERROR, f"Could not create index '{name}'. Output is truncated: Invalid argument\n")
        return builder.to_bytes()

    def _alias_entries(self, array: list[_Module]) -> Iterator[tuple[bytes, bytes, int]]:
        for module in array:
            name = module.name.encode(ENCODING, ERRORS)
            for alias in module.record[3]:
                normalized = _normalize(alias)
                if normalized is None:
                    self.log(WARNING, f"Unmatched bracket in {alias}\n")
                    continue
                yield normalized.encode(ENCODING, ERRORS), name, module.idx

    def _owned_symbols(self) -> list[_Symbol]:
        owned = [symbol for symbol in self.symbols.values() if symbol.owner is not None]
        owned.sort(key=lambda s: (s.hash & (_SYMBOL_BUCKETS - 1), s.name))
        return owned

    def _builtin_bin(self) -> bytes:
        path = f"{self.dirname}/modules.builtin"
        try:
            with open(path, "rb") as handle:
                lines = handle.read().splitlines(keepends=True)
        except OSError as exc:
            self.log(
                WARNING, f"could not open modules.builtin at {self.dirname}: {os.strerror(exc.errno or errno.EIO)}\n"
            )
            return b""
        entries = []
        for line in lines:
            if not line[:1].isalpha():
                self.log(ERROR, f"Invalid modules.builtin line: {_text(line)}\n")
                continue
            base = line.rsplit(b"/", 1)[-1]
            entries.append((base.split(b".", 1)[0].replace(b"-", b"_"), b"", 0))
        return self._index("modules.builtin.bin", entries, None)

    def _builtin_alias_bin(self) -> bytes:
        path = f"{self.dirname}/modules.builtin.modinfo"
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            self.log(
                WARNING,
                f"could not open modules.builtin.modinfo at {self.dirname}: {os.strerror(exc.errno or errno.EIO)}\n",
            )
            return b""
        # Imported here, in the child that builds this index when there is one: moddir and
        # what it imports are a good part of start-up.
        from kvc.kmod.moddir import BuiltinModinfo

        info = BuiltinModinfo.parse(data, path)
        entries = []
        seen: set[str] = set()
        for module, _strings in info.blocks:
            if module in seen:
                continue
            seen.add(module)
            for text in info.strings(module) or ():
                key, _sep, value = text.partition("=")
                if key != "alias":
                    continue
                normalized = _normalize(value)
                if normalized is None:
                    self.log(WARNING, f"Unmatched bracket in {value}\n")
                    continue
                entries.append((normalized.encode(ENCODING, ERRORS), module.encode(ENCODING, ERRORS), 0))
        if not seen:
            return b""
        return self._index("modules.builtin.alias.bin", entries, None)

    def _devname(self, array: list[_Module]) -> str:
        out: list[str] = []
        for module in array:
            devname: Optional[str] = None
            kind = ""
            major = minor = 0
            for alias in module.record[3]:
                if alias.startswith("devname:"):
                    devname = alias[len("devname:") :]
                else:
                    match = _DEVICE.match(alias)
                    if match is not None:
                        kind = "c" if match.group(1) == "char" else "b"
                        major, minor = _c_unsigned(match.group(2)), _c_unsigned(match.group(3))
                if kind and devname is not None:
                    break
            if devname is None:
                continue
            if kind:
                if not out:
                    out.append("# Device nodes to trigger on-demand module loading.\n")
                out.append(f"{module.name} {devname} {kind}{major}:{minor}\n")
            else:
                self.log(
                    ERROR,
                    f"Module '{module.name}' has devname ({devname}) but lacks major and minor "
                    "information. Ignoring.\n",
                )
        return "".join(out)

    def _captured(self, work: Callable[[], _T]) -> tuple[list[tuple[int, str]], _T]:
        """``work()`` with its messages kept, for logging later in kmod's order."""
        messages: list[tuple[int, str]] = []
        log = self.log
        self.log = Log(lambda level, text: messages.append((level, text)), log.verbosity)
        try:
            return messages, work()
        finally:
            self.log = log

    def _child_indexes(
        self, array: list[_Module]
    ) -> tuple[list[tuple[int, str]], bytes, list[tuple[int, str]], bytes, bytes]:
        """modules.alias.bin (the largest index), modules.builtin.bin and
        modules.builtin.alias.bin, with their messages."""
        alias_messages, alias = self._captured(
            partial(self._index, "modules.alias.bin", self._alias_entries(array), "alias")
        )
        builtin_messages, (builtin, builtin_alias) = self._captured(
            lambda: (self._builtin_bin(), self._builtin_alias_bin())
        )
        return alias_messages, alias, builtin_messages, builtin, builtin_alias

    def outputs(self, array: list[_Module], show: bool) -> list[tuple[str, bytes]]:
        # A child builds three of the indexes meanwhile; the messages of what comes after
        # modules.alias.bin in kmod's order are held back and logged in that order.
        child = None if show else Forked(partial(self._child_indexes, array), fork=self.parallel)
        files: list[tuple[str, bytes]] = []
        lines = self.dep_lines(array)
        files.append(("modules.dep", _raw("".join(line + "\n" for line in lines))))
        if not show:
            entries = (
                (module.name.encode(ENCODING, ERRORS), _raw(line), module.idx) for module, line in zip(array, lines)
            )
            files.append(("modules.dep.bin", self._index("modules.dep.bin", entries, "deps")))
        alias_text = ["# Aliases extracted from modules themselves.\n"]
        for module in array:
            alias_text.extend(f"alias {alias} {module.name}\n" for alias in module.record[3])
        files.append(("modules.alias", _raw("".join(alias_text))))
        symbol_messages, middle = self._captured(partial(self._softdeps_and_symbols, array, show))
        devname_messages, devname = self._captured(partial(self._devname, array))
        held = symbol_messages
        if child is None:
            files.extend(middle)
        else:
            alias_messages, alias, builtin_messages, builtin, builtin_alias = child.result()
            files.append(("modules.alias.bin", alias))
            files.extend(middle)
            files.append(("modules.builtin.bin", builtin))
            files.append(("modules.builtin.alias.bin", builtin_alias))
            held = alias_messages + symbol_messages + builtin_messages
        files.append(("modules.devname", _raw(devname)))
        for level, message in held + devname_messages:
            self.log(level, message)
        return files

    def _softdeps_and_symbols(self, array: list[_Module], show: bool) -> list[tuple[str, bytes]]:
        files: list[tuple[str, bytes]] = []
        softdep_text = ["# Soft dependencies extracted from modules themselves.\n"]
        for module in array:
            softdep_text.extend(f"softdep {module.name} {value}\n" for value in module.record[4])
        files.append(("modules.softdep", _raw("".join(softdep_text))))
        owned = self._owned_symbols()
        symbol_text = [b"# Aliases for symbols, used by symbol_request().\n"]
        for symbol in owned:
            assert symbol.owner is not None
            symbol_text.append(b"alias symbol:" + symbol.name + b" " + _raw(symbol.owner.name) + b"\n")
        files.append(("modules.symbols", b"".join(symbol_text)))
        if not show:
            entries = ((b"symbol:" + s.name, _raw(s.owner.name), s.owner.idx) for s in owned if s.owner is not None)
            files.append(("modules.symbols.bin", self._index("modules.symbols.bin", entries, "syms")))
        return files


_DEVICE = re.compile(r"(char|block)-major-\s*([+-]?\d+)-\s*([+-]?\d+)", re.ASCII)


def _remove_rotating(roots: list[_Module], module: _Module) -> list[_Module]:
    """kmod_list_remove_data on a circular list: the element after the removed one becomes the
    head, so the list comes back rotated; unchanged when ``module`` is not in it."""
    for index, candidate in enumerate(roots):
        if candidate is module:
            return roots[index + 1 :] + roots[:index]
    return roots


def _normalize(alias: str) -> Optional[str]:
    """alias_normalize, or None for an unmatched bracket. Most aliases have no brackets and are
    shorter than PATH_MAX, and then only '-' changes."""
    if "[" not in alias and "]" not in alias and len(alias) < 2048:
        return alias.replace("-", "_")
    from kvc.kmod.moddir import normalize_alias

    try:
        return normalize_alias(alias)
    except ValueError:
        return None


def _c_unsigned(text: str) -> int:
    """sscanf's %u: a sign is accepted and the value wraps to 32 bits."""
    return int(text) & 0xFFFFFFFF


def _uncompressed(relpath: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if relpath.endswith(".ko" + suffix):
            return relpath[: -len(suffix)]
    return relpath


def _text(raw: bytes) -> str:
    return raw.decode(ENCODING, ERRORS)


def _raw(text: str) -> bytes:
    return text.encode(ENCODING, ERRORS)


def run(options: DepmodOptions, log: Log, *, show: bool = False) -> DepmodResult:
    """One depmod run up to its outputs (written by the caller: see :func:`write_outputs`).
    Raises DepmodError after logging when depmod would exit with failure before writing."""
    depmod = Depmod(options, log)
    try:
        if options.symvers is not None:
            depmod.load_symvers(options.symvers)
        elif options.system_map is not None:
            depmod.load_system_map(options.system_map)
    except OSError as exc:
        log(FATAL, f"could not load {options.symvers or options.system_map}: {os.strerror(exc.errno or errno.EIO)}\n")
        raise DepmodError from None
    if options.print_unknown and options.symvers is None and options.system_map is None:
        log(WARNING, "-e needs -E or -F\n")
        options = options._replace(print_unknown=False)
        depmod.options = options
    config: Optional[DepmodConfig] = None
    config_digest = b""
    if not options.module_paths:
        config, config_digest = load_config(options.config_paths, options.kernel_version, log)
    modules = depmod.discover(config)
    cache_dir = options.cache_dir
    cache = ParseCache(cache_dir, depmod.dirname) if cache_dir else None
    key = b""
    if cache is not None and log.verbosity <= WARNING:
        key = depmod.input_key(modules, config_digest + (b"show" if show else b"write"))
        replay = cache.outputs(key)
        if replay is not None:
            messages, files, status = replay
            for level, message in messages:
                log(level, message)
            if status:
                raise DepmodError
            return DepmodResult(tuple((name, data) for name, data in files), status)
    log.record()
    try:
        depmod.read_records(modules, cache)
        array = depmod.order(modules)
        depmod.load_symbols(array)
        depmod.load_dependencies(array)
        depmod.sort_dependencies(array)
        files = depmod.outputs(array, show)
    except DepmodError:
        if cache is not None and key:
            cache.store_outputs(key, log.recorded or [], [], 1)
        raise
    finally:
        depmod.wait()
    if cache is not None and key:
        cache.store_outputs(key, log.recorded or [], files, 0)
    return DepmodResult(tuple(files), 0)


def write_outputs(dirname: str, files: Sequence[tuple[str, bytes]], log: Log, *, strict: bool = False) -> bool:
    """Write every file to a temp file in ``dirname`` and fsync it, then rename them all into place
    (mode 0644 less the umask, as depmod creates them): a write that fails (no space) leaves every
    index as it was. modules.dep is renamed last, so a modules.dep that lists a module means every
    index was written with it, even if this process is killed midway. Temporary files a killed
    writer left are removed first (see :mod:`kvc.kmod.atomic`). A temp file that cannot be
    created is skipped with an error, as depmod does, unless ``strict``: then nothing is renamed."""
    try:
        directory = os.open(dirname, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        log(FATAL, f"could not open directory {dirname}: {os.strerror(exc.errno or errno.EIO)}\n")
        return False
    written: list[tuple[str, str]] = []  # (temp, name), not renamed yet
    try:
        for name, _data in files:
            remove_stale(os.path.join(dirname, name))
        for name, data in sorted(files, key=lambda item: item[0] == "modules.dep"):
            temp = f"{temporary_prefix(name)}{int(time.time() * 1e6) % 1000000}"
            try:
                fd = os.open(temp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644, dir_fd=directory)
            except OSError as exc:
                log(
                    ERROR,
                    f"openat({dirname}, {temp}, {os.O_CREAT | os.O_TRUNC | os.O_WRONLY:o}, 644): "
                    f"{os.strerror(exc.errno or errno.EIO)}\n",
                )
                if strict:
                    return False
                continue
            written.append((temp, name))
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                log(ERROR, f"Could not write index '{name}': {os.strerror(exc.errno or errno.EIO)}\n")
                return False
            finally:
                os.close(fd)
        while written:
            temp, name = written[0]
            try:
                os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
            except OSError as exc:
                log(FATAL, f"renameat({dirname}, {temp}, {dirname}, {name}): {os.strerror(exc.errno or errno.EIO)}\n")
                return False
            written.pop(0)
        os.fsync(directory)
    finally:
        for temp, _name in written:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=directory)
        os.close(directory)
    return True


def modules_dep_up_to_date(dirname: str, log: Log) -> bool:
    """``-A``: true when no module file under ``dirname`` is newer than its modules.dep."""
    try:
        reference = os.stat(f"{dirname}/modules.dep").st_mtime
    except OSError as exc:
        log(ERROR, f"could not fstatat({dirname}, modules.dep): {os.strerror(exc.errno or errno.EIO)}\n")
        return False
    return _up_to_date(dirname + "/", int(reference))


def _up_to_date(prefix: str, mtime: int) -> bool:
    try:
        entries = list(os.scandir(prefix))
    except OSError:
        return True
    for entry in entries:
        if entry.name in ("build", "source"):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if not _up_to_date(prefix + entry.name + "/", mtime):
                return False
        elif stat.S_ISREG(st.st_mode) and _is_module_file(entry.name) and int(st.st_mtime) > mtime:
            return False
    return True
