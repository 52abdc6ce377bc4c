"""Debian's real kernel booted under qemu with systemd as PID 1 on this host's root, for tests of
kvc's units at a real boot (tests/verify/test_boot_systemd.py).

The guest's root is this host's root, read-only over 9p, under an overlay whose upper layer is a
tmpfs (the initramfs's /init, ``systemd-init`` next to this file): the guest runs the host's
systemd, podman and this checkout's kvc as they are installed, writes anywhere, and changes
nothing on the host. What a test needs in the guest (kvc's confs and unit, the enablement links,
a container storage configuration, the test's own units) is written into a host directory,
:class:`GuestFiles`, that /init copies into the root before systemd starts; paths in
:data:`FRESH` are removed from the guest's root first, so the guest starts as a host on which kvc
was never used and nothing else is enabled for ``default.target``.

The guest boots into ``default.target``, which here is an alias of the test's target
(:func:`add_test_units`), so the units enabled for ``default.target`` start as on a host, and the
host's other enabled services do not. The test's oneshot unit runs a script after the units it
is ordered after, reports into a writable share (``/kvc-test`` in the guest, ``out`` on the host)
and on the console (``kvc-boot-test: ...`` lines), and powers the guest off whatever happens;
``rescue.service`` and ``emergency.service`` power it off too, after saving the failed units,
the journal and the kernel log. qemu is
killed at the timeout in any case.

kvc verify's building blocks make the guest: the cpio writer, the boot-module closure of the
kernel's virtio and 9p modules (plus overlay), the PVH-bootable vmlinux and the qemu adapter.
"""

from __future__ import annotations

import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from kvc import hooks
from kvc.kmod.compression import decompress
from kvc.kmod.moddir import ModuleDirectory
from kvc.layout import Layout
from kvc.systemd import install_unit
from kvc.verify.bootimage import pvh_kernel
from kvc.verify.initramfs import CpioEntry, boot_modules, find_busybox, write_cpio
from kvc.verify.qemu import GuestMachine, Share, run_guest
from support.debian_kernel import DebianKernel, cache_dir

INIT = Path(__file__).with_name("systemd-init")
# The virtio and 9p modules the initramfs needs for the host's root, and overlay for the root itself.
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# This checkout: the guest runs its kvc (the .venv the unit's PATH links to).
CHECKOUT = Path(__file__).resolve().parents[2]
# The guest's own, empty (tmpfs): a checkout below them is shared at its path.
GUEST_TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))
# No "quiet": systemd's status lines on the console say how far a boot got.
APPEND = "console=ttyS0 panic=-1 oops=panic loglevel=4"
# Removed from the guest's root before the test's files are copied in.
FRESH = ("/etc/kvc", "/var/lib/kvc", "/etc/systemd/system/default.target.wants")
TEST_TARGET = "kvc-boot-test.target"
TEST_SERVICE = "kvc-boot-test.service"
TEST_SCRIPT = "/etc/kvc-boot-test/check.sh"
GUEST_REPORT = "/kvc-test"
MARKER = "kvc-boot-test:"

# The test's script runs after this preamble: ``check NAME CMD...`` runs CMD, logs its output
# to checks.log and says "ok: NAME" or "FAILED: NAME" on the console; ``run NAME CMD...`` keeps
# CMD's stdout, stderr and exit status in NAME.out, NAME.err and NAME.status for the test to judge.
SCRIPT_PREAMBLE = f"""set -u
report={GUEST_REPORT}
say() {{ echo "{MARKER} $*"; }}
failed=0
check() {{
    name=$1; shift
    echo "== $name: $*" >>"$report/checks.log"
    if "$@" >>"$report/checks.log" 2>&1; then say "ok: $name"; else say "FAILED: $name"; failed=1; fi
}}
run() {{
    name=$1; shift
    "$@" >"$report/$name.out" 2>"$report/$name.err"
    status=$?
    echo "$status" >"$report/$name.status"
    read -r uptime _ </proc/uptime
    say "$name: exit $status at $uptime s"
}}
read -r uptime _ </proc/uptime
say "started at $uptime s"
"""
SCRIPT_END = """read -r uptime _ </proc/uptime
say "finished at $uptime s, failed=$failed"
echo "$failed" >"$report/failed"
sync
exit "$failed"
"""
# rescue.service and emergency.service would wait for a root password on the console.
FAIL_FAST = f"""[Service]
ExecStartPre=
ExecStart=
ExecStart=/bin/sh -c 'echo "{MARKER} %n started: the boot failed" >/dev/ttyS0; \
{{ systemctl --failed --no-pager; journalctl -b -o short-monotonic --no-pager; dmesg; }} >{GUEST_REPORT}/%n.log 2>&1; \
sync; \
systemctl --force --force poweroff'
Type=simple
StandardInput=null
StandardOutput=tty
TTYPath=/dev/ttyS0
"""
# kvc's podman in the guest uses this host's own container storage, as a host uses the storage
# its images were built into before a reboot: its files come through the overlay root (what the
# guest writes stays in the guest). The kernel's overlayfs cannot stack a writable overlay on the
# overlay root, so the storage's overlay driver mounts through fuse-overlayfs. (A read-only
# additional image store would not do: podman 4.3 cannot "image mount" an image there, "layer not
# known", and kvc then reads the image through a container, about 38 s instead of 7 under TCG.)
STORAGE_CONF = """[storage]
driver = "overlay"
graphroot = "/var/lib/containers/storage"
runroot = "/run/containers/storage"
[storage.options.overlay]
mount_program = "/usr/bin/fuse-overlayfs"
"""


class GuestFiles:
    """A host directory whose contents /init copies into the guest's root (``root/etc/...`` becomes
    ``/etc/...``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, guest_path: str) -> Path:
        return self.root / guest_path.lstrip("/")

    def write(self, guest_path: str, text: str, mode: int = 0o644) -> Path:
        path = self.path(guest_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        return path

    def link(self, guest_path: str, target: str) -> None:
        path = self.path(guest_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)

    def layout(self) -> Layout:
        """kvc's layout with these files as KVC_ROOT (kvc writes its own files here as on a host)."""
        return Layout.from_env({"KVC_ROOT": str(self.root)})


def kvc_on_path(files: GuestFiles) -> None:
    """``kvc`` and ``kmods-via-containers`` in the guest's /usr/local/bin: links to this
    checkout's entry points (the ones the tests run)."""
    bin_dir = Path(sys.prefix) / "bin"
    for program in ("kvc", "kmods-via-containers"):
        assert (bin_dir / program).is_file(), f"no {program} in {bin_dir}: run scripts/setup.sh"
        files.link(f"/usr/local/bin/{program}", str(bin_dir / program))


def container_storage(files: GuestFiles) -> None:
    files.write("/etc/containers/storage.conf", STORAGE_CONF)


def enable_instance(files: GuestFiles, name: str) -> str:
    """kvc's template unit where ``kvc install`` puts it, and ``kmods-via-containers@NAME.service``
    enabled by systemctl itself (offline, ``--root``): the ``default.target.wants`` link. The
    unit's name."""
    install_unit(files.layout())
    unit = f"kmods-via-containers@{name}.service"
    subprocess.run(["systemctl", f"--root={files.root}", "enable", unit], check=True, capture_output=True)
    assert (files.path("/etc/systemd/system/default.target.wants") / unit).is_symlink()
    return unit


def install_kernel_hooks(files: GuestFiles) -> None:
    """kvc's kernel hooks where ``kvc install`` writes them (its kernel-install plugin in
    /etc/kernel/install.d, the Debian hook in /etc/kernel/postinst.d), from kvc's package data."""
    layout = files.layout()
    for hook in hooks.HOOKS:
        path = Path(hook.path(layout))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hook.text)
        path.chmod(hooks.HOOK_MODE)


def mask_kernel_install_plugin(files: GuestFiles, plugin: str) -> None:
    """A /dev/null link in /etc/kernel/install.d: kernel-install skips the packaged plugin."""
    files.link(f"/etc/kernel/install.d/{plugin}", "/dev/null")


def boot_loader_entries(files: GuestFiles, release: str, token: str = "kvc-test") -> None:
    """A Boot Loader Specification /boot as on Fedora or an OSTree host: kernel-install's entry
    token and its directory, and an entry for ``release`` (the kernel the guest boots). kernel-install
    then uses the ``bls`` layout and writes an entry for every kernel it adds."""
    files.write("/etc/kernel/entry-token", f"{token}\n")
    files.path(f"/boot/{token}/{release}").mkdir(parents=True)
    files.write(
        f"/boot/loader/entries/{token}-{release}.conf",
        f"title Debian GNU/Linux\nversion {release}\nlinux /{token}/{release}/linux\n",
    )


def add_test_units(files: GuestFiles, script: str, after: Sequence[str] = (), timeout: float = 240) -> None:
    """The test's target (the guest's ``default.target``), its oneshot unit running ``script``
    (after :data:`SCRIPT_PREAMBLE`) once ``after`` units are done, and fail-fast rescue and
    emergency units."""
    files.write(TEST_SCRIPT, SCRIPT_PREAMBLE + script + "\n" + SCRIPT_END, 0o755)
    files.write(
        f"/etc/systemd/system/{TEST_TARGET}",
        f"[Unit]\nDescription=kvc boot test\nRequires=basic.target\nWants={TEST_SERVICE}\nAfter=basic.target\n",
    )
    files.link("/etc/systemd/system/default.target", TEST_TARGET)
    files.write(
        f"/etc/systemd/system/{TEST_SERVICE}",
        "[Unit]\n"
        "Description=kvc boot test: the checks\n"
        f"After=basic.target {' '.join(after)}\n"
        # Immediate: the report is on the host already (the share is uncached), and nothing of
        # the guest needs to be stopped cleanly.
        "SuccessAction=poweroff-immediate\n"
        "FailureAction=poweroff-immediate\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart=/bin/sh {TEST_SCRIPT}\n"
        f"TimeoutStartSec={int(timeout)}\n"
        "StandardOutput=tty\n"
        "StandardError=inherit\n"
        "TTYPath=/dev/ttyS0\n",
    )
    for unit in ("rescue.service", "emergency.service"):
        files.write(f"/etc/systemd/system/{unit}.d/kvc-boot-test.conf", FAIL_FAST)


@dataclass(frozen=True)
class SystemdBoot:
    returncode: Optional[int]  # None: killed at the timeout
    seconds: float
    console: str
    report: Path  # what the guest wrote to /kvc-test

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def markers(self) -> list[str]:
        """The test unit's (and the fail-fast units') console lines, without the prefix."""
        return [line.split(MARKER, 1)[1].strip() for line in self.console.splitlines() if MARKER in line]

    def read(self, name: str) -> str:
        path = self.report / name
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self, name: str) -> int:
        """The exit status the guest script's ``run NAME ...`` kept (-1: it did not run)."""
        text = self.read(f"{name}.status").strip()
        return int(text) if text else -1

    def output(self, name: str) -> str:
        """What ``run NAME ...`` printed, stdout then stderr."""
        return self.read(f"{name}.out") + self.read(f"{name}.err")

    def context(self) -> str:
        """What to show when an assertion fails: the checks' log and the end of the console."""
        return f"--- checks.log ---\n{self.read('checks.log')[-6000:]}\n--- console ---\n{self.console[-6000:]}"


def _initramfs(path: Path, modules: Sequence[tuple[str, str]], settings: dict[str, str]) -> None:
    with open(find_busybox(), "rb") as handle:
        busybox = handle.read()
    directory = stat.S_IFDIR | 0o755
    entries = [
        CpioEntry(name, directory)
        for name in ("bin", "dev", "proc", "sys", "modules", "lower", "upper", "newroot", "setup", "kernels")
    ]
    entries += [
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        CpioEntry("init", stat.S_IFREG | 0o755, INIT.read_bytes()),
        CpioEntry(
            "boot.conf",
            stat.S_IFREG | 0o644,
            "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items()).encode(),
        ),
    ]
    for name, source in modules:
        _, data = decompress(Path(source).read_bytes(), source)
        entries.append(CpioEntry(f"modules/{name}", stat.S_IFREG | 0o644, bytes(data)))
    with open(path, "wb") as out:
        write_cpio(out, entries)


def boot(
    kernels: Sequence[DebianKernel],
    files: GuestFiles,
    work: Path,
    *,
    host_dirs: Sequence[Path] = (),
    readonly_modules: bool = False,
    timeout: float = 420,
    memory_mb: int = 2048,
) -> SystemdBoot:
    """Boot ``kernels[0]`` with systemd on this host's root plus ``files``; every kernel's module
    tree is at /lib/modules/RELEASE in the guest (the others' vmlinuz inside it, as a kernel
    package installed there but not booted); ``host_dirs`` are shared read-only at their paths
    (the host's /tmp is not the guest's), and so is this checkout when it is below /tmp.
    ``readonly_modules``: /lib/modules is the one kernel's tree, read-only, as on OSTree and bootc
    hosts, and /var/lib/kvc a file system of its own.
    Returns when the guest powers off, or at ``timeout``."""
    assert not readonly_modules or len(kernels) == 1, "a read-only /lib/modules holds one kernel's tree"
    kernel = kernels[0]
    if any(tmp in CHECKOUT.parents for tmp in GUEST_TMP_DIRS):
        host_dirs = [*host_dirs, CHECKOUT]
    report = work / "report"
    report.mkdir(parents=True, exist_ok=True)
    initrd = work / "initramfs.cpio"
    modules = boot_modules(ModuleDirectory(str(kernel.moddir)), ROOT_MODULES)
    _initramfs(
        initrd,
        modules,
        {
            "BOOT_MODULES": " ".join(name for name, _ in modules),
            "KERNELS": " ".join(k.release for k in kernels),
            "REMOVE": " ".join(FRESH),
            "HOST_DIRS": " ".join(str(directory) for directory in host_dirs),
            "READONLY_MODULES": "1" if readonly_modules else "0",
        },
    )
    shares = (
        Share("hostroot", "/"),
        *(Share(f"kernel{index}", str(k.root)) for index, k in enumerate(kernels)),
        Share("setup", str(files.root)),
        Share("out", str(report), readonly=False),
        *(Share(f"hostdir{index}", str(directory)) for index, directory in enumerate(host_dirs)),
    )
    console = work / "console.log"
    vmlinuz = str(kernel.vmlinuz)
    machine = GuestMachine(
        pvh_kernel(vmlinuz, str(cache_dir() / "kvc")) or vmlinuz,
        str(initrd),
        APPEND,
        str(console),
        shares,
        memory_mb=memory_mb,
    )
    run = run_guest(machine, timeout)
    text = console.read_text(errors="replace") if console.exists() else ""
    if run.output:
        text += f"\n--- qemu ---\n{run.output}"
    return SystemdBoot(run.returncode, run.seconds, text, report)
