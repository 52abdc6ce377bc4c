"""finit_module from inside the kvc container reaches the real kernel.

Debian's real kernel boots under qemu with kvc verify's pieces (its initramfs and vm-init: this
host's root shared read-only over 9p and mirrored at the guest's /). vm-init's agent is a script in
the work share that runs this host's real podman and runc on the kvc image itself, by its id: the
guest's podman keeps its own storage on tmpfs and takes images from this host's container storage
(read-only over 9p) as an additional image store, so the container's root is the image's layers
under overlayfs, as on a host, and nothing is copied (a ``podman load`` of the image into the guest
would unpack some 200 MB under TCG). The container gets the unit's own run options
(kvc-container@.service's ExecStart and ExecStop), two mount sources moved to writable places
(the guest's /etc and /var are the host's, read-only), plus simple-kmod built for that kernel and
the kernel's module tree, and runs the unit's ``load`` and ``unload`` with ``--modules-dir``.
Outside the container, the script reads /proc/modules after each and the kernel log. The test
asserts the kernel has both modules, tainted out-of-tree, after the container's load,
simple_kmod's hello line, and neither module after the container's unload."""

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

# Runs as vm-init's agent (PID 1's child, the host's root at /, the work share at /kvc/work), after
# the test's lines that set IMAGE and NAME and define load and unload (the unit's commands).
GUEST_SCRIPT = r"""
set -u
exec >/kvc/work/agent.log 2>&1
stamp() { read -r now _ </proc/uptime; echo "$1 $now" >>/kvc/work/times; }
stamp agent
set -x
# podman's overlay driver; the initramfs loads only what 9p needs.
insmod /kvc/kernel-modules/kernel/fs/overlayfs/overlay.ko
# Scratch places podman writes on tmpfs (the host's root is read-only here), and the writable
# sources of the container's /etc/kvc and /var/lib/kvc.
mkdir -p /dev/shm /dev/pts
for dir in /tmp /var/tmp /etc/containers/networks /dev/shm; do mount -t tmpfs tmpfs "$dir"; done
mount -t devpts devpts /dev/pts
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /run/guest-storage /run/containers/storage /run/kvc /run/host/etc/kvc /run/host/var/lib/kvc
cp "/kvc/work/$NAME.conf" /run/host/etc/kvc/
export CONTAINERS_CONF=/kvc/work/containers.conf CONTAINERS_STORAGE_CONF=/kvc/work/storage.conf
podman image exists "$IMAGE"; echo "exists=$?" >/kvc/work/image.status
stamp podman
load; echo "load=$?" >/kvc/work/load.status
stamp load
cat /proc/modules >/kvc/work/modules.after-load
unload; echo "unload=$?" >/kvc/work/unload.status
stamp unload
cat /proc/modules >/kvc/work/modules.after-unload
dmesg >/kvc/work/dmesg.txt
"""
# podman in the guest: no systemd (cgroupfs, events in a file), and a root on the initramfs, where
# pivot_root cannot work (runc moves the container's root with MS_MOVE instead).
GUEST_CONTAINERS_CONF = """[engine]
runtime = "runc"
no_pivot_root = true
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
# The host's storage at its own path is read-only over 9p: images only, the guest's own on tmpfs.
GUEST_STORAGE_CONF = """[storage]
driver = "overlay"
graphroot = "/run/guest-storage"
runroot = "/run/containers/storage"
[storage.options]
additionalimagestores = ["/var/lib/containers/storage"]
"""
# Mount sources of the unit that are read-only in the guest, and where the script keeps them.
WRITABLE_SOURCES = {"/etc/kvc": "/run/host/etc/kvc", "/var/lib/kvc": "/run/host/var/lib/kvc"}


def guest_command(argv: list[str], image: str, name: str, mounts: list[str], *more: str) -> str:
    """The unit's ``podman run`` line (``argv``) as the guest script runs it: the kvc image by id,
    the writable mount sources, ``mounts`` (more ``-v`` options) and ``more`` arguments for kvc."""
    options = []
    for option in run_options(argv):
        source, _, rest = option.partition(":")
        options.append(f"{WRITABLE_SOURCES[source]}:{rest}" if source in WRITABLE_SOURCES and rest else option)
    assert options.count("-v") == run_options(argv).count("-v")
    args = [arg.replace("%i", name) for arg in argv[argv.index("${KVC_CONTAINER_IMAGE}") + 1 :]]
    return shlex.join(["podman", "run", *options, *mounts, image, *args, *more])


def module_files(tag: str, release: str, names: list[str], target: Path) -> None:
    mounted = subprocess.run(["podman", "image", "mount", tag], check=True, capture_output=True, text=True)
    try:
        for name in names:
            shutil.copyfile(Path(mounted.stdout.strip()) / "lib" / "modules" / release / "extra" / name, target / name)
    finally:
        subprocess.run(["podman", "image", "unmount", tag], capture_output=True)


def test_finit_module_from_the_kvc_container_reaches_the_real_kernel(
    tmp_path: Path, indexed_kernel_tree: DebianKernel
) -> None:
    for program in ("qemu-system-x86_64", "podman"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    release = indexed_kernel_tree.release
    work = tmp_path / "work"
    modules = work / "modules" / "lib" / "modules" / release / "extra"
    modules.mkdir(parents=True)
    with unique_prefix("kvcctr") as prefix:
        name = f"{prefix}-simple-kmod"
        root = tmp_path / "root"
        conf = write_example_conf(root, name)
        built = subprocess.run(
            [sys.executable, "-m", "kvc", "build", name, "--kernel", release],
            capture_output=True,
            text=True,
            env={**os.environ, "KVC_ROOT": str(root)},
        )
        assert built.returncode == 0, built.stderr
        module_files(f"{name}-1.0.0:{release}", release, ["simple-kmod.ko", "simple-procfs-kmod.ko"], modules)
    shutil.copyfile(conf, work / f"{name}.conf")
    # The id, not the name: the tag may move to a newer build while the guest runs.
    image = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", build_kvc_image()],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    extra = ["-v", "/kvc/work/modules:/kvc/modules:ro", "-v", f"/kvc/kernel-modules:/lib/modules/{release}:ro"]
    commands = {setting: argv for setting, argv in unit_commands() if setting in ("ExecStart", "ExecStop")}
    from_dir = ["--modules-dir", "/kvc/modules"]  # unload needs none: kvc records what it loaded
    (work / "containers.conf").write_text(GUEST_CONTAINERS_CONF)
    (work / "storage.conf").write_text(GUEST_STORAGE_CONF)
    (work / "agent.sh").write_text(
        f"IMAGE={image}\nNAME={name}\n"
        f"load() {{ {guest_command(commands['ExecStart'], image, name, extra, *from_dir)}; }}\n"
        f"unload() {{ {guest_command(commands['ExecStop'], image, name, extra)}; }}\n" + GUEST_SCRIPT
    )
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    boot = boot_modules(moddir)
    settings = {
        "KVC_BOOT_MODULES": " ".join(module for module, _ in boot),
        "KVC_AGENT": shlex.join(["/bin/sh", "/kvc/work/agent.sh"]),
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
    run = run_guest(machine, 900)
    said = (work / "agent.log").read_text(errors="replace") if (work / "agent.log").exists() else ""
    console = (tmp_path / "console.log").read_text(errors="replace")
    context = f"--- agent.log ---\n{said[-4000:]}\n--- console ---\n{console[-3000:]}"
    times = (work / "times").read_text() if (work / "times").exists() else ""
    print(f"the guest ran {run.seconds:.1f} s; guest uptime at each step:\n{times}")
    assert (work / "image.status").read_text().strip() == "exists=0", context
    assert (work / "load.status").read_text().strip() == "load=0", context
    after_load = {line.split()[0]: line for line in (work / "modules.after-load").read_text().splitlines()}
    for module in ("simple_kmod", "simple_procfs_kmod"):
        assert after_load.get(module, "").endswith(" (OE)"), context
    assert "Hello world from simple_kmod." in (work / "dmesg.txt").read_text(), context
    assert (work / "unload.status").read_text().strip() == "unload=0", context
    after_unload = {line.split()[0] for line in (work / "modules.after-unload").read_text().splitlines()}
    assert not after_unload & {"simple_kmod", "simple_procfs_kmod"}, context
