"""finit_module from inside the kvc container reaches the real kernel.

Debian's real kernel boots under qemu with kvc verify's pieces (its initramfs and vm-init, this
host's root shared read-only over 9p). vm-init's agent is a shell script that runs this host's real
podman in the guest: its storage (vfs) and scratch places on tmpfs, cgroup2 mounted, no network.
It ``podman load``s the kvc image from an oci-archive this host saved into the work share, then runs
the kvc image with kvc-container@.service's own run options (the conf's and kvc's state directories
on the guest's tmpfs, ``--network=none`` for the host's network): ``kvc load NAME --modules-dir /m``
with simple-kmod built for that kernel in /m, then ``kvc unload NAME``. Outside the container the
script reads /proc/modules after each and the kernel log into the work share. The test asserts
the kernel lists both modules after the container's load, simple_kmod's hello line is in the log,
and neither module is left after the unload."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvc.kmod.moddir import ModuleDirectory
from kvc.verify.bootimage import pvh_kernel
from kvc.verify.initramfs import boot_modules, build_initramfs, find_busybox
from kvc.verify.qemu import GuestMachine, Share, run_guest
from kvc.verify.run import GUEST_APPEND
from support.debian_kernel import DebianKernel
from support.example import unique_prefix, write_example_conf
from support.kvcimage import build_kvc_image, run_options, unit_commands

pytestmark = [pytest.mark.vm, pytest.mark.podman]

# What the guest's root lacks for podman: the host's root is read-only there, so storage, scratch
# and kvc's state go on tmpfs (/var/lib over the host's: /var/lib/kvc must exist for the unit's
# mount; netavark takes a lock in /etc/containers/networks even with no network), /dev/shm is
# mounted for podman's locks, the guest kernel's module tree is put where the unit mounts
# /lib/modules from, and cgroup2 is mounted for podman's cgroupfs manager. Each step's status and
# the guest's uptime go to steps.txt.
GUEST_SCRIPT = r"""
set -u
exec >/kvc/work/agent.log 2>&1
set -x
step() {
    name=$1; shift
    read -r started _ </proc/uptime
    "$@"; status=$?
    read -r ended _ </proc/uptime
    echo "$name $status $started $ended" >>/kvc/work/steps.txt
}
KVER=$(uname -r)
mount -t tmpfs -o mode=0755 tmpfs /var/lib
mkdir -p /var/lib/containers/storage /var/lib/kvc /run/kvc /run/containers/storage /run/etc-kvc
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /var/tmp
mount -t tmpfs tmpfs /etc/containers/networks
mkdir -p /dev/shm
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /lib/modules
mkdir "/lib/modules/$KVER"
mount --bind /kvc/kernel-modules "/lib/modules/$KVER"
mount -t cgroup2 cgroup2 /sys/fs/cgroup
cp /kvc/work/instance.conf "/run/etc-kvc/$INSTANCE.conf"
export CONTAINERS_CONF=/kvc/work/containers.conf
PODMAN="podman --storage-driver vfs"
step podman-load $PODMAN load --input /kvc/work/kvc-image.tar
$PODMAN images
eval "set -- $RUN_OPTIONS"
step kvc-load $PODMAN run --pull=never "$@" -v /kvc/work/modules:/m:ro "$IMAGE" load "$INSTANCE" --modules-dir /m
cat /proc/modules >/kvc/work/modules.after-load
step kvc-unload $PODMAN run --pull=never "$@" "$IMAGE" unload "$INSTANCE"
cat /proc/modules >/kvc/work/modules.after-unload
dmesg >/kvc/work/dmesg.txt
"""
# podman in the guest: no systemd there (cgroupfs, events in a file), and a root on the initramfs,
# where pivot_root cannot work (runc moves the container's root with MS_MOVE instead).
GUEST_CONTAINERS_CONF = """[engine]
runtime = "runc"
no_pivot_root = true
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def guest_run_options() -> list[str]:
    """The unit's ExecStart options for the guest: its paths but /etc/kvc's source (the guest's /etc
    is the host's, read-only, without /etc/kvc), and no network to share."""
    options = run_options(unit_commands()["ExecStart"])
    assert "--privileged" in options and "/sys:/sys" in options and "--network=host" in options
    guest = ["--network=none" if option == "--network=host" else option for option in options]
    return [option.replace("/etc/kvc:", "/run/etc-kvc:", 1) for option in guest]


def build_modules(work: Path, instance: str, release: str, root: Path) -> Path:
    """simple-kmod built for ``release`` by kvc build; its modules copied to work/modules/lib/modules/."""
    conf = write_example_conf(root, instance)
    built = subprocess.run(
        [sys.executable, "-m", "kvc", "build", instance, "--kernel", release],
        capture_output=True,
        text=True,
        env={**os.environ, "KVC_ROOT": str(root)},
    )
    assert built.returncode == 0, built.stderr
    tag = f"{instance}-1.0.0:{release}"
    mounted = subprocess.run(["podman", "image", "mount", tag], check=True, capture_output=True, text=True)
    try:
        extra = Path(mounted.stdout.strip()) / "lib" / "modules" / release / "extra"
        shutil.copytree(extra, work / "modules" / "lib" / "modules" / release / "extra")
    finally:
        subprocess.run(["podman", "image", "unmount", tag], capture_output=True)
    return conf


def test_finit_module_from_the_kvc_container_reaches_the_real_kernel(
    tmp_path: Path, indexed_kernel_tree: DebianKernel
) -> None:
    for program in ("qemu-system-x86_64", "podman"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    release = indexed_kernel_tree.release
    work = tmp_path / "work"
    work.mkdir()
    image = build_kvc_image()
    saved = subprocess.run(
        ["podman", "save", "--quiet", "--format", "oci-archive", "--output", str(work / "kvc-image.tar"), image],
        capture_output=True,
        text=True,
    )
    assert saved.returncode == 0, saved.stderr
    with unique_prefix("kvcct") as instance:
        conf = build_modules(work, instance, release, tmp_path / "root")
        shutil.copyfile(conf, work / "instance.conf")
        (work / "containers.conf").write_text(GUEST_CONTAINERS_CONF)
        variables = {"IMAGE": image, "INSTANCE": instance, "RUN_OPTIONS": shlex.join(guest_run_options())}
        (work / "agent.sh").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in variables.items()) + GUEST_SCRIPT)
        moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
        boot = boot_modules(moddir)
        settings = {
            "KVC_BOOT_MODULES": " ".join(name for name, _ in boot),
            "KVC_AGENT": shlex.join(["/bin/sh", "/kvc/work/agent.sh"]),
            "KVC_PYTHONPATH": "",
            "KVC_AGENT_SHARE": "0",
            "KVC_IMAGE_SHARE": "0",
        }
        initrd = tmp_path / "initramfs.cpio"
        build_initramfs(str(initrd), find_busybox(), boot, settings)
        vmlinuz = str(indexed_kernel_tree.vmlinuz)
        machine = GuestMachine(
            pvh_kernel(vmlinuz, str(tmp_path / "cache")) or vmlinuz,
            str(initrd),
            GUEST_APPEND,
            str(tmp_path / "console.log"),
            (Share("kvcroot", "/"), Share("kvcwork", str(work), readonly=False), Share("kvcmods", str(moddir.path))),
            memory_mb=3072,
        )
        run = run_guest(machine, 1800)
    said = (work / "agent.log").read_text(errors="replace") if (work / "agent.log").exists() else ""
    console = (tmp_path / "console.log").read_text(errors="replace")
    context = f"--- agent.log ---\n{said[-4000:]}\n--- console ---\n{console[-3000:]}"
    assert not run.timed_out, context
    steps = {}
    for line in (work / "steps.txt").read_text().splitlines() if (work / "steps.txt").exists() else []:
        name, status, started, ended = line.split()
        steps[name] = (int(status), float(ended) - float(started))
    print(
        f"the VM ran {run.seconds:.1f} s; in the guest: " + ", ".join(f"{n} {s:.1f} s" for n, (_, s) in steps.items())
    )
    assert [(name, status) for name, (status, _) in steps.items()] == [
        ("podman-load", 0),
        ("kvc-load", 0),
        ("kvc-unload", 0),
    ], context
    assert "loaded simple_kmod, simple_procfs_kmod" in said, context  # kvc in the container said so
    after_load = {line.split()[0] for line in (work / "modules.after-load").read_text().splitlines()}
    assert {"simple_kmod", "simple_procfs_kmod"} <= after_load, context
    assert "Hello world from simple_kmod." in (work / "dmesg.txt").read_text(), context
    after_unload = {line.split()[0] for line in (work / "modules.after-unload").read_text().splitlines()}
    assert not {"simple_kmod", "simple_procfs_kmod"} & after_unload, context
