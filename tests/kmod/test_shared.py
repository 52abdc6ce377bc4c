"""The one copy of what kvc.kmod and the framework share: module names (kvc.kmod.names), atomic
writes (kvc.kmod.atomic, which kvc.atomic re-exports) and streaming digests (kvc.kmod.digest)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvc.atomic
from kvc.kmod import atomic
from kvc.kmod.digest import file_sha256
from kvc.kmod.names import modname_from_path, modname_normalize, path_to_modname

PATH_PARTS = st.text(alphabet="ab-_./", max_size=12)


@given(PATH_PARTS)
def test_path_to_modname_is_the_normalized_basename(path: str) -> None:
    base = path.split("/")[-1]
    assert modname_from_path(path) == modname_normalize(base)
    assert path_to_modname(path) == (modname_normalize(base) if base else None)
    name = modname_normalize(path)
    assert "-" not in name and "." not in name and modname_normalize(name) == name


def test_framework_writes_through_kmods_atomic_write() -> None:
    assert kvc.atomic.write_file is atomic.write_file and kvc.atomic.fsync_path is atomic.fsync_path


@pytest.mark.parametrize("sync_directory", [True, False])
def test_atomic_write_replaces_whole_files_with_the_exact_mode(tmp_path: Path, sync_directory: bool) -> None:
    target = tmp_path / "sub" / "file"
    old_umask = os.umask(0o077)
    try:
        atomic.write_file(str(target), "first\udcff\n", 0o444, sync_directory=sync_directory)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"first\xff\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    atomic.write_file(str(target), b"second", sync_directory=sync_directory)
    assert target.read_bytes() == b"second" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["file"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "file"
    atomic.write_file(str(target), "old")

    def refuse(source: str, destination: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        atomic.write_file(str(target), "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (5 << 19) + 3])
def test_file_digest_across_chunk_boundaries(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "data"
    path.write_bytes(data)
    assert file_sha256(str(path)) == hashlib.sha256(data).digest()


def test_file_digest_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        file_sha256(str(tmp_path / "missing"))
