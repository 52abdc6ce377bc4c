"""kvc's agent inside the verification VM (``python -m kvc.verify.guest JOB``, or
``kvc __kvc_guest JOB`` from the single-file kvc; see kvc.verify).

It runs on the guest kernel with the host's Python and the host's kvc (mounted over 9p), or as the
single-file kvc itself (shared into the guest), and does what a host does, with the real kernel
judging. The guest's ``/lib/modules/KVER`` is the target kernel's tree (an overlay kvc's guest init
sets up) and the kernel's ``request_module()`` runs kvc's modprobe on it.

An instance delivered directly (``KVC_DELIVERY=direct``): the agent plans what ``kvc load`` plans
(the in-tree modules the instance names, the in-tree dependencies, the instance's modules with
their softdeps) from that tree and inserts the steps with
:class:`~kvc.kmod.kernel.live.LiveKernel` (``finit_module``); when the kernel refuses one, it
rolls back what it loaded. An instance delivered into the tree (its modules in
``updates/kvc/NAME/`` of that tree, indexed): after the in-tree modules it names, the agent
loads modules as udev does at coldplug -- kvc's modprobe for every device's modalias -- then
loads by name those of the instance's modules no device asked for, as a host's unit would.

For every insert and removal it records the kernel's answer and the kernel log lines it wrote
(``/dev/kmsg``), and the modules the kernel asked kvc's modprobe for meanwhile; then it runs the
smoke test inside the instance image (chroot), unloads what it loaded in reverse and writes
``result.json`` (schema 1) to the work share. Under ``kvc verify --secure-boot`` it first records
Secure Boot, lockdown, ``sig_enforce`` and which trusted keyrings hold the enrolled key.

Every step is told as it happens (:class:`Story`): appended to ``progress`` on the work share,
so that the host can tell what the guest was doing if the kernel dies, and written to the
kernel log, so that the console shows it in place among the kernel's own lines, before an oops.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from kvc.atomic import write_json
from kvc.errors import KvcError
from kvc.kmod.config import ModprobeConfig, load_config
from kvc.kmod.kernel.libkmod import LibkmodView
from kvc.kmod.kernel.live import LiveKernel
from kvc.kmod.kernel.protocol import KernelError, ModuleSource
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.modprobe import Modprobe
from kvc.kmod.names import modname_from_path
from kvc.kmod.paths import HostPaths
from kvc.loader import LoadStep, Origin, plan_load

if TYPE_CHECKING:
    from typing import AbstractSet, Any, Optional, Sequence

RESULT_SCHEMA = 1
SMOKE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STORY_PREFIX = "kvc-agent: "
# The console shows kernel log lines below this level: notices (5, the agent's) and more urgent.
CONSOLE_LOGLEVEL = "6"
_KERN_NOTICE = 5
_KERNEL_FACILITY = 0


class KernelLog:
    """New lines of the kernel log (``/dev/kmsg``) since the last read: the kernel's own, not the
    lines user space wrote (the agent's story, kvc's modprobe)."""

    def __init__(self, path: str = "/dev/kmsg") -> None:
        try:
            self.fd: Optional[int] = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError:
            self.fd = None

    def new_lines(self) -> list[str]:
        lines: list[str] = []
        while self.fd is not None:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten before we read it: go on from the next one
                    continue
                break
            if not record:
                break
            prefix, _, text = record.decode("utf-8", "replace").partition(";")
            priority = prefix.split(",", 1)[0]
            if priority.isdigit() and int(priority) >> 3 != _KERNEL_FACILITY:
                continue
            lines.append(text.split("\n", 1)[0])
        return lines


class Story:
    """Every step as it happens, twice: a JSON line appended (and fsynced) to the work share's
    ``progress``, which the host reads when the guest dies, and a notice in the kernel log, which
    the console prints in its place among the kernel's lines. The kernel log line also ends a
    kernel line left open without its newline (a printk without "\\n" stays in the kernel's
    continuation buffer, unreadable, until the next record), so reading the log after writing it
    gets that line too."""

    def __init__(self, path: str, kmsg: str = "/dev/kmsg") -> None:
        self.path = path
        self.steps: list[dict[str, Any]] = []
        try:
            self.kmsg: Optional[int] = os.open(kmsg, os.O_WRONLY)
        except OSError:
            self.kmsg = None

    def step(self, text: str, log: Optional[KernelLog] = None) -> list[str]:
        """Tell ``text``; with ``log``, the kernel lines written since the last read go with it
        (and are returned)."""
        if self.kmsg is not None:
            with contextlib.suppress(OSError):
                os.write(self.kmsg, f"<{_KERN_NOTICE}>{STORY_PREFIX}{text}\n".encode("utf-8", "replace"))
        lines = log.new_lines() if log is not None else []
        entry: dict[str, Any] = {"step": text, "log": lines}
        self.steps.append(entry)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return lines


class Requests:
    """The modules the kernel asked for (``request_module()``), from the log kvc's modprobe helper
    appends to: per call a line with its exit status then its arguments (``-q -- NAME``), then
    its output, each line after ``| ``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0

    def new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        calls: list[dict[str, Any]] = []
        for line in complete.decode("utf-8", "replace").splitlines():
            if line.startswith("| "):
                if calls:
                    calls[-1]["output"].append(line[2:])
                continue
            status, _, arguments = line.partition(" ")
            words = arguments.split()
            calls.append(
                {
                    "module": words[-1] if words else "",
                    "arguments": arguments,
                    "exit_code": int(status) if status.lstrip("-").isdigit() else None,
                    "output": [],
                }
            )
        return calls


def _error_fields(exc: KernelError) -> dict[str, Any]:
    return {"errno": errno.errorcode.get(exc.errno, str(exc.errno)), "error": exc.strerror}


class StoryKernel(LiveKernel):
    """The live kernel; every insert and removal -- the agent's own and those kvc's modprobe makes
    in the agent -- is told and recorded with the kernel's answer, its log lines and the modules
    the kernel requested meanwhile."""

    def __init__(self, story: Story, log: KernelLog, requests: Requests, instance_paths: Sequence[str]) -> None:
        super().__init__(HostPaths("/"))
        self.story = story
        self.log = log
        self.requests = requests
        self.instance_paths = set(instance_paths)
        self.inserted: list[dict[str, Any]] = []
        self.removed: list[dict[str, Any]] = []
        self.reason = ""  # why the inserts happen now, for people ("by alias ...")
        self.step: Optional[LoadStep] = None  # the loader's step being inserted, if any

    def insert(self, module: ModuleSource, params: str = "", flags: int = 0) -> None:
        path = module if isinstance(module, str) else getattr(module, "path", "<memory>")
        name = modname_from_path(path)
        origin = self.step.origin if self.step else Origin.INSTANCE if path in self.instance_paths else Origin.IN_TREE
        entry: dict[str, Any] = {
            "name": name,
            "origin": origin.value,
            "path": path,
            "params": params,
            "required": self.step.required if self.step else origin is Origin.INSTANCE,
            "loaded": False,
        }
        if self.reason:
            entry["by"] = self.reason
        how = f", {self.reason}" if self.reason else ""
        self.story.step(f"inserting {name}{' ' + params if params else ''} ({origin.value}{how})")
        started = time.monotonic()
        failure: Optional[KernelError] = None
        try:
            super().insert(module, params, flags)
        except KernelError as exc:
            failure = exc
            entry.update(_error_fields(exc))
        else:
            entry["loaded"] = True
        entry["seconds"] = round(time.monotonic() - started, 3)
        if failure is None:
            outcome = f"inserted {name} in {entry['seconds']:.2f} s"
        else:
            outcome = f"refused {name}: {entry['errno']} ({entry['error']})"
        entry["log"] = self.story.step(outcome, self.log)
        entry["requests"] = self.requests.new()
        self.inserted.append(entry)
        if failure is not None:
            raise failure

    def remove(self, name: str, flags: int = 0) -> None:
        self.story.step(f"removing {name}")
        entry: dict[str, Any] = {"name": name, "removed": False}
        failure: Optional[KernelError] = None
        try:
            super().remove(name, flags)
        except KernelError as exc:
            failure = exc
            entry.update(_error_fields(exc))
        else:
            entry["removed"] = True
        outcome = f"removed {name}" if failure is None else f"could not remove {name}: {entry['errno']}"
        entry["log"] = self.story.step(outcome, self.log)
        self.removed.append(entry)
        if failure is not None:
            raise failure


def _uptime() -> float:
    try:
        with open("/proc/uptime", encoding="ascii") as handle:
            return float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _tainted() -> int:
    try:
        with open("/proc/sys/kernel/tainted", encoding="ascii") as handle:
            return int(handle.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _console_shows_notices() -> None:
    """The guest boots "quiet" (errors only on the console); from here on notices show too."""
    try:
        with open("/proc/sys/kernel/printk", "w", encoding="ascii") as handle:
            handle.write(CONSOLE_LOGLEVEL)
    except OSError:
        pass


def _insert_steps(steps: Sequence[LoadStep], kernel: StoryKernel) -> bool:
    """Insert the loader's steps in order; False when the kernel refused a required one (a
    refused softdep is skipped, as modprobe skips it)."""
    for step in steps:
        if kernel.module_state(step.name) is not None:
            # Loaded since the plan was made (the kernel requested it meanwhile): modprobe, too,
            # skips a module that is in the kernel already.
            kernel.story.step(f"{step.name} is loaded already")
            continue
        kernel.step = step
        try:
            kernel.insert(step.path, step.params, 0)
        except KernelError:
            if step.required:
                return False
        finally:
            kernel.step = None
    return True


def _modaliases() -> list[tuple[str, str]]:
    """(device, modalias) of every device on every bus, as udev sees them at coldplug."""
    found = []
    for path in sorted(os.path.join(device, "modalias") for device in _device_dirs("/sys/bus")):
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                alias = handle.read().strip()
        except OSError:
            continue
        if alias:
            found.append((os.path.dirname(path), alias))
    return found


def _device_dirs(buses: str) -> list[str]:
    """``BUSES/*/devices/*`` (what glob would give, without importing glob and re)."""
    found = []
    for bus in _listdir(buses):
        devices = os.path.join(buses, bus, "devices")
        found += [os.path.join(devices, name) for name in _listdir(devices)]
    return found


def _listdir(path: str) -> list[str]:
    try:
        return [name for name in os.listdir(path) if not name.startswith(".")]
    except OSError:
        return []


def _coldplug(engine: Modprobe, kernel: StoryKernel, instance_modules: Sequence[str]) -> dict[str, Any]:
    """modprobe by every device's modalias (udev's coldplug, blacklist applied). Returns the
    number of devices, what each alias reached, by which alias each instance module was loaded,
    and the entries of the modules loaded for other devices (which stay loaded, as on a host)."""
    kernel.story.step("coldplug: kvc's modprobe for every device's modalias")
    matches = []
    loaded_by: dict[str, str] = {}
    others: list[dict[str, Any]] = []
    devices = _modaliases()
    for device, alias in devices:
        mods = engine.lookup(alias) or []
        if not mods:
            continue
        names = [mod.name for mod in mods]
        before = len(kernel.inserted)
        kernel.reason = f"by alias {alias}"
        try:
            for mod in mods:
                engine.probe_insert(mod, blacklist=True)
        finally:
            kernel.reason = ""
        entries = kernel.inserted[before:]
        ours = [name for name in names if name in instance_modules]
        for name in ours:
            if any(entry["name"] == name and entry["loaded"] for entry in entries):
                loaded_by.setdefault(name, alias)
        if not ours:
            others += entries
        inserted = [entry["name"] for entry in entries if entry["loaded"]]
        matches.append({"device": device, "alias": alias, "modules": names, "inserted": inserted})
    return {"devices": len(devices), "matches": matches, "loaded_by": loaded_by, "others": others}


def _smoke(command: str, image_root: str, tools: str, timeout: float, log: KernelLog, story: Story) -> dict[str, Any]:
    """Run the smoke test in the image (chroot), or on the guest's root with the image's tools
    first on PATH when the image could not be mounted."""
    story.step("smoke test")
    argv = ["chroot", image_root, "/bin/sh", "-c", command] if image_root else ["/bin/sh", "-c", command]
    path = f"{tools}:{SMOKE_PATH}" if tools else SMOKE_PATH
    started = time.monotonic()
    result: dict[str, Any] = {"command": command, "in_image": bool(image_root)}
    environment = {**os.environ, "PATH": path, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8"}
    try:
        # subprocess, not kvc.proc: its command logging (kvc -v) is the host's, and logging would
        # be the biggest of the agent's imports, paid at every start under emulation.
        done = subprocess.run(
            argv, capture_output=True, text=True, errors="replace", timeout=timeout, env=environment, check=False
        )
        result.update(exit_code=done.returncode, stdout=done.stdout, stderr=done.stderr, timed_out=False)
    except subprocess.TimeoutExpired:
        result.update(exit_code=None, stdout="", stderr=f"did not finish in {timeout:g} s", timed_out=True)
    except FileNotFoundError:
        result.update(exit_code=127, stdout="", stderr=f"{argv[0]}: command not found", timed_out=False)
    result["seconds"] = round(time.monotonic() - started, 3)
    outcome = "timed out" if result["timed_out"] else f"exit {result['exit_code']}"
    result["log"] = story.step(f"smoke test: {outcome}", log)
    return result


_KEYCTL_SYSCALL = 250  # x86_64
_KEYCTL_READ = 11
TRUST_KEYRINGS = (".builtin_trusted_keys", ".secondary_trusted_keys", ".machine", ".platform")
_SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
_BOOT_KEY_LINES = ("X.509", "Secure boot", "secureboot", "locked down", "Lockdown")


def _read_file(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _proc_keys() -> dict[int, tuple[str, str]]:
    """serial -> (type, description and summary) of every key /proc/keys shows."""
    keys = {}
    for line in (_read_file("/proc/keys") or b"").decode("utf-8", "replace").splitlines():
        # serial flags usage expiry perm uid gid type description
        fields = line.split(None, 8)
        if len(fields) == 9:
            with contextlib.suppress(ValueError):
                keys[int(fields[0], 16)] = (fields[7], fields[8].strip())
    return keys


def _keyring_members(serial: int) -> list[int]:
    """The serials of the keys a keyring links (keyctl read)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(4096)
    size = libc.syscall(_KEYCTL_SYSCALL, _KEYCTL_READ, ctypes.c_int32(serial), buffer, ctypes.c_size_t(4096))
    if size < 0:
        return []
    count = min(size, 4096) // 4
    return [int.from_bytes(buffer.raw[index * 4 : index * 4 + 4], "little", signed=True) for index in range(count)]


def _boot_key_lines() -> list[str]:
    """The kernel's lines about certificates, Secure Boot and lockdown since boot."""
    lines = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    continue
                break
            if not record:
                break
            text = record.decode("utf-8", "replace").partition(";")[2].split("\n", 1)[0]
            if any(word in text for word in _BOOT_KEY_LINES):
                lines.append(text)
    finally:
        os.close(fd)
    return lines


def secure_boot_state(key_id: str) -> dict[str, Any]:
    """Secure Boot, lockdown and signature enforcement as the guest kernel has them, and the
    trusted keyrings that hold the key ``key_id`` (the enrolled certificate's)."""
    variable = _read_file(_SECURE_BOOT_VAR)
    lines = _boot_key_lines()
    if variable is not None and len(variable) > 4:
        secure_boot: Optional[bool] = bool(variable[4])
    else:
        # efivarfs is a module in many kernels; the kernel's own line says it too.
        said = [line for line in lines if line.startswith("secureboot: Secure boot")]
        secure_boot = said[-1].endswith("enabled") if said else None
    lockdown = (_read_file("/sys/kernel/security/lockdown") or b"").decode().strip()
    selected = next((word[1:-1] for word in lockdown.split() if word.startswith("[")), None)
    sig_enforce = (_read_file("/sys/module/module/parameters/sig_enforce") or b"").decode().strip()
    keys = _proc_keys()
    keyrings = {}
    holding = []
    for serial, (type_name, description) in keys.items():
        name = description.split(":", 1)[0]
        if type_name == "keyring" and name in TRUST_KEYRINGS:
            members = [keys.get(member, ("", f"key {member:08x}"))[1] for member in _keyring_members(serial)]
            keyrings[name] = members
            if any(key_id and key_id in member for member in members):
                holding.append(name)
    return {
        "efi": os.path.isdir("/sys/firmware/efi"),
        "secure_boot": secure_boot,
        "lockdown": selected,
        "sig_enforce": {"Y": True, "N": False}.get(sig_enforce),
        "key_id": key_id,
        "keyrings": sorted(holding, key=TRUST_KEYRINGS.index),
        "trusted_keys": keyrings,
        "kernel_lines": lines,
    }


def _remove_if_possible(kernel: StoryKernel, name: str) -> bool:
    """Remove ``name``; a refusal is not recorded (the caller only tries)."""
    try:
        kernel.remove(name, 0)
    except KernelError:
        kernel.removed.pop()
        return False
    return True


def _unload(names: Sequence[str], kernel: StoryKernel, keep: AbstractSet[str]) -> list[dict[str, Any]]:
    """Remove ``names`` in reverse; then the modules the run's requests loaded (anything loaded now
    that is not in ``keep``: in-tree modules kvc's modprobe loaded for a module's request_module(),
    which still hold what they use), as long as some can go; then again whatever was held."""
    first = len(kernel.removed)
    for name in reversed(names):
        with contextlib.suppress(KernelError):
            kernel.remove(name, 0)
    held = [entry for entry in kernel.removed[first:] if not entry["removed"] and entry.get("errno") == "EAGAIN"]
    if not held:
        return kernel.removed[first:]
    requested = {module.name for module in kernel.loaded_modules()} - set(keep) - set(names)
    progress = True
    while requested and progress:
        progress = False
        for name in sorted(requested):
            state = kernel.module_state(name)
            if state is not None and state.refcnt == 0 and _remove_if_possible(kernel, name):
                requested.discard(name)
                progress = True
    for entry in held:
        if _remove_if_possible(kernel, entry["name"]):
            kernel.removed.remove(entry)
    return kernel.removed[first:]


def _state(entries: list[dict[str, Any]], kernel: LiveKernel) -> None:
    for entry in entries:
        state = kernel.module_state(entry["name"]) if entry["loaded"] else None
        entry["refcnt"] = state.refcnt if state else None
        entry["taint"] = state.taint if state else None


def _load_direct(job: dict[str, Any], kernel: StoryKernel, moddir: ModuleDirectory, config: ModprobeConfig) -> bool:
    plan = plan_load(
        job["instance"],
        job["kernel"],
        job["modules"],
        job["params"],
        kernel,
        moddir,
        preflight=False,
        modprobe_config=config,
        intree_modules=job.get("intree_modules", []),
    )
    return _insert_steps(plan.steps, kernel)


def _load_from_tree(
    job: dict[str, Any], kernel: StoryKernel, moddir: ModuleDirectory, config: ModprobeConfig, result: dict[str, Any]
) -> tuple[bool, list[dict[str, Any]]]:
    """Whether every instance module is loaded, and the entries of modules loaded for other devices."""
    plan = plan_load(
        job["instance"],
        job["kernel"],
        [],
        {},
        kernel,
        moddir,
        preflight=False,
        modprobe_config=config,
        intree_modules=job.get("intree_modules", []),
    )
    if not _insert_steps(plan.steps, kernel):
        return False, []
    engine = Modprobe(moddir, config, view=LibkmodView(HostPaths("/")), kernel=kernel)
    names = [modname_from_path(path) for path in job["modules"]]
    coldplug = _coldplug(engine, kernel, names)
    result["coldplug"] = {"devices": coldplug["devices"], "matches": coldplug["matches"]}
    for name in names:
        if name in coldplug["loaded_by"]:
            kernel.story.step(f"{name} was loaded by alias {coldplug['loaded_by'][name]}")
            continue
        mods = engine.lookup(name) or []
        if mods and engine.in_kernel(mods[0]):
            continue  # loaded as a dependency of another of the instance's modules
        kernel.story.step(f"{name} was not loaded by any device's alias: modprobe {name}")
        kernel.reason = f"by name (modprobe {name})"
        try:
            for mod in mods:
                engine.probe_insert(mod)
        finally:
            kernel.reason = ""
    loaded = {entry["name"] for entry in kernel.inserted if entry["loaded"]}
    # Modules the kernel's request_module() had kvc's modprobe load (xt_CHAOS asks for xt_TARPIT)
    # are the instance's too; others hold them, so they go before the instance's own inserts and
    # are unloaded after them.
    first_own = next(
        (at for at, entry in enumerate(kernel.inserted) if entry["origin"] == Origin.INSTANCE.value),
        len(kernel.inserted),
    )
    for name in names:
        mods = [] if name in loaded else engine.lookup(name) or []
        if mods and engine.in_kernel(mods[0]):
            kernel.story.step(f"{name} was loaded on the kernel's request")
            kernel.inserted.insert(
                first_own,
                {
                    "name": name,
                    "origin": Origin.INSTANCE.value,
                    "path": mods[0].path or "",
                    "params": "",
                    "required": True,
                    "loaded": True,
                    "by": "the kernel's request_module()",
                    "seconds": 0.0,
                    "log": [],
                    "requests": [],
                },
            )
            loaded.add(name)
    for name in names:
        if name not in loaded and not any(entry["name"] == name for entry in kernel.inserted):
            kernel.inserted.append(
                {
                    "name": name,
                    "origin": Origin.INSTANCE.value,
                    "path": "",
                    "params": "",
                    "required": True,
                    "loaded": False,
                    "errno": "ENOENT",
                    "error": f"modprobe found no {name} in {moddir.path}",
                    "seconds": 0.0,
                    "log": [],
                    "requests": [],
                }
            )
    return all(name in loaded for name in names), coldplug["others"]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "boot_seconds": round(_uptime(), 3),
        "kernel_release": os.uname().release,
        "delivery": job.get("delivery", "direct"),
        "plan_error": None,
        "modules": [],
        "smoke": None,
        "unload": [],
        "rollback": False,
    }
    _console_shows_notices()
    story = Story(job["progress"])
    story.step("agent started")
    if "secure_boot" in job:
        state = result["secure_boot"] = secure_boot_state(job["secure_boot"]["key_id"])
        story.step(
            f"Secure Boot {state['secure_boot']}, lockdown {state['lockdown']}, sig_enforce {state['sig_enforce']}, "
            f"the enrolled key in {', '.join(state['keyrings']) or 'no trusted keyring'}"
        )
    log = KernelLog()
    kernel = StoryKernel(story, log, Requests(job["requests"]), job["modules"])
    before = {module.name for module in kernel.loaded_modules()}
    moddir = ModuleDirectory(job["moddir"])
    config = load_config([job["modprobe_config"]], module_dir=moddir.path, paths=HostPaths("/"))
    others: list[dict[str, Any]] = []
    try:
        if result["delivery"] == "tree":
            complete, others = _load_from_tree(job, kernel, moddir, config, result)
        else:
            complete = _load_direct(job, kernel, moddir, config)
    except KvcError as exc:
        result["plan_error"] = exc.brief + (f": {exc.details}" if exc.details else "")
        complete = False
    loading_done = time.monotonic()
    ours = [entry for entry in kernel.inserted if not any(entry is other for other in others)]
    result["modules"] = ours
    if "coldplug" in result:
        result["coldplug"]["modules"] = others
    _state(kernel.inserted, kernel)
    if complete and job.get("smoke_test"):
        result["smoke"] = _smoke(
            job["smoke_test"],
            job.get("image_root", ""),
            job.get("tools", ""),
            float(job["smoke_timeout"]),
            log,
            story,
        )
    smoke_done = time.monotonic()
    result["tainted"] = _tainted()
    loaded = [entry["name"] for entry in ours if entry["loaded"]]
    if not complete and loaded:
        result["rollback"] = True
        story.step(f"rollback started: removing {', '.join(reversed(loaded))}")
    result["unload"] = _unload(loaded, kernel, before | {entry["name"] for entry in others})
    done = time.monotonic()
    result["agent_seconds"] = round(done - started, 3)
    result["phase_seconds"] = {
        "load": round(loading_done - started, 3),
        "smoke": round(smoke_done - loading_done, 3),
        "unload": round(done - smoke_done, 3),
    }
    story.step("done")
    return result


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m kvc.verify.guest JOB.json\n")
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        job = json.load(handle)
    write_json(job["result"], run_job(job))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
