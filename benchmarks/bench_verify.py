"""Benchmark: ``kvc verify`` wall time for the simple-kmod example, cold and warm.

Builds ``examples/simple-kmod`` for Debian's current kernel first (not timed; up to date after
the first run), then times ``kvc verify simple-kmod --kernel KVER``:

- cold: with an empty kernel cache (``KVC_CACHE_DIR`` a new directory), so the run includes
  ``apt-get download`` of the kernel package, ``dpkg-deb -x``, ``depmod`` and the KVM probe;
- warm: the same cache again, ``--repeat`` times (kernel unpacked, probe verdict cached).

It prints each time, the warm best and median, the boot and guest-agent times the report gives,
and the warm target (30 s). With ``--secure-boot`` it then times the same number of warm runs of
``kvc verify --secure-boot`` (the bzImage through OVMF with Secure Boot on and a throwaway
certificate enrolled; the example is unsigned, so the expected outcome is the kernel's refusal,
``unsigned-rejected``) and prints their extra cost over the PVH boot. Exit status: 0 every run
verified (refused as expected, with --secure-boot) and the warm median within the target; 1 a run
failed or the target was missed; 2 a missing prerequisite.

Run as root after ``bash scripts/setup.sh --containers``:
``.venv/bin/python benchmarks/bench_verify.py [--repeat N] [--secure-boot]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.debian_kernel import current_release
from support.example import write_example_conf

KVC = str(Path(sys.executable).parent / "kvc")
WARM_TARGET = 30.0


def kvc(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run([KVC, *argv], capture_output=True, text=True, env={**os.environ, **env})
    return time.perf_counter() - started, proc


def verify(release: str, env: dict[str, str], *extra: str) -> tuple[float, dict[str, Any]]:
    seconds, proc = kvc(["verify", "simple-kmod", "--kernel", release, "--json", *extra], env)
    if not proc.stdout:
        sys.exit(f"bench_verify: kvc verify printed no report: {proc.stderr.strip()}")
    report: dict[str, Any] = json.loads(proc.stdout)
    return seconds, report


def secure_boot_runs(
    release: str, env: dict[str, str], work: Path, repeat: int, pvh_median: float, pvh_boot: float
) -> bool:
    """Time ``repeat`` runs with --secure-boot; True when one did not end as expected."""
    cert = work / "sb.pem"
    subject = ["-subj", "/CN=kvc bench", "-keyout", str(work / "sb.key"), "-out", str(cert)]
    subprocess.run(
        ["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "1", *subject],
        check=True,
        capture_output=True,
    )
    failed = False
    walls: list[float] = []
    boots: list[float] = []
    print("  with --secure-boot (bzImage through OVMF, Secure Boot on; the unsigned example is refused):")
    for index in range(repeat):
        seconds, report = verify(release, env, "--secure-boot", "--sb-cert", str(cert))
        timings = report["timings"]
        verdicts = [module.get("signature") for module in report["modules"]]
        print(
            f"  {'sb ' + str(index + 1):<8} {seconds:6.1f}s {timings.get('boot_seconds') or 0:5.1f}s "
            f"{timings.get('guest_seconds') or 0:5.1f}s {timings['vm_seconds']:5.1f}s  {report['status']} {verdicts}"
        )
        failed = failed or verdicts[:1] != ["unsigned-rejected"]
        walls.append(seconds)
        boots.append(timings.get("boot_seconds") or 0.0)
    wall, boot = statistics.median(walls), statistics.median(boots)
    print(
        f"  --secure-boot median {wall:.1f} s (boot {boot:.1f} s): {wall - pvh_median:+.1f} s wall, "
        f"{boot - pvh_boot:+.1f} s kernel boot over the PVH boot (firmware time is outside the kernel's uptime)"
    )
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="warm runs (default 3)")
    parser.add_argument("--secure-boot", action="store_true", help="also time warm runs with --secure-boot (OVMF)")
    args = parser.parse_args()
    if not os.access(KVC, os.X_OK) or shutil.which("qemu-system-x86_64") is None:
        print("bench_verify: needs .venv/bin/kvc and qemu: run scripts/setup.sh --containers", file=sys.stderr)
        return 2
    release = current_release()
    work = Path(tempfile.mkdtemp(prefix="kvc-bench-verify-"))
    try:
        write_example_conf(work / "root")
        env = {"KVC_ROOT": str(work / "root"), "KVC_CACHE_DIR": str(work / "cache")}
        build_seconds, built = kvc(["build", "simple-kmod", "--kernel", release], env)
        if built.returncode != 0:
            print(f"bench_verify: build failed: {built.stderr.strip()}", file=sys.stderr)
            return 1
        print(f"kvc verify simple-kmod --kernel {release} (build beforehand: {build_seconds:.1f} s, not counted)")
        print(f"  {'run':<8} {'wall':>7} {'boot':>6} {'guest':>6} {'VM':>6}  status")
        failed = False
        warm: list[float] = []
        boots: list[float] = []
        for index in range(args.repeat + 1):
            seconds, report = verify(release, env)
            timings = report["timings"]
            label = "cold" if index == 0 else f"warm {index}"
            print(
                f"  {label:<8} {seconds:6.1f}s {timings.get('boot_seconds') or 0:5.1f}s "
                f"{timings.get('guest_seconds') or 0:5.1f}s {timings['vm_seconds']:5.1f}s  {report['status']}"
            )
            failed = failed or report["status"] != "verified"
            if index:
                warm.append(seconds)
                boots.append(timings.get("boot_seconds") or 0.0)
        median = statistics.median(warm)
        within = median <= WARM_TARGET
        print(
            f"  warm best {min(warm):.1f} s, median {median:.1f} s: "
            f"{'within' if within else 'OVER'} the {WARM_TARGET:.0f} s target ({median / WARM_TARGET:.2f}x of it)"
        )
        if args.secure_boot:
            failed = secure_boot_runs(release, env, work, args.repeat, median, statistics.median(boots)) or failed
        return 1 if failed or not within else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
