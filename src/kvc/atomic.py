"""The framework's atomic file writes: :mod:`kvc.kmod.atomic`'s (kvc.kmod cannot import the
framework, so the one implementation lives there), plus JSON documents."""

from __future__ import annotations

import json

from kvc.kmod.atomic import fsync_path, remove_stale, temporary_prefix, write_file

__all__ = ["fsync_path", "remove_stale", "temporary_prefix", "write_file", "write_json"]


def write_json(path: str, data: object, *, volatile: bool = False) -> None:
    write_file(path, json.dumps(data, indent=2, sort_keys=True) + "\n", volatile=volatile)
