"""What mirrors libkmod 30: its insert and remove logic over the three module syscalls
(:class:`SyscallKernel`, shared by the live and the fake kernel), and its reading of
``/proc/modules`` and ``/sys/module`` with the same results and log messages
(:class:`LibkmodView`).

:meth:`SyscallKernel.insert` loads a module the way libkmod does: an uncompressed file (or one
compressed the way the kernel itself decompresses, see ``/sys/module/compression``) goes to
``finit_module``; anything else, or a kernel without ``finit_module`` (ENOSYS), is decompressed
here and handed to ``init_module`` -- stripped of ``__versions`` and/or ``vermagic`` first when
the load is forced, like ``kmod_elf_strip``.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import os
import re
import struct
from typing import NamedTuple, Optional

from kvc.kmod import compression as _compression
from kvc.kmod.elf import ElfFile
from kvc.kmod.errors import ModuleFormatError
from kvc.kmod.kernel.protocol import (
    MODULE_INIT_COMPRESSED_FILE,
    MODULE_INIT_FORCE_FLAGS,
    MODULE_INIT_IGNORE_MODVERSIONS,
    MODULE_INIT_IGNORE_VERMAGIC,
    O_NONBLOCK,
    O_TRUNC,
    REMOVE_FORCE,
    KernelError,
    ModuleSource,
)
from kvc.kmod.module import ModuleFile, strip_for_force
from kvc.kmod.names import modname_normalize
from kvc.kmod.paths import HostPaths

# The longest magic libkmod reads before deciding how to open a file (xz: 6 bytes). A shorter
# file makes kmod_file_open fail with EINVAL before any syscall.
_MAGIC_SIZE = 6


class SyscallKernel(abc.ABC):
    """The part shared by the live and the fake kernel: libkmod's insert and remove logic on
    top of three syscalls that subclasses provide. Each syscall returns 0 or an errno."""

    REMOVE_FORCE = REMOVE_FORCE

    @abc.abstractmethod
    def compression(self) -> Optional[str]: ...

    @abc.abstractmethod
    def sys_finit_module(self, fd: int, params: str, flags: int) -> int: ...

    @abc.abstractmethod
    def sys_init_module(self, image: bytes, params: str) -> int: ...

    @abc.abstractmethod
    def sys_delete_module(self, name: str, flags: int) -> int: ...

    def _raise(self, err: int, what: str) -> None:
        """Turn a syscall's errno into :class:`KernelError` (the fake kernel adds its log)."""
        if err:
            raise KernelError(err, f"{what}: {os.strerror(err)}")

    def insert(self, module: ModuleSource, params: str = "", flags: int = 0) -> None:
        """Load a module from a path, an open :class:`ModuleFile` or an in-memory image.
        ``flags`` are ``MODULE_INIT_IGNORE_*``. Raises :class:`KernelError` with the errno
        libkmod would report."""
        force = flags & MODULE_INIT_FORCE_FLAGS
        if isinstance(module, (bytes, bytearray, memoryview)):
            self._init_from_memory(bytes(module), "<memory>", params, force)
            return
        path = module.path if isinstance(module, ModuleFile) else os.fspath(module)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError(exc.errno or errno.EIO, f"{path}: {exc.strerror}") from None
        try:
            try:
                head = os.pread(fd, _MAGIC_SIZE, 0)
            except OSError as exc:
                raise KernelError(exc.errno or errno.EIO, f"{path}: {exc.strerror}") from None
            if len(head) < _MAGIC_SIZE:
                raise KernelError(errno.EINVAL, f"{path}: too short to be a module")
            kind = _compression.detect(head)
            if kind is None or kind == self.compression():
                kernel_flags = force | (MODULE_INIT_COMPRESSED_FILE if kind else 0)
                err = self.sys_finit_module(fd, params, kernel_flags)
                if err != errno.ENOSYS:
                    self._raise(err, f"finit_module({path})")
                    return
            raw = _read_fd(fd)
        finally:
            os.close(fd)
        self._init_from_memory(raw, path, params, force)

    def _init_from_memory(self, raw: bytes, path: str, params: str, force: int) -> None:
        try:
            _kind, image = _compression.decompress(raw, path)
            data = bytes(image)
            if force:
                data = strip_for_force(
                    data,
                    ElfFile(data, path),
                    modversions=bool(force & MODULE_INIT_IGNORE_MODVERSIONS),
                    vermagic=bool(force & MODULE_INIT_IGNORE_VERMAGIC),
                )
        except (ModuleFormatError, struct.error) as exc:
            # libkmod fails to decompress or to parse for stripping: -EINVAL, nothing logged.
            raise KernelError(errno.EINVAL, f"{path}: {exc}") from None
        self._raise(self.sys_init_module(data, params), f"init_module({path})")

    def remove(self, name: str, flags: int = 0) -> None:
        """delete_module(name, O_NONBLOCK | (flags & O_TRUNC)), as kmod_module_remove_module."""
        self._raise(self.sys_delete_module(name, (flags & O_TRUNC) | O_NONBLOCK), f"delete_module({name})")


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


# -- libkmod's view of /proc/modules and /sys/module (kmod 30) ----------------------------------

KMOD_MODULE_BUILTIN = 0
KMOD_MODULE_LIVE = 1
KMOD_MODULE_COMING = 2
KMOD_MODULE_GOING = 3

LOG_ERR = 3
LOG_INFO = 6


class LibkmodLog(NamedTuple):
    """One message libkmod logs: priority, source file, line and function (as kmod 30 built by
    Debian reports them) and the text, which ends with a newline like kmod's."""

    priority: int
    file: str
    line: int
    function: str
    message: str


def _strtol(text: str) -> tuple[Optional[int], str]:
    """C strtol(text, &end, 10): (value, rest at end), value None when no digits were read."""
    match = re.match(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    if match is None:
        return None, text
    return int(match.group(1)), text[match.end() :]


def _c_isspace(char: str) -> bool:
    return char != "" and char in " \t\n\v\f\r"


class LibkmodView:
    """What libkmod 30 reads about loaded modules, with the same results for odd files and the
    same log messages: used by lsmod and rmmod so that they print what kmod's print. Paths in
    messages are the host's (``/sys/module/...``); the files are read under ``paths.root``."""

    def __init__(self, paths: HostPaths) -> None:
        self.paths = paths
        self.logs: list[LibkmodLog] = []

    def _log(self, line: int, function: str, message: str) -> None:
        self.logs.append(LibkmodLog(LOG_ERR, "../libkmod/libkmod-module.c", line, function, message))

    def take_logs(self) -> list[LibkmodLog]:
        logs, self.logs = self.logs, []
        return logs

    def _host(self, path: str) -> str:
        return self.paths.host(path)

    def _read_str_safe(self, fd: int) -> str:
        data = b""
        while len(data) < 31:
            chunk = os.read(fd, 31 - len(data))
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "surrogateescape")

    def _read_str_long(self, path: str) -> tuple[int, int]:
        """(err, value) as read_str_long: err is 0 or -errno; value is 0 when it fails."""
        fd = os.open(self._host(path), os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = self._read_str_safe(fd)
        except OSError as exc:
            return -(exc.errno or errno.EIO), 0
        finally:
            os.close(fd)
        value, rest = _strtol(text)
        if value is None or not _c_isspace(rest[:1]):
            return -errno.EINVAL, 0
        return 0, value

    def loaded_names(self) -> list[str]:
        """kmod_module_new_from_loaded: the first field of each /proc/modules line (split on
        spaces and tabs only, so a line without one keeps its newline). Raises OSError."""
        try:
            with open(os.path.join(self.paths.proc, "modules"), "rb") as handle:
                data = handle.read()
        except OSError as exc:
            self._log(
                1725,
                "kmod_module_new_from_loaded",
                f"could not open /proc/modules: {os.strerror(exc.errno or errno.EIO)}\n",
            )
            raise
        names = []
        for chunk in _fgets_chunks(data.decode("utf-8", "surrogateescape")):
            token = _strtok(chunk)
            if token is not None:
                names.append(modname_normalize(token))
        return names

    def initstate(self, name: str) -> int:
        """kmod_module_get_initstate without the built-in check: a KMOD_MODULE_* or -errno."""
        path = f"/sys/module/{name}/initstate"
        try:
            fd = os.open(self._host(path), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if os.path.isdir(self._host(f"/sys/module/{name}")):
                return KMOD_MODULE_COMING
            return -(exc.errno or errno.ENOENT)
        try:
            text = self._read_str_safe(fd)
        except OSError as exc:
            self._log(
                1835,
                "kmod_module_get_initstate",
                f"could not read from '{path}': {os.strerror(exc.errno or errno.EIO)}\n",
            )
            return -(exc.errno or errno.EIO)
        finally:
            os.close(fd)
        states = {"live\n": KMOD_MODULE_LIVE, "coming\n": KMOD_MODULE_COMING, "going\n": KMOD_MODULE_GOING}
        if text in states:
            return states[text]
        self._log(1847, "kmod_module_get_initstate", f"unknown {path}: '{text}'\n")
        return -errno.EINVAL

    def refcnt(self, name: str) -> int:
        """kmod_module_get_refcnt: the count, or -errno."""
        path = f"/sys/module/{name}/refcnt"
        try:
            err, value = self._read_str_long(path)
        except OSError as exc:
            return -(exc.errno or errno.ENOENT)
        if err < 0:
            self._log(1967, "kmod_module_get_refcnt", f"could not read integer from '{path}': '{os.strerror(-err)}'\n")
            return err
        return ctypes.c_int(value).value

    def size(self, name: str) -> int:
        """kmod_module_get_size: coresize, else the /proc/modules size field, else -errno."""
        directory = f"/sys/module/{name}"
        try:
            dfd = os.open(self._host(directory), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return -(exc.errno or errno.ENOENT)
        try:
            try:
                err, value = self._read_str_long(f"{directory}/coresize")
            except OSError:
                pass
            else:
                if err < 0:
                    self._log(1886, "kmod_module_get_size", f"failed to read coresize from {directory}\n")
                return ctypes.c_long(value).value
        finally:
            os.close(dfd)
        try:
            with open(os.path.join(self.paths.proc, "modules"), "rb") as handle:
                data = handle.read().decode("utf-8", "surrogateescape")
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        for lineno, chunk in enumerate(_fgets_chunks(data), start=1):
            rest = chunk
            token, rest = _strtok_rest(rest)
            if token is None or token != name:
                continue
            token, rest = _strtok_rest(rest)
            if token is None:
                self._log(1912, "kmod_module_get_size", f"invalid line format at /proc/modules:{lineno}\n")
                break
            number = re.fullmatch(r"[ \t\n\v\f\r]*[+-]?[0-9]+", token)
            if number is None:
                self._log(1919, "kmod_module_get_size", f"invalid line format at /proc/modules:{lineno}\n")
                break
            return int(token)
        return -errno.ENOENT

    def holders(self, name: str) -> list[str]:
        """kmod_module_get_holders: the names in /sys/module/NAME/holders, readdir order."""
        path = f"/sys/module/{name}/holders"
        try:
            entries = os.listdir(self._host(path))
        except OSError as exc:
            self._log(
                1998, "kmod_module_get_holders", f"could not open '{path}': {os.strerror(exc.errno or errno.EIO)}\n"
            )
            return []
        return [modname_normalize(entry) for entry in entries]


def _fgets_chunks(text: str) -> list[str]:
    """The pieces fgets(line, 4096, fp) returns: lines with their newline, at most 4095 chars."""
    chunks = []
    for line in text.splitlines(keepends=True):
        while len(line) > 4095:
            chunks.append(line[:4095])
            line = line[4095:]
        if line:
            chunks.append(line)
    return chunks


def _strtok_rest(text: str) -> tuple[Optional[str], str]:
    """strtok_r with the delimiters " \\t": (token or None, the rest after its delimiter)."""
    stripped = text.lstrip(" \t")
    if not stripped:
        return None, ""
    match = re.match(r"[^ \t]+", stripped)
    assert match is not None
    return match.group(0), stripped[match.end() + 1 :]


def _strtok(text: str) -> Optional[str]:
    return _strtok_rest(text)[0]
