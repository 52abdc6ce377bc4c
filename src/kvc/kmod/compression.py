"""Module compression: detected by magic bytes (as libkmod does), decompressed with bounded memory."""

from __future__ import annotations

import io
import mmap
import zlib
from typing import Optional, Union

from kvc.kmod.errors import ModuleFormatError

XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"

# File name suffixes that mark module files, as kmod's kmod_exts lists them.
MODULE_SUFFIXES = (".ko", ".ko.gz", ".ko.xz", ".ko.zst")

# No kernel module comes close; the cap keeps a compression bomb from exhausting memory.
MAX_DECOMPRESSED = 512 * 1024 * 1024


def detect(data: Union[bytes, mmap.mmap]) -> Optional[str]:
    """The compression of ``data`` by its magic bytes: "xz", "zstd", "gzip" or None."""
    head = data[:6]
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return None


def decompress(data: Union[bytes, mmap.mmap], path: str) -> tuple[Optional[str], Union[bytes, mmap.mmap]]:
    """(compression, decompressed bytes); raw data passes through unchanged."""
    kind = detect(data)
    if kind is None:
        return None, data
    try:
        if kind == "xz":
            return kind, _xz(bytes(data))
        if kind == "gzip":
            return kind, _gzip(bytes(data))
        return kind, _zstd(bytes(data), path)
    except (zlib.error, EOFError, ValueError) as exc:
        raise ModuleFormatError(path, f"corrupt {kind} data: {exc}") from None


def _too_large(path: str) -> ModuleFormatError:
    return ModuleFormatError(path, f"decompresses to more than {MAX_DECOMPRESSED} bytes")


def _xz(data: bytes) -> bytes:
    import lzma  # here: most trees and most tools need no xz, and lzma costs a millisecond to import

    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        out = decoder.decompress(data, max_length=MAX_DECOMPRESSED + 1)
    except lzma.LZMAError as exc:
        raise ValueError(str(exc)) from None
    if len(out) > MAX_DECOMPRESSED:
        raise ValueError("output too large")
    if not decoder.eof:
        raise EOFError("truncated xz stream")
    return out


def _gzip(data: bytes) -> bytes:
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = decoder.decompress(data, MAX_DECOMPRESSED + 1)
    if len(out) > MAX_DECOMPRESSED:
        raise ValueError("output too large")
    if not decoder.eof:
        raise EOFError("truncated gzip stream")
    return out


def _zstd(data: bytes, path: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise ModuleFormatError(path, "zstd-compressed, and the Python package 'zstandard' is not installed") from None
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    chunks = []
    total = 0
    try:
        while True:
            chunk = reader.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_DECOMPRESSED:
                raise ValueError("output too large")
            chunks.append(chunk)
    except zstandard.ZstdError as exc:
        raise ValueError(str(exc)) from None
    if not total:
        raise EOFError("truncated zstd stream")
    return b"".join(chunks)


def compress(kind: str, data: bytes, path: str) -> bytes:
    """``data`` compressed as ``kind`` ("xz", "zstd", "gzip"), with the kernel's Makefile.modinst
    settings where Python allows (xz with CRC32 checks, zstd level 19 by default)."""
    if kind == "xz":
        import lzma

        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if kind == "gzip":
        import gzip

        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise ModuleFormatError(
                path, "zstd compression needs the Python package 'zstandard', which is not installed"
            ) from None
        return zstandard.ZstdCompressor(level=19).compress(data)
    raise ValueError(f"unknown compression {kind!r}")
