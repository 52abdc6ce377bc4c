"""Find the DKMS source tree in what the user gave: a directory holding ``dkms.conf``, a tarball of
one (plain, or DKMS's ``mktarball`` layout with ``dkms_source_tree/``), or a Debian ``*-dkms``
package (its ``usr/src/NAME-VERSION/``). Archives are unpacked by kvc itself into a scratch
directory: regular files, directories and links that stay inside the tree; nothing else, and
nothing outside the scratch directory."""

from __future__ import annotations

import enum
import io
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional

import zstandard

from kvc.errors import ConfigError

DKMS_CONF = "dkms.conf"
_AR_MAGIC = b"!<arch>\n"
_AR_HEADER = 60
# Archives are untrusted: refuse ones that would unpack to more than this.
MAX_UNPACKED_BYTES = 4 << 30
# What a damaged archive raises while it is read: tarfile passes its decompressors' errors through.
_CORRUPT_ARCHIVE = (tarfile.TarError, zstandard.ZstdError, EOFError, lzma.LZMAError, zlib.error)


class SourceKind(str, enum.Enum):
    DIRECTORY = "directory"
    TARBALL = "tarball"
    MKTARBALL = "DKMS mktarball"
    DEB = "Debian package"


@dataclass(frozen=True)
class DkmsSource:
    """The source tree (the directory holding dkms.conf) and what it came from."""

    tree: str
    kind: SourceKind
    given: str


def _bad(source: str, what: str, hint: str) -> ConfigError:
    return ConfigError(f"{source}: {what}", hint=hint)


def _safe_member_path(name: str, source: str) -> Optional[str]:
    """The member's path relative to the archive root, or None for the root itself; ConfigError for
    an absolute path or one that climbs out."""
    normalized = posixpath.normpath(name)
    if name.startswith("/") or normalized == ".." or normalized.startswith("../"):
        raise _bad(source, f"archive member {name!r} points outside the archive", "use an archive of the source tree")
    return None if normalized in (".", "") else normalized


def _unpack_tar(tar: tarfile.TarFile, destination: str, source: str, prefix: str = "") -> None:
    """Unpack the members below ``prefix`` (all when empty) into ``destination``."""
    total = 0
    links: list[tuple[str, str]] = []
    for member in tar:
        relative = _safe_member_path(member.name, source)
        if relative is None:
            continue
        if prefix and relative != prefix and not relative.startswith(prefix + "/"):
            continue
        target = os.path.join(destination, relative)
        if member.isdir():
            os.makedirs(target, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if member.issym() or member.islnk():
            links.append((relative, member.linkname if member.issym() else "/" + member.linkname))
            continue
        if not member.isreg():
            raise _bad(source, f"archive member {member.name!r} is not a file, directory or link", "remove it")
        total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise _bad(source, "the archive unpacks to more than 4 GiB", "give the DKMS source tree itself")
        data = tar.extractfile(member)
        if data is None:
            raise _bad(source, f"cannot read archive member {member.name!r}", "check the archive")
        with data, open(target, "xb") as out:
            shutil.copyfileobj(data, out)
        os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
    for relative, link in links:
        _place_link(destination, relative, link, source)


def _place_link(root: str, relative: str, link: str, source: str) -> None:
    """A symlink (``link`` relative to its directory) or a hard link (``link`` starting with '/',
    relative to the archive root) that stays inside the tree; a hard link becomes a copy."""
    if link.startswith("/"):
        inside = posixpath.normpath(link[1:])
        resolved = os.path.join(root, inside)
        if inside.startswith("../") or not os.path.isfile(resolved):
            raise _bad(
                source, f"hard link {relative!r} names {link[1:]!r}, not a file of the archive", "fix the archive"
            )
        with open(resolved, "rb") as data, open(os.path.join(root, relative), "xb") as out:
            out.write(data.read())
        os.chmod(os.path.join(root, relative), stat.S_IMODE(os.stat(resolved).st_mode))
        return
    inside = posixpath.normpath(posixpath.join(posixpath.dirname(relative), link))
    if link.startswith("/") or inside == ".." or inside.startswith("../"):
        raise _bad(source, f"symbolic link {relative!r} points outside the source tree ({link!r})", "fix the archive")
    os.symlink(link, os.path.join(root, relative))


def _ar_members(handle: BinaryIO, source: str) -> Iterator[tuple[str, int]]:
    """(name, size) of each member of an ar archive, the handle positioned at its data."""
    end = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    if handle.read(len(_AR_MAGIC)) != _AR_MAGIC:
        raise _bad(source, "not a Debian package (no ar header)", "give a .deb, a tarball or a directory")
    while True:
        header = handle.read(_AR_HEADER)
        if not header:
            return
        if len(header) != _AR_HEADER or header[58:60] != b"`\n":
            raise _bad(source, "truncated or corrupt Debian package", "download it again")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        field = header[48:58].strip()
        # Decimal digits only: int() also takes a sign, and a negative size would seek back forever.
        if not field.isdigit():
            raise _bad(source, "corrupt Debian package (member size)", "download it again")
        size = int(field)
        start = handle.tell()
        # A member cannot be larger than the rest of the file; reading its claimed size would
        # allocate that much memory first.
        if start + size > end:
            raise _bad(source, "truncated or corrupt Debian package", "download it again")
        yield name, size
        handle.seek(start + size + (size & 1))


def _open_data_tar(handle: BinaryIO, name: str, size: int, source: str) -> tarfile.TarFile:
    payload = handle.read(size)
    if name.endswith(".zst"):
        return _zstd_tar(payload)
    if name in ("data.tar", "data.tar.gz", "data.tar.xz", "data.tar.bz2"):
        return tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
    raise _bad(source, f"unsupported package payload {name}", "give the source tree or a tarball instead")


def _single_conf(candidates: list[str], root: str, source: str, where: str) -> str:
    if not candidates:
        raise _bad(
            source, f"no {DKMS_CONF} {where}", "give a DKMS source: a directory, tarball or package with dkms.conf"
        )
    if len(candidates) > 1:
        names = ", ".join(os.path.relpath(path, root) for path in sorted(candidates))
        raise _bad(source, f"more than one DKMS source in it ({names})", "unpack it and give one source directory")
    return os.path.dirname(candidates[0])


def _from_deb(path: str, scratch: str) -> DkmsSource:
    with open(path, "rb") as handle:
        for name, size in _ar_members(handle, path):
            if name.startswith("data.tar"):
                try:
                    with _open_data_tar(handle, name, size, path) as tar:
                        _unpack_tar(tar, scratch, path, prefix="usr/src")
                except (*_CORRUPT_ARCHIVE, OSError) as exc:
                    raise _bad(path, f"cannot unpack the package's {name}: {exc}", "download it again") from None
                break
        else:
            raise _bad(path, "the package has no data.tar member", "give a Debian binary package")
    src = os.path.join(scratch, "usr", "src")
    candidates = [
        os.path.join(src, entry, DKMS_CONF)
        for entry in (sorted(os.listdir(src)) if os.path.isdir(src) else [])
        if os.path.isfile(os.path.join(src, entry, DKMS_CONF))
    ]
    return DkmsSource(_single_conf(candidates, scratch, path, "below usr/src in the package"), SourceKind.DEB, path)


def _zstd_tar(compressed: bytes) -> tarfile.TarFile:
    """A zstd-compressed tar, decompressed as it is read (a stream): a small file can hold
    gigabytes of zeros, which must not all come into memory at once."""
    return tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed)), mode="r|")


def _open_tarball(path: str) -> tarfile.TarFile:
    if path.endswith((".zst", ".tzst")):
        with open(path, "rb") as raw:
            return _zstd_tar(raw.read())
    return tarfile.open(path, mode="r:*")


def _from_tarball(path: str, scratch: str) -> DkmsSource:
    try:
        with _open_tarball(path) as tar:
            _unpack_tar(tar, scratch, path)
    except _CORRUPT_ARCHIVE as exc:
        raise _bad(
            path, f"cannot unpack: {exc}", "give a tar archive (gzip, xz, bzip2 or zstd) or a directory"
        ) from None
    mktarball = os.path.join(scratch, "dkms_source_tree")
    if os.path.isdir(mktarball):
        if not os.path.isfile(os.path.join(mktarball, DKMS_CONF)):
            raise _bad(path, "its dkms_source_tree/ has no dkms.conf", "give a DKMS tarball made with its source")
        return DkmsSource(mktarball, SourceKind.MKTARBALL, path)
    if os.path.isdir(os.path.join(scratch, "dkms_main_tree")):
        raise _bad(path, "a binary-only DKMS tarball (no dkms_source_tree/)", "make the tarball with its source")
    candidates = [os.path.join(scratch, DKMS_CONF)] if os.path.isfile(os.path.join(scratch, DKMS_CONF)) else []
    if not candidates:
        candidates = [
            os.path.join(scratch, entry, DKMS_CONF)
            for entry in sorted(os.listdir(scratch))
            if os.path.isfile(os.path.join(scratch, entry, DKMS_CONF))
        ]
    return DkmsSource(
        _single_conf(candidates, scratch, path, "at its top or one directory down"), SourceKind.TARBALL, path
    )


def locate(path: str, scratch: str) -> DkmsSource:
    """The DKMS source tree of ``path``; archives are unpacked below ``scratch`` (empty, kvc's)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, DKMS_CONF)):
            raise _bad(
                path, f"no {DKMS_CONF} in this directory", "give the DKMS source directory (/usr/src/NAME-VERSION)"
            )
        return DkmsSource(os.path.abspath(path), SourceKind.DIRECTORY, path)
    if not os.path.isfile(path):
        raise _bad(path, "no such file or directory", "give a DKMS source directory, tarball or *-dkms .deb")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(_AR_MAGIC))
        if magic == _AR_MAGIC:
            return _from_deb(path, scratch)
        return _from_tarball(path, scratch)
    except PermissionError as exc:
        raise _bad(path, f"cannot read: {exc.strerror}", "run kvc as a user who can read it") from None
    except OSError as exc:
        raise _bad(
            path, f"cannot unpack: {exc}", "check the file and the free space in the temporary directory"
        ) from None
