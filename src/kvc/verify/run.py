"""``kvc verify``: prove an instance's modules on the real target kernel in a throwaway VM.

The host side: find the image (it must be built), the target kernel's files
(:mod:`kvc.verify.kernelfiles`), copy the instance's modules out of the image into a work directory,
write the initramfs (:mod:`kvc.verify.initramfs`) and the job, and boot the kernel under qemu
(:mod:`kvc.verify.qemu`: TCG unless a KVM probe works, no network, bounded memory, a hard timeout). The
guest mounts the host's root (or ``--guest-root DIR``) read-only over 9p and runs this very
installation of kvc (:mod:`kvc.verify.guest`): the host's Python running kvc's agent bundle from
the initramfs (:mod:`kvc.verify.agentbundle`: this kvc and the standard-library modules it
imports, compiled), or the single-file kvc itself, whose directory is shared into the guest so
that its root needs neither.
The agent loads the modules with kvc's loader and the live kernel, runs the
smoke test in the image, unloads and writes ``result.json``; the host turns it into the report.
A kernel of another architecture than the host's (arm64 on an amd64 host) boots emulated on its own
board (``qemu-system-aarch64 -M virt``), and the guest's root is Debian's Python and busybox of
that architecture, fetched into the cache (:mod:`kvc.verify.debarch`), which runs the agent bundle.
With ``--secure-boot`` the bzImage boots through OVMF with Secure Boot on and a certificate
enrolled (:mod:`kvc.verify.secureboot`), and the report gives the kernel's verdict on each
module's signature (:class:`SignatureVerdict`).

Outcomes (:class:`VerifyStatus`) and exit codes (:class:`kvc.errors.ExitCode`): 0 verified; 5 a
module refused by the kernel (or not unloadable); 6 the image is not built; 7 the kernel's files
cannot be found; 8 the smoke test failed; 9 the guest kernel crashed, the guest timed out, or kvc's
guest init or agent failed. A failed run (or
any run with ``--keep-artifacts``) is kept in ``/var/lib/kvc/NAME/verify/KVER/`` (console log, job,
result, initramfs, modules).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from kvc.arch import Arch, host_arch, target_arch
from kvc.atomic import write_json
from kvc.config import Delivery, InstanceConfig
from kvc.errors import CommandError, ExitCode, UsageError
from kvc.extract import copy_instance_modules, replace_dir
from kvc.images import built_image
from kvc.kmod.moddir import ModuleDirectory
from kvc.layout import Layout
from kvc.runtime import ContainerRuntime, ImageFiles
from kvc.verify import FROZEN_AGENT_ARGUMENT
from kvc.verify.agentbundle import KMOD_ARGUMENT, agent_bundle, agent_command
from kvc.verify.bootimage import pvh_kernel
from kvc.verify.debarch import GuestPython, guest_python
from kvc.verify.guesttree import write_tree_layer
from kvc.verify.initramfs import CpioEntry, boot_modules, build_initramfs, find_busybox
from kvc.verify.kernelfiles import KernelFiles
from kvc.verify.qemu import PLATFORMS, GuestMachine, Share, choose_accel, run_guest
from kvc.verify.secureboot import Certificate, boot_copy, enrolled_vars, find_firmware, read_certificate
from kvc.verifyrecord import REPORT_SCHEMA, VerifyStatus

STORY_LINES = 40  # the agent's last steps a crash report shows
# devkmsg=on: the agent's story lines in the kernel log are never rate-limited away. The rest is
# boot time under emulation: cryptomgr.notests skips the crypto self-tests (0.5-1 s),
# no_timer_check the IO-APIC timer probe (which, on a busy host, can fail and panic the guest),
# random.trust_cpu=on seeds the RNG from RDRAND (see qemu.GuestMachine.argv).
GUEST_APPEND = (
    "console=ttyS0 panic=-1 oops=panic quiet printk.devkmsg=on cryptomgr.notests no_timer_check random.trust_cpu=on"
)
# x86's own command-line words (the IO-APIC timer probe): another architecture's kernel does not
# know them and would hand them to init as arguments.
X86_ONLY_APPEND = frozenset({"no_timer_check"})
SMOKE_TIMEOUT = 120.0
GUEST_WORK = "/kvc/work"
GUEST_IMAGE = "/kvc/image"
GUEST_AGENT_DIR = "/kvc/agent"
GUEST_AGENT_BUNDLE = "/kvc/agent.pyz"
GUEST_TREE_LAYER = "/kvc/work/tree"
GUEST_MODPROBE = "kvc/modprobe"  # in the initramfs; /proc/sys/kernel/modprobe names it
GUEST_MODPROBE_D = "kvc/modprobe.d"
GUEST_REQUESTS = "/kvc/requests"
TOOL_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


_GUEST_MARK = re.compile(r"^kvc-guest: (.+) \(at ([0-9]+\.[0-9]+) s\)$", re.MULTILINE)
GUEST_FAILURE = re.compile(r"^kvc-guest: (FAILED: .*|agent exited with status [1-9].*)$", re.MULTILINE)
_CRASH_LINE = re.compile(
    r"Kernel panic|kernel BUG at|BUG:|Oops|general protection fault|RIP:|Call Trace|"
    r"Unable to handle"
)


@dataclass(frozen=True)
class VerifyOptions:
    accel: str = "auto"
    memory_mb: int = 1024
    timeout: float = 300.0
    keep_artifacts: bool = False
    guest_root: str = "/"
    secure_boot_cert: str = ""  # --secure-boot: the certificate to enroll as a MOK (empty: a normal boot)


@dataclass(frozen=True)
class VerifyPlan:
    instance: InstanceConfig
    kernel: KernelFiles
    image: str
    image_id: str
    options: VerifyOptions
    arch: Arch
    certificate: Optional[Certificate] = None  # --secure-boot

    @property
    def foreign(self) -> bool:
        """Whether the target is of another architecture than this host (its guest is emulated
        and runs Debian's Python of its architecture)."""
        return self.arch is not host_arch()

    def describe(self) -> str:
        return "\n".join(
            [
                f"verify {self.instance.name} {self.instance.software_version} for {self.kernel.release}:",
                f"  image {self.image} ({self.image_id[:12]})",
                f"  kernel {self.kernel.vmlinuz}, modules {self.kernel.moddir} ({self.kernel.source})",
                *self._secure_boot_lines(),
                *self._foreign_lines(),
                f"  boot under qemu ({self.options.accel}), {self.options.memory_mb} MiB, no network, "
                f"timeout {self.options.timeout:g} s, guest root {self._guest_root()}"
                + "".join(f", -device {device}" for device in self.instance.verify_devices),
                f"  {self._load_line()}, smoke test: {self.instance.smoke_test or '(none)'}, unload",
            ]
        )

    def _secure_boot_lines(self) -> list[str]:
        if self.certificate is None:
            return []
        return [
            f"  Secure Boot: the bzImage through OVMF ({find_firmware()[0]}), certificate {self.certificate.path} "
            f"('{self.certificate.description}') enrolled in MokListRT"
        ]

    def _foreign_lines(self) -> list[str]:
        if not self.foreign:
            return []
        platform = PLATFORMS[self.arch]
        return [
            f"  an {self.arch.value} guest, emulated (tcg): "
            f"{platform.program} -M {platform.machine} -cpu {platform.tcg_cpu}"
        ]

    def _guest_root(self) -> str:
        if self.foreign:
            return f"Debian's {self.arch.value} Python and busybox-static (fetched once into the cache)"
        return self.options.guest_root

    def _load_line(self) -> str:
        intree = self.instance.intree_modules
        first = f"in-tree {' '.join(intree)}, then " if intree else ""
        names = " ".join(self.instance.module_names)
        if self.instance.delivery is Delivery.TREE:
            return (
                f"load {first}{names} from the module tree (updates/kvc/{self.instance.name}): "
                "modprobe by each device's modalias, then by name"
            )
        return f"load {first}{names} with their in-tree dependencies and softdeps"


def plan_verify(
    instance: InstanceConfig,
    release: str,
    runtime: ContainerRuntime,
    options: VerifyOptions,
    find_kernel: Callable[[str], KernelFiles],
    arch_name: Optional[str] = None,
) -> VerifyPlan:
    """The image first (a missing build is reported before any kernel download), then the kernel.
    ``arch_name`` is ``--arch``, for a release that names no architecture."""
    arch = target_arch(release, arch_name)
    if arch is not host_arch():
        _check_foreign(arch, options)
    certificate = None
    if options.secure_boot_cert:
        certificate = read_certificate(options.secure_boot_cert)
        find_firmware()
    tag, info = built_image(runtime, instance, release, arch)
    return VerifyPlan(instance, find_kernel(release), tag, info.id, options, arch, certificate)


def _check_foreign(arch: Arch, options: VerifyOptions) -> None:
    """What a guest of another architecture cannot have: KVM (``--accel auto`` is TCG), this
    host's root or the single-file kvc (their programs are this host's), OVMF (an x86 firmware)."""
    what = ""
    if options.accel == "kvm":
        what = "--accel kvm (KVM runs guests of the host's architecture only; the guest is emulated)"
    elif options.guest_root != "/":
        what = "--guest-root (the guest's root is Debian's Python of its architecture, which kvc fetches)"
    elif options.secure_boot_cert:
        what = "--secure-boot (kvc boots x86 kernels through OVMF only)"
    elif getattr(sys, "frozen", False):
        what = "the single-file kvc (its agent is this host's executable); use the Python kvc"
    if what:
        raise UsageError(
            f"kvc verify of an {arch.value} kernel on this {host_arch().value} host cannot take {what}",
            hint=f"verify on an {arch.value} host for that",
        )


def guest_append(arch: Arch) -> str:
    """The guest kernel's command line for ``arch``: GUEST_APPEND with the board's console, and
    on another architecture than x86 without x86's own words."""
    if arch is Arch.AMD64:
        return GUEST_APPEND
    words = [
        f"console={PLATFORMS[arch].console}" if word.startswith("console=") else word for word in GUEST_APPEND.split()
    ]
    return " ".join(word for word in words if word not in X86_ONLY_APPEND)


@dataclass(frozen=True)
class VerifyReport:
    status: VerifyStatus
    data: dict[str, Any]

    @property
    def exit_code(self) -> ExitCode:
        return self.status.exit_code


def _copy_tools(files: ImageFiles, plan: VerifyPlan, destination: str) -> None:
    """Without a mounted image the smoke test runs on the guest's root; the image's wrapper tools
    are put on its PATH."""
    wanted = set(plan.instance.wrapper_tools)
    paths = {}
    for directory in TOOL_DIRS:
        for path in files.list(directory):
            base = os.path.basename(path)
            if base in wanted and base not in paths:
                paths[base] = path
    os.makedirs(destination, exist_ok=True)
    for local in files.copy(list(paths.values()), destination).values():
        os.chmod(local, 0o755)


def _agent(
    cache_dir: str, guest: Optional[GuestPython]
) -> tuple[dict[str, str], tuple[Share, ...], list[str], list[CpioEntry]]:
    """boot.conf's settings for starting the guest agent, the share it needs, the command that
    runs kvc's modprobe the same way, and the initramfs files it needs: the host's Python (or, on
    a guest of another architecture, ``guest``'s) running kvc's agent bundle
    (:mod:`kvc.verify.agentbundle`) from the initramfs, or (a frozen kvc) the single-file kvc
    from its own directory."""
    if guest is not None or not getattr(sys, "frozen", False):
        command = agent_command(GUEST_AGENT_BUNDLE, guest)
        settings = {"KVC_AGENT": shlex.join(command), "KVC_AGENT_SHARE": "0"}
        with open(agent_bundle(cache_dir, guest), "rb") as handle:
            bundle = CpioEntry(GUEST_AGENT_BUNDLE.lstrip("/"), stat.S_IFREG | 0o644, handle.read())
        return settings, (), [*command, KMOD_ARGUMENT, "modprobe"], [bundle]
    executable = os.path.realpath(sys.executable)
    guest_executable = f"{GUEST_AGENT_DIR}/{os.path.basename(executable)}"
    settings = {"KVC_AGENT": shlex.join([guest_executable, FROZEN_AGENT_ARGUMENT]), "KVC_AGENT_SHARE": "1"}
    return settings, (Share("kvcagent", os.path.dirname(executable)),), [guest_executable, "kmod", "modprobe"], []


def _modprobe_helper(modprobe: list[str]) -> bytes:
    """The program the guest kernel runs for ``request_module()`` (``modprobe -q -- NAME``): kvc's
    modprobe on the guest's module tree, with the guest's modprobe configuration; every call is
    logged with its exit status and output (for the report) and told in the kernel log (for the
    console)."""
    environment = [
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/",
        "LANG=C.UTF-8",
        "TMPDIR=/run",
        "PYTHONDONTWRITEBYTECODE=1",
    ]
    command = shlex.join(["/kvc/busybox", "env", "-i", *environment, *modprobe, "-C", f"/{GUEST_MODPROBE_D}"])
    # The kernel starts it without standard input or output: modprobe's output goes to the log.
    return (
        "#!/kvc/busybox sh\n"
        "# kvc verify: the guest kernel's request_module() runs this (/proc/sys/kernel/modprobe).\n"
        f'output=$({command} "$@" </dev/null 2>&1)\n'
        "status=$?\n"
        "{\n"
        '    /kvc/busybox echo "$status $*"\n'
        '    [ -z "$output" ] || /kvc/busybox echo "$output" | /kvc/busybox sed "s/^/| /"\n'
        f"}} >>{GUEST_REQUESTS}\n"
        '/kvc/busybox echo "<5>kvc-modprobe: modprobe $* exited with status $status" >/dev/kmsg\n'
        "exit $status\n"
    ).encode()


def _modprobe_options(instance: InstanceConfig) -> bytes:
    """The guest's modprobe configuration for an instance in the tree: its modules' parameters
    as ``options`` lines, as a host's tree delivery writes them."""
    return "".join(f"options {module} {params}\n" for module, params in sorted(instance.module_params.items())).encode()


def _read_steps(path: str) -> list[dict[str, Any]]:
    """The agent's story so far (its progress file: one JSON object per line; a line cut short
    by a dying guest is left out)."""
    steps = []
    for line in _read_text(path).splitlines():
        try:
            step = json.loads(line)
        except ValueError:
            continue
        if isinstance(step, dict) and isinstance(step.get("step"), str):
            log = step.get("log")
            steps.append({"step": step["step"], "log": [str(text) for text in log] if isinstance(log, list) else []})
    return steps


def _guest_marks(console: str) -> dict[str, float]:
    """The guest init's "kvc-guest: WHAT (at UPTIME s)" lines: WHAT (without an exit status) -> uptime."""
    marks: dict[str, float] = {}
    for what, uptime in _GUEST_MARK.findall(console):
        marks.setdefault(what.split(" with status ")[0], float(uptime))
    return marks


def _phases(console: str, result: dict[str, Any], prepare: float, timings: dict[str, Any]) -> dict[str, float]:
    """Where a run's time went, in order, as far as the run got: the host's preparation (image,
    modules, agent bundle, initramfs), the guest's phases by its uptime, qemu's own time outside
    the guest's (its start, firmware, the power-off), then the host's report."""
    marks = _guest_marks(console)
    points = [
        ("kernel_boot", 0.0, marks.get("init started")),
        ("boot_modules", marks.get("init started"), marks.get("boot modules loaded")),
        ("mounts", marks.get("boot modules loaded"), marks.get("agent starting")),
        ("python_start", marks.get("agent starting"), result.get("boot_seconds")),
    ]
    phases = {"host_prepare": prepare}
    phases.update((name, end - start) for name, start, end in points if start is not None and end is not None)
    agent = result.get("phase_seconds")
    if isinstance(agent, dict):
        phases.update((f"agent_{name}", float(seconds)) for name, seconds in agent.items())
    exited = marks.get("agent exited")
    if exited is not None and result.get("agent_seconds") is not None:
        phases["agent_exit"] = exited - float(result["boot_seconds"]) - float(result["agent_seconds"])
        phases["qemu_outside_guest"] = timings["vm_seconds"] - exited
    phases["host_finish"] = timings["total_seconds"] - prepare - timings["vm_seconds"]
    return {name: round(seconds, 2) for name, seconds in phases.items()}


def _crash_lines(console: str) -> list[str]:
    lines = console.splitlines()
    for index, line in enumerate(lines):
        if _CRASH_LINE.search(line):
            return [text.rstrip() for text in lines[index : index + 24]]
    return [text.rstrip() for text in lines[-12:]]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


class SignatureVerdict(enum.Enum):
    """The guest kernel's verdict on a module's signature (``--secure-boot``), from its answer
    and its log lines (kernel/module/signing.c)."""

    ACCEPTED = "accepted"  # loaded without the unsigned-module taint (E)
    LOADED_UNSIGNED = "loaded-unsigned"  # loaded, tainted E: the kernel did not enforce
    UNSIGNED_REJECTED = "unsigned-rejected"
    UNAVAILABLE_KEY_REJECTED = "unavailable-key-rejected"
    BAD_SIGNATURE_REJECTED = "signature-rejected"  # EKEYREJECTED without a line: the signature does not match
    LOCKDOWN_REFUSED = "lockdown-refused"
    NOT_LOADED = "not-loaded"  # refused for another reason


_UNSIGNED_LINE = "Loading of unsigned module is rejected"
_UNAVAILABLE_KEY_LINE = "Loading of module with unavailable key is rejected"


def signature_verdict(module: dict[str, Any]) -> str:
    if module.get("loaded"):
        tainted = "E" in (module.get("taint") or "")
        return SignatureVerdict.LOADED_UNSIGNED.value if tainted else SignatureVerdict.ACCEPTED.value
    log = "\n".join(module.get("log") or [])
    if module.get("errno") == "EKEYREJECTED":
        if _UNSIGNED_LINE in log:
            return SignatureVerdict.UNSIGNED_REJECTED.value
        if _UNAVAILABLE_KEY_LINE in log:
            return SignatureVerdict.UNAVAILABLE_KEY_REJECTED.value
        return SignatureVerdict.BAD_SIGNATURE_REJECTED.value
    if module.get("errno") == "EPERM" and "Lockdown:" in log:
        return SignatureVerdict.LOCKDOWN_REFUSED.value
    return SignatureVerdict.NOT_LOADED.value


def _status_of(result: dict[str, Any]) -> VerifyStatus:
    modules = result.get("modules", [])
    if result.get("plan_error") or not all(m.get("loaded") or not m.get("required", True) for m in modules):
        return VerifyStatus.LOAD_REFUSED
    smoke = result.get("smoke")
    if smoke is not None and (smoke.get("timed_out") or smoke.get("exit_code") != 0):
        return VerifyStatus.SMOKE_FAILED
    if not all(u.get("removed") for u in result.get("unload", [])):
        return VerifyStatus.UNLOAD_FAILED
    return VerifyStatus.VERIFIED


def execute_verify(plan: VerifyPlan, runtime: ContainerRuntime, layout: Layout) -> VerifyReport:
    started = time.monotonic()
    final = layout.verify_dir(plan.instance.name, plan.kernel.release)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.run-", dir=parent)
    os.chmod(work, 0o755)
    keep = plan.options.keep_artifacts
    try:
        report = _run_in_vm(plan, runtime, layout, work, started)
        keep = keep or report.status is not VerifyStatus.VERIFIED
    except BaseException:
        keep = True
        raise
    finally:
        if keep:
            replace_dir(work, final)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if keep:
        report.data["artifacts"] = final
        report.data["console_log"] = os.path.join(final, "console.log")
    write_json(
        layout.verify_record(plan.instance.name, plan.kernel.release),
        {
            "schema": REPORT_SCHEMA,
            "status": report.status.value,
            "image_id": plan.image_id,
            "at": time.time(),
            "timings": report.data["timings"],
            "artifacts": report.data["artifacts"],
        },
    )
    return report


def _run_in_vm(plan: VerifyPlan, runtime: ContainerRuntime, layout: Layout, work: str, started: float) -> VerifyReport:
    instance, kernel = plan.instance, plan.kernel
    moddir = ModuleDirectory(kernel.moddir)
    boot = boot_modules(moddir)
    guest = guest_python(layout.cache_dir, plan.arch) if plan.foreign else None
    agent_settings, agent_shares, modprobe, agent_files = _agent(layout.cache_dir, guest)
    tree = instance.delivery is Delivery.TREE
    guest_moddir = f"/lib/modules/{kernel.release}"
    settings = {
        "KVC_BOOT_MODULES": " ".join(name for name, _ in boot),
        "KVC_TREE_LAYER": "1" if tree else "0",
        "KVC_SECURE_BOOT": "1" if plan.certificate else "0",
        **agent_settings,
    }
    extra_files = [*agent_files, CpioEntry(GUEST_MODPROBE, stat.S_IFREG | 0o755, _modprobe_helper(modprobe))]
    with runtime.open_image(plan.image) as files:
        os.makedirs(os.path.join(work, "modules"))
        copies = copy_instance_modules(
            files, instance, kernel.release, f"image {plan.image}", os.path.join(work, "modules")
        )
        local_modules = [local for _, local in copies.values()]
        if tree:
            in_tree = write_tree_layer(
                kernel.release,
                kernel.moddir,
                instance.name,
                local_modules,
                os.path.join(work, "tree"),
                layout.cache_dir,
            )
            guest_modules = [f"{guest_moddir}/{relative}" for relative in in_tree]
            extra_files.append(
                CpioEntry(
                    f"{GUEST_MODPROBE_D}/kvc-{instance.name}.conf", stat.S_IFREG | 0o644, _modprobe_options(instance)
                )
            )
        else:
            guest_modules = [f"{GUEST_WORK}/modules/{os.path.basename(local)}" for local in local_modules]
        image_root = files.root
        if image_root is None and instance.wrapper_tools:
            _copy_tools(files, plan, os.path.join(work, "bin"))
        settings["KVC_IMAGE_SHARE"] = "1" if image_root else "0"
        initrd = os.path.join(work, "initramfs.cpio")
        busybox = find_busybox([guest.busybox]) if guest else find_busybox()
        build_initramfs(initrd, busybox, boot, settings, extra_files)
        job = {
            "instance": instance.name,
            "kernel": kernel.release,
            "delivery": instance.delivery.value,
            "moddir": guest_moddir,
            "modules": guest_modules,
            "params": dict(instance.module_params),
            "intree_modules": list(instance.intree_modules),
            "modprobe_config": f"/{GUEST_MODPROBE_D}",
            "requests": GUEST_REQUESTS,
            "smoke_test": instance.smoke_test,
            "smoke_timeout": SMOKE_TIMEOUT,
            "image_root": GUEST_IMAGE if image_root else "",
            "tools": f"{GUEST_WORK}/bin" if image_root is None else "",
            "result": f"{GUEST_WORK}/result.json",
            "progress": f"{GUEST_WORK}/progress",
        }
        if plan.certificate is not None:
            job["secure_boot"] = {"key_id": plan.certificate.key_id}
        write_json(os.path.join(work, "job.json"), job)
        guest_root = guest.root if guest else plan.options.guest_root
        shares = [
            Share("kvcroot", guest_root),
            Share("kvcwork", work, readonly=False),
            Share("kvcmods", kernel.moddir),
            *agent_shares,
        ]
        if image_root:
            shares.append(Share("kvcimage", image_root))
        # PVH has no EFI: a Secure Boot guest boots the bzImage through the firmware. PVH is
        # x86's; arm64's vmlinuz is an uncompressed Image already.
        x86 = plan.arch is Arch.AMD64
        pvh = pvh_kernel(kernel.vmlinuz, layout.cache_dir) if x86 and not plan.certificate else None
        machine = GuestMachine(
            pvh or kernel.vmlinuz,
            initrd,
            guest_append(plan.arch),
            os.path.join(work, "console.log"),
            tuple(shares),
            plan.options.memory_mb,
            arch=plan.arch,
            devices=instance.verify_devices,
        )
        accel = choose_accel(plan.options.accel, machine, os.path.join(layout.cache_dir, "accel-probe.json"))
        machine = dataclasses.replace(machine, accel=accel)
        if plan.certificate is not None:
            machine = dataclasses.replace(
                machine,
                firmware_code=find_firmware()[0],
                # A fresh copy every boot: the firmware writes to its variable store.
                firmware_vars=boot_copy(
                    enrolled_vars(plan.certificate, layout.cache_dir), os.path.join(work, "ovmf-vars.fd")
                ),
                secure_boot=True,
            )
        vm_started = time.monotonic()
        run = run_guest(machine, plan.options.timeout)
    console = _read_text(machine.console_log)
    data: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "instance": instance.name,
        "version": instance.software_version,
        "kernel": kernel.release,
        "image": {"tag": plan.image, "id": plan.image_id},
        "kernel_files": {"vmlinuz": kernel.vmlinuz, "moddir": kernel.moddir, "source": kernel.source},
        "vm": {
            "arch": plan.arch.value,
            "machine": PLATFORMS[plan.arch].machine,
            "accel": accel,
            "boot": "pvh" if pvh else "bzimage" if x86 else "image",
            "firmware": machine.firmware_code or None,
            "kernel_image": machine.kernel,
            "memory_mb": plan.options.memory_mb,
            "timeout": plan.options.timeout,
            "guest_root": guest_root,
            "devices": list(instance.verify_devices),
            "qemu_exit": run.returncode,
        },
        "delivery": instance.delivery.value,
        "secure_boot": None,
        "modules": [],
        "coldplug": None,
        "smoke": None,
        "unload": [],
        "rollback": False,
        "steps": _read_steps(os.path.join(work, "progress")),
        "crash": None,
        "artifacts": None,
        "console_log": None,
    }
    result_text = _read_text(os.path.join(work, "result.json"))
    try:
        result = json.loads(result_text) if result_text else None
    except ValueError:
        result = None
    timings: dict[str, Any] = {"vm_seconds": round(run.seconds, 2)}
    if isinstance(result, dict):
        status = _status_of(result)
        data.update(
            modules=result.get("modules", []),
            coldplug=result.get("coldplug"),
            smoke=result.get("smoke"),
            unload=result.get("unload", []),
            rollback=bool(result.get("rollback")),
            plan_error=result.get("plan_error"),
            tainted=result.get("tainted"),
        )
        if plan.certificate is not None:
            data["secure_boot"] = {
                **(result.get("secure_boot") or {}),
                "certificate": plan.certificate.path,
                "key": plan.certificate.description,
            }
            for module in data["modules"]:
                module["signature"] = signature_verdict(module)
        timings["boot_seconds"] = result.get("boot_seconds")
        timings["guest_seconds"] = result.get("agent_seconds")
    else:
        if run.returncode not in (None, 0) and not console.strip():
            raise CommandError(
                machine.argv(), run.returncode, run.output, hint="qemu could not start the guest; see its message above"
            )
        during = data["steps"][-1]["step"] if data["steps"] else "boot"
        failure = GUEST_FAILURE.search(console)
        if run.timed_out:
            status = VerifyStatus.TIMED_OUT
        elif failure is not None and not _CRASH_LINE.search(console):
            # The kernel is fine; kvc's guest init or agent is not (its own lines say what).
            status = VerifyStatus.GUEST_FAILED
        else:
            status = VerifyStatus.CRASHED
        lines = console.splitlines()[-24:] if status is VerifyStatus.GUEST_FAILED else _crash_lines(console)
        data["crash"] = {"during": during, "lines": [line.rstrip() for line in lines]}
    timings["total_seconds"] = round(time.monotonic() - started, 2)
    timings["phases"] = _phases(console, result if isinstance(result, dict) else {}, vm_started - started, timings)
    data["timings"] = timings
    data["status"] = status.value
    return VerifyReport(status, data)


# ---- the report, for people ---------------------------------------------------------------------------------


def _log_lines(lines: Any, indent: str = "      ") -> list[str]:
    return [f"{indent}kernel: {line}" for line in lines or []]


def _on_off(value: Any) -> str:
    return "unknown" if value is None else "on" if value else "off"


def _secure_boot_report(secure: dict[str, Any]) -> list[str]:
    keyrings = ", ".join(secure.get("keyrings") or []) or "NO trusted keyring"
    return [
        f"  Secure Boot {_on_off(secure.get('secure_boot'))}, lockdown {secure.get('lockdown') or 'unknown'}, "
        f"sig_enforce {_on_off(secure.get('sig_enforce'))}",
        f"  enrolled (MokListRT) {secure['certificate']}: key '{secure['key']}' in {keyrings}",
        *_log_lines(secure.get("kernel_lines"), "    "),
    ]


_BOOT_LABELS = {"pvh": "PVH boot", "bzimage": "bzImage boot", "image": "Image boot"}


def _board(vm: dict[str, Any]) -> str:
    """The emulated board, named when the guest is not x86."""
    return "" if vm.get("arch", Arch.AMD64.value) == Arch.AMD64.value else f"{vm['arch']} {vm['machine']}, "


def format_report(report: VerifyReport) -> str:
    data = report.data
    vm = data["vm"]
    lines = [
        f"verify {data['instance']} {data['version']} on kernel {data['kernel']} "
        f"(qemu {vm['accel']}, {_board(vm)}{_BOOT_LABELS.get(vm['boot'], vm['boot'])}"
        f"{' through OVMF' if vm.get('firmware') else ''}, "
        f"{vm['memory_mb']} MiB, no network)",
        f"  kernel files: {data['kernel_files']['source']}",
        f"  image: {data['image']['tag']} ({data['image']['id'][:12]})",
    ]
    secure = data.get("secure_boot")
    if secure is not None:
        lines += _secure_boot_report(secure)
    if data.get("plan_error"):
        lines.append(f"  plan: {data['plan_error']}")
    coldplug = data.get("coldplug")
    if coldplug is not None:
        lines.append(
            f"  coldplug: kvc's modprobe by the modalias of each of {coldplug['devices']} devices, as udev "
            f"({len(coldplug['matches'])} matched a module); it loaded:"
        )
        for match in coldplug["matches"]:
            if match["inserted"]:
                lines.append(
                    f"    {os.path.basename(match['device'])} {match['alias']}: {', '.join(match['inserted'])}"
                )
    if data["modules"]:
        lines.append("  load:")
    for module in data["modules"]:
        params = f" {module['params']}" if module.get("params") else ""
        how = f", {module['by']}" if module.get("by") else ""
        if module["loaded"]:
            lines.append(
                f"    {module['name']}{params} ({module['origin']}{how}): loaded in {module['seconds']:.2f} s, "
                f"refcnt {module['refcnt']}, taint {module['taint'] or '-'}"
            )
        else:
            verdict = "REFUSED by the kernel" if module.get("path") else "NOT LOADED"
            lines.append(
                f"    {module['name']}{params} ({module['origin']}{how}): "
                f"{verdict}: {module['errno']} ({module['error']})"
            )
        if module.get("signature"):
            lines.append(f"      signature: {module['signature']}")
        lines += _log_lines(module.get("log"))
        for call in module.get("requests", []):
            lines.append(f"      the kernel requested {call['module']}: kvc's modprobe exited {call['exit_code']}")
            lines += [f"        | {text}" for text in call.get("output", [])]
    smoke = data.get("smoke")
    if smoke is not None:
        outcome = "timed out" if smoke.get("timed_out") else f"exit {smoke['exit_code']}"
        where = "in the image" if smoke.get("in_image") else "in the guest"
        lines.append(f"  smoke test ({where}): {smoke['command']}")
        lines.append(f"    {outcome} in {smoke['seconds']:.2f} s")
        lines += [f"    | {line}" for line in (smoke.get("stdout", "") + smoke.get("stderr", "")).splitlines()]
        lines += _log_lines(smoke.get("log"), "    ")
    if data["unload"]:
        lines.append("  unload (rollback: the kernel refused a module):" if data.get("rollback") else "  unload:")
    for entry in data["unload"]:
        state = "removed" if entry["removed"] else f"NOT REMOVED: {entry['errno']} ({entry['error']})"
        lines.append(f"    {entry['name']}: {state}")
        lines += _log_lines(entry.get("log"))
    crash = data.get("crash")
    if crash is not None:
        what = {VerifyStatus.TIMED_OUT: "timed out", VerifyStatus.GUEST_FAILED: "failed"}.get(report.status, "crashed")
        lines.append(f"  the guest {what} during: {crash['during']}")
        if data.get("steps"):
            lines.append("  what kvc's agent did, step by step:")
            for step in data["steps"][-STORY_LINES:]:
                lines.append(f"    {step['step']}")
                lines += _log_lines(step["log"])
            lines.append("  then the console:")
        lines += [f"    {line}" for line in crash["lines"]]
    timings = data["timings"]
    boot = timings.get("boot_seconds")
    boot_text = f"boot {boot:.1f} s, " if isinstance(boot, (int, float)) else ""
    lines.append(
        f"{report.status.summary} ({boot_text}VM {timings['vm_seconds']:.1f} s, total {timings['total_seconds']:.1f} s)"
    )
    if data.get("artifacts"):
        lines.append(f"  console log and artifacts kept in {data['artifacts']}")
    return "\n".join(lines)
