"""What the host boots next: the kernel release, and the kvc instances that start with it.

The kernel comes from the first source that answers, in this order (each one skipped says why):

1. A kernel named by the caller: ``--kernel KVER``, the ``add KVER ...`` call of kernel-install's
   plugin (``KERNEL_INSTALL_*`` in the environment) or the ``KVER`` argument of Debian's
   ``/etc/kernel/postinst.d`` hook (``DEB_MAINT_PARAMS`` in the environment): :func:`named_kernel`.
2. bootc (``bootc status --json``): the rollback deployment when it is queued for the next boot,
   else the staged one, else the booted one; its kernel is the one ostree boots, the deployment's
   ``/usr/lib/modules/KVER/vmlinuz`` (bootc's JSON names images, not kernels).
3. rpm-ostree (``rpm-ostree status --json``): the first deployment, which is the bootloader's
   default (a staged or pending one comes first); its kernel from the deployment's tree, else the
   commit metadata ``ostree.linux``.
4. Boot Loader Specification entries (``loader/entries/*.conf`` under ``/boot``, ``/efi`` or
   ``/boot/efi``): the entry with the newest ``version``, which systemd-boot and grub's blscfg boot
   when no default is pinned; its release from its ``linux`` path.
5. ``/boot/vmlinuz-KVER`` files: the newest release, which is grub's default on Debian
   (grub-mkconfig lists the kernels newest first, with ``sort -V``).

"Newest" is the UAPI version comparison (:func:`compare_versions`), the one systemd-boot, kernel-install
and ``systemd-analyze compare-versions`` use; on distribution kernel releases it agrees with ``sort -V``.
A default entry pinned by hand (``GRUB_DEFAULT=saved``, systemd-boot's ``default``, a one-shot
entry) is not read: name the kernel with ``--kernel`` then.

An instance starts at boot when ``kmods-via-containers@NAME.service`` or ``kvc-container@NAME.service``
is enabled: a link in a ``*.wants/`` directory of ``/etc/systemd/system`` (runtime enablement under
``/run`` does not survive the reboot, so it does not count). Every path is read under ``KVC_ROOT``.
"""

from __future__ import annotations

import enum
import functools
import glob
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from kvc import proc
from kvc.config import check_kernel_release
from kvc.errors import CommandError, ConfigError, KernelMissingError
from kvc.layout import Layout

STATUS_TIMEOUT = 120.0
BOOT_DIRS = ("/boot", "/efi", "/boot/efi")
OSTREE_DEPLOY = "/ostree/deploy"
UNIT_TEMPLATES = ("kmods-via-containers@", "kvc-container@")
_VERSION_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.~^")
_DIGITS = frozenset("0123456789")
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Source(enum.Enum):
    """Where the next kernel's release came from; the value is what ``--json`` says."""

    COMMAND_LINE = "command-line"
    KERNEL_INSTALL = "kernel-install"
    DEBIAN_HOOK = "postinst.d"
    BOOTC = "bootc"
    RPM_OSTREE = "rpm-ostree"
    BOOT_ENTRIES = "boot-entries"
    BOOT_IMAGES = "boot-images"


@dataclass(frozen=True)
class Skipped:
    """A source that gave no answer, and why."""

    source: Source
    why: str


@dataclass(frozen=True)
class NextKernel:
    release: str
    source: Source
    why: str
    skipped: tuple[Skipped, ...] = ()

    def describe(self) -> str:
        return f"kernel {self.release} (from {self.source.value}: {self.why})"

    def to_json(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "source": self.source.value,
            "why": self.why,
            "skipped": [{"source": s.source.value, "why": s.why} for s in self.skipped],
        }


@dataclass(frozen=True)
class Finding:
    """One reader's answer: a release and why, or no release and why not."""

    release: str
    why: str


# ---- version order ---------------------------------------------------------------------------------------


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, as new as, or newer than ``b``, in the order of the UAPI
    version format specification as systemd implements it (``systemd-analyze compare-versions``).
    Each round skips characters outside ``[A-Za-z0-9.~^-]``, then takes these steps in turn, a
    matching pair of ``~``, ``-``, ``^`` or ``.`` being stepped over: ``~`` against anything else
    is older (even against the end); then a string that has ended is older; then ``-``, ``^`` and
    ``.`` against anything else are older; then a digit run is newer than none and digit runs
    compare as numbers; else letter runs compare as ASCII, the longer newer."""
    i = j = 0

    def at(text: str, index: int) -> str:
        return text[index] if index < len(text) else ""

    while True:
        while i < len(a) and a[i] not in _VERSION_CHARS:
            i += 1
        while j < len(b) and b[j] not in _VERSION_CHARS:
            j += 1
        for separator in "~-^.":
            x, y = at(a, i), at(b, j)
            if separator == "-" and (not x or not y):
                return (x > y) - (x < y)
            if separator in (x, y):
                if x != y:
                    return -1 if x == separator else 1
                i, j = i + 1, j + 1
        i, first = _run(a, i, _DIGITS)
        j, second = _run(b, j, _DIGITS)
        if bool(first) != bool(second):
            return 1 if first else -1
        if first:
            first, second = first.lstrip("0"), second.lstrip("0")
            order = (len(first) > len(second)) - (len(first) < len(second)) or (first > second) - (first < second)
        else:
            i, first = _run(a, i, _LETTERS)
            j, second = _run(b, j, _LETTERS)
            order = (first > second) - (first < second)
        if order:
            return order


def _run(text: str, start: int, chars: frozenset[str]) -> tuple[int, str]:
    end = start
    while end < len(text) and text[end] in chars:
        end += 1
    return end, text[start:end]


def newest(versions: Sequence[str]) -> str:
    return max(versions, key=functools.cmp_to_key(compare_versions))


def _release(text: str) -> str:
    """``text`` if it can be a kernel release (kvc's rule for releases), else ""."""
    try:
        return check_kernel_release(text)
    except ConfigError:
        return ""


# ---- 1. named by the caller ----------------------------------------------------------------------------


def named_kernel(release: str, environ: Optional[Mapping[str, str]] = None) -> NextKernel:
    """A kernel the caller named: the hook that runs kvc says which one through its environment
    (kernel-install exports ``KERNEL_INSTALL_*`` to its plugins; Debian's kernel maintainer
    scripts set ``DEB_MAINT_PARAMS`` for their hooks)."""
    env = os.environ if environ is None else environ
    check_kernel_release(release)
    if env.get("KERNEL_INSTALL_MACHINE_ID") or env.get("KERNEL_INSTALL_LAYOUT"):
        return NextKernel(release, Source.KERNEL_INSTALL, f"kernel-install add {release} ran kvc's plugin")
    if "DEB_MAINT_PARAMS" in env:
        params = env["DEB_MAINT_PARAMS"].strip() or "no arguments"
        return NextKernel(release, Source.DEBIAN_HOOK, f"the kernel package's postinst.d hook ({params})")
    return NextKernel(release, Source.COMMAND_LINE, "named on the command line")


# ---- adapters: the status commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class StatusCommand:
    """A program that prints the host's deployments as JSON (``bootc status --json``,
    ``rpm-ostree status --json``), found on PATH and run through kvc.proc."""

    argv: tuple[str, ...]
    environ: Optional[Mapping[str, str]] = None

    def document(self) -> tuple[Optional[dict[str, Any]], str]:
        """The parsed document, or None and why there is none."""
        env = os.environ if self.environ is None else self.environ
        command = " ".join(self.argv)
        program = shutil.which(self.argv[0], path=env.get("PATH", os.defpath))
        if program is None:
            return None, f"{self.argv[0]} is not installed (not on PATH)"
        try:
            done = proc.run([program, *self.argv[1:]], check=False, timeout=STATUS_TIMEOUT)
        except CommandError as exc:
            return None, f"'{command}' failed: {exc.brief}"
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            return None, f"'{command}' exited with status {done.returncode}" + (f": {said[-1]}" if said else "")
        try:
            data = json.loads(done.stdout)
        except ValueError:
            return None, f"'{command}' did not print a JSON document"
        if not isinstance(data, dict):
            return None, f"'{command}' printed JSON that is not an object"
        return data, ""


def bootc(environ: Optional[Mapping[str, str]] = None) -> StatusCommand:
    return StatusCommand(("bootc", "status", "--json"), environ)


def rpm_ostree(environ: Optional[Mapping[str, str]] = None) -> StatusCommand:
    return StatusCommand(("rpm-ostree", "status", "--json"), environ)


# ---- ostree deployments ----------------------------------------------------------------------------------


def _component(value: Any) -> str:
    """``value`` if it is a string usable as one path component, else ""."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    return "" if not text or text in (".", "..") or "/" in text or "\0" in text else text


def deployment_kernel(layout: Layout, stateroot: Any, checksum: Any, serial: Any) -> Finding:
    """The kernel ostree boots for a deployment: the one ``/usr/lib/modules/KVER/vmlinuz`` in
    ``/ostree/deploy/STATEROOT/deploy/CHECKSUM.SERIAL`` (a staged deployment is written out when
    it is staged; only its boot entry waits for the shutdown)."""
    parts = [_component(stateroot), _component(checksum), _component(serial)]
    if not all(parts):
        return Finding(
            "", f"the deployment's stateroot, checksum or serial is missing ({stateroot!r}, {checksum!r}, {serial!r})"
        )
    deployment = os.path.join(OSTREE_DEPLOY, parts[0], "deploy", f"{parts[1]}.{parts[2]}")
    pattern = os.path.join(glob.escape(layout.host.host(deployment)), "usr/lib/modules/*/vmlinuz")
    names = [os.path.basename(os.path.dirname(path)) for path in sorted(glob.glob(pattern))]
    if len(names) == 1 and _release(names[0]):
        return Finding(names[0], f"{deployment}/usr/lib/modules/{names[0]}/vmlinuz")
    if not names:
        return Finding("", f"no {deployment}/usr/lib/modules/*/vmlinuz")
    return Finding("", f"{deployment} has vmlinuz in {', '.join(names)}; ostree boots one kernel release")


# ---- 2. bootc --------------------------------------------------------------------------------------------


def read_bootc(layout: Layout, command: StatusCommand) -> Finding:
    data, problem = command.document()
    if data is None:
        return Finding("", problem)
    status = data.get("status")
    status = status if isinstance(status, dict) else {}
    booted = status.get("booted")
    if not isinstance(booted, dict):
        return Finding("", "not a bootc host (bootc status has no booted deployment)")
    rollback, staged = status.get("rollback"), status.get("staged")
    if status.get("rollbackQueued") and isinstance(rollback, dict):
        entry, role = rollback, "the rollback deployment (queued for the next boot)"
    elif isinstance(staged, dict):
        entry, role = staged, "the staged deployment"
    else:
        entry, role = booted, "the booted deployment (nothing staged)"
    image = entry.get("image")
    reference = image.get("image") if isinstance(image, dict) else None
    name = reference.get("image") if isinstance(reference, dict) else None
    what = f"{role} of {name}" if isinstance(name, str) else role
    ostree = entry.get("ostree")
    if not isinstance(ostree, dict):
        return Finding("", f"{what} is not an ostree deployment (kvc reads the kernel of ostree ones)")
    found = deployment_kernel(layout, ostree.get("stateroot"), ostree.get("checksum"), ostree.get("deploySerial"))
    if not found.release:
        return Finding("", f"{what}: {found.why}")
    return Finding(found.release, f"{what} boots {found.why}")


# ---- 3. rpm-ostree ---------------------------------------------------------------------------------------


def read_rpm_ostree(layout: Layout, command: StatusCommand) -> Finding:
    data, problem = command.document()
    if data is None:
        return Finding("", problem)
    deployments = data.get("deployments")
    if not isinstance(deployments, list) or not deployments or not isinstance(deployments[0], dict):
        return Finding("", "rpm-ostree lists no deployments")
    # rpm-ostree lists deployments in boot order: the first is the bootloader's default.
    first: dict[str, Any] = deployments[0]
    if first.get("staged"):
        role = "the staged deployment"
    elif not first.get("booted"):
        role = "the pending deployment"
    else:
        role = "the booted deployment (nothing staged or pending)"
    what = f"{role} {first.get('osname')} {str(first.get('checksum'))[:12]}.{first.get('serial')}"
    found = deployment_kernel(layout, first.get("osname"), first.get("checksum"), first.get("serial"))
    if found.release:
        return Finding(found.release, f"{what} boots {found.why}")
    for key in ("layered-commit-meta", "base-commit-meta"):
        meta = first.get(key)
        release = _release(str(meta.get("ostree.linux", ""))) if isinstance(meta, dict) else ""
        if release:
            return Finding(
                release, f"{what}: its {key} says ostree.linux={release} (its tree is not readable here: {found.why})"
            )
    return Finding("", f"{what}: {found.why}, and its commit metadata has no ostree.linux")


# ---- 4. Boot Loader Specification entries --------------------------------------------------------------


@dataclass(frozen=True)
class BootEntry:
    path: str
    fields: Mapping[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.fields.get("version", "")

    @property
    def release(self) -> str:
        """The kernel release the entry boots: from its ``linux`` path (``/vmlinuz-KVER`` as
        Fedora and ostree write it, ``/ENTRY-TOKEN/KVER/linux`` as kernel-install does), else its
        ``version``. A rescue entry (``0-rescue-MACHINE-ID``) boots no kernel release."""
        linux = self.fields.get("linux", "").rstrip("/")
        base = os.path.basename(linux)
        if base.startswith("vmlinuz-"):
            candidate = base[len("vmlinuz-") :]
        elif base == "linux":
            candidate = os.path.basename(os.path.dirname(linux))
        else:
            candidate = self.version
        return "" if candidate.startswith("0-rescue") else _release(candidate)


def parse_boot_entry(path: str, text: str) -> BootEntry:
    """A Type #1 entry: ``KEY VALUE`` lines, ``#`` comments (the first value of a key counts)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if words and not words[0].startswith("#"):
            fields.setdefault(words[0], words[1].strip() if len(words) > 1 else "")
    return BootEntry(path, fields)


def _entry_order(x: BootEntry, y: BootEntry) -> int:
    """By version (the release when an entry has none), then by file name."""
    names = (os.path.basename(x.path), os.path.basename(y.path))
    return compare_versions(x.version or x.release, y.version or y.release) or (names[0] > names[1]) - (
        names[0] < names[1]
    )


def read_boot_entries(layout: Layout) -> Finding:
    entries = []
    for boot in BOOT_DIRS:
        for path in sorted(glob.glob(os.path.join(layout.host.host(boot), "loader", "entries", "*.conf"))):
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    text = handle.read()
            except OSError:
                continue
            entries.append(parse_boot_entry(os.path.join(boot, "loader", "entries", os.path.basename(path)), text))
    if not entries:
        return Finding("", f"no boot entries in {', '.join(b + '/loader/entries' for b in BOOT_DIRS)}")
    kernels = [entry for entry in entries if entry.release]
    if not kernels:
        return Finding("", f"none of the {len(entries)} boot entries boots a kernel release")
    best = max(kernels, key=functools.cmp_to_key(_entry_order))
    return Finding(
        best.release,
        f"{best.path} has the newest version ({best.version or best.release}) of {len(kernels)} entries",
    )


# ---- 5. /boot/vmlinuz-KVER -------------------------------------------------------------------------------


def read_boot_images(layout: Layout) -> Finding:
    boot = layout.host.host("/boot")
    try:
        names = sorted(os.listdir(boot))
    except OSError:
        return Finding("", "no /boot directory")
    releases = [
        release
        for release in (_release(name[len("vmlinuz-") :]) for name in names if name.startswith("vmlinuz-"))
        if release and not release.startswith("0-rescue") and os.path.isfile(os.path.join(boot, f"vmlinuz-{release}"))
    ]
    if not releases:
        return Finding("", "no /boot/vmlinuz-KVER files")
    best = newest(releases)
    return Finding(best, f"/boot/vmlinuz-{best} is the newest of {len(releases)} kernels in /boot")


# ---- all of them ------------------------------------------------------------------------------------------


def find_next_kernel(layout: Layout, environ: Optional[Mapping[str, str]] = None) -> NextKernel:
    """The kernel the host boots next, from the first source (2 to 5 of the module's list) that
    answers; KernelMissingError naming what each lacked when none does."""
    readers: tuple[tuple[Source, Callable[[], Finding]], ...] = (
        (Source.BOOTC, lambda: read_bootc(layout, bootc(environ))),
        (Source.RPM_OSTREE, lambda: read_rpm_ostree(layout, rpm_ostree(environ))),
        (Source.BOOT_ENTRIES, lambda: read_boot_entries(layout)),
        (Source.BOOT_IMAGES, lambda: read_boot_images(layout)),
    )
    skipped: list[Skipped] = []
    for source, read in readers:
        found = read()
        if found.release:
            return NextKernel(found.release, source, found.why, tuple(skipped))
        skipped.append(Skipped(source, found.why))
    raise KernelMissingError(
        "cannot tell which kernel this host boots next",
        details="\n".join(f"{s.source.value}: {s.why}" for s in skipped),
        hint="name it: --kernel KVER",
    )


# ---- enabled instances -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnabledInstance:
    name: str
    units: tuple[str, ...]


def enabled_instances(layout: Layout) -> tuple[EnabledInstance, ...]:
    """The instances whose unit is enabled, by name (a name that is not a valid instance name is
    listed as it is: the gate reports it)."""
    units: dict[str, set[str]] = {}
    for wants in sorted(glob.glob(os.path.join(layout.systemd_dir, "*.wants"))):
        try:
            entries = os.listdir(wants)
        except OSError:
            continue
        for entry in entries:
            for template in UNIT_TEMPLATES:
                if entry.startswith(template) and entry.endswith(".service") and len(entry) > len(template) + 8:
                    units.setdefault(entry[len(template) : -len(".service")], set()).add(entry)
    return tuple(EnabledInstance(name, tuple(sorted(found))) for name, found in sorted(units.items()))
