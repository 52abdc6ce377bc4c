"""modprobe configuration as libkmod 30 reads it (libkmod-config.c, shared/util.c).

Files: every ``-C`` path, or by default ``/etc/modprobe.d``, ``/run/modprobe.d``,
``/usr/local/lib/modprobe.d`` and ``/lib/modprobe.d`` (under ``KVC_ROOT``). A directory gives its
``*.conf`` and ``*.alias`` entries that do not start with '.'; anything else is read as one file.
All files, plus ``<moddir>/modules.softdep``, are merged into one list sorted by basename
(``strcmp``), and a basename seen before (an earlier directory) is skipped. The kernel command
line (``/proc/cmdline``) is parsed last.

Lines: ``\\`` + newline joins lines, ``\\`` + another character drops the backslash, a line
starting with ``#`` is a comment (an indented one is a bad line). Words are split on spaces and
tabs only. Module names and alias patterns pass through ``underscores()`` ('-' becomes '_' outside
``[...]``; an unbalanced bracket makes the line bad). Directives: ``alias``, ``options``,
``install``, ``remove``, ``blacklist``, ``softdep``; ``include``/``config`` are "deprecated", and
anything else -- ``weakdep`` too, which kmod 30 does not know -- is a bad line. libkmod's messages
are kept as :class:`~kvc.kmod.kernel.libkmod.LibkmodLog` records with kmod 30's source lines.
"""

from __future__ import annotations

import os
import stat
from typing import NamedTuple, Optional, Sequence

from kvc.kmod.index import fnmatch_c
from kvc.kmod.kernel.libkmod import LOG_ERR, LibkmodLog
from kvc.kmod.paths import HostPaths

DEFAULT_CONFIG_DIRS = ("/etc/modprobe.d", "/run/modprobe.d", "/usr/local/lib/modprobe.d", "/lib/modprobe.d")
SOFTDEP_FILE = "modules.softdep"
# read_str_safe(fd, buf, KCMD_LINE_SIZE): at most 4095 bytes of /proc/cmdline.
_KCMD_LINE_SIZE = 4096
_CONFIG_C = "../libkmod/libkmod-config.c"
_C_SPACE = " \t\n\v\f\r"
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


class Softdep(NamedTuple):
    """One ``softdep`` line: the module pattern and its pre/post module names, as written."""

    pattern: str
    pre: tuple[str, ...] = ()
    post: tuple[str, ...] = ()

    def plain(self) -> str:
        """The value ``modprobe -c`` prints (kmod 30 puts no space before ``post:``)."""
        text = f"pre: {' '.join(self.pre)}" if self.pre else ""
        return text + (f"post: {' '.join(self.post)}" if self.post else "")


class ModprobeConfig(NamedTuple):
    """Everything the configuration files and the kernel command line say, in libkmod's list
    order. Pairs are (module name or pattern, value). ``files`` are the files read, in order;
    ``logs`` what libkmod logged while reading them."""

    blacklists: tuple[str, ...] = ()
    install_commands: tuple[tuple[str, str], ...] = ()
    remove_commands: tuple[tuple[str, str], ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, str], ...] = ()
    softdeps: tuple[Softdep, ...] = ()
    files: tuple[str, ...] = ()
    logs: tuple[LibkmodLog, ...] = ()

    # -- LookupConfig (kvc.kmod.moddir) ------------------------------------------------------

    def alias_targets(self, name: str) -> list[str]:
        """kmod_lookup_alias_from_config: every alias whose pattern fnmatches ``name``."""
        return [module for pattern, module in self.aliases if fnmatch_c(pattern, name)]

    def has_command(self, name: str) -> bool:
        """kmod_lookup_alias_from_commands: a remove or install command for exactly ``name``."""
        return any(module == name for module, _cmd in (*self.remove_commands, *self.install_commands))

    # -- per-module queries ------------------------------------------------------------------

    def module_options(self, name: str, alias: Optional[str] = None) -> Optional[str]:
        """kmod_module_get_options: the non-empty ``options`` of every entry equal to the module's
        name or the alias it was looked up by, joined by spaces; None when there are none."""
        found = [
            text
            for module, text in self.options
            if text and (module == name or (alias is not None and module == alias))
        ]
        return " ".join(found) if found else None

    def install_command(self, name: str) -> Optional[str]:
        """The first ``install`` whose pattern fnmatches the name."""
        return _first_command(self.install_commands, name)

    def remove_command(self, name: str) -> Optional[str]:
        """The first ``remove`` whose pattern fnmatches the name."""
        return _first_command(self.remove_commands, name)

    def softdep(self, name: str) -> Optional[Softdep]:
        """The first ``softdep`` whose pattern fnmatches the name (later ones are ignored)."""
        return next((dep for dep in self.softdeps if fnmatch_c(dep.pattern, name)), None)

    def is_blacklisted(self, name: str) -> bool:
        return name in self.blacklists

    def show_lines(self) -> list[str]:
        """``modprobe -c``'s configuration part: ``type key[ value]`` lines (no newlines)."""
        lines = [f"blacklist {name}" for name in self.blacklists]
        lines += [f"install {name} {cmd}" for name, cmd in self.install_commands]
        lines += [f"remove {name} {cmd}" for name, cmd in self.remove_commands]
        lines += [f"alias {pattern} {name}" for pattern, name in self.aliases]
        lines += [f"options {name} {text}" for name, text in self.options]
        lines += [f"softdep {dep.pattern} {dep.plain()}" for dep in self.softdeps]
        return lines


def _first_command(commands: Sequence[tuple[str, str]], name: str) -> Optional[str]:
    return next((cmd for pattern, cmd in commands if fnmatch_c(pattern, name)), None)


# -- text helpers ------------------------------------------------------------------------------


def _underscored(text: str) -> tuple[str, bool]:
    """shared/util.c underscores() in place: (the buffer afterwards, whether it succeeded).
    '-' becomes '_' outside ``[...]``; a ']' outside brackets or an unclosed '[' stops it."""
    chars = list(text)
    position = 0
    while position < len(chars):
        char = chars[position]
        if char == "-":
            chars[position] = "_"
        elif char == "]":
            return "".join(chars), False
        elif char == "[":
            close = text.find("]", position)
            if close < 0:
                return "".join(chars), False
            position = close
        position += 1
    return "".join(chars), True


def underscores(text: str) -> Optional[str]:
    """The name underscores() makes of ``text``, or None when the brackets do not balance."""
    result, ok = _underscored(text)
    return result if ok else None


def wrapped_lines(data: bytes) -> list[tuple[str, int]]:
    """getline_wrapped(): (line, number of its last physical line); a line is cut at a NUL as
    C reads it. A backslash at the very end becomes the byte 0xFF (getc's EOF stored as char)."""
    lines: list[tuple[str, int]] = []
    buffer = bytearray()
    count = 0
    position = 0
    started = False
    while True:
        if position >= len(data):
            if started or buffer:
                count += 1
                lines.append((_c_line(buffer), count))
            return lines
        byte = data[position]
        position += 1
        started = True
        if byte == 0x0A:
            count += 1
            lines.append((_c_line(buffer), count))
            buffer = bytearray()
            started = False
        elif byte == 0x5C:
            if position >= len(data):
                buffer.append(0xFF)
                continue
            following = data[position]
            position += 1
            if following == 0x0A:
                count += 1
            else:
                buffer.append(following)
        else:
            buffer.append(byte)


def _c_line(buffer: bytearray) -> str:
    return bytes(buffer).split(b"\0", 1)[0].decode(_ENCODING, _ERRORS)


class _Tokens:
    """strtok_r over one line: ``word()`` with the delimiters space and tab, ``rest()`` with an
    empty delimiter set (the remainder after the delimiter that ended the previous word)."""

    def __init__(self, line: str) -> None:
        self.line = line
        self.at = 0

    def word(self) -> Optional[str]:
        line = self.line
        start = self.at
        while start < len(line) and line[start] in " \t":
            start += 1
        if start >= len(line):
            self.at = len(line)
            return None
        end = start
        while end < len(line) and line[end] not in " \t":
            end += 1
        self.at = end + 1 if end < len(line) else end
        return line[start:end]

    def rest(self) -> Optional[str]:
        if self.at >= len(self.line):
            return None
        text = self.line[self.at :]
        self.at = len(self.line)
        return text


def parse_softdep(pattern: str, text: str) -> Softdep:
    """kmod_config_add_softdep: words split on C whitespace; ``pre:`` and ``post:`` switch lists;
    words before either are ignored. Like libkmod, a word is measured from the character after
    the previous separator run, so a single leading separator sticks to the first word."""
    pre: list[str] = []
    post: list[str] = []
    mode = ""
    start = 0
    was_space = False
    for position in range(len(text) + 1):
        end = position == len(text)
        if not end:
            if text[position] not in _C_SPACE:
                was_space = False
                continue
            if was_space:
                start = position + 1
                continue
            was_space = True
            if start >= position:
                continue
        word = text[start:position]
        if word == "pre:":
            mode = "pre"
        elif word == "post:":
            mode = "post"
        elif not end or not was_space:
            if mode == "pre":
                pre.append(word)
            elif mode == "post":
                post.append(word)
        start = position + 1
    return Softdep(pattern, tuple(pre), tuple(post))


# -- building a configuration --------------------------------------------------------------------


class _Builder:
    def __init__(self) -> None:
        self.blacklists: list[str] = []
        self.install_commands: list[tuple[str, str]] = []
        self.remove_commands: list[tuple[str, str]] = []
        self.aliases: list[tuple[str, str]] = []
        self.options: list[tuple[str, str]] = []
        self.softdeps: list[Softdep] = []
        self.files: list[str] = []
        self.logs: list[LibkmodLog] = []

    def error(self, line: int, function: str, message: str) -> None:
        self.logs.append(LibkmodLog(LOG_ERR, _CONFIG_C, line, function, message))

    def freeze(self) -> ModprobeConfig:
        return ModprobeConfig(
            tuple(self.blacklists),
            tuple(self.install_commands),
            tuple(self.remove_commands),
            tuple(self.aliases),
            tuple(self.options),
            tuple(self.softdeps),
            tuple(self.files),
            tuple(self.logs),
        )

    def parse_file(self, data: bytes, filename: str) -> None:
        """kmod_config_parse on one file's bytes."""
        self.files.append(filename)
        for line, number in wrapped_lines(data):
            if not line or line[0] == "#":
                continue
            tokens = _Tokens(line)
            cmd = tokens.word()
            if cmd is None:
                continue
            if not self._directive(cmd, tokens):
                if cmd in ("include", "config"):
                    self.error(
                        708, "kmod_config_parse", f"{filename}: command {cmd} is deprecated and not parsed anymore\n"
                    )
                else:
                    self.error(
                        712, "kmod_config_parse", f"{filename} line {number}: ignoring bad line starting with '{cmd}'\n"
                    )

    def _directive(self, cmd: str, tokens: _Tokens) -> bool:
        """One known directive; False when the line is bad (or not a known directive)."""
        if cmd == "alias":
            pattern, module = tokens.word(), tokens.word()
            if pattern is None or module is None:
                return False
            pattern, module = underscores(pattern), underscores(module)
            if pattern is None or module is None:
                return False
            self.aliases.append((pattern, module))
            return True
        if cmd == "blacklist":
            name = tokens.word()
            name = underscores(name) if name is not None else None
            if name is None:
                return False
            self.blacklists.append(name)
            return True
        if cmd in ("options", "install", "remove", "softdep"):
            name, rest = tokens.word(), tokens.rest()
            if name is None or rest is None:
                return False
            module = underscores(name)
            if module is None:
                return False
            if cmd == "options":
                self.options.append((module, rest.replace("\t", " ")))
            elif cmd == "install":
                self.install_commands.append((module, rest))
            elif cmd == "remove":
                self.remove_commands.append((module, rest))
            else:
                self.softdeps.append(parse_softdep(module, rest))
            return True
        return False

    def parse_kcmdline(self, data: bytes) -> None:
        """kmod_config_parse_kcmdline (kmod 30's state machine): ``mod.param[=value]`` words
        become options, ``modprobe.blacklist=a,b`` blacklist entries. A quote may open the word
        (the bootloader's ``"mod.p=v w"``, re-quoted as ``mod.p="v w"``) or the value."""
        buf = bytearray(data[: _KCMD_LINE_SIZE - 1].split(b"\0", 1)[0])
        buf.append(0)
        state = "modname"
        quoted = False
        quote_start: Optional[int] = None
        modname = 0
        param: Optional[int] = None
        value: Optional[int] = None
        position = 0
        while True:
            byte = buf[position]
            last = byte == 0
            if byte == 0x22:  # '"'
                quoted = not quoted
                if quoted and state == "modname" and position == modname:
                    quote_start = position
                    modname = position + 1
                elif state != "value":
                    state = "ignore"
            elif byte in (0, 0x0A, 0x20):
                if quoted and state == "value":
                    pass
                elif quoted:
                    state = "ignore"
                elif state in ("value", "param"):
                    buf[position] = 0
                    state = "complete"
                else:
                    modname = position + 1
                    state = "modname"
                    quote_start = None
            elif byte == 0x2E:  # '.'
                if state == "modname":
                    buf[position] = 0
                    param = position + 1
                    state = "param"
                elif state == "param":
                    state = "ignore"
            elif byte == 0x3D:  # '='
                if state == "param":
                    value = position + 1
                    state = "value"
                elif state == "modname":
                    state = "ignore"
            if state == "complete":
                assert param is not None
                if quote_start is not None and quote_start < modname and value is not None:
                    buf[quote_start : value - 1] = buf[modname:value]
                    value -= 1
                    modname -= 1
                    param -= 1
                    buf[value] = 0x22
                self._kcmdline_result(
                    _c_string(buf, modname), _c_string(buf, param), _c_string(buf, value) if value is not None else None
                )
                modname = position + 1
                state = "modname"
                quote_start = None
                param = value = None
            if last:
                return
            position += 1

    def _kcmdline_result(self, modname: str, param: str, value: Optional[str]) -> None:
        if modname == "modprobe" and param.startswith("blacklist="):
            self.blacklists.extend((value or "").split(","))
            return
        module = underscores(modname)
        if module is None:
            self.error(
                489,
                "kcmdline_parse_result",
                f"Ignoring bad option on kernel command line while parsing module name: '{_underscored(modname)[0]}'\n",
            )
            return
        self.options.append((module, param.replace("\t", " ")))


def _c_string(buf: bytearray, start: int) -> str:
    end = buf.index(0, start)
    return bytes(buf[start:end]).decode(_ENCODING, _ERRORS)


# -- finding the files ---------------------------------------------------------------------------


def config_files(
    config_paths: Sequence[str], module_dir: Optional[str], logs: Optional[list[LibkmodLog]] = None
) -> list[str]:
    """The files kmod_config_new reads, in order: ``config_paths`` (directories listed,
    anything else taken as a file) and ``module_dir/modules.softdep``, sorted by basename with
    the first of equal basenames kept. Missing paths are skipped, as libkmod skips them."""
    entries: dict[str, str] = {}
    for path in config_paths:
        try:
            mode = os.stat(path).st_mode
        except (OSError, ValueError):
            continue
        if not stat.S_ISDIR(mode):
            entries.setdefault(path.rsplit("/", 1)[-1], path)
            continue
        try:
            names = os.listdir(path)
        except OSError:
            continue
        for name in names:
            if name.startswith(".") or len(name) < 6 or not name.endswith((".conf", ".alias")):
                continue
            full = f"{path}/{name}"
            if os.path.isdir(full):
                if logs is not None:
                    logs.append(
                        LibkmodLog(
                            LOG_ERR,
                            _CONFIG_C,
                            772,
                            "conf_files_filter_out",
                            f"Directories inside directories are not supported: {full}\n",
                        )
                    )
                continue
            entries.setdefault(name, full)
    if module_dir is not None:
        entries.setdefault(SOFTDEP_FILE, f"{module_dir}/{SOFTDEP_FILE}")
    return [entries[name] for name in sorted(entries, key=lambda n: n.encode(_ENCODING, _ERRORS))]


def parse_config(files: Sequence[tuple[str, bytes]], kcmdline: Optional[bytes] = None) -> ModprobeConfig:
    """A configuration from (file name, content) pairs in list order and an optional kernel
    command line. Never raises on any content."""
    builder = _Builder()
    for name, data in files:
        builder.parse_file(data, name)
    if kcmdline is not None:
        builder.parse_kcmdline(kcmdline)
    return builder.freeze()


def load_config(
    config_paths: Optional[Sequence[str]] = None, *, module_dir: Optional[str] = None, paths: Optional[HostPaths] = None
) -> ModprobeConfig:
    """Read the configuration like kmod_new(dirname, config_paths): ``config_paths`` (``-C``)
    or the default directories under ``paths.root``, ``module_dir``'s modules.softdep, then the
    root's ``/proc/cmdline``."""
    host = paths or HostPaths.from_env()
    builder = _Builder()
    search = list(config_paths) if config_paths is not None else [host.host(d) for d in DEFAULT_CONFIG_DIRS]
    for path in config_files(search, module_dir, builder.logs):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        builder.parse_file(data, path)
    try:
        with open(host.host("/proc/cmdline"), "rb") as handle:
            cmdline: Optional[bytes] = handle.read(_KCMD_LINE_SIZE - 1)
    except OSError:
        cmdline = None
    if cmdline is not None:
        builder.parse_kcmdline(cmdline)
    return builder.freeze()
