"""The qemu adapter: the one place kvc starts a virtual machine.

A :class:`GuestMachine` is a frozen description (the target's architecture, kernel, initramfs,
command line, 9p shares, extra devices, memory, accelerator, and for a UEFI boot the firmware and
its variable store); the architecture picks qemu's program, board, CPU and console
(:class:`Platform`);
:func:`run_guest` boots it with no network, the serial console written to a file, no reboot (a
guest panic ends qemu) and a hard timeout after which qemu is killed.
:func:`choose_accel` uses KVM only when a quick probe boot under KVM works, else TCG.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from kvc import proc
from kvc.arch import Arch, host_arch
from kvc.atomic import write_json
from kvc.errors import CommandError, CommandTimeout

QEMU = "qemu-system-x86_64"
ACCELS = ("auto", "tcg", "kvm")
PROBE_TIMEOUT = 30.0
PROBE_ARGUMENT = "kvc.probe"
PROBE_OK = "kvc-guest: probe ok"
QEMU_HINT = "install qemu: 'apt-get install qemu-system-x86' (Debian) or 'dnf install qemu-kvm' (Fedora)"


@dataclass(frozen=True)
class Platform:
    """What qemu emulates for a target architecture."""

    program: str
    machine: str
    tcg_cpu: str
    console: str  # the board's serial port, as the guest kernel names it
    hint: str
    tcg_append: str = ""  # kernel arguments for an emulated guest only


PLATFORMS = {
    # Emulated, the CPU has RDRAND: with it (random.trust_cpu) the guest kernel's RNG is ready at
    # boot, where the first getrandom() or /dev/urandom read -- Python's start -- would otherwise
    # wait 1-2 s for the kernel's jitter entropy.
    # TCG has no TSC-deadline timer, so the kernel would calibrate the local APIC timer against
    # another clock for 0.1-0.2 s of its boot; without it (noapictimer) the HPET ticks, and nothing
    # in the guest needs per-CPU timers (it has one CPU). KVM's guest has the deadline timer.
    Arch.AMD64: Platform(QEMU, "q35", "qemu64,+rdrand", "ttyS0", QEMU_HINT, tcg_append="noapictimer"),
    # cortex-a57, not "max": max emulates pointer authentication, which makes the guest's boot
    # 4-5 times slower under TCG. The virt board's console is its PL011 UART.
    Arch.ARM64: Platform(
        "qemu-system-aarch64",
        "virt",
        "cortex-a57",
        "ttyAMA0",
        "install qemu: 'apt-get install qemu-system-arm' (Debian) or 'dnf install qemu-system-aarch64' (Fedora)",
    ),
}


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts over virtio-9p under ``tag``."""

    tag: str
    path: str
    readonly: bool = True


@dataclass(frozen=True)
class GuestMachine:
    kernel: str
    initrd: str
    append: str
    console_log: str
    shares: tuple[Share, ...] = ()
    memory_mb: int = 1024
    accel: str = "tcg"
    arch: Arch = Arch.AMD64
    devices: tuple[str, ...] = ()  # extra -device values (KVC_VERIFY_DEVICES)
    # UEFI firmware (kvc verify --secure-boot): OVMF's code and this boot's copy of a variable store.
    firmware_code: str = ""
    firmware_vars: str = ""
    secure_boot: bool = False  # SMM and a secure flash: OVMF's Secure Boot build needs both

    @property
    def program(self) -> str:
        """qemu's program for the architecture (qemu-system-x86_64, qemu-system-aarch64)."""
        return PLATFORMS[self.arch].program

    def argv(self) -> list[str]:
        platform = PLATFORMS[self.arch]
        # q35 (PCIe): on the older i440fx machine each PCI device's interrupt link is set up by
        # ACPI's interpreter, 0.15 s per 9p share under emulation; q35's links are fixed.
        machine = f"{platform.machine},smm=on" if self.secure_boot else platform.machine
        argv = [self.program, "-accel", self.accel, "-machine", machine]
        if self.firmware_code:
            if self.secure_boot:
                argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
            argv += [
                "-drive",
                f"if=pflash,format=raw,unit=0,readonly=on,file={self.firmware_code}",
                "-drive",
                f"if=pflash,format=raw,unit=1,file={self.firmware_vars}",
            ]
        argv += ["-cpu", "host" if self.accel == "kvm" else platform.tcg_cpu]
        append = f"{self.append} {platform.tcg_append}" if self.accel != "kvm" and platform.tcg_append else self.append
        argv += [
            "-m",
            f"{self.memory_mb}M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
            "-serial",
            f"file:{self.console_log}",
            "-kernel",
            self.kernel,
            "-initrd",
            self.initrd,
            "-append",
            append,
        ]
        for share in self.shares:
            options = [f"local,path={share.path}", f"mount_tag={share.tag}", "security_model=none", "multidevs=remap"]
            if share.readonly:
                options.append("readonly=on")
            argv += ["-virtfs", ",".join(options)]
        for device in self.devices:
            argv += ["-device", device]
        return argv


@dataclass(frozen=True)
class GuestRun:
    returncode: Optional[int]  # None: killed at the timeout
    seconds: float
    output: str  # qemu's own stdout and stderr (the guest's console is in the console log)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_guest(machine: GuestMachine, timeout: float) -> GuestRun:
    """Boot ``machine`` until it powers off, panics (no reboot) or ``timeout`` seconds pass."""
    started = time.monotonic()
    try:
        result = proc.run(machine.argv(), check=False, timeout=timeout, hint=PLATFORMS[machine.arch].hint)
    except CommandTimeout:
        return GuestRun(None, time.monotonic() - started, "")
    return GuestRun(result.returncode, time.monotonic() - started, (result.stdout + result.stderr).strip())


def _probe_key(machine: GuestMachine) -> str:
    parts = []
    for path in (machine.program, machine.kernel):
        resolved = path if os.path.isabs(path) else shutil.which(path) or path
        try:
            info = os.stat(resolved)
            parts.append(f"{resolved}:{info.st_size}:{int(info.st_mtime)}")
        except OSError:
            parts.append(resolved)
    return "|".join([*parts, os.uname().release])


def kvm_works(machine: GuestMachine, cache_file: str) -> bool:
    """Boot ``machine`` under KVM to the guest init's probe answer (cached per qemu, guest kernel
    and host kernel). /dev/kvm can exist and still not run a stock kernel (nested hypervisors)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = _probe_key(machine)
    try:
        with open(cache_file, encoding="utf-8") as handle:
            cached = json.load(handle)
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and isinstance(cached.get(key), bool):
        return bool(cached[key])
    probe_log = f"{machine.console_log}.kvm-probe"
    probe = dataclasses.replace(
        machine,
        append=f"{machine.append} {PROBE_ARGUMENT}",
        console_log=probe_log,
        shares=(),
        devices=(),
        memory_mb=min(machine.memory_mb, 512),
        accel="kvm",
    )
    try:
        run = run_guest(probe, PROBE_TIMEOUT)
        with open(probe_log, encoding="utf-8", errors="replace") as handle:
            works = run.returncode == 0 and PROBE_OK in handle.read()
    except (CommandError, OSError):
        works = False
    finally:
        if os.path.exists(probe_log):
            os.unlink(probe_log)
    verdicts = cached if isinstance(cached, dict) else {}
    verdicts[key] = works
    write_json(cache_file, verdicts)
    return works


def choose_accel(requested: str, machine: GuestMachine, cache_file: str) -> str:
    """``tcg`` or ``kvm`` for ``requested`` (``auto``: KVM when the probe works). KVM runs guests
    of the host's own architecture only: another one's is always emulated (kvc verify refuses
    ``--accel kvm`` for it)."""
    if machine.arch is not host_arch():
        return "tcg"
    if requested != "auto":
        return requested
    return "kvm" if kvm_works(machine, cache_file) else "tcg"
