"""Benchmark: ``kvc kmod depmod`` against kmod's C ``depmod`` on a full Debian module tree.

``--tree 6.1`` (the default) is Debian's current 6.1 kernel (``.ko`` files), ``--tree 6.12``
bookworm's newest 6.12 kernel (``.ko.xz`` files), ``--tree 6.1-arm64`` the arm64 package of the 6.1
ABI; each is fetched with ``apt-get download`` once (tests/support/). In one run, on hard-link
copies of the tree (one per tool, outputs removed), each timed round runs:

- C ``depmod -C /dev/null -b ROOT KVER``
- ours, cold: the same through ``python -m kvc kmod depmod`` with an empty cache directory
- ours, warm: again with the cache the cold run left (unchanged tree)
- ours, uncached: ``--no-cache`` (parsing every module, no replay)

It prints, as a Markdown table, best and median wall times, ours/C ratios (best against best), the
best CPU time (user + system, workers included), the peak RSS of each
command (ru_maxrss of the child, and of the worst worker for the cold run), and checks that every
output file is byte-identical to kmod's. Exit status: 0 identical, 1 a mismatch, 2 a missing
prerequisite.

Run: ``.venv/bin/python benchmarks/bench_depmod.py [--tree 6.1|6.12|6.1-arm64] [--repeat N]``
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kvc
from kvc.kmod.depmod import OUTPUTS
from support.debian_headers import foreign_kernel
from support.debian_kernel import DebianKernel, arm64_kernel, debian_kernel
from support.oracle import kmod_tool

TREES: dict[str, Callable[[], DebianKernel]] = {"6.1": debian_kernel, "6.12": foreign_kernel, "6.1-arm64": arm64_kernel}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", choices=sorted(TREES), default="6.1", help="Debian kernel series (default 6.1)")
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()
    try:
        depmod = kmod_tool("depmod")
        kernel = TREES[options.tree]()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"missing prerequisite: {exc}", file=sys.stderr)
        return 2
    # Timed as installed, byte-compiled: an editable install under PYTHONDONTWRITEBYTECODE would
    # compile every edited module at each run.
    compileall.compile_dir(Path(kvc.__file__).parent, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="bench-depmod-"))
    try:
        roots = {}
        for who in ("c", "ours"):
            target = work / who / "lib" / "modules" / kernel.release
            shutil.copytree(kernel.moddir, target, copy_function=os.link)
            for name in OUTPUTS:
                (target / name).unlink(missing_ok=True)
            roots[who] = work / who
        env = dict(os.environ)
        base = ["-C", "/dev/null"]
        c_cmd = [depmod, *base, "-b", str(roots["c"]), kernel.release]
        ours = [sys.executable, "-m", "kvc", "kmod", "depmod", *base, "-b", str(roots["ours"])]
        cache = work / "cache"
        commands = {
            "C depmod": (c_cmd, None),
            "ours cold": ([*ours, f"--cache-dir={cache}", kernel.release], "cold"),
            "ours warm": ([*ours, f"--cache-dir={cache}", kernel.release], None),
            "ours --no-cache": ([*ours, "--no-cache", kernel.release], None),
        }
        # Warm-up, not timed: fills the page cache.
        subprocess.run(c_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu_times: dict[str, list[float]] = {name: [] for name in commands}
        peaks: dict[str, int] = {}
        for _round in range(options.repeat):
            for name, (argv, mode) in commands.items():
                if mode == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                # Each command is measured in a fresh child so that ru_maxrss is its own.
                probe = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        "import resource, subprocess, sys, time; t = time.perf_counter(); "
                        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
                        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
                        "print(time.perf_counter() - t, r.returncode, u.ru_maxrss, u.ru_utime + u.ru_stime)",
                        *argv,
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                elapsed_text, status_text, peak_text, cpu_text = probe.stdout.split()
                if int(status_text) != 0:
                    print(f"{name} failed with status {status_text}", file=sys.stderr)
                    return 1
                times[name].append(float(elapsed_text))
                cpu_times[name].append(float(cpu_text))
                peaks[name] = max(peaks.get(name, 0), int(peak_text))
        reference = min(times["C depmod"])
        print(
            f"{kernel.release}: {len(kernel.modules())} modules, {os.cpu_count()} CPUs, "
            f"Python {sys.version.split()[0]}, {options.repeat} rounds, "
            f"load average {os.getloadavg()[0]:.2f} at the end"
        )
        print()
        print("| command | best | median | ours/C | CPU (best) | peak RSS |")
        print("|---|--:|--:|--:|--:|--:|")
        for name, values in times.items():
            print(
                f"| {name} | {min(values):.3f} s | {statistics.median(values):.3f} s | "
                f"{min(values) / reference:.2f}x | {min(cpu_times[name]):.3f} s | {peaks[name] / 1024:.0f} MB |"
            )
        ours_dir = roots["ours"] / "lib" / "modules" / kernel.release
        c_dir = roots["c"] / "lib" / "modules" / kernel.release
        different = [n for n in OUTPUTS if (ours_dir / n).read_bytes() != (c_dir / n).read_bytes()]
        print("outputs: " + ("byte-identical to kmod" if not different else f"DIFFERENT: {', '.join(different)}"))
        return 1 if different else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
