"""Benchmark: size and start-up time of the single-file kvc against the Python one.

Builds (or takes from the build cache) ``scripts/build-onefile.sh --onedir`` into a temporary
directory, then times, interleaved after one untimed warm-up round, each of

- ``kvc --help`` (start-up and argparse only) and
- ``kvc kmod modinfo -F vermagic X.ko`` (a module of Debian's kernel package: kvc.kmod's reader)

for three builds: ``.venv/bin/kvc`` (this host's Python), the one file ``kvc`` (which unpacks its
bundle into $TMPDIR at every start and removes it at exit) and ``kvc-onedir/kvc`` (the same bundle
unpacked once, beside the executable). It prints the sizes, the best and median wall time of
each command and the ratio to the Python kvc's median, and checks that the outputs are the same.

Exit status: 0 outputs identical; 1 a difference or a failed build; 2 a missing prerequisite.
Run as root (the build debootstraps) after ``bash scripts/setup.sh``:
``.venv/bin/python benchmarks/bench_onefile.py [--repeat N]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.debian_kernel import debian_kernel

TOP = Path(__file__).resolve().parent.parent
PYTHON_KVC = Path(sys.executable).parent / "kvc"


def megabytes(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_size for p in files) / 1e6


def run(executable: Path, args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([str(executable), *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    # Python 3.10 renamed argparse's "optional arguments" heading; the bundle runs 3.9.
    output = proc.stdout.replace("\noptional arguments:\n", "\noptions:\n")
    return seconds, f"{proc.returncode}\n{output}{proc.stderr}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per command and build (default 20)")
    args = parser.parse_args()
    if not os.access(PYTHON_KVC, os.X_OK) or os.geteuid() != 0:
        print("bench_onefile: run as root, with .venv/bin/kvc (bash scripts/setup.sh)", file=sys.stderr)
        return 2
    module = debian_kernel().modules()[0]
    work = Path(tempfile.mkdtemp(prefix="kvc-bench-onefile-"))
    try:
        started = time.perf_counter()
        build = subprocess.run(
            ["bash", str(TOP / "scripts" / "build-onefile.sh"), "--onedir", "--output", str(work)],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:
            print(f"bench_onefile: the build failed: {build.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"build-onefile.sh --onedir: {time.perf_counter() - started:.1f} s")
        builds = {"python (.venv)": PYTHON_KVC, "onefile": work / "kvc", "onedir": work / "kvc-onedir" / "kvc"}
        print(f"  size: onefile {megabytes(work / 'kvc'):.1f} MB, onedir {megabytes(work / 'kvc-onedir'):.1f} MB")
        commands = {
            "kvc --help": ["--help"],
            f"kvc kmod modinfo -F vermagic {module.name}": ["kmod", "modinfo", "-F", "vermagic", str(module)],
        }
        times: dict[tuple[str, str], list[float]] = {(c, b): [] for c in commands for b in builds}
        outputs: dict[tuple[str, str], str] = {}
        for round_index in range(args.repeat + 1):
            for command, argv in commands.items():
                for name, executable in builds.items():
                    seconds, output = run(executable, argv)
                    outputs.setdefault((command, name), output)
                    if round_index:
                        times[(command, name)].append(seconds)
        same = True
        print(f"  {'command':<50} {'build':<15} {'best':>7} {'median':>7}  {'/python':>7}  output")
        for command in commands:
            reference = statistics.median(times[(command, "python (.venv)")])
            for name in builds:
                runs = times[(command, name)]
                identical = outputs[(command, name)] == outputs[(command, "python (.venv)")]
                same = same and identical
                print(
                    f"  {command:<50} {name:<15} {min(runs):6.3f}s {statistics.median(runs):6.3f}s "
                    f"{statistics.median(runs) / reference:7.2f}x  {'identical' if identical else 'DIFFERENT'}"
                )
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
