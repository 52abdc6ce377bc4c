"""Benchmark: kvc kmod modinfo vs kmod's modinfo over every module of the Debian tree.

Both run in this process tree in one run, several times each; prints best and median wall times,
the ratio ours/C, and whether the outputs are identical.
Run: .venv/bin/python benchmarks/bench_modinfo.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.debian_kernel import debian_kernel
from support.oracle import kmod_tool


def timed(argv: list[str]) -> tuple[float, bytes]:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - started, proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    kernel = debian_kernel()
    files = [str(path) for path in kernel.modules()]
    kvc = str(Path(sys.executable).parent / "kvc")
    commands = {
        "C modinfo": [kmod_tool("modinfo"), *files],
        "kvc kmod modinfo": [kvc, "kmod", "modinfo", *files],
        "python -m kvc kmod modinfo": [sys.executable, "-m", "kvc", "kmod", "modinfo", *files],
    }
    results: dict[str, list[float]] = {}
    outputs: dict[str, bytes] = {}
    for _ in range(args.repeat):
        for label, argv in commands.items():
            elapsed, out = timed(argv)
            results.setdefault(label, []).append(elapsed)
            outputs[label] = out
    print(f"modinfo over {len(files)} modules of Debian {kernel.release}, {args.repeat} runs each, "
          f"{os.cpu_count()} CPUs")
    base = min(results["C modinfo"])
    for label, times in results.items():
        print(f"  {label:28s} best {min(times):.3f}s  median {statistics.median(times):.3f}s  "
              f"ratio {min(times) / base:.2f}x")
    same = all(out == outputs["C modinfo"] for out in outputs.values())
    print(f"  outputs identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
