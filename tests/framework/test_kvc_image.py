"""The kvc image (scripts/build-kvc-image.sh) and its unit (kvc-container@.service), for hosts
without Python: the unit verifies offline and runs the image with every documented mount; the image
has kvc and no compiler, and kvc inside it loads an instance whose image is in the HOST's container
storage (mounted in, as the unit does) into a fake kernel under a KVC_ROOT. That finit_module from
inside the container reaches a real kernel is tests/verify/test_container_load.py's part."""

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
from support.kvcimage import UNIT, build_kvc_image, unit_run_options

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
def test_the_unit_verifies_offline(tmp_path: Path) -> None:
    root = tmp_path / "root"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    shutil.copyfile(UNIT, units / "kvc-container@.service")
    for program in ("podman", "mkdir"):
        path = root / "usr" / "bin" / program
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    target = root / "usr" / "lib" / "systemd" / "system" / "sysinit.target"
    target.parent.mkdir(parents=True)
    target.write_text("[Unit]\nDescription=System Initialization\n")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", "kvc-container@simple-kmod.service"],
        capture_output=True,
        text=True,
    )
    assert (result.returncode, (result.stdout + result.stderr).strip()) == (0, "")


def test_the_unit_runs_the_image_with_the_documented_mounts() -> None:
    text = UNIT.read_text()
    options = unit_run_options()
    assert options[:3] == ["--rm", "--privileged", "--network=host"]
    mounts = dict(options[i + 1].split(":", 1) for i, arg in enumerate(options) if arg == "-v")
    for path in ("/lib/modules", "/sys", "/etc/kvc", "/var/lib/kvc", "/run/kvc", "/lib/firmware"):
        assert mounts[path].split(":")[0] == path, path
        assert re.search(rf"^#   {re.escape(path)}\b", text, re.MULTILINE), f"{path} is not explained"
    assert mounts["/var/lib/containers/storage"] == "/var/lib/containers/storage"
    for action in ("build", "load", "reload", "unload"):
        assert re.search(
            rf"^Exec\w+=/usr/bin/podman run \$KVC_CONTAINER_RUN \$\{{KVC_CONTAINER_IMAGE\}} {action} %i$",
            text,
            re.MULTILINE,
        )


@pytest.mark.podman
def test_kvc_in_its_image_loads_an_instance_from_the_hosts_storage(
    tmp_path: Path, indexed_kernel_tree: DebianKernel
) -> None:
    image = build_kvc_image()
    size = int(
        subprocess.run(
            ["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True, check=True
        ).stdout
    )
    print(f"{image}: {size / 1e6:.0f} MB")
    probe = subprocess.run(
        [
            "podman",
            "run",
            "--rm",
            "--entrypoint",
            "sh",
            image,
            "-c",
            "for p in gcc cc make python3; do command -v $p || echo no $p; done; kvc --help",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.splitlines()[:4] == ["no gcc", "no cc", "no make", "/usr/bin/python3"], probe.stdout
    assert "usage: kvc" in probe.stdout
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
    storage = ["-v", "/var/lib/containers/storage:/var/lib/containers/storage", "-v", "/run/containers:/run/containers"]
    # The example's conf names its build context on this host: mount the repository where it is.
    context = ["-v", f"{Path(__file__).resolve().parents[2]}:{Path(__file__).resolve().parents[2]}:ro"]
    moddir = f"{indexed_kernel_tree.moddir}:{indexed_kernel_tree.moddir}:ro"
    symvers = f"{indexed_kernel_tree.symvers}:{indexed_kernel_tree.symvers}:ro"  # the fake kernel's exports
    run = ["podman", "run", "--rm", "--privileged", *storage, *context, "-v", f"{root}:{root}", "-v", moddir,
           "-v", symvers, "-e", f"KVC_ROOT={root}", "-e", "KVC_KERNEL=fake", image]  # fmt: skip
    loaded = subprocess.run([*run, "load", name], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "loaded simple_kmod, simple_procfs_kmod" in loaded.stdout
    assert {m.name for m in FakeKernel(HostPaths(str(root))).loaded_modules()} == {"simple_kmod", "simple_procfs_kmod"}
    status = subprocess.run([*run, "status", name], capture_output=True, text=True)
    assert status.returncode == 0 and "simple_kmod: loaded" in status.stdout, status.stdout + status.stderr
    unloaded = subprocess.run([*run, "unload", name], capture_output=True, text=True)
    assert unloaded.returncode == 0, unloaded.stderr
    assert FakeKernel(HostPaths(str(root))).loaded_modules() == []
