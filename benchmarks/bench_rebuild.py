"""Benchmark: ``kvc build NAME --force`` of the unchanged simple-kmod example (the build cache's worth).

Installs a copy of ``examples/simple-kmod`` under a fresh ``KVC_ROOT`` as an instance with a name
of its own (``kvcbench-PID``, so no other instance's images are touched), builds it once for
Debian's current kernel (not timed), then times ``--repeat`` forced rebuilds of the unchanged
sources. A forced rebuild runs the whole build again; with podman's layer cache intact every step
is a cache hit. The copy's Containerfile gets a ``LABEL kvc.bench=PID`` line after each ``FROM``,
so the first build makes every layer itself, as the only instance on a host does: otherwise it
could take its build stage from another instance's cache, whose images kvc's pruning never sees.
It prints each time and its summary line, the best and median, and the cache hits podman printed
in one more forced rebuild run with ``-v`` (which streams the build output). At the end it removes
the images its own builds made (its tags, and the untagged images labelled ``name=kvcbench-PID``).

Exit status: 0 every build succeeded; 1 a build failed; 2 a missing prerequisite.

Run as root after ``bash scripts/setup.sh --containers``:
``.venv/bin/python benchmarks/bench_rebuild.py [--repeat N]``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.debian_kernel import current_release
from support.example import EXAMPLE, write_example_conf

KVC = str(Path(sys.executable).parent / "kvc")


def kvc(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run([KVC, *argv], capture_output=True, text=True, env={**os.environ, **env})
    return time.perf_counter() - started, proc


def remove_images(name: str) -> None:
    """The benchmark's own images: tagged ones by tag, then the untagged ones its builds labelled."""
    listing = subprocess.run(
        ["podman", "images", "-a", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"label=name={name}"],
        capture_output=True,
        text=True,
    ).stdout.split()
    for ref in listing:
        if ref.startswith(f"localhost/{name}-"):
            subprocess.run(["podman", "rmi", ref], capture_output=True)
    ids = subprocess.run(
        ["podman", "images", "-a", "-q", "--filter", f"label=name={name}"], capture_output=True, text=True
    ).stdout.split()
    if ids:
        subprocess.run(["podman", "rmi", *sorted(set(ids))], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed forced rebuilds (default 3)")
    args = parser.parse_args()
    if not os.access(KVC, os.X_OK) or shutil.which("podman") is None or os.geteuid() != 0:
        print("bench_rebuild: needs root, podman and .venv/bin/kvc: run scripts/setup.sh --containers", file=sys.stderr)
        return 2
    release = current_release()
    name = f"kvcbench-{os.getpid()}"
    work = Path(tempfile.mkdtemp(prefix="kvc-bench-rebuild-"))
    try:
        context = work / "simple-kmod"
        shutil.copytree(EXAMPLE, context)
        containerfile = context / "Containerfile"
        containerfile.write_text(
            re.sub(r"^(FROM .*)$", rf"\1\nLABEL kvc.bench={os.getpid()}", containerfile.read_text(), flags=re.M)
        )
        write_example_conf(work / "root", name, f"KMOD_CONTAINER_BUILD_CONTEXT={context}\n")
        env = {"KVC_ROOT": str(work / "root")}
        first, built = kvc(["build", name, "--kernel", release], env)
        if built.returncode != 0:
            print(f"bench_rebuild: the first build failed: {built.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"kvc build {name} --kernel {release}: first build {first:.1f} s (not counted): {built.stdout.strip()}")
        times: list[float] = []
        for index in range(args.repeat):
            seconds, rebuilt = kvc(["build", name, "--kernel", release, "--force"], env)
            if rebuilt.returncode != 0:
                print(f"bench_rebuild: a forced rebuild failed: {rebuilt.stderr.strip()}", file=sys.stderr)
                return 1
            times.append(seconds)
            print(f"  --force {index + 1}: {seconds:6.1f} s  {rebuilt.stdout.strip()}")
        print(f"  best {min(times):.1f} s, median {statistics.median(times):.1f} s")
        _, verbose = kvc(["-v", "build", name, "--kernel", release, "--force"], env)
        hits = verbose.stderr.count("--> Using cache")
        steps = len(re.findall(r"STEP \d+/\d+:", verbose.stderr))
        print(f"  kvc -v build --force: {hits} cache hit(s) among {steps} step(s) in the streamed output")
        return 0
    finally:
        remove_images(name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
