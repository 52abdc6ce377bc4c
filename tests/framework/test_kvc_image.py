"""The kvc image (scripts/build-kvc-image.sh) and its unit (kvc-container@.service), for hosts
without Python: the unit verifies offline and runs the image with the documented options; the image
is built once per session, is labelled and tagged, has kvc (``--help``, ``status``) and no compiler,
and kvc in it loads an instance whose image is in the HOST's container storage (mounted in, as the
unit does) into a fake kernel under a KVC_ROOT. That finit_module from inside the container reaches
a real kernel is tests/verify/test_container_load.py's part."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel
from support.example import write_example_conf
from support.kvcimage import SCRIPT, TOP, UNIT, build_kvc_image, run_options, unit_commands
from support.offlineunit import needs_systemd_analyze, prepare_root, verify_unit

# The run line the unit documents for hosts without Python, options and mounts in this order.
RUN_OPTIONS = [
    "--rm", "--privileged", "--network=host",
    "-v", "/lib/modules:/lib/modules:ro", "-v", "/sys:/sys", "-v", "/etc/kvc:/etc/kvc:ro",
    "-v", "/var/lib/kvc:/var/lib/kvc", "-v", "/run/kvc:/run/kvc", "-v", "/lib/firmware:/lib/firmware:ro",
    "-v", "/var/lib/containers/storage:/var/lib/containers/storage",
    "-v", "/run/containers/storage:/run/containers/storage",
]  # fmt: skip


def unit_root(tmp_path: Path) -> Path:
    """A root with the unit installed, the executables its commands name and sysinit.target: enough
    for an offline ``systemd-analyze verify``."""
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copyfile(UNIT, units / UNIT.name)
    return prepare_root(root, ("podman", "mkdir"))


def verify(root: Path) -> tuple[int, str]:
    return verify_unit(root, "kvc-container@simple-kmod.service")


@needs_systemd_analyze
def test_the_unit_verifies_offline(tmp_path: Path) -> None:
    assert verify(unit_root(tmp_path)) == (0, "")


@needs_systemd_analyze
def test_verify_sees_a_missing_podman(tmp_path: Path) -> None:
    root = unit_root(tmp_path)
    (root / "usr" / "bin" / "podman").unlink()
    status, said = verify(root)
    assert status != 0 and "Command /usr/bin/podman is not executable" in said


def test_the_unit_loads_at_start_and_unloads_at_stop_with_the_documented_run_line() -> None:
    lines = unit_commands()
    assert [setting for setting, _argv in lines] == ["ExecStartPre", "ExecStartPre", "ExecStart", "ExecStop"]
    mkdir = lines[0][1]
    assert mkdir[:2] == ["/usr/bin/mkdir", "-p"]
    # Get the image (a pull from the instance's registry, or a check), load at start, unload at stop.
    for (setting, argv), action in zip(lines[1:], ("build", "load", "unload")):
        assert run_options(argv) == RUN_OPTIONS, setting
        assert argv[-3:] == ["${KVC_CONTAINER_IMAGE}", action, "%i"], setting
    text = UNIT.read_text()
    assert "\nType=oneshot\n" in text and "\nRemainAfterExit=true\n" in text
    defaults = text.index("Environment=KVC_CONTAINER_IMAGE=localhost/kvc:latest\n")
    assert text.index("EnvironmentFile=-/etc/kvc/container.env\n") > defaults  # the file overrides
    sources = [RUN_OPTIONS[i + 1].split(":")[0] for i, option in enumerate(RUN_OPTIONS) if option == "-v"]
    for source in sources:
        assert re.search(rf"^#   .*{re.escape(source)}\b", text, re.MULTILINE), f"{source} is not explained"
    for option in ("--privileged", "--network=host"):
        assert re.search(rf"^#   {option} ", text, re.MULTILINE), f"{option} is not explained"
    for source in sources:
        if source not in ("/lib/modules", "/sys", "/etc/kvc", "/lib/firmware"):
            assert source in mkdir, f"{source} may not exist at the first start"


def test_the_script_says_how_and_refuses_bad_arguments() -> None:
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stderr.startswith("build-kvc-image.sh: build the kvc image")
    assert "Exit status: 0 built" in shown.stderr
    for argv in (["--bogus"], ["--tag"]):
        refused = subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True)
        assert refused.returncode == 2, argv
        assert len(refused.stderr.splitlines()) == 1 and refused.stderr.startswith("build-kvc-image: error: ")


@pytest.fixture(scope="module")
def kvc_image() -> str:
    return build_kvc_image()


def in_image(image: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "run", "--rm", "--entrypoint", "sh", image, "-c", script], capture_output=True, text=True
    )


def inspect(image: str, template: str) -> str:
    argv = ["podman", "image", "inspect", "--format", template, image]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.podman
def test_the_image_is_labelled_and_tagged(kvc_image: str) -> None:
    version = re.search(r'^__version__ = "(.*)"$', (TOP / "src" / "kvc" / "__init__.py").read_text(), re.MULTILINE)
    assert version and kvc_image == f"localhost/kvc:{version.group(1)}"
    print(f"{kvc_image}: {int(inspect(kvc_image, '{{.Size}}')) / 1e6:.0f} MB")
    assert inspect(kvc_image, "{{.Id}}") == inspect("localhost/kvc:latest", "{{.Id}}")
    labels = {
        key: inspect(kvc_image, f'{{{{index .Labels "org.opencontainers.image.{key}"}}}}')
        for key in ("title", "version", "revision")
    }
    assert labels["title"] == "kvc" and labels["version"] == version.group(1)
    # The image is rebuilt only when its sources change, so its commit may be an older one.
    assert re.fullmatch(r"[0-9a-f]{40}", labels["revision"]), labels
    ancestor = subprocess.run(["git", "-C", str(TOP), "merge-base", "--is-ancestor", labels["revision"], "HEAD"])
    assert ancestor.returncode == 0, labels["revision"]
    assert inspect(kvc_image, "{{.Config.Entrypoint}}") == "[/usr/local/bin/kvc]"


@pytest.mark.podman
def test_the_script_only_checks_when_nothing_changed(kvc_image: str) -> None:
    # Twice: the sources may have changed since the session's build (kvc's own tree is being worked on).
    runs = [subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert runs[1].stdout.strip() == kvc_image and "up to date" in runs[1].stderr
    assert len(runs[1].stderr.splitlines()) == 1, runs[1].stderr


@pytest.mark.podman
def test_kvc_runs_in_the_image_which_has_no_compiler(kvc_image: str) -> None:
    helped = subprocess.run(["podman", "run", "--rm", kvc_image, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: kvc"), helped.stderr
    status = subprocess.run(["podman", "run", "--rm", kvc_image, "status"], capture_output=True, text=True)
    # No conf in the image's /etc/kvc: an empty status, not an error.
    assert (status.returncode, status.stdout.strip().lower()) == (0, "no instances installed"), status.stderr
    probe = in_image(
        kvc_image,
        "for p in gcc cc make python3 podman modprobe kmods-via-containers; do command -v $p || echo no $p; done",
    )
    assert probe.stdout.split() == [
        "no", "gcc", "no", "cc", "no", "make", "/usr/bin/python3", "/usr/bin/podman", "/usr/sbin/modprobe",
        "/usr/local/bin/kmods-via-containers",
    ], probe.stdout + probe.stderr  # fmt: skip


@pytest.mark.podman
def test_kvc_in_its_image_loads_an_instance_from_the_hosts_storage(
    tmp_path: Path, indexed_kernel_tree: DebianKernel, kvc_image: str
) -> None:
    # A host: the example built into podman's default storage, a fake kernel of its release.
    root = tmp_path / "root"
    name = "simple-kmod"
    write_example_conf(root, name)
    env = {**os.environ, "KVC_ROOT": str(root)}
    built = subprocess.run(
        [sys.executable, "-m", "kvc", "build", name, "--kernel", indexed_kernel_tree.release],
        capture_output=True,
        text=True,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    (root / "lib" / "modules").mkdir(parents=True, exist_ok=True)
    (root / "lib" / "modules" / indexed_kernel_tree.release).symlink_to(indexed_kernel_tree.moddir)
    FakeKernel.create(HostPaths(str(root)), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers))
    # The host's storage as the unit mounts it.
    options = RUN_OPTIONS[RUN_OPTIONS.index("/lib/firmware:/lib/firmware:ro") + 1 :]
    # The example's conf names its build context on this host: mount the repository where it is.
    mounts = [f"{TOP}:{TOP}:ro", f"{root}:{root}", f"{indexed_kernel_tree.moddir}:{indexed_kernel_tree.moddir}:ro",
              f"{indexed_kernel_tree.symvers}:{indexed_kernel_tree.symvers}:ro"]  # fmt: skip
    run = ["podman", "run", "--rm", "--privileged", *options, *(f"--volume={m}" for m in mounts),
           "-e", f"KVC_ROOT={root}", "-e", "KVC_KERNEL=fake", kvc_image]  # fmt: skip
    loaded = subprocess.run([*run, "load", name], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "loaded simple_kmod, simple_procfs_kmod" in loaded.stdout
    assert {m.name for m in FakeKernel(HostPaths(str(root))).loaded_modules()} == {"simple_kmod", "simple_procfs_kmod"}
    status = subprocess.run([*run, "status", name], capture_output=True, text=True)
    assert status.returncode == 0 and "simple_kmod: loaded" in status.stdout, status.stdout + status.stderr
    unloaded = subprocess.run([*run, "unload", name], capture_output=True, text=True)
    assert unloaded.returncode == 0, unloaded.stderr
    assert FakeKernel(HostPaths(str(root))).loaded_modules() == []
