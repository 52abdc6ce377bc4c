"""What a path on the host is, as kvc's install and tree records name it: a regular file, a
symlink or a directory. Its own module so that the boot path's tree planning does not import
the installer."""

from __future__ import annotations

import enum
import os
import stat
from typing import Optional


class Kind(enum.Enum):
    FILE = "file"
    SYMLINK = "symlink"
    DIR = "dir"


def kind_of(path: str) -> Optional[Kind]:
    """The path's kind without following a symlink; None when it is missing or something else
    (a device, a socket, a FIFO)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    if stat.S_ISDIR(mode):
        return Kind.DIR
    return Kind.FILE if stat.S_ISREG(mode) else None
