"""An example (examples/simple-kmod unless told) installed as an instance under a KVC_ROOT: its
conf, with the build context pointing at the example's directory (the conf's own context is
relative to the bundle)."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
EXAMPLE = EXAMPLES / "simple-kmod"
EDU_EXAMPLE = EXAMPLES / "edu-kmod"


def write_example_conf(root: Path, name: str = "simple-kmod", extra: str = "", example: Path = EXAMPLE) -> Path:
    """``root/etc/kvc/NAME.conf`` for the example, with ``extra`` lines appended (later keys win)."""
    conf = (
        (example / f"{example.name}.conf")
        .read_text()
        .replace("KMOD_CONTAINER_BUILD_CONTEXT=.", f"KMOD_CONTAINER_BUILD_CONTEXT={example}")
    )
    path = root / "etc" / "kvc" / f"{name}.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(conf + extra)
    return path


@contextlib.contextmanager
def unique_prefix(stem: str) -> Iterator[str]:
    """A fresh instance-name prefix ``STEM<hex>``; the images named after it (in podman's default
    storage) are removed afterwards."""
    prefix = f"{stem}{uuid.uuid4().hex[:6]}"
    try:
        yield prefix
    finally:
        ids = subprocess.run(
            ["podman", "images", "-q", "--filter", f"reference=*{prefix}*"], capture_output=True, text=True
        ).stdout.split()
        if ids:
            subprocess.run(["podman", "rmi", "-f", *sorted(set(ids))], capture_output=True)
