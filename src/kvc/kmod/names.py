"""Module names as libkmod spells them: a file's basename up to the first '.', with '-' as '_'."""

from __future__ import annotations

from typing import Optional


def modname_normalize(name: str) -> str:
    """libkmod's modname_normalize: up to the first '.', with '-' as '_'."""
    return name.split(".", 1)[0].replace("-", "_")


def modname_from_path(path: str) -> str:
    """The normalized basename of a module's path ("" for a path ending in '/')."""
    return modname_normalize(path.rsplit("/", 1)[-1])


def path_to_modname(path: str) -> Optional[str]:
    """libkmod's path_to_modname: the normalized basename; None for a path ending in '/'."""
    return modname_from_path(path) if not path.endswith("/") and path else None
