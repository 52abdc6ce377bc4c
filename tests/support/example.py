"""The simple-kmod example installed as an instance under a KVC_ROOT: its conf, with the build
context pointing at examples/simple-kmod (the conf's own context is relative to the bundle)."""

from __future__ import annotations

from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "simple-kmod"


def write_example_conf(root: Path, name: str = "simple-kmod", extra: str = "") -> Path:
    """``root/etc/kvc/NAME.conf`` for the example, with ``extra`` lines appended (later keys win)."""
    conf = (
        (EXAMPLE / "simple-kmod.conf")
        .read_text()
        .replace("KMOD_CONTAINER_BUILD_CONTEXT=.", f"KMOD_CONTAINER_BUILD_CONTEXT={EXAMPLE}")
    )
    path = root / "etc" / "kvc" / f"{name}.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(conf + extra)
    return path
