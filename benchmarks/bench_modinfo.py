"""Benchmark: ``kvc kmod modinfo`` against kmod's C ``modinfo`` over every module of a Debian kernel.

In one run, each command gets all module files of a Debian kernel package in a single invocation,
several times, interleaved (after one warm-up round that is not counted). ``--tree 6.1`` (the
default) is Debian's current 6.1 kernel (``.ko`` files), ``--tree 6.12`` bookworm's newest 6.12
kernel (``.ko.xz`` files), ``--tree 6.1-arm64`` the arm64 package of the 6.1 ABI; each is
fetched with ``apt-get download`` once (tests/support/):

- ``modinfo FILE...``                     kmod's C tool
- ``kvc kmod modinfo FILE...``            the console script installed in this interpreter's venv
- ``python -m kvc kmod modinfo FILE...``  the same through ``python -m`` with this interpreter

It prints, as Markdown tables, best and median wall times, the ratio ours/C (best against best),
the best CPU time (user + system, workers included), and compares each command's stdout, stderr
and exit status with the C tool's, module by module; then the floors: the interpreter's start-up
and, for a compressed tree, xz's single-threaded decompression of every module alone. Exit
status: 0 when every output is identical, 1 when any differs, 2 on bad usage or a missing
prerequisite.

Run: ``.venv/bin/python benchmarks/bench_modinfo.py [--tree 6.1|6.12|6.1-arm64] [--repeat N] [--limit N]``
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kvc as kvc_package
from support.debian_headers import foreign_kernel
from support.debian_kernel import DebianKernel, arm64_kernel, debian_kernel
from support.oracle import kmod_tool

TREES: dict[str, Callable[[], DebianKernel]] = {"6.1": debian_kernel, "6.12": foreign_kernel, "6.1-arm64": arm64_kernel}


@dataclass(frozen=True)
class Output:
    returncode: int
    stdout: bytes
    stderr: bytes


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(argv: list[str]) -> tuple[float, float, Output]:
    """(wall seconds, CPU seconds of the command and its children, output)."""
    cpu = children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True)
    elapsed = time.perf_counter() - started
    return elapsed, children_cpu() - cpu, Output(proc.returncode, proc.stdout, proc.stderr)


def blocks(stdout: bytes) -> list[bytes]:
    """modinfo's output split per module: each module's block starts with its filename line."""
    result: list[bytes] = []
    for line in stdout.splitlines(keepends=True):
        if line.startswith(b"filename:") or not result:
            result.append(line)
        else:
            result[-1] += line
    return result


def mismatches(ours: Output, theirs: Output) -> list[str]:
    """What differs, one entry per module block (plus stderr and exit status)."""
    found = []
    mine, reference = blocks(ours.stdout), blocks(theirs.stdout)
    if len(mine) != len(reference):
        found.append(f"printed {len(mine)} module blocks where C modinfo printed {len(reference)}")
    for index, (a, b) in enumerate(zip(mine, reference)):
        if a != b:
            first = b.split(b"\n", 1)[0].decode(errors="replace")
            found.append(f"block {index + 1} ({first}) differs")
    if ours.stderr != theirs.stderr:
        found.append(f"stderr differs ({len(ours.stderr)} bytes, C modinfo {len(theirs.stderr)})")
    if ours.returncode != theirs.returncode:
        found.append(f"exit status {ours.returncode}, C modinfo {theirs.returncode}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description="kvc kmod modinfo vs kmod's modinfo over a real module tree.")
    parser.add_argument("--tree", choices=sorted(TREES), default="6.1", help="Debian kernel series (default 6.1)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N modules (default: all)")
    args = parser.parse_args()
    if args.repeat < 1 or args.limit < 0:
        parser.error("--repeat must be at least 1 and --limit not negative")

    kvc = Path(sys.executable).parent / "kvc"
    if not kvc.is_file():
        print(
            f"bench_modinfo: error: no kvc console script next to {sys.executable}; "
            "run with .venv/bin/python after bash scripts/setup.sh",
            file=sys.stderr,
        )
        return 2
    try:
        c_modinfo = kmod_tool("modinfo")
        kernel = TREES[args.tree]()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"bench_modinfo: error: {exc}", file=sys.stderr)
        return 2
    files = [str(path) for path in kernel.modules()]
    if args.limit:
        files = files[: args.limit]
    if not files:
        print(f"bench_modinfo: error: no modules found under {kernel.moddir}", file=sys.stderr)
        return 2

    # Timed as installed, byte-compiled: an editable install under PYTHONDONTWRITEBYTECODE would
    # compile every edited module at each run.
    compileall.compile_dir(Path(kvc_package.__file__).parent, quiet=1)
    commands = {
        "C modinfo": [c_modinfo, *files],
        "kvc kmod modinfo": [str(kvc), "kmod", "modinfo", *files],
        "python -m kvc kmod modinfo": [sys.executable, "-m", "kvc", "kmod", "modinfo", *files],
    }
    times: dict[str, list[float]] = {label: [] for label in commands}
    cpu_times: dict[str, list[float]] = {label: [] for label in commands}
    outputs: dict[str, Output] = {}
    unstable: set[str] = set()
    for round_ in range(args.repeat + 1):  # round 0 warms the page cache and is not counted
        for label, argv in commands.items():
            elapsed, cpu, output = run(argv)
            if round_:
                times[label].append(elapsed)
                cpu_times[label].append(cpu)
            if outputs.setdefault(label, output) != output:
                unstable.add(label)

    print(f"modinfo over {len(files)} modules of Debian {kernel.release} ({kernel.moddir})")
    print(
        f"{args.repeat} timed runs each, interleaved; Python {platform.python_version()} "
        f"({sys.executable}), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end"
    )
    base = min(times["C modinfo"])
    reference = outputs["C modinfo"]
    print()
    print("| command | best | median | ours/C | CPU (best) | output |")
    print("|---|--:|--:|--:|--:|---|")
    failed = False
    for label, runs in times.items():
        problems = [] if label == "C modinfo" else mismatches(outputs[label], reference)
        if label in unstable:
            problems.append("output differs from one run to the next")
        failed = failed or bool(problems)
        verdict = (
            "reference" if label == "C modinfo" else ("identical" if not problems else f"{len(problems)} MISMATCHES")
        )
        print(
            f"| `{label}` | {min(runs):.3f} s | {statistics.median(runs):.3f} s | {min(runs) / base:.2f}x "
            f"| {min(cpu_times[label]):.3f} s | {verdict} |"
        )
        for problem in problems[:10]:
            print(f"      {problem}")
        if len(problems) > 10:
            print(f"      ... and {len(problems) - 10} more")
    floors = {"interpreter start-up (`python -c pass`)": [sys.executable, "-c", "pass"]}
    xz = shutil.which("xz")
    if xz and all(name.endswith(".xz") for name in files):
        floors["xz decompression alone (`xz -dc -T1 FILE...`)"] = [xz, "-dc", "-T1", *files]
    print()
    print("| floor | best | CPU (best) |")
    print("|---|--:|--:|")
    for label, argv in floors.items():
        walls, cpus = zip(*(run(argv)[:2] for _ in range(args.repeat)))
        print(f"| {label} | {min(walls):.3f} s | {min(cpus):.3f} s |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
