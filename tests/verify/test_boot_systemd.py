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
- tree mode (``KVC_DELIVERY=tree``): the same at boot, the unit's load delivering the modules into
  /lib/modules/KVER/updates/kvc/NAME and indexing the tree with kvc's depmod; then Debian's own
  modprobe, on that tree, removes both modules and loads them again by name, simple-procfs-kmod
  with the option kvc wrote to /etc/modprobe.d/kvc-NAME.conf. Twice: on a writable tree (the
  package's tree under a tmpfs overlay), and on a read-only /lib/modules as OSTree and bootc hosts
  have, where kvc's load writes, enables and starts its overlay mount unit (upper layer in
  /var/lib/kvc/modules/KVER) and delivers through it.
- a kernel update: the guest has a Boot Loader Specification /boot (an entry for the kernel it
  runs) and kvc's kernel hooks as ``kvc install`` writes them; the "new kernel" is a real one,
  Debian's newest 6.12 package (bookworm offers it as linux-image-6.12-amd64), unpacked at
  /lib/modules/KVER with its vmlinuz there, as Fedora's and bootc's packages leave a kernel
  before kernel-install runs, and indexed (Debian's 50-depmod.install, which would index it again
  over 9p for 25 s, is masked). Its image was built on this host and pushed to the local TLS
  registry, then removed from this host's storage; the registry (its config, certificates and
  storage shared from this host) runs in the guest, which has no network. Before: ``kvc check
  --next-boot`` names the running kernel (the newest entry) and passes; asked about the new kernel
  it fails (exit 6, no image). ``kernel-install add KVER /lib/modules/KVER/vmlinuz`` runs kvc's
  plugin, whose ``kvc kernel-added KVER`` pulls the image from the registry; kernel-install writes
  the new entry; then ``kvc check --next-boot`` names the new kernel and passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from support import systemdvm
from support.debian_headers import newest_foreign_release
from support.debian_kernel import DebianKernel, indexed_kernel_package
from support.example import unique_prefix, write_example_conf
from support.registry import LocalRegistry

pytestmark = [pytest.mark.vm, pytest.mark.podman]

MODULES = ("simple_kmod", "simple_procfs_kmod")


def kvc(args: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    """This checkout's kvc on this host, with ``root`` as KVC_ROOT."""
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


@pytest.mark.parametrize("readonly", [False, True], ids=["writable-tree", "read-only-tree"])
def test_tree_mode_delivers_at_boot_and_modprobe_finds_the_modules(
    tmp_path: Path, instance: str, indexed_kernel_tree: DebianKernel, readonly: bool
) -> None:
    files, unit = guest_with_instance(tmp_path, instance, "\nKVC_DELIVERY=tree\n")
    release = indexed_kernel_tree.release
    overlay = (
        f"mount=$(systemd-escape --path --suffix=mount /usr/lib/modules/{release})\n"
        'check "the tree\'s overlay mount is active" systemctl is-active "$mount"\n'
        'check "the tree\'s overlay mount is enabled" systemctl is-enabled "$mount"\n'
        f"run findmnt findmnt -n -o FSTYPE,OPTIONS /usr/lib/modules/{release}\n"
        f"run upper find /var/lib/kvc/modules/{release}/upper -type f -name '*.ko'\n"
        if readonly
        else ""
    )
    script = (
        'cat /proc/modules >"$report/modules"\n'
        + "".join(f"check '{module} loaded' grep -q '^{module} ' /proc/modules\n" for module in MODULES)
        + f"check 'unit active' systemctl is-active {unit}\n"
        + f"run delivered find /lib/modules/{release}/updates -type f\n"
        + f"run indexed grep -F updates/kvc/ /lib/modules/{release}/modules.dep\n"
        + f"run options cat /etc/modprobe.d/kvc-{instance}.conf\n"
        + "run remove /sbin/modprobe -r simple-procfs-kmod simple-kmod\n"
        + 'cat /proc/modules >"$report/modules.after-remove"\n'
        + "run modprobe /sbin/modprobe -v simple-procfs-kmod\n"
        + "run modprobe-second /sbin/modprobe -v simple-kmod\n"
        + 'cat /proc/modules >"$report/modules.after-modprobe"\n'
        + "run procfs cat /proc/simple-procfs-kmod\n"
        + overlay
        + unit_report(unit)
    )
    systemdvm.add_test_units(files, script, after=[unit])
    booted = systemdvm.boot([indexed_kernel_tree], files, tmp_path, readonly_modules=readonly)
    print(f"the guest ran {booted.seconds:.1f} s; {booted.markers()}")
    context = (
        booted.context()
        + "".join(f"\n--- {name} ---\n{booted.output(name)}" for name in ("delivered", "indexed", "remove", "modprobe"))
        + f"\n--- unit journal ---\n{booted.read('unit.journal')[-5000:]}"
    )
    assert not booted.timed_out, context
    assert booted.read("failed").strip() == "0", context
    state = show(booted.read("unit.show"))
    assert (state["ActiveState"], state["Result"]) == ("active", "success"), context
    started = int(show(booted.read("test.show"))["ExecMainStartTimestampMonotonic"])
    assert 0 < int(state["ActiveEnterTimestampMonotonic"]) < started, context
    place = f"/lib/modules/{release}/updates/kvc/{instance}"
    assert sorted(booted.read("delivered.out").split()) == [
        f"{place}/simple-kmod.ko",
        f"{place}/simple-procfs-kmod.ko",
    ], context
    assert f"updates/kvc/{instance}/simple-kmod.ko:" in booted.read("indexed.out"), context
    assert "options simple_procfs_kmod number=0" in booted.read("options.out").replace("-", "_"), context
    assert booted.status("remove") == 0, context
    assert not {"simple_kmod", "simple_procfs_kmod"} & {
        line.split()[0] for line in booted.read("modules.after-remove").splitlines()
    }, context
    assert booted.status("modprobe") == 0 and booted.status("modprobe-second") == 0, context
    assert f"insmod {place}/simple-procfs-kmod.ko number=0" in booted.output("modprobe"), context
    reloaded = {line.split()[0] for line in booted.read("modules.after-modprobe").splitlines()}
    assert {"simple_kmod", "simple_procfs_kmod"} <= reloaded, context
    assert booted.read("procfs.out").strip() == "simple-procfs-kmod number = 0", context
    if readonly:
        kind, options = booted.read("findmnt.out").split()
        assert kind == "overlay" and f"upperdir=/var/lib/kvc/modules/{release}/upper" in options, context
        assert len(booted.read("upper.out").split()) == 2, context


def image_tags(name: str, kernel_tag: str) -> list[str]:
    """Every local name of the instance's images for a kernel (kvc's tag, the labelled push's)."""
    listed = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference=*{name}*"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return [ref for ref in listed if ref.rsplit(":", 1)[-1].endswith(kernel_tag)]


@pytest.mark.registry
def test_kernel_install_of_a_new_kernel_runs_kvcs_plugin_which_pulls_its_image(
    tmp_path: Path, instance: str, indexed_kernel_tree: DebianKernel, local_registry: LocalRegistry
) -> None:
    new = indexed_kernel_package(f"{newest_foreign_release()}-amd64")
    registry = f"KVC_REGISTRY_AUTH_FILE={local_registry.auth_file}\nKVC_REGISTRY_CERTS_DIR={local_registry.certs_dir}\n"
    repository = f"KVC_REGISTRY={local_registry.host}/kvcboot/{instance}\n"
    # The build host: the new kernel's image built, pushed, and removed from this storage.
    build_root = tmp_path / "build-host"
    write_example_conf(build_root, instance, "\n" + repository)
    (build_root / "etc" / "kvc" / "kmods-via-containers.conf").write_text(registry)
    built = kvc(["build", instance, "--kernel", new.release, "--push"], build_root)
    assert built.returncode == 0, built.stdout + built.stderr
    kernel_tag = new.release.replace("+", "_")
    tags = image_tags(instance, kernel_tag)
    assert tags, built.stdout
    subprocess.run(["podman", "rmi", *tags], check=True, capture_output=True)
    assert not image_tags(instance, kernel_tag)

    files, unit = guest_with_instance(tmp_path, instance, "\n" + repository + "KVC_REGISTRY_FALLBACK=fail\n")
    files.write("/etc/kvc/kmods-via-containers.conf", registry)
    systemdvm.install_kernel_hooks(files)
    systemdvm.mask_kernel_install_plugin(files, "50-depmod.install")
    systemdvm.boot_loader_entries(files, indexed_kernel_tree.release)
    answers = (
        f"[ \"$(curl -s -o /dev/null -w '%{{http_code}}' --cacert {local_registry.ca_file} "
        f'https://{local_registry.host}/v2/)" = 401 ]'
    )
    script = (
        f"new={new.release}\n"
        f"systemd-run --quiet --unit=kvc-boot-registry /usr/bin/docker-registry serve {local_registry.dir}/config.yml\n"
        f"check 'the registry answers' sh -c 'for i in $(seq 120); do {answers} && exit 0; sleep 0.5; done; exit 1'\n"
        "run gate-before kvc check --next-boot --json\n"
        'run gate-new-kernel-before kvc check --next-boot --kernel "$new" --json\n'
        'run kernel-install kernel-install --verbose add "$new" "/lib/modules/$new/vmlinuz"\n'
        "run gate-after kvc check --next-boot --json\n"
        'ls /boot/loader/entries >"$report/entries"\n'
        'journalctl -b -u kvc-boot-registry -o cat --no-pager >"$report/registry.log" 2>&1\n' + unit_report(unit)
    )
    systemdvm.add_test_units(files, script, after=[unit])
    booted = systemdvm.boot([indexed_kernel_tree, new], files, tmp_path, host_dirs=[Path(local_registry.dir)])
    print(f"the guest ran {booted.seconds:.1f} s; {booted.markers()}")
    context = booted.context() + "".join(
        f"\n--- {name} ---\n{booted.output(name)[-3000:]}"
        for name in ("gate-before", "gate-new-kernel-before", "kernel-install", "gate-after")
    )
    assert not booted.timed_out, context
    assert booted.read("failed").strip() == "0", context
    before = json.loads(booted.read("gate-before.out"))
    assert booted.status("gate-before") == 0 and before["ready"], context
    assert before["next_kernel"]["release"] == indexed_kernel_tree.release, context
    assert before["next_kernel"]["source"] == "boot-entries", context
    new_before = json.loads(booted.read("gate-new-kernel-before.out"))
    assert booted.status("gate-new-kernel-before") == 6 and not new_before["ready"], context
    assert [item["name"] for item in new_before["instances"]] == [instance], context
    installed = booted.output("kernel-install")
    assert booted.status("kernel-install") == 0, context
    assert f"/etc/kernel/install.d/90-kvc.install add {new.release}" in installed, context
    assert f"pull {local_registry.host}/kvcboot/{instance}:" in installed, context
    assert f"{instance}: pulled {instance}-1.0.0:{kernel_tag} " in installed, context
    after = json.loads(booted.read("gate-after.out"))
    assert booted.status("gate-after") == 0 and after["ready"], context
    assert (after["next_kernel"]["release"], after["next_kernel"]["source"]) == (new.release, "boot-entries"), context
    (entry,) = after["instances"]
    assert entry["name"] == instance and entry["ready"] and entry["image"]["tag"].endswith(kernel_tag), context
    assert f"kvc-test-{new.release}.conf" in booted.read("entries").split(), context
