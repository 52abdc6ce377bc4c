"""The simple-kmod example, built for real.

* On the host: both modules compile against the installed ``/usr/src/linux-headers-KVER``
  with no compiler warnings, record KMODVER and the right vermagic; spkut compiles with
  ``-Wall -Wextra -Werror`` and rejects bad arguments.
* In podman (``-m podman``, as root): ``scripts/setup-podman.sh`` and
  ``scripts/bootstrap-base-image.sh`` run first (both are idempotent, so cheap once done),
  then the example's Containerfile is built for the current Debian kernel ABI with the build
  args kvc passes, cold (``--no-cache``), warm (every layer cached) and after a source change;
  the times are printed (``pytest -s``) and the image is checked with its own ``modinfo``.
* Through kvc (``-m podman``): the example installed under a ``KVC_ROOT`` is built with
  ``kvc build``, then ``kvc -v build --force`` rebuilds the unchanged sources with every step
  from podman's cache (kvc's pruning leaves the labelled build-stage image alone) into the very
  same image.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from support.example import write_example_conf

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "simple-kmod"
SCRIPTS = ROOT / "scripts"
KMODVER = "1.2.3-kvctest"
MODULES = ("simple-kmod", "simple-procfs-kmod")
RUNTIME = os.environ.get("KVC_CONTAINER_RUNTIME", "podman")


def current_headers_release() -> str:
    """The kernel release whose headers Debian's linux-headers-ARCH metapackage names."""
    if not shutil.which("apt-cache") or not shutil.which("dpkg"):
        pytest.skip("needs Debian's apt-cache and dpkg")
    arch = subprocess.run(["dpkg", "--print-architecture"], check=True, capture_output=True, text=True).stdout.strip()
    out = subprocess.run(
        ["apt-cache", "depends", f"linux-headers-{arch}"], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"Depends: linux-headers-(\d+\.\d+\.\d+-\d+-[a-z0-9]+)\b", out)
    if not match:
        pytest.skip(f"linux-headers-{arch} names no kernel release")
    return match.group(1)


def run(cmd: list[str], timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result


def timed(cmd: list[str], timeout: float = 900) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    result = run(cmd, timeout=timeout)
    return time.monotonic() - start, result


def uncached_steps(output: str) -> list[str]:
    """The build steps (other than FROM and LABEL) that the build did not take from its cache."""
    lines = output.splitlines()
    return [
        line
        for index, line in enumerate(lines)
        if re.search(r"STEP \d+/\d+: (?!FROM |LABEL )", line)
        and not (index + 1 < len(lines) and lines[index + 1].startswith("--> Using cache"))
    ]


def compiler_warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"\b(warning|error):", line)]


# ---- on the host ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    """The example's src/ built on the host: (kernel release, build directory, make output)."""
    kver = current_headers_release()
    kdir = Path("/usr/src") / f"linux-headers-{kver}"
    if not (kdir / "Makefile").exists():
        pytest.skip(f"{kdir} is not installed (apt-get install linux-headers-{kver})")
    if not shutil.which("make") or not shutil.which("gcc"):
        pytest.skip("needs make and gcc")
    build = tmp_path_factory.mktemp("simple-kmod") / "src"
    shutil.copytree(EXAMPLE / "src", build)
    start = time.monotonic()
    result = run(["make", f"KVER={kver}", f"KMODVER={KMODVER}", f"KDIR={kdir}", "all"], cwd=build)
    print(f"\nhost build of both modules and spkut: {time.monotonic() - start:.1f} s")
    return kver, build, result.stdout + result.stderr


def modinfo(path: Path | str, field: str, prefix: list[str] | None = None) -> str:
    return run([*(prefix or []), "modinfo", "-F", field, str(path)]).stdout.strip()


def test_host_modules_compile_cleanly(host_build: tuple[str, Path, str]) -> None:
    kver, build, output = host_build
    assert compiler_warnings(output) == []
    if not shutil.which("modinfo"):
        pytest.skip("needs modinfo (kmod)")
    for module in MODULES:
        ko = build / f"{module}.ko"
        assert ko.exists(), output
        assert modinfo(ko, "vermagic").split()[0] == kver
        assert modinfo(ko, "version") == KMODVER
        assert modinfo(ko, "license") == "GPL"
    assert "number:" in modinfo(build / "simple-procfs-kmod.ko", "parm")


def test_host_spkut_arguments(host_build: tuple[str, Path, str]) -> None:
    _, build, _ = host_build
    spkut = str(build / "spkut")
    for args in ([], ["1", "2"], ["abc"], ["12x"], [""], ["99999999999"]):
        result = subprocess.run([spkut, *args], check=False, capture_output=True, text=True)
        assert result.returncode == 2, (args, result)
        assert "usage: spkut N" in result.stderr
    if not Path("/proc/simple-procfs-kmod").exists():
        result = subprocess.run([spkut, "44"], check=False, capture_output=True, text=True)
        assert result.returncode == 1
        assert "cannot open /proc/simple-procfs-kmod: No such file or directory" in result.stderr


# ---- in a container image ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def container_ready() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (kvc uses rootful podman)")
    if RUNTIME == "podman":
        start = time.monotonic()
        result = run([str(SCRIPTS / "setup-podman.sh")])
        print(f"\nsetup-podman.sh: {time.monotonic() - start:.1f} s: {result.stderr.strip()}")
    elif not shutil.which(RUNTIME):
        pytest.skip(f"{RUNTIME} is not installed")
    start = time.monotonic()
    result = run([str(SCRIPTS / "bootstrap-base-image.sh")], timeout=900)
    print(f"bootstrap-base-image.sh: {time.monotonic() - start:.1f} s:\n{result.stderr.strip()}")


def all_image_ids() -> set[str]:
    out = run([RUNTIME, "images", "--all", "--quiet", "--no-trunc"]).stdout
    return set(out.split())


@pytest.mark.podman
def test_example_image(container_ready: None, tmp_path: Path) -> None:
    kver = current_headers_release()
    image = f"localhost/kvc-test-simple-kmod-{os.getpid()}:{kver}"
    context = tmp_path / "simple-kmod"
    shutil.copytree(EXAMPLE, context)
    build = [
        RUNTIME,
        "build",
        "-t",
        image,
        "--label",
        "name=kvc-test-simple-kmod",
        "--build-arg",
        f"KVER={kver}",
        "--build-arg",
        f"KMODVER={KMODVER}",
        "-f",
        str(context / "Containerfile"),
        str(context),
    ]
    before = all_image_ids()
    try:
        # A --no-cache build reuses nothing, and leaves its RUN layers (not its COPY layers)
        # for later builds; the next build after a source change redoes COPY and make.
        cold, result = timed([*build[:2], "--no-cache", *build[2:]])
        assert compiler_warnings(result.stdout + result.stderr) == []
        with (context / "src" / "simple-kmod.c").open("a") as source:
            source.write("/* a source change */\n")
        changed, _ = timed(build)
        warm, result = timed(build)
        assert uncached_steps(result.stdout) == [], result.stdout
        size = int(run([RUNTIME, "image", "inspect", "--format", "{{.Size}}", image]).stdout)
        print(
            f"\nimage build for {kver}: cold {cold:.1f} s, after a source change {changed:.1f} s, "
            f"warm {warm:.1f} s; image {size / 1e6:.0f} MB"
        )

        in_image = [RUNTIME, "run", "--rm", "--network=none", image]
        extra = f"/lib/modules/{kver}/extra"
        for module in MODULES:
            ko = f"{extra}/{module}.ko"
            vermagic = modinfo(ko, "vermagic", in_image)
            assert vermagic.startswith(f"{kver} "), vermagic
            assert modinfo(ko, "version", in_image) == KMODVER
        listing = run(
            [*in_image, "sh", "-c", f"ls {extra}; cat /lib/modules/{kver}/modules.dep; command -v spkut"]
        ).stdout
        assert listing.split() == [
            "simple-kmod.ko",
            "simple-procfs-kmod.ko",
            "extra/simple-kmod.ko:",
            "extra/simple-procfs-kmod.ko:",
            "/usr/local/bin/spkut",
        ]
        usage = subprocess.run([*in_image, "spkut"], check=False, capture_output=True, text=True)
        assert usage.returncode == 2
        assert "usage: spkut N" in usage.stderr
        labels = run([RUNTIME, "image", "inspect", "--format", "{{json .Labels}}", image]).stdout
        assert '"name":"kvc-test-simple-kmod"' in labels
    finally:
        # The tagged image and the untagged stage and cache images these builds made (each
        # --no-cache build makes a new ~400 MB build stage); images in use are left alone.
        subprocess.run([RUNTIME, "rmi", image], check=False, capture_output=True)
        new = sorted(all_image_ids() - before)
        if new:
            subprocess.run([RUNTIME, "rmi", *new], check=False, capture_output=True)


@pytest.mark.podman
def test_a_forced_kvc_rebuild_of_the_example_is_all_cache_hits(container_ready: None, tmp_path: Path) -> None:
    if RUNTIME != "podman":
        pytest.skip("kvc's default runtime is podman")
    kver = current_headers_release()
    name = f"kvctest-example-{uuid.uuid4().hex[:8]}"
    write_example_conf(tmp_path / "root", name)
    env = {**os.environ, "KVC_ROOT": str(tmp_path / "root")}
    kvc = [sys.executable, "-m", "kvc"]
    tag = f"localhost/{name}-1.0.0:{kver}"
    try:
        first = subprocess.run([*kvc, "build", name, "--kernel", kver], capture_output=True, text=True, env=env)
        assert first.returncode == 0, first.stderr
        assert "removed" not in first.stdout
        built = run([RUNTIME, "image", "inspect", "--format", "{{.Id}}", tag]).stdout.strip()
        start = time.monotonic()
        forced = subprocess.run(
            [*kvc, "-v", "build", name, "--kernel", kver, "--force"], capture_output=True, text=True, env=env
        )
        seconds = time.monotonic() - start
        assert forced.returncode == 0, forced.stderr
        assert forced.stdout.startswith(f"built {name}-1.0.0:{kver} ") and "removed" not in forced.stdout
        assert uncached_steps(forced.stderr) == [], forced.stderr
        assert forced.stderr.count("--> Using cache") >= 5, forced.stderr
        assert run([RUNTIME, "image", "inspect", "--format", "{{.Id}}", tag]).stdout.strip() == built
        print(f"\nkvc build --force of the unchanged example: {seconds:.1f} s")
    finally:
        subprocess.run([RUNTIME, "rmi", tag], check=False, capture_output=True)
        ids = run([RUNTIME, "images", "-a", "-q", "--filter", f"label=name={name}"]).stdout.split()
        if ids:
            subprocess.run([RUNTIME, "rmi", *sorted(set(ids))], check=False, capture_output=True)
