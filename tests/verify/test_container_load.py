"""finit_module from inside the kvc container reaches the real kernel.

Debian's real kernel boots under qemu (kvc verify's pieces: its initramfs and vm-init, this host's
root shared read-only over 9p). In the guest, a script (vm-init's agent) runs this host's real
podman and runc — storage and scratch on tmpfs, cgroup2 mounted, no network, no pivot_root (the
guest's root is the initramfs) — on the kvc image's root file system (mounted on the host, shared
over 9p, an overlay on top: ``--rootfs DIR:O``; loading the 277 MB image into the guest's storage
takes minutes under TCG), with the unit's options (privileged, /lib/modules, /sys, /etc/kvc,
/var/lib/kvc): ``kvc load simple-kmod --modules-dir /kvc/modules``, simple-kmod built for that
kernel. Outside the container the script reads /proc/modules and the kernel log; then the
container unloads again. The test asserts the kernel has both modules after the container's load,
simple_kmod's hello line, and neither after the unload."""

from __future__ import annotations

import dataclasses
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
from support.example import write_example_conf
from support.kvcimage import build_kvc_image, unit_run_options

pytestmark = [pytest.mark.vm, pytest.mark.podman]

# Runs as vm-init's agent (PID 1's child, with the host's root at / and the work share at /kvc/work).
GUEST_SCRIPT = r"""
set -u
exec >/kvc/work/agent.log 2>&1
set -x
KVER=$(uname -r)
insmod /kvc/kernel-modules/kernel/fs/overlayfs/overlay.ko
# The host's root is read-only here: podman's storage, scratch places and network lock on tmpfs,
# and the host paths the container gets (/etc/kvc, /var/lib/kvc) under /run.
mount -t tmpfs -o size=512m tmpfs /var/lib/containers
for dir in /tmp /var/tmp /etc/containers/networks; do mount -t tmpfs tmpfs "$dir"; done
mkdir -p /run/host/etc/kvc /run/host/var/lib/kvc /run/kvc-image /dev/shm /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t devpts devpts /dev/pts
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t 9p -o trans=virtio,version=9p2000.L,ro kvcimage /run/kvc-image
cp /kvc/work/simple-kmod.conf /run/host/etc/kvc/
export CONTAINERS_CONF=/kvc/work/containers.conf
RUN="podman run --network=none $CONTAINER_RUN -v /kvc/work/modules:/kvc/modules:ro \
    -v /kvc/kernel-modules:/lib/modules/$KVER:ro --rootfs /run/kvc-image:O /usr/local/bin/kvc"
$RUN load simple-kmod --modules-dir /kvc/modules; echo "load=$?" >/kvc/work/load.status
cat /proc/modules >/kvc/work/modules.after-load
$RUN unload simple-kmod; echo "unload=$?" >/kvc/work/unload.status
cat /proc/modules >/kvc/work/modules.after-unload
dmesg >/kvc/work/dmesg.txt
"""
# podman in the guest: no systemd (cgroupfs, events in a file) and a root on the initramfs, where
# pivot_root cannot work (runc moves the container's root with MS_MOVE instead).
GUEST_CONTAINERS_CONF = """[engine]
runtime = "runc"
no_pivot_root = true
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_backend = "cni"
"""


def test_finit_module_from_the_kvc_container_reaches_the_real_kernel(
    tmp_path: Path, indexed_kernel_tree: DebianKernel
) -> None:
    for program in ("qemu-system-x86_64", "podman"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    release = indexed_kernel_tree.release
    root = tmp_path / "root"
    conf = write_example_conf(root)
    env = {**os.environ, "KVC_ROOT": str(root)}
    built = subprocess.run(
        [sys.executable, "-m", "kvc", "build", "simple-kmod", "--kernel", release],
        capture_output=True,
        text=True,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    work = tmp_path / "work"
    modules = work / "modules" / "lib" / "modules" / release / "extra"
    modules.mkdir(parents=True)
    tag = f"simple-kmod-1.0.0:{release}"
    mounted = subprocess.run(["podman", "image", "mount", tag], check=True, capture_output=True, text=True)
    try:
        for name in ("simple-kmod.ko", "simple-procfs-kmod.ko"):
            shutil.copyfile(Path(mounted.stdout.strip()) / "lib" / "modules" / release / "extra" / name, modules / name)
    finally:
        subprocess.run(["podman", "image", "unmount", tag], capture_output=True)
    shutil.copyfile(conf, work / "simple-kmod.conf")
    image = build_kvc_image()
    # The unit's run options, less what this guest has no use for (host network, host image storage).
    options = unit_run_options()
    keep = [o for o in options if o != "--network=host"]
    pairs = [(keep[i], keep[i + 1]) for i in range(len(keep) - 1) if keep[i] == "-v"]
    dropped = {f"{a} {b}" for a, b in pairs if "containers" in b or "/run/kvc" in b or "firmware" in b}
    container_run = []
    skip = False
    for index, option in enumerate(keep):
        if skip:
            skip = False
            continue
        if option == "-v" and f"-v {keep[index + 1]}" in dropped:
            skip = True
            continue
        for path in ("/etc/kvc:", "/var/lib/kvc:"):
            option = f"/run/host{option}" if option.startswith(path) else option
        container_run.append(option)
    assert "--privileged" in container_run and "/sys:/sys" in container_run
    script = work / "agent.sh"
    (work / "containers.conf").write_text(GUEST_CONTAINERS_CONF)
    script.write_text(f"CONTAINER_RUN={shlex.quote(shlex.join(container_run))}\n" + GUEST_SCRIPT)
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
    vmlinuz = str(indexed_kernel_tree.root / "boot" / f"vmlinuz-{release}")
    machine = GuestMachine(
        pvh_kernel(vmlinuz, str(tmp_path / "cache")) or vmlinuz,
        str(initrd),
        GUEST_APPEND,
        str(tmp_path / "console.log"),
        (Share("kvcroot", "/"), Share("kvcwork", str(work), readonly=False), Share("kvcmods", str(moddir.path))),
        memory_mb=2560,
    )
    mounted_image = subprocess.run(["podman", "image", "mount", image], check=True, capture_output=True, text=True)
    try:
        machine = dataclasses.replace(
            machine, shares=(*machine.shares, Share("kvcimage", mounted_image.stdout.strip()))
        )
        run = run_guest(machine, 900)
    finally:
        subprocess.run(["podman", "image", "unmount", image], capture_output=True)
    said = (work / "agent.log").read_text(errors="replace") if (work / "agent.log").exists() else ""
    console = (tmp_path / "console.log").read_text(errors="replace")
    context = f"--- agent.log ---\n{said[-4000:]}\n--- console ---\n{console[-3000:]}"
    print(f"the guest ran {run.seconds:.1f} s")
    assert (work / "load.status").read_text().strip() == "load=0", context
    after_load = (work / "modules.after-load").read_text()
    assert after_load.startswith("simple_procfs_kmod ") or "\nsimple_procfs_kmod " in after_load, context
    assert "\nsimple_kmod " in "\n" + after_load, context
    assert "Hello world from simple_kmod." in (work / "dmesg.txt").read_text(), context
    assert (work / "unload.status").read_text().strip() == "unload=0", context
    after_unload = (work / "modules.after-unload").read_text()
    assert "simple_kmod" not in after_unload and "simple_procfs_kmod" not in after_unload, context
