"""A file's SHA-256, read in chunks so that a large file never sits in memory whole."""

from __future__ import annotations

import hashlib

_CHUNK = 1 << 20


def file_sha256(path: str) -> bytes:
    """The SHA-256 digest of the file's content (``.hex()`` gives the usual hex string).
    Raises OSError when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.digest()
