"""A seeded mutation fuzzer over real Debian modules: whatever the bytes, reading a module either
works or raises kvc.kmod's own error — never another exception, never a hang."""

from __future__ import annotations

import lzma
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import zstandard

from kvc.kmod.errors import KmodError
from kvc.kmod.module import ModuleFile
from kvc.kmod.tools.modinfo import Options, Printer, signature_entries
from support.debian_kernel import DebianKernel

CASES = int(os.environ.get("KVC_FUZZ_CASES", "10000"))
SEED = int(os.environ.get("KVC_FUZZ_SEED", "20261124"))
# Generous: a case normally takes about a millisecond; anything slow is a hang in the making.
SLOW_CASE_SECONDS = 2.0


def seeds(kernel: DebianKernel, count: int = 24) -> list[bytes]:
    """Small real modules (fast to mutate), with and without signatures, plus compressed copies."""
    small = sorted((p for p in kernel.modules() if p.stat().st_size < 60_000), key=lambda p: p.name)
    chosen = random.Random(SEED).sample(small, count)
    raw = [path.read_bytes() for path in chosen]
    raw.append(lzma.compress(raw[0], format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
    raw.append(zstandard.ZstdCompressor().compress(raw[1]))
    return raw


def elf_field_offsets(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of the header and section-header fields that steer parsing."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return []
    fields = [(0x28, 8), (0x3A, 2), (0x3C, 2), (0x3E, 2)]
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    (shnum,) = struct.unpack_from("<H", data, 0x3C)
    for index in range(shnum):
        base = shoff + index * 64
        fields += [(base, 4), (base + 0x18, 8), (base + 0x20, 8)]
    return fields


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    choice = rng.randrange(8)
    if choice == 0:  # truncate anywhere
        return bytes(buf[: rng.randrange(len(buf) + 1)])
    if choice in (1, 2):  # a structural field gets an edge value
        fields = elf_field_offsets(data)
        if fields:
            offset, width = rng.choice(fields)
            value = rng.choice(
                [
                    0,
                    1,
                    0xFF,
                    0xFFFF,
                    0x7FFFFFFF,
                    0xFFFFFFFF,
                    (1 << (8 * width)) - 1,
                    len(data),
                    len(data) - 1,
                    rng.getrandbits(8 * width),
                ]
            )
            buf[offset : offset + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            return bytes(buf)
    if choice == 3:  # damage the signature trailer region
        for _ in range(rng.randrange(1, 6)):
            position = len(buf) - 1 - rng.randrange(min(len(buf), 700))
            buf[position] = rng.randrange(256)
        return bytes(buf)
    if choice == 4:  # overwrite a run with NULs or 0xFF
        start = rng.randrange(len(buf))
        buf[start : start + rng.randrange(1, 64)] = bytes([rng.choice([0, 0xFF])]) * rng.randrange(1, 64)
        return bytes(buf)
    for _ in range(rng.randrange(1, 16)):  # random byte flips
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def exercise(data: bytes) -> None:
    """Everything a tool reads from a module file."""
    module = ModuleFile("/fuzz/case.ko", data)
    printer = Printer(Options(None, "\n", False, None))
    entries = list(module.modinfo)
    entries.extend(signature_entries(module))
    printer.record(module.name, module.path, entries)
    _ = (
        module.vermagic,
        module.depends,
        module.parameters,
        module.this_module_name,
        module.exported_symbols,
        module.dependency_symbols,
        module.modversions,
    )


def test_mutation_fuzz_never_raises_foreign_exceptions(kernel_tree: DebianKernel) -> None:
    rng = random.Random(SEED)
    corpus = seeds(kernel_tree)
    failures: list[str] = []
    rejected = 0
    for case in range(CASES):
        original = rng.choice(corpus)
        data = mutate(original, rng)
        started = time.monotonic()
        try:
            exercise(data)
        except KmodError:
            rejected += 1
        except Exception as exc:  # the point of the test: anything else is a bug
            failures.append(f"case {case}: {type(exc).__name__}: {exc}")
        elapsed = time.monotonic() - started
        if elapsed > SLOW_CASE_SECONDS:
            failures.append(f"case {case}: took {elapsed:.1f}s")
    print(f"fuzz: {CASES} cases, {rejected} rejected cleanly, {len(failures)} failures")
    assert failures == []
    assert rejected > CASES // 20  # the mutations really do hit the parsers


def test_cli_reports_each_bad_file_on_one_line(kernel_tree: DebianKernel, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    corpus = seeds(kernel_tree, 8)
    paths = []
    for index in range(300):
        path = tmp_path / f"case{index}.ko"
        path.write_bytes(mutate(rng.choice(corpus), rng))
        paths.append(str(path))
    proc = subprocess.run([sys.executable, "-m", "kvc", "kmod", "modinfo", *paths], capture_output=True, timeout=120)
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line]
    assert all(line.startswith("modinfo: ERROR: ") for line in lines), lines[:5]
    assert lines, "no mutated file was rejected"
    assert proc.returncode == 1
