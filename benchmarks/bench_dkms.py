"""Benchmark: kvc against real DKMS on the same Debian ``*-dkms`` sources.

For each package (default: the five of tests/support/dkms.py), downloaded with ``apt-get download``
(never installed), against Debian's current 6.1 kernel (the headers ``linux-headers-amd64`` names):

- **DKMS on this host**: ``dkms add`` of the package's ``usr/src/NAME-VERSION`` (unpacked with
  ``dpkg-deb -x``), then ``dkms build -k KVER`` timed (0 built, 77 skipped by BUILD_EXCLUSIVE, else
  failed), then ``dkms remove --all`` and the ``/usr/src`` copy removed, unless the module was
  there before (then it is left alone and not measured). ``dkms`` itself is installed first when
  missing (``apt-get install --no-install-recommends dkms``).
- **DKMS in the build container**, the alternative to kvc's driver: a Containerfile whose build
  stage installs ``dkms`` with the compiler and headers and runs ``dkms add``/``dkms build``, then
  copies the modules out of ``/var/lib/dkms``. What ``dkms`` adds to that stage (the packages only it
  pulls, their installed size) is printed once.
- **kvc's driver**: the bundle ``kvc dkms import`` writes, built by podman the same way.
- **kvc**: ``kvc dkms import`` of the .deb, ``kvc install`` of the bundle under a scratch
  ``KVC_ROOT``, ``kvc build`` (image build with kvc's own dkms.conf driver, verification of every
  module's vermagic, tagging) and ``kvc verify`` on the real kernel in qemu; then ``kvc uninstall``.

Container builds run once untimed (the headers and dkms layers cached, as on any host that built
before), then once timed after a new file in the source, so the module step reruns: what a new
source version costs. Prints one table; exit 0 when it ran (the table says what failed), 2 on bad
usage or a missing prerequisite. Everything it creates (images, containers, DKMS tree entries,
scratch directories) is removed again; DKMS's own MOK key, if DKMS makes one, stays.

Run as root after ``bash scripts/setup.sh --containers``:
``.venv/bin/python benchmarks/bench_dkms.py [--packages a,b] [--kernel KVER] [--skip-host-dkms]
[--skip-container-dkms] [--skip-kvc]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kvc.images import LABEL_NAME
from support.debian_kernel import current_release
from support.dkms import PACKAGES, download

KVC = str(Path(sys.executable).parent / "kvc")
BASE_IMAGE = "localhost/debian:bookworm"
DKMS_CONTAINERFILE = """FROM {base} AS build
ARG KVER
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; \\
    apt-get install -y -q --no-install-recommends gcc libc6-dev make kmod dwarves patch dkms \\
        "linux-headers-${{KVER}}"; \\
    apt-get clean; rm -rf /var/lib/apt/lists/*
COPY src/ /usr/src/{name}-{version}/
RUN set -eu; dkms add -m {name} -v {version}; dkms build -m {name} -v {version} -k "$KVER"; \\
    mkdir -p /out; cp /var/lib/dkms/{name}/{version}/"$KVER"/$(uname -m)/module/*.ko* /out/

FROM {base}
COPY --from=build /out/ /out/
"""


@dataclass
class Row:
    package: str
    cells: dict[str, str] = field(default_factory=dict)


def run(argv: list[str], *, env: dict[str, str] | None = None) -> tuple[float, int, str, str]:
    """(seconds, exit status, stdout, stderr)."""
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    return time.perf_counter() - started, done.returncode, done.stdout, done.stderr


def cell(seconds: float, code: int, ok: str = "built", skipped: str = "skipped") -> str:
    what = ok if code == 0 else skipped if code == 77 else f"failed ({code})"
    return f"{what} {seconds:.1f} s"


def dkms_source(deb: Path, work: Path, release: str) -> tuple[Path, str, str]:
    """The package's source tree (dpkg-deb -x) and its PACKAGE_NAME and PACKAGE_VERSION, as kvc's
    import reads them in a container (the benchmark runs no dkms.conf on the host but DKMS's own)."""
    into = work / f"x-{deb.stem}"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    (tree,) = sorted((into / "usr" / "src").iterdir())
    _, code, out, err = run([KVC, "dkms", "import", str(deb), "-k", release, "--dry-run"])
    match = re.match(r"import the DKMS source (\S+)/(\S+) \(", out)
    if code != 0 or not match:
        raise SystemExit(f"bench_dkms: kvc dkms import --dry-run {deb.name} failed: {err.strip()}")
    return tree, match.group(1), match.group(2)


def host_dkms(tree: Path, name: str, version: str, release: str) -> str:
    status = subprocess.run(["dkms", "status", "-m", name], capture_output=True, text=True, check=False).stdout
    source = Path("/usr/src") / f"{name}-{version}"
    if status.strip() or source.exists():
        return "already on this host: not measured"
    shutil.copytree(tree, source, symlinks=True)
    try:
        _, code, _, err = run(["dkms", "add", "-m", name, "-v", version])
        if code != 0:
            return f"add failed ({code}): {err.strip()[-120:]}"
        seconds, code, _, _ = run(["dkms", "build", "-m", name, "-v", version, "-k", release])
        return cell(seconds, code)
    finally:
        run(["dkms", "remove", "-m", f"{name}/{version}", "--all"])
        shutil.rmtree(source, ignore_errors=True)


def timed_rebuild(context: Path, tag: str, release: str, version: str) -> str:
    """An untimed build (layers cached), then a timed one after a new file in src/."""
    argv = ["podman", "build", "-q", "--build-arg", f"KVER={release}", "--build-arg", f"KMODVER={version}"]
    _, code, _, err = run([*argv, "-t", tag, str(context)])
    if code != 0:
        return f"failed ({code}): {err.strip()[-120:]}"
    (context / "src" / ".bench-stamp").write_text(uuid.uuid4().hex)
    seconds, code, _, _ = run([*argv, "-t", tag, str(context)])
    return cell(seconds, code)


def container_dkms(tree: Path, name: str, version: str, release: str, work: Path, tag: str) -> str:
    context = work / f"dkms-{name}"
    shutil.copytree(tree, context / "src", symlinks=True)
    (context / "Containerfile").write_text(DKMS_CONTAINERFILE.format(base=BASE_IMAGE, name=name, version=version))
    return timed_rebuild(context, tag, release, version)


def dkms_pulls(release: str, work: Path, tag: str) -> str:
    """The packages the build stage has only for dkms (what purging it would autoremove) and their
    installed size: the build stage of the first package's Containerfile, from the build cache."""
    (context,) = sorted(work.glob("dkms-*"))[:1]
    _, code, _, err = run(
        ["podman", "build", "-q", "--build-arg", f"KVER={release}", "--target", "build", "-t", tag, str(context)]
    )
    if code != 0:
        return f"unknown: {err.strip()[-120:]}"
    script = (
        "apt-get -s purge --autoremove dkms | sed -n 's/^Purg \\([^ ]*\\).*/\\1/p' | sort"
        " | xargs dpkg-query -W -f '${Package} ${Installed-Size}\\n'"
    )
    _, code, out, err = run(["podman", "run", "--rm", "--network=none", tag, "sh", "-c", script])
    if code != 0:
        return f"unknown: {err.strip()[-120:]}"
    pulled = [line.split() for line in out.splitlines() if line.strip()]
    kib = sum(int(size) for _, size in pulled)
    return f"{len(pulled)} packages, {kib / 1024:.1f} MiB installed: {' '.join(name for name, _ in pulled)}"


def kvc_side(deb: Path, version: str, release: str, work: Path, prefix: str, row: Row) -> None:
    name = f"{prefix}-{deb.name.split('_')[0].removesuffix('-dkms')}"
    root = work / "root"
    env = {"KVC_ROOT": str(root)}
    bundle = work / name
    _, code, _, err = run(
        [KVC, "dkms", "import", str(deb), "--name", name, "--output", str(bundle), "-k", release], env=env
    )
    if code != 0:
        row.cells["kvc build"] = f"import failed ({code}): {err.strip()[-120:]}"
        return
    # kvc's driver alone, as the DKMS-in-container column is measured: podman build of the bundle.
    row.cells["kvc driver"] = timed_rebuild(bundle, f"localhost/{prefix}-driver-{name}:bench", release, version)
    try:
        _, code, _, err = run([KVC, "install", str(bundle)], env=env)
        if code != 0:
            row.cells["kvc build"] = f"install failed ({code}): {err.strip()[-120:]}"
            return
        _, code, _, err = run([KVC, "build", name, "-k", release], env=env)
        if code not in (0, 77):
            row.cells["kvc build"] = f"failed ({code}): {err.strip()[-120:]}"
            return
        (root / "etc" / "kvc" / "bundles" / name / "src" / ".bench-stamp").write_text(uuid.uuid4().hex)
        seconds, code, _, _ = run([KVC, "build", name, "-k", release], env=env)
        row.cells["kvc build"] = cell(seconds, code)
        if code != 0:
            return
        seconds, code, out, err = run([KVC, "verify", name, "-k", release, "--json"], env=env)
        try:
            report = json.loads(out)
        except ValueError:
            report = {"status": f"failed ({code}): {err.strip()[-120:]}"}
        refused = [m["name"] for m in report.get("modules", []) if not m.get("loaded", True)]
        verdict = str(report.get("status"))
        row.cells["kvc verify"] = f"{verdict}{' (' + ', '.join(refused) + ')' if refused else ''} {seconds:.1f} s"
    finally:
        run([KVC, "uninstall", name], env=env)
        remove_images(["--filter", f"label={LABEL_NAME}={name}"])


def remove_images(filters: list[str]) -> None:
    """Remove the images these podman filters select (only ones this run created: the filters name
    its own prefix or instance)."""
    ids = subprocess.run(["podman", "images", "-q", *filters], capture_output=True, text=True, check=False).stdout
    if ids.split():
        subprocess.run(["podman", "rmi", "-f", *sorted(set(ids.split()))], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", help="comma-separated Debian *-dkms packages (default: the tests' five)")
    parser.add_argument("--kernel", help="kernel release (default: the one linux-headers-amd64 depends on)")
    parser.add_argument("--skip-host-dkms", action="store_true")
    parser.add_argument("--skip-container-dkms", action="store_true")
    parser.add_argument("--skip-kvc", action="store_true")
    args = parser.parse_args()
    packages = args.packages.split(",") if args.packages else [p.deb for p in PACKAGES]
    for program in ("podman", "apt-get", "dpkg-deb", KVC):
        if not shutil.which(program):
            print(f"bench_dkms: {program} is missing: run scripts/setup.sh --containers", file=sys.stderr)
            return 2
    release = args.kernel or current_release()
    if not args.skip_host_dkms and not shutil.which("dkms"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "dkms"], check=True, capture_output=True
        )
    dkms_version = (
        subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "dkms"], capture_output=True, text=True, check=False
        ).stdout
        or "not installed"
    )
    prefix = f"kvcbench{uuid.uuid4().hex[:6]}"
    rows = []
    pulled = ""
    with tempfile.TemporaryDirectory(prefix="kvc-bench-dkms-") as scratch:
        work = Path(scratch)
        try:
            for package in packages:
                row = Row(package)
                rows.append(row)
                deb = download(package, work / "debs")
                tree, name, version = dkms_source(deb, work, release)
                if not args.skip_host_dkms:
                    row.cells["DKMS on host"] = host_dkms(tree, name, version, release)
                if not args.skip_container_dkms:
                    tag = f"localhost/{prefix}-dkms-{name}:bench"
                    row.cells["DKMS in container"] = container_dkms(tree, name, version, release, work, tag)
                    if not pulled:
                        pulled = dkms_pulls(release, work, f"localhost/{prefix}-dkms-stage:bench")
                if not args.skip_kvc:
                    kvc_side(deb, version, release, work, prefix, row)
                print(f"{package}: {row.cells}", file=sys.stderr)
        finally:
            remove_images(["--filter", f"reference=*{prefix}*"])
    columns = ["DKMS on host", "DKMS in container", "kvc driver", "kvc build", "kvc verify"]
    shown = [c for c in columns if any(c in r.cells for r in rows)]
    print(f"kernel {release}, dkms {dkms_version}, {os.cpu_count()} CPUs, {platform.machine()}")
    if pulled:
        print(f"dkms in the build stage: {pulled}")
    print("| package | " + " | ".join(shown) + " |")
    print("|---|" + "---|" * len(shown))
    for row in rows:
        print(f"| {row.package} | " + " | ".join(row.cells.get(c, "-") for c in shown) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
