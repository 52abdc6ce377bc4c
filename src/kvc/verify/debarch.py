"""Debian packages of another architecture than the host's (arm64 on an amd64 host), for
``kvc verify``: the target's kernel package, and the guest root of an arm64 VM -- a static busybox
and the Python that runs kvc's agent there.

apt reads the host's own sources through a configuration of kvc's own in the cache
(``/var/cache/kvc/apt/ARCH/apt.conf``: its package lists and archives there, ``APT::Architectures``
the host's and the target's), so the system's dpkg architectures, apt state and sources are
never touched. Packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``,
never installed; an unpacked set is kept (a ``.complete`` mark), so only the first run downloads
(:func:`unpack`, which also unpacks the host architecture's kernel packages, through the system's
apt).
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from kvc import proc
from kvc.arch import Arch
from kvc.atomic import write_file
from kvc.errors import CommandError, KernelMissingError

COMPLETE_MARK = ".complete"
# Debian's python3-minimal names the distribution's Python (python3.11-minimal on bookworm); these
# three packages of that version are the interpreter and its standard library.
PYTHON_META = "python3-minimal"
PYTHON_PACKAGES = ("python{v}-minimal", "libpython{v}-minimal", "libpython{v}-stdlib")
BUSYBOX_PACKAGE = "busybox-static"
APPLETS = ("/bin/sh", "/usr/sbin/chroot")
_PYTHON_VERSION = re.compile(r"\bpython(3\.[0-9]+)-minimal\b")
_ROOT_VERSION = re.compile(r"-python([0-9]+)\.([0-9]+)$")
_FIRST_NAME = re.compile(r"^\s*([a-z0-9][a-z0-9+.-]*)")


@dataclass(frozen=True)
class GuestPython:
    """Debian's Python of a foreign architecture, unpacked into a root the guest mounts as its own."""

    root: str  # on the host
    version: tuple[int, int]

    @property
    def executable(self) -> str:  # in the guest
        return f"/usr/bin/python{self.version[0]}.{self.version[1]}"

    @property
    def stdlib(self) -> str:  # in the guest
        return f"/usr/lib/python{self.version[0]}.{self.version[1]}"

    @property
    def path(self) -> list[str]:
        """The guest Python's module path (its standard library and extension modules)."""
        return [self.stdlib, f"{self.stdlib}/lib-dynload"]

    @property
    def busybox(self) -> str:  # on the host
        return os.path.join(self.root, "bin", "busybox")


def apt_environment(cache_dir: str, arch: Arch) -> dict[str, str]:
    """``APT_CONFIG`` naming kvc's own apt configuration for ``arch`` (written, and its lists
    fetched, on first use)."""
    state = os.path.join(cache_dir, "apt", arch.value)
    lists, caches = os.path.join(state, "lists"), os.path.join(state, "cache")
    for directory in (os.path.join(lists, "partial"), os.path.join(caches, "archives", "partial")):
        os.makedirs(directory, exist_ok=True)
    native = proc.run(["dpkg", "--print-architecture"]).stdout.strip()
    config = os.path.join(state, "apt.conf")
    text = (
        f'Dir::State::Lists "{lists}";\nDir::Cache "{caches}";\nAPT::Architectures {{ "{native}"; "{arch.value}"; }};\n'
    )
    if _read(config) != text:
        write_file(config, text)
    env = {"APT_CONFIG": config}
    if not glob.glob(os.path.join(glob.escape(lists), f"*_binary-{arch.value}_Packages*")):
        update(env)
    return env


def update(env: dict[str, str]) -> None:
    """``apt-get update`` of kvc's own lists (the host's sources), one kvc at a time (apt itself
    would make a second one fail on its lock rather than wait)."""
    with open(os.path.join(os.path.dirname(env["APT_CONFIG"]), ".update-lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc.run(["apt-get", "update", "-q"], env=env, hint="check the host's apt sources and network")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def known(env: dict[str, str], package: str) -> bool:
    """Whether kvc's lists name ``package`` (``NAME:ARCH``), updated first when they do not (kvc's
    lists are fetched when first needed, and a kernel released since is not in them)."""
    if package in _records(env, [package]):
        return True
    update(env)
    return package in _records(env, [package])


def _records(env: dict[str, str], packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """``apt-cache show`` of the candidate versions of ``packages`` (``NAME:ARCH``): ``NAME:ARCH``
    (the record's own architecture: ``all`` for architecture-independent ones) -> its fields.
    Names apt does not know are left out."""
    shown = proc.run(["apt-cache", "show", "--no-all-versions", *packages], env=env, check=False).stdout
    records: dict[str, dict[str, str]] = {}
    for paragraph in shown.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            records[f"{fields['Package']}:{fields.get('Architecture', '')}"] = fields
    return records


def library_closure(env: dict[str, str], roots: Sequence[str], arch: Arch) -> list[str]:
    """``roots`` (``NAME:ARCH``) and the libraries they need, from the packages' Depends and
    Pre-Depends (an alternative's first choice): only ``Multi-Arch: same`` packages of ``arch``,
    the libraries -- not tools (dpkg, tar) or architecture-independent data (tzdata,
    media-types), which the guest's interpreter does not need to run. apt answers the whole
    dependency tree once (each apt-cache run reads the lists: 1-2 s), kvc walks it."""
    skipped = ("recommends", "suggests", "conflicts", "breaks", "replaces", "enhances")
    tree = proc.run(
        ["apt-cache", "depends", "--recurse", *(f"--no-{kind}" for kind in skipped), *roots], env=env
    ).stdout
    suffix = f":{arch.value}"
    names = sorted({line for line in tree.splitlines() if line.endswith(suffix) and line[:1] not in (" ", "<")})
    records = _records(env, names)
    wanted, frontier = list(roots), list(roots)
    while frontier:
        found = []
        for name in frontier:
            record = records.get(name, {})
            depends = ", ".join(filter(None, (record.get("Pre-Depends"), record.get("Depends"))))
            for clause in depends.split(","):
                match = _FIRST_NAME.match(clause.split("|")[0])
                needed = f"{match.group(1)}{suffix}" if match else ""
                if needed in records and needed not in wanted and records[needed].get("Multi-Arch") == "same":
                    wanted.append(needed)
                    found.append(needed)
        frontier = found
    return wanted


def unpack(
    base: str,
    packages: Sequence[str],
    env: Optional[dict[str, str]],
    finish: Optional[Callable[[str], str]] = None,
) -> tuple[Optional[str], str]:
    """``base/tree``: ``packages`` downloaded (through kvc's own apt configuration ``env``, or the
    system's with None) and unpacked there once, then ``finish(tree)`` ("" or what went wrong),
    under a lock, with a ``.complete`` mark; (the tree, "") or (None, what went wrong). With kvc's
    own lists a download that fails is tried again after updating them (they may name versions
    the mirror has dropped since)."""
    root = os.path.join(base, "tree")
    if os.path.isfile(os.path.join(base, COMPLETE_MARK)):
        return root, ""
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, ".lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(base, COMPLETE_MARK)):
            return root, ""
        download = os.path.join(base, "download")
        for path in (download, root):
            shutil.rmtree(path, ignore_errors=True)
        os.makedirs(download)
        try:
            try:
                proc.run(["apt-get", "download", "-q", *packages], cwd=download, env=env)
            except CommandError:
                if env is None:
                    raise
                update(env)
                proc.run(["apt-get", "download", "-q", *packages], cwd=download, env=env)
            debs = sorted(glob.glob(os.path.join(glob.escape(download), "*.deb")))
            if len(debs) != len(packages):
                return None, f"apt-get download of {' '.join(packages)} gave {len(debs)} packages"
            for deb in debs:
                proc.run(["dpkg-deb", "-x", deb, root])
            problem = finish(root) if finish else ""
            if problem:
                return None, problem
        except CommandError as exc:
            last = exc.output_tail.strip().splitlines()
            return None, f"{' '.join(exc.argv[:3])} failed: {last[-1] if last else exc.brief}"
        finally:
            shutil.rmtree(download, ignore_errors=True)
        write_file(os.path.join(base, COMPLETE_MARK), "")
    return root, ""


def guest_python(cache_dir: str, arch: Arch) -> GuestPython:
    """Debian's Python and static busybox for ``arch``, unpacked (once) under
    ``cache_dir/guest-roots/ARCH-pythonX.Y``; KernelMissingError (the guest's files, like the
    kernel's) when apt cannot give them. A root once made is used as it is (asking apt which
    Python is current costs a second a run): removing it fetches the current one."""
    roots = os.path.join(cache_dir, "guest-roots")
    made = [
        GuestPython(os.path.join(os.path.dirname(mark), "tree"), (int(match[1]), int(match[2])))
        for mark in glob.glob(os.path.join(glob.escape(roots), f"{arch.value}-python*", COMPLETE_MARK))
        for match in [_ROOT_VERSION.search(os.path.dirname(mark))]
        if match
    ]
    guest = max(made, key=lambda made_root: made_root.version) if made else _fetch_guest_python(roots, arch)
    # The agent runs the smoke test with /bin/sh, chrooted into the image: busybox's applets,
    # linked as its package's own --install would (the root has no dash or coreutils).
    for applet in APPLETS:
        link = os.path.join(guest.root, applet.lstrip("/"))
        if not os.path.lexists(link):
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink("/bin/busybox", link)
    return guest


def _fetch_guest_python(roots: str, arch: Arch) -> GuestPython:
    hint = "kvc verify fetches them with apt-get from this host's Debian sources; check 'apt-get update' works"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise KernelMissingError(f"no apt-get and dpkg-deb here to fetch an {arch.value} guest's Python", hint=hint)
    env = apt_environment(os.path.dirname(roots), arch)
    meta = _records(env, [f"{PYTHON_META}:{arch.value}"]).get(f"{PYTHON_META}:{arch.value}", {})
    match = _PYTHON_VERSION.search(f"{meta.get('Pre-Depends', '')}, {meta.get('Depends', '')}")
    if match is None:
        raise KernelMissingError(f"{PYTHON_META}:{arch.value} names no Python in this host's apt sources", hint=hint)
    major, minor = (int(part) for part in match.group(1).split("."))
    base = os.path.join(roots, f"{arch.value}-python{major}.{minor}")
    packages = [
        *library_closure(env, [f"{name.format(v=match.group(1))}:{arch.value}" for name in PYTHON_PACKAGES], arch),
        f"{BUSYBOX_PACKAGE}:{arch.value}",
    ]
    root, problem = unpack(base, packages, env)
    if root is None:
        raise KernelMissingError(f"cannot fetch the {arch.value} guest's Python and busybox: {problem}", hint=hint)
    return GuestPython(root, (major, minor))
