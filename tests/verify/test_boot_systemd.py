"""kvc's unit at a real boot: Debian's real kernel under qemu with systemd 252 as PID 1 on this
host's root (tests/support/systemdvm.py).

The instance is examples/simple-kmod, built on this host with podman for Debian's current 6.1
kernel (and, for the kernel update, for Debian's newest 6.12). In the guest, kvc's podman uses
this host's container storage (seen through the guest's overlay root: tests/support/systemdvm.py),
so the unit's ``kmods-via-containers build NAME KVER`` finds the image up to date (an inspect) and ``load`` extracts the
modules through ``podman image mount`` as on a host; nothing is copied or built in the guest. The
guest's /etc/kvc holds only the instance's conf, ``kmods-via-containers@NAME.service`` is enabled
by ``systemctl enable`` (its ``default.target.wants`` link), and kvc is on the units' PATH as
``kmods-via-containers`` (links to this checkout's entry points).

- direct mode: the enabled unit loads both modules at boot, before the test's unit (ordered
  after it) runs; the test unit sees them in /proc/modules with their parameter, the unit
  active, and kvc's load lines in its journal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from support import systemdvm
from support.debian_kernel import DebianKernel
from support.example import unique_prefix, write_example_conf

pytestmark = [pytest.mark.vm, pytest.mark.podman]

MODULES = ("simple_kmod", "simple_procfs_kmod")


def kvc(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvc", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "KVC_ROOT": str(root)},
        timeout=900,
    )


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory, indexed_kernel_tree: DebianKernel) -> Iterator[str]:
    """simple-kmod under a unique name, its image built here for the kernel the guest boots."""
    for program in ("qemu-system-x86_64", "podman", "systemctl"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    with unique_prefix("kvcboot") as prefix:
        name = f"{prefix}-simple-kmod"
        root = tmp_path_factory.mktemp("build-root")
        write_example_conf(root, name)
        built = kvc(["build", name, "--kernel", indexed_kernel_tree.release], root)
        assert built.returncode == 0, built.stderr
        yield name


def guest_with_instance(tmp_path: Path, name: str, extra_conf: str = "") -> tuple[systemdvm.GuestFiles, str]:
    """The guest's files: the instance's conf, kvc's unit enabled for it, kvc on PATH, the
    container storage; the enabled unit's name."""
    files = systemdvm.GuestFiles(tmp_path / "guest")
    write_example_conf(files.root, name, extra_conf)
    unit = systemdvm.enable_instance(files, name)
    systemdvm.kvc_on_path(files)
    systemdvm.container_storage(files)
    return files, unit


def unit_report(unit: str) -> str:
    """Guest script lines that save the unit's state, status and journal into the report."""
    return (
        f'systemctl show -p ActiveState,Result,ActiveEnterTimestampMonotonic {unit} >"$report/unit.show"\n'
        f'systemctl show -p ExecMainStartTimestampMonotonic {systemdvm.TEST_SERVICE} >"$report/test.show"\n'
        f'systemctl status --no-pager -l {unit} >"$report/unit.status" 2>&1\n'
        f'journalctl -b -u {unit} -o short-monotonic --no-pager >"$report/unit.journal" 2>&1\n'
        'if [ "$failed" != 0 ]; then cat "$report/unit.status" "$report/unit.journal"; fi\n'
    )


def show(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_the_enabled_unit_loads_the_modules_at_boot(
    tmp_path: Path, instance: str, indexed_kernel_tree: DebianKernel
) -> None:
    files, unit = guest_with_instance(tmp_path, instance)
    script = (
        'cat /proc/modules >"$report/modules"\n'
        + "".join(f"check '{module} loaded' grep -q '^{module} ' /proc/modules\n" for module in MODULES)
        + "check 'parameter number=0' grep -qx 'simple-procfs-kmod number = 0' /proc/simple-procfs-kmod\n"
        + f"check 'unit active' systemctl is-active {unit}\n"
        + unit_report(unit)
    )
    systemdvm.add_test_units(files, script, after=[unit])
    booted = systemdvm.boot([indexed_kernel_tree], files, tmp_path)
    print(f"the guest ran {booted.seconds:.1f} s; {booted.markers()}")
    context = booted.context() + f"\n--- unit journal ---\n{booted.read('unit.journal')}"
    assert not booted.timed_out, context
    assert booted.read("failed").strip() == "0", context
    loaded = {line.split()[0]: line for line in booted.read("modules").splitlines()}
    for module in MODULES:
        assert loaded.get(module, "").endswith(" (OE)"), context
    state = show(booted.read("unit.show"))
    assert (state["ActiveState"], state["Result"]) == ("active", "success"), context
    started = int(show(booted.read("test.show"))["ExecMainStartTimestampMonotonic"])
    assert 0 < int(state["ActiveEnterTimestampMonotonic"]) < started, context
    journal = booted.read("unit.journal")
    assert f"KVC: build {instance} for {indexed_kernel_tree.release}" in journal, context
    assert f"KVC: load {instance} for {indexed_kernel_tree.release}" in journal, context
