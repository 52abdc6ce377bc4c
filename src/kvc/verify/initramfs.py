"""The verification VM's initramfs: a cpio ("newc") archive the guest kernel unpacks as its root.

It holds a static busybox, kvc's guest init (``data/vm-init``), the guest kernel's own virtio, 9p
and overlay modules (decompressed, in dependency order; Debian builds them as modules),
``boot.conf`` naming them and the command that starts kvc's agent, and the files the caller adds
(kvc's agent bundle, the modprobe the kernel's ``request_module()`` runs, modprobe
configuration). Everything else the guest runs comes from the host over 9p; the bundle is
compiled from the kvc installed on the host whenever that changes, so the code that runs in the
guest is the host's, not a copy that can drift.
"""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass
from importlib import resources
from typing import BinaryIO, Mapping, Sequence

from kvc.errors import KernelMissingError, MissingProgramError
from kvc.kmod.compression import decompress
from kvc.kmod.errors import KmodError
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.names import modname_from_path

# What the guest must load before it can mount its 9p shares and its module tree (an overlay).
BOOT_MODULE_ROOTS = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
BUSYBOX_CANDIDATES = ("/usr/lib/kvc/busybox", "/bin/busybox", "/usr/bin/busybox", "/sbin/busybox")

_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    path: str  # inside the archive, without a leading '/'
    mode: int  # file type and permission bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def write_cpio(out: BinaryIO, entries: Sequence[CpioEntry]) -> None:
    """Write ``entries`` and the trailer as a newc archive (the format the kernel unpacks)."""
    for inode, entry in enumerate([*entries, CpioEntry(_TRAILER, 0)], start=1):
        name = entry.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            inode if entry.path != _TRAILER else 0,
            entry.mode,
            0,
            0,
            nlink,
            0,
            len(entry.data),
            0,
            0,
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,
        )
        header = _NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        out.write(header + name + _pad(len(header) + len(name)))
        out.write(entry.data + _pad(len(entry.data)))


def find_busybox(candidates: Sequence[str] = BUSYBOX_CANDIDATES) -> str:
    """A statically linked busybox on the host (the initramfs has no libraries for a dynamic one)."""
    for path in candidates:
        try:
            with open(path, "rb") as handle:
                head = handle.read(1 << 16)
        except OSError:
            continue
        if head[:4] == b"\x7fELF" and b"/ld-linux" not in head and b"ld-musl" not in head:
            return path
    raise MissingProgramError(
        "no statically linked busybox found (looked in " + ", ".join(candidates) + ")",
        hint="install it: 'apt-get install busybox-static' (Debian) or 'dnf install busybox'",
    )


def boot_modules(moddir: ModuleDirectory, roots: Sequence[str] = BOOT_MODULE_ROOTS) -> list[tuple[str, str]]:
    """(file name, path) of ``roots`` and their dependencies from modules.dep, each once, deepest
    first. Roots the kernel has built in (modules.builtin) need nothing."""
    order: list[tuple[str, str]] = []
    seen: set[str] = set()
    for root in roots:
        entry = moddir.lookup_module(root)
        if entry is None or entry.path is None:
            if moddir.is_builtin(root):
                continue
            raise KernelMissingError(
                f"the guest kernel has no module {root} in {moddir.path}",
                hint="kvc verify needs a kernel with virtio-pci and 9p (built in or as modules)",
            )
        for path in [*reversed(entry.dependencies), entry.path]:
            name = modname_from_path(path)
            if name not in seen:
                seen.add(name)
                order.append((f"{name}.ko", path))
    return order


def _module_image(path: str) -> bytes:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        _, data = decompress(raw, path)
    except KmodError as exc:
        raise KernelMissingError(f"cannot read the guest kernel's module {path}: {exc}") from None
    return bytes(data)


def guest_init_script() -> bytes:
    return resources.files("kvc").joinpath("data/vm-init").read_bytes()


def build_initramfs(
    path: str,
    busybox: str,
    modules: Sequence[tuple[str, str]],
    settings: Mapping[str, str],
    files: Sequence[CpioEntry] = (),
) -> None:
    """Write the initramfs to ``path`` (a temporary file renamed into place); ``files`` go in
    after kvc's own (their directories must be among kvc's)."""
    with open(busybox, "rb") as handle:
        busybox_data = handle.read()
    conf = "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items())
    directory = stat.S_IFDIR | 0o755
    entries = [
        CpioEntry(name, directory)
        for name in (
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "kvc",
            "kvc/host",
            "kvc/work",
            "kvc/image",
            "kvc/agent",
            "kvc/kernel-modules",
            "kvc/modules",
            "kvc/modprobe.d",
            "kvc/rw",
        )
    ]
    entries += [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("kvc/busybox", stat.S_IFREG | 0o755, busybox_data),
        CpioEntry("init", stat.S_IFREG | 0o755, guest_init_script()),
        CpioEntry("kvc/boot.conf", stat.S_IFREG | 0o644, conf.encode()),
    ]
    entries += [
        CpioEntry(f"kvc/modules/{name}", stat.S_IFREG | 0o644, _module_image(source)) for name, source in modules
    ]
    entries += files
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as out:
            write_cpio(out, entries)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
