"""Inputs that crashed a reader, hung it or broke its memory bound, found by scripts/fuzz.py or while
building it, rebuilt here from small synthetic ones: each must now end in the reader's documented
error (one line, exit 3)."""

from __future__ import annotations

import gzip
import io
import lzma
import random
import signal
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard

from kvc.config import InstanceConfig
from kvc.dkms.source import locate
from kvc.errors import ConfigError, ExitCode

DECOMPRESSOR_ERRORS = {"xz": lzma.LZMAError, "gz": zlib.error}


def _tar(compression: str) -> bytes:
    """A DKMS source tarball with one big text member (so the stream has Huffman blocks to damage)."""
    rng = random.Random(15)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randrange(2, 9))) for _ in range(300)]
    payload = b" ".join(rng.choice(words) for _ in range(40000))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in (("demo-1.0/dkms.conf", b"PACKAGE_NAME=demo\n"), ("demo-1.0/blob.txt", payload)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(out.getvalue()) if compression == "xz" else gzip.compress(out.getvalue(), mtime=0)


def _read_all(data: bytes) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            extracted = tar.extractfile(member)
            if extracted is not None:
                extracted.read()


def _damaged(compression: str) -> bytes:
    """The tarball with one byte flipped where tarfile itself lets the decompressor's error out
    (the headers parse; a member's data does not): the input class the fuzzer found."""
    good = _tar(compression)
    for offset in range(200, len(good) - 64, 97):
        bad = bytearray(good)
        bad[offset] ^= 0xFF
        try:
            _read_all(bytes(bad))
        except DECOMPRESSOR_ERRORS[compression]:
            return bytes(bad)
        except (tarfile.TarError, EOFError):
            continue
    raise AssertionError(f"no single-byte damage makes tarfile raise {DECOMPRESSOR_ERRORS[compression].__name__}")


def _deb(data_member: str, payload: bytes) -> bytes:
    def member(name: str, data: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    return b"!<arch>\n" + member("debian-binary", b"2.0\n") + member(data_member, payload)


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_a_package_whose_data_tar_is_corrupt_midway_is_a_config_error(tmp_path: Path, compression: str) -> None:
    # Found by fuzzing the Debian DKMS packages: lzma.LZMAError escaped from tarfile while a
    # member was copied out (zlib.error is the same for gzip).
    deb = tmp_path / "demo-dkms_1.0_all.deb"
    deb.write_bytes(_deb(f"data.tar.{compression}", _damaged(compression)))
    with pytest.raises(ConfigError) as raised:
        locate(str(deb), str(tmp_path / "scratch"))
    assert "cannot unpack the package's data.tar" in raised.value.brief
    assert raised.value.exit_code == ExitCode.CONFIG


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_a_tarball_corrupt_midway_is_a_config_error(tmp_path: Path, compression: str) -> None:
    tarball = tmp_path / f"demo-1.0.tar.{compression}"
    tarball.write_bytes(_damaged(compression))
    with pytest.raises(ConfigError) as raised:
        locate(str(tarball), str(tmp_path / "scratch"))
    assert "cannot unpack" in raised.value.brief


@pytest.mark.parametrize("keep", ["²", "³", "0", "-1", "1.5"])
def test_a_keep_kernels_value_that_is_not_a_plain_number_is_a_config_error(keep: str) -> None:
    # Found by fuzzing instance confs: str.isdigit() accepts '²', which int() refuses (ValueError).
    values = {"KMOD_CONTAINER_BUILD_CONTEXT": "/srv/ctx", "KMOD_SOFTWARE_VERSION": "1", "KMOD_NAMES": "demo"}
    with pytest.raises(ConfigError) as raised:
        InstanceConfig.from_values("demo", "/etc/kvc/demo.conf", {**values, "KVC_KEEP_KERNELS": keep})
    assert "KVC_KEEP_KERNELS" in raised.value.brief


@pytest.mark.parametrize("size", [b"-60", b"-1", b"+4", b"4_0", b""])
def test_an_ar_member_size_that_is_not_decimal_digits_is_a_config_error(tmp_path: Path, size: bytes) -> None:
    # -60 made the ar reader seek back to the same header forever (a hang): int() takes a sign.
    header = b"debian-binary".ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + b"100644".ljust(8)
    deb = tmp_path / "demo-dkms_1.0_all.deb"
    deb.write_bytes(b"!<arch>\n" + header + size.ljust(10) + b"`\n" + b"2.0\n")
    signal.alarm(10)  # a regression would loop forever
    try:
        with pytest.raises(ConfigError) as raised:
            locate(str(deb), str(tmp_path / "scratch"))
    finally:
        signal.alarm(0)
    assert "member size" in raised.value.brief


def test_an_ar_member_larger_than_the_file_is_a_config_error_not_a_memory_error(tmp_path: Path) -> None:
    # Found by fuzzing (seed 7): a size field of 9999999999 made read() allocate 9.3 GB first.
    payload = gzip.compress(b"x" * 100)
    deb = tmp_path / "demo-dkms_1.0_all.deb"
    deb.write_bytes(_deb("data.tar.gz", payload).replace(f"{len(payload):<10}`".encode(), b"9999999999`"))
    with pytest.raises(ConfigError) as raised:
        locate(str(deb), str(tmp_path / "scratch"))
    assert "truncated or corrupt Debian package" in raised.value.brief


def test_a_zstd_payload_of_a_gigabyte_of_zeros_is_read_in_bounded_memory(tmp_path: Path) -> None:
    # A data.tar.zst (or .tar.zst) was decompressed whole into memory: 32 KiB can hold 1 GiB.
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    bomb = b"".join(compressor.compress(bytes(1 << 20)) for _ in range(1024)) + compressor.flush()
    (tmp_path / "bomb-dkms_1.0_all.deb").write_bytes(_deb("data.tar.zst", bomb))
    (tmp_path / "bomb-1.0.tar.zst").write_bytes(bomb)
    script = (
        "import os, resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))\n"
        "from kvc.dkms.source import locate\n"
        "from kvc.errors import ConfigError\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        os.mkdir(f'{path}.scratch')\n"
        "        locate(path, f'{path}.scratch')\n"
        "    except ConfigError as exc:\n"
        "        print(exc.brief)\n"
    )
    paths = [str(tmp_path / "bomb-dkms_1.0_all.deb"), str(tmp_path / "bomb-1.0.tar.zst")]
    proc = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"{paths[0]}: no dkms.conf below usr/src in the package",
        f"{paths[1]}: no dkms.conf at its top or one directory down",
    ]


def test_module_parameters_with_an_unclosed_quote_are_a_config_error_for_kmm() -> None:
    # Found by fuzzing instance confs through 'kvc k8s module': shlex.split() raised ValueError
    # ("No closing quotation") for KVC_MODULE_PARAMS_demo='a="b'.
    from kvc.k8s.objects import FleetOptions, kmm_module
    from kvc.registry import Reference

    values = {"KMOD_CONTAINER_BUILD_CONTEXT": "/srv/ctx", "KMOD_SOFTWARE_VERSION": "1", "KMOD_NAMES": "demo"}
    instance = InstanceConfig.from_values("demo", "/etc/kvc/demo.conf", {**values, "KVC_MODULE_PARAMS_demo": 'a="b'})
    options = FleetOptions(repository=Reference.parse("registry.invalid/kmods/demo"))
    with pytest.raises(ConfigError) as raised:
        kmm_module(instance, ["6.1.0-1-amd64"], options)
    assert raised.value.brief.startswith("/etc/kvc/demo.conf: KVC_MODULE_PARAMS_demo cannot be split")
