"""kvc's guest agent as one zip in the initramfs, run by this very Python as a zipapp.

Under emulation, starting the agent was mostly Python finding and reading modules over 9p: for
each of ~150 imports a search along ``sys.path`` (site-packages, a ``.pth``-added checkout), a
source file stat'ed against its ``.pyc`` (or compiled, when kvc's ``__pycache__`` is missing or
not writable), each a round trip through an emulated virtio device. The bundle holds kvc's
package and the standard-library modules the agent imports, compiled by the host's interpreter
into unchecked hash-based ``.pyc`` files (PEP 552: nothing is stat'ed or recompiled in the
guest), in RAM. The guest runs ``PYTHON -I -S /kvc/agent.pyz JOB`` with the same interpreter;
its ``__main__`` puts the host's ``sys.path`` behind the zip, so anything else (an optional
third-party module, a C extension) is found where the host finds it. The code that runs in the
guest is still this installation's: the bundle is rebuilt whenever a file it was made from
changes (its key covers every file's path, size and mtime, and the interpreter).

A guest of another architecture (an arm64 VM on an amd64 host) cannot run the host's Python: it
runs Debian's Python of its own architecture (:mod:`kvc.verify.debarch`), and the bundle then holds
that Python's standard-library modules (the same ones, read from its unpacked root) with kvc's
package, and puts that Python's own path behind the zip. Bytecode is the same on every
architecture, and the same for every release of one Python version (the magic number changes
within alphas and betas only), so when the host's Python has the guest's version the bundle is
compiled as for the host. Otherwise it holds the sources, which the guest compiles at each start
(zipimport caches nothing): correct, but slower under emulation.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import marshal
import os
import sys
import sysconfig
import zipfile
from typing import Iterator, Optional

import kvc
from kvc.atomic import write_file
from kvc.verify.debarch import GuestPython

# What the guest runs: the agent, and kvc's modprobe (the kernel's request_module() helper).
ENTRY_MODULES = ("kvc.verify.guest", "kvc.kmod.tools", "kvc.kmod.tools.modprobe")
KMOD_ARGUMENT = "kmod"
# Imported while the interpreter starts, before the zip is on sys.path: never served from it.
_STARTUP_PACKAGES = frozenset({"encodings"})
_SKIPPED_DIRS = frozenset({"__pycache__", "test", "tests", "idle_test"})
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed, so the same sources make the same bytes
_PYC_UNCHECKED_HASH = 0b01  # PEP 552 flags: hash-based, source not checked
KEEP_BUNDLES = 4  # one per Python a host verifies with, say

_MAIN = """\
import sys

sys.path[1:] = {path!r}
if sys.argv[1:2] == [{kmod!r}]:
    from kvc.kmod.tools import main

    sys.exit(main(sys.argv[2:]))
from kvc.verify.guest import main

sys.exit(main(sys.argv[1:]))
"""


def agent_command(bundle: str, guest: Optional[GuestPython] = None) -> list[str]:
    """The guest's command for the agent (the job file follows); ``+ [KMOD_ARGUMENT, "modprobe"]``
    is kvc's modprobe. ``-I``: no environment, no user site; ``-S``: the path is the bundle's."""
    return [guest.executable if guest else sys.executable, "-I", "-S", bundle]


def _package_files(directory: str, prefix: str) -> Iterator[tuple[str, str]]:
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(name for name in dirs if name not in _SKIPPED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield prefix + os.path.relpath(path, directory)[: -len(".py")].replace(os.sep, "/"), path


def _stdlib_module_files(stdlib: str, target: str) -> dict[str, str]:
    """The standard-library modules this process has imported (whole packages: a package only
    partly in the zip would hide the rest of it), outside site-packages, as files of the standard
    library in ``target`` (the host's own, or a guest Python's)."""
    found: dict[str, str] = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        top = name.partition(".")[0]
        if not isinstance(path, str) or not path.endswith(".py") or top in _STARTUP_PACKAGES or top in found:
            continue
        relative = os.path.relpath(path, stdlib)
        first = relative.split(os.sep, 1)[0]
        if first == os.pardir or first in ("site-packages", "dist-packages"):
            continue
        if os.sep in relative:
            found.update(_package_files(os.path.join(target, first), first + "/"))
        elif os.path.isfile(os.path.join(target, relative)):
            found[relative[: -len(".py")]] = os.path.join(target, relative)
    return found


def bundle_sources(guest: Optional[GuestPython] = None) -> dict[str, str]:
    """Archive name (without ``.pyc``) -> source file, for everything the bundle holds."""
    for name in ENTRY_MODULES:
        importlib.import_module(name)
    package = os.path.dirname(os.path.abspath(kvc.__file__))
    stdlib = sysconfig.get_paths()["stdlib"]
    target = guest.root + guest.stdlib if guest else stdlib
    sources = _stdlib_module_files(stdlib, target)
    sources.update(_package_files(package, "kvc/"))
    return sources


def _host_path() -> list[str]:
    """The host's module search path, without its first entry when that is the script's
    directory or the working directory (not isolated, not -P)."""
    path = list(sys.path)
    if path and not (sys.flags.isolated or getattr(sys.flags, "safe_path", False)):
        path = path[1:]
    return [entry for entry in path if os.path.isabs(entry)]


def _pyc(source: bytes, path: str) -> bytes:
    code = compile(source, path, "exec", dont_inherit=True, optimize=0)
    flags = _PYC_UNCHECKED_HASH.to_bytes(4, "little")
    return importlib.util.MAGIC_NUMBER + flags + importlib.util.source_hash(source) + marshal.dumps(code)


def _key(sources: dict[str, str], main: str, compiled: bool) -> str:
    digest = hashlib.sha256()
    executable = os.path.realpath(sys.executable)
    info = os.stat(executable)
    digest.update(f"{sys.version}\0{executable}\0{info.st_size}\0{info.st_mtime_ns}\0{main}\0{compiled}\0".encode())
    for name, path in sorted(sources.items()):
        stat = os.stat(path)
        digest.update(f"{name}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def _write_zip(sources: dict[str, str], main: str, compiled: bool) -> bytes:
    """The zip of ``sources`` and ``main``: compiled (``.pyc``), or the sources themselves."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, path in [*sorted(sources.items()), ("__main__", "")]:
            source = main.encode() if name == "__main__" else _read_bytes(path)
            if compiled:
                archive.writestr(zipfile.ZipInfo(f"{name}.pyc", _ZIP_TIME), _pyc(source, path or "__main__.py"))
            else:
                archive.writestr(zipfile.ZipInfo(f"{name}.py", _ZIP_TIME), source)
    return buffer.getvalue()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def agent_bundle(cache_dir: str, guest: Optional[GuestPython] = None) -> str:
    """The bundle for this kvc and this Python (or ``guest``'s), from the cache or made now
    (about a second)."""
    sources = bundle_sources(guest)
    main = _MAIN.format(path=guest.path if guest else _host_path(), kmod=KMOD_ARGUMENT)
    compiled = guest is None or guest.version == sys.version_info[:2]
    directory = os.path.join(cache_dir, "verify-agent")
    target = os.path.join(directory, f"{_key(sources, main, compiled)[:32]}.pyz")
    if os.path.isfile(target):
        os.utime(target)  # most recently used: kept by the pruning below
        return target
    write_file(target, _write_zip(sources, main, compiled), sync_directory=False)
    _prune(directory, target)
    return target


def _prune(directory: str, keep: str) -> None:
    """Remove all but the ``KEEP_BUNDLES`` most recently used bundles (another kvc may be pruning too)."""
    used = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.endswith(".pyz") and path != keep:
            with contextlib.suppress(FileNotFoundError):
                used.append((os.stat(path).st_mtime, path))
    for _, path in sorted(used, reverse=True)[KEEP_BUNDLES - 1 :]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
