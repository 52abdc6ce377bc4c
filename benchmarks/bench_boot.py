"""Benchmark: the boot path. ``kvc load NAME`` of an instance whose image is built and already
extracted (what the systemd unit runs at every boot), and ``kvc status NAME``.

It sets up a root of its own with the fake kernel (``KVC_KERNEL=fake``), a small copy of Debian's
module tree and an instance built FROM the simple-kmod example's image with firmware, a modprobe.d
file and a udev rule (tests/support/faulthost.py, as the fault scripts do), builds it with kvc,
loads it once (the extraction) and unloads it. Then, ``--repeat`` times, interleaved: ``kvc unload``
(not timed), ``kvc load NAME`` (timed), ``kvc status NAME`` and ``kvc status NAME --json`` (timed).
``podman`` on PATH is a wrapper that records each call before running the real one, so the table
says how many times each command started the container runtime. The figures before (issue 15's
table) and the targets are printed beside the best and median wall times and the median CPU time
(user and system: a busy machine inflates it far less than the wall time), with the interpreter's
start-up as the floor. Exit status: 0 every target met; 1 a target missed or a command failed;
2 a missing prerequisite (podman, Debian's depmod).

Run: ``.venv/bin/python benchmarks/bench_boot.py [--repeat N] [--keep]``
"""

from __future__ import annotations

import argparse
import compileall
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kvc

# (label, kvc arguments after the name is put in, figure before, target), in seconds.
COMMANDS = (
    ("kvc load NAME (up to date)", ("load",), 0.2, 0.1),
    ("kvc status NAME", ("status",), 0.2, 0.1),
    ("kvc status NAME --json", ("status", "--json"), 0.2, 0.1),
)

PODMAN_WRAPPER = """#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
exec "{real}" "$@"
"""


class Timing(NamedTuple):
    wall: float
    cpu: float  # the command's user and system time: what a busy machine inflates far less


def timed(argv: list[str], env: dict[str, str]) -> Timing:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[2:])} exited {done.returncode}: {done.stderr.strip()}")
    return Timing(elapsed, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def podman_calls(log: Path) -> int:
    calls = len(log.read_text().splitlines()) if log.exists() else 0
    log.write_text("")
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="leave the work directory")
    args = parser.parse_args()
    real_podman = shutil.which("podman")
    if real_podman is None or shutil.which("depmod") is None:
        print("bench_boot: needs podman and Debian's depmod (apt-get install podman kmod)", file=sys.stderr)
        return 2
    from support.debian_kernel import indexed_debian_kernel
    from support.faulthost import (
        example_image,
        instance_conf,
        instance_name,
        new_host,
        podman,
        small_tree,
        write_bundle,
    )

    # Timed runs must not pay for byte-compiling kvc (an editable install under PYTHONDONTWRITEBYTECODE).
    compileall.compile_dir(Path(kvc.__file__).parent, quiet=1)
    work = Path(tempfile.mkdtemp(prefix="kvc-bench-boot-"))
    name = instance_name("boot")
    base = f"localhost/{name}-base:1"
    host = None
    try:
        kernel = indexed_debian_kernel()
        small_tree(kernel.moddir, work / "tree", kernel.release)
        podman("tag", example_image(kernel.release), base)
        write_bundle(work / "bundle", base)
        host = new_host(
            work, "host", name, kernel.release, work / "tree", kernel.symvers, instance_conf(work / "bundle")
        )
        host.ok("build", name)
        host.ok("load", name)
        host.ok("unload", name)
        wrappers = work / "bin"
        wrappers.mkdir()
        log = work / "podman.log"
        (wrappers / "podman").write_text(PODMAN_WRAPPER.format(log=log, real=real_podman))
        (wrappers / "podman").chmod(0o755)
        env = {**host.env(), "PATH": f"{wrappers}:{os.environ['PATH']}"}
        times: dict[str, list[Timing]] = {label: [] for label, *_rest in COMMANDS}
        calls: dict[str, int] = {label: 0 for label, *_rest in COMMANDS}
        floor: list[Timing] = []
        for _round in range(args.repeat + 1):
            floor.append(timed([sys.executable, "-c", "pass"], env))
            for label, command, _before, _target in COMMANDS:
                if command == ("load",):
                    subprocess.run(host.argv("unload", name), env=env, capture_output=True, check=True)
                podman_calls(log)
                times[label].append(timed(host.argv(command[0], name, *command[1:]), env))
                calls[label] += podman_calls(log)
        loaded = sorted(host.loaded())
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"bench_boot: {exc}", file=sys.stderr)
        return 1
    finally:
        if host is not None:
            host.kvc("unload", name)
        podman("rmi", "--ignore", base, host.tag if host else base, check=False)
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"kvc {kvc.__version__}, Python {sys.version.split()[0]} ({sys.executable}), {os.cpu_count()} CPUs, "
        f"kernel tree {kernel.release} (fake kernel), load average {os.getloadavg()[0]:.2f} at the end; "
        f"{args.repeat} timed runs each after one warm-up, modules loaded at the end: {', '.join(loaded) or 'none'}"
    )
    print()
    print("| command | best | median | CPU (median) | before | target | podman calls per run | met |")
    print("|---|---|---|---|---|---|---|---|")
    missed = 0
    for label, _command, before, target in COMMANDS:
        runs = [timing.wall for timing in times[label][1:]]
        cpu = statistics.median(timing.cpu for timing in times[label][1:])
        best = min(runs)
        met = best <= target and (label.startswith("kvc status") or calls[label] == 0)
        missed += not met
        per_run = calls[label] / len(times[label])
        print(
            f"| `{label}` | {best:.3f} s | {statistics.median(runs):.3f} s | {cpu:.3f} s | {before:.2f} s "
            f"| ≤ {target:.2f} s | {per_run:g} | {'yes' if met else 'NO'} |"
        )
    start = floor[1:]
    walls = [timing.wall for timing in start]
    cpu = statistics.median(timing.cpu for timing in start)
    print(
        f"| `{sys.executable} -c pass` (floor) | {min(walls):.3f} s | {statistics.median(walls):.3f} s "
        f"| {cpu:.3f} s | | | | |"
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
