#!/usr/bin/env python3
"""Many kvc commands at once on one host: do the locks keep every instance consistent?

The host is a root directory (``KVC_ROOT``) with the fake kernel (Debian's ``Module.symvers``),
Debian's module tree and two instances, each built with real podman FROM one of the examples'
images (simple-kmod: two modules, one with a parameter; edu-kmod: one module), direct delivery.

Each round starts 20 commands at once (start times spread over ``--spread`` seconds, in a seeded
random order), first all on instance A, then ten on A and ten on B:

======= ========================================================================================
load    ``kvc load NAME``; every third one impatient (``KVC_LOCK_TIMEOUT=1``)
unload  ``kvc unload NAME``; every third one impatient
status  ``kvc status NAME --json``
build   ``kvc build NAME --force`` (podman rebuilds from its layer cache; the tag moves)
verify  ``kvc verify NAME`` with a fake qemu (below) and a stand-in kernel directory
======= ========================================================================================

``kvc verify`` runs a fake ``qemu-system-x86_64``, not a VM: a real TCG guest takes both cores
of this machine for most of its run (issue 15's figures), so 20 commands beside it would measure
CPU contention rather than the locks. The fake reads the job kvc wrote into the work share, keeps
the mounted image share for ``--vm-seconds``, checks that the instance's module files in it kept
their bytes throughout (a build that retagged or pruned the image mid-run would be caught), then
writes the agent's result (every module loaded and removed) and the serial log, and exits 0.

Every kvc process runs with a probe (the ``-c`` launcher below) that records, in one event log,
each change of the fake kernel's module list (made under the fake kernel's own lock, so the log
has the kernel's order), each refused insert or removal (errno), and each lock kvc takes: when,
how long it waited, when it let go.

Checks (any failure: exit status 1):

* every command exits 0, or 11 (busy) when it was impatient; no traceback; a busy exit says so in
  its one error line;
* the fake kernel never holds a module twice, and kvc never inserts a module that is loaded nor
  removes one that is not (replaying the log); it refuses a second insert with EEXIST, as Linux
  does (checked once before the rounds);
* no two holds of a lock overlap unless both are shared (verifications);
* after each round, ``kvc status --json`` of each instance says which modules are loaded exactly
  as the fake kernel does; at the end ``kvc load`` of both instances loads exactly their modules
  and ``kvc unload`` of both leaves the kernel empty; ``kvc status`` shows each image up to date;
* nothing left behind: no temporary file (kvc's start with a dot) under the root, nothing in its
  TMPDIR, every lock file free, and podman holds only each instance's one tag.

Prints per kind: commands run, exit codes, the longest lock wait and run time; the inserts and
removals; how many loads and unloads took the instance lock while a verification of the same
instance held its images. ``--json FILE`` writes the same figures.

Needs root, podman, busybox-static, the examples' images for Debian's current kernel (built
when missing, from scripts/bootstrap-base-image.sh's base) and Debian's kernel package
(tests/support/debian_kernel.py, downloaded into the test cache once).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "src", REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from kvc.kmod.kernel.fake import STATE_DIR, FakeKernel  # noqa: E402
from kvc.kmod.kernel.protocol import KernelError  # noqa: E402
from kvc.kmod.paths import HostPaths  # noqa: E402
from kvc.verify.initramfs import BOOT_MODULE_ROOTS  # noqa: E402

KINDS = ("load", "unload", "status", "build", "verify")
# 20 commands per round: how many of each kind.
MIX = {"load": 5, "unload": 4, "status": 5, "build": 3, "verify": 3}
BUSY = 11
IMPATIENT = "1"  # KVC_LOCK_TIMEOUT of every third load and unload
EXAMPLES = {"a": ("simple-kmod", ("simple-kmod", "simple-procfs-kmod")), "b": ("edu-kmod", ("kvc-edu",))}
EVENTS_ENV = "KVC_CONCURRENCY_EVENTS"

# Runs ``python -m kvc ARGS`` with the probe: the fake kernel's module list changes, its refusals
# and kvc's lock holds are appended to the event log (one JSON line each, O_APPEND).
PROBE = r"""
import contextlib, errno, json, os, runpy, sys, time
LOG = os.environ["KVC_CONCURRENCY_EVENTS"]
def record(**event):
    event["pid"] = os.getpid()
    event["cmd"] = sys.argv[1]
    event["t"] = time.time()
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    finally:
        os.close(fd)
from kvc.kmod.kernel import fake
_save = fake.FakeKernel._save
def save(self, state):
    before = list(state.get("sysfs", []))
    after = [module["name"] for module in state["modules"]]
    _save(self, state)
    for name in sorted(set(after) - set(before)):
        record(event="insert", module=name)
    for name in sorted(set(before) - set(after)):
        record(event="remove", module=name)
    if len(after) != len(set(after)):
        record(event="double", modules=after)
fake.FakeKernel._save = save
for call in ("sys_finit_module", "sys_init_module", "sys_delete_module"):
    def refusing(self, *args, _call=getattr(fake.FakeKernel, call), _name=call):
        err = _call(self, *args)
        if err:
            record(event="refused", call=_name, errno=errno.errorcode.get(err, str(err)),
                   module=args[0] if _name == "sys_delete_module" else "")
        return err
    setattr(fake.FakeKernel, call, refusing)
import kvc.lock
_flock = kvc.lock._flock
@contextlib.contextmanager
def flock(path, busy, *, shared, deadline):
    asked = time.time()
    try:
        with _flock(path, busy, shared=shared, deadline=deadline):
            record(event="locked", lock=os.path.basename(path), shared=shared, waited=time.time() - asked)
            try:
                yield
            finally:
                record(event="unlocked", lock=os.path.basename(path), shared=shared)
    except kvc.errors.BusyError:
        record(event="busy", lock=os.path.basename(path), shared=shared, waited=time.time() - asked)
        raise
kvc.lock._flock = flock
sys.argv = ["kvc", *sys.argv[1:]]
runpy.run_module("kvc", run_name="__main__", alter_sys=True)
"""

# The fake qemu: argv as kvc.verify.qemu builds it (-serial file:LOG, -virtfs ...,mount_tag=T,path=P).
FAKE_QEMU = r"""#!{python}
import hashlib, json, os, sys, time
LOG = {log!r}
def share(tag):
    for arg in sys.argv:
        if "mount_tag=" + tag + "," in arg + ",":
            return arg.split("path=")[1].split(",")[0]
    return ""
def digests(root, names):
    found = {{}}
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".ko") and name[:-3] in names:
                with open(os.path.join(directory, name), "rb") as handle:
                    found[name] = hashlib.sha256(handle.read()).hexdigest()
    return found
started = time.time()
work = share("kvcwork")
job = json.load(open(os.path.join(work, "job.json")))
names = [os.path.basename(path)[:-3] for path in job["modules"]]
image = share("kvcimage")
before = digests(image, names) if image else {{}}
time.sleep({seconds})
after = digests(image, names) if image else {{}}
steady = bool(image) and len(before) == len(names) and before == after
with open(LOG, "a") as log:
    log.write(json.dumps({{"event": "vm", "instance": job["instance"], "start": started, "end": time.time(),
                          "image_steady": steady, "pid": os.getpid(), "t": time.time()}}) + "\n")
result = {{
    "modules": [
        {{"name": name, "origin": "instance", "loaded": True, "required": True, "seconds": 0.01, "refcnt": 0,
          "taint": "OE", "log": []}}
        for name in names
    ],
    "unload": [{{"name": name, "removed": True}} for name in reversed(names)],
    "boot_seconds": 0.1, "agent_seconds": {seconds}, "tainted": 0,
}}
with open(os.path.join(work, "result.json"), "w") as handle:
    json.dump(result, handle)
serial = sys.argv[sys.argv.index("-serial") + 1][len("file:"):]
with open(serial, "w") as handle:
    handle.write("kvc-guest: fake guest\n")
"""


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def podman(*args: str, check: bool = True) -> str:
    done = run(["podman", *args])
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Instance:
    name: str
    example: str
    modules: tuple[str, ...]

    @property
    def kernel_names(self) -> set[str]:
        return {module.replace("-", "_") for module in self.modules}


@dataclass
class Host:
    root: Path
    release: str
    kernel_dir: Path
    bin_dir: Path
    events: Path
    instances: dict[str, Instance]

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "KVC_ROOT": str(self.root),
            "KVC_KERNEL": "fake",
            "TMPDIR": str(self.root / "tmp"),
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": str(REPO / "src"),
            EVENTS_ENV: str(self.events),
            **extra,
        }

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-c", PROBE, *args]

    def kvc(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*args), env=self.env(**extra), timeout=900)

    def ok(self, *args: str) -> str:
        done = self.kvc(*args)
        if done.returncode != 0:
            raise RuntimeError(f"kvc {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done.stdout

    def loaded(self) -> list[str]:
        state = json.loads((self.root / STATE_DIR / "state.json").read_text())
        return [module["name"] for module in state["modules"]]


def example_image(example: str, release: str) -> str:
    """The example's image for ``release``, built with kvc when missing."""
    image = f"localhost/{example}-1.0.0:{release}"
    if run(["podman", "image", "exists", image]).returncode == 0:
        return image
    for script in ("setup-podman.sh", "bootstrap-base-image.sh"):
        subprocess.run(["bash", str(REPO / "scripts" / script)], check=True, capture_output=True)
    from support.example import EXAMPLES, write_example_conf

    root = Path(tempfile.mkdtemp(prefix="kvc-cc-example-"))
    try:
        write_example_conf(root, example, example=EXAMPLES / example)
        env = {**os.environ, "KVC_ROOT": str(root)}
        done = run([sys.executable, "-m", "kvc", "build", example, "--kernel", release], env=env)
        if done.returncode != 0:
            raise RuntimeError(f"building the {example} example failed: {done.stderr}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return image


def make_host(base: Path, qemu_seconds: float) -> Host:
    from support.debian_kernel import indexed_debian_kernel

    debian = indexed_debian_kernel()
    release = debian.release
    stem = f"kvccc{uuid.uuid4().hex[:6]}"
    root = base / "root"
    (root / "lib" / "modules").mkdir(parents=True)
    (root / "tmp").mkdir()
    (root / "lib" / "modules" / release).symlink_to(debian.moddir)
    FakeKernel.create(HostPaths(str(root)), release, symvers=str(debian.symvers))
    instances = {}
    for label, (example, modules) in EXAMPLES.items():
        instance = Instance(f"{stem}{label}", example, modules)
        bundle = base / "bundles" / instance.name
        bundle.mkdir(parents=True)
        (bundle / "marker").write_text(f"{instance.name}\n")
        (bundle / "Containerfile").write_text(
            f"FROM {example_image(example, release)}\nCOPY marker /etc/kvc-concurrency-marker\n"
        )
        params = 'KVC_MODULE_PARAMS_simple_procfs_kmod="number=0"\n' if label == "a" else ""
        conf = root / "etc" / "kvc" / f"{instance.name}.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(
            f"KMOD_CONTAINER_BUILD_CONTEXT={bundle}\nKMOD_SOFTWARE_VERSION=1.0.0\n"
            f'KMOD_NAMES="{" ".join(modules)}"\n{params}'
        )
        instances[label] = instance
    # What kvc verify needs of the kernel (its files; the fake qemu boots nothing): a vmlinuz and a
    # module tree with the guest's boot modules.
    from support.modbuild import ModuleSpec, build_module

    kernel_dir = base / "kernel"
    (kernel_dir / "boot").mkdir(parents=True)
    (kernel_dir / "boot" / f"vmlinuz-{release}").write_bytes(b"the fake qemu boots nothing")
    moddir = kernel_dir / "lib" / "modules" / release / "kernel"
    moddir.mkdir(parents=True)
    (moddir.parent / "modules.dep").write_text("".join(f"kernel/{name}.ko:\n" for name in BOOT_MODULE_ROOTS))
    for name in BOOT_MODULE_ROOTS:
        (moddir / f"{name}.ko").write_bytes(build_module(ModuleSpec(name, f"{release} SMP ")))
    bin_dir = base / "bin"
    bin_dir.mkdir()
    events = base / "events.jsonl"
    qemu = bin_dir / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU.format(python=sys.executable, log=str(events), seconds=qemu_seconds))
    qemu.chmod(0o755)
    return Host(root, release, kernel_dir, bin_dir, events, instances)


@dataclass
class Outcome:
    kind: str
    instance: str
    impatient: bool
    returncode: int
    seconds: float
    stdout: str
    stderr: str


def command_args(host: Host, kind: str, name: str) -> list[str]:
    if kind == "status":
        return ["status", name, "--json"]
    if kind == "build":
        return ["build", name, "--force"]
    if kind == "verify":
        return ["verify", name, "--kernel-dir", str(host.kernel_dir), "--accel", "tcg", "--timeout", "120"]
    return [kind, name]


def one_round(host: Host, labels: list[str], rng: random.Random, spread: float) -> list[Outcome]:
    """The MIX of commands on the instances ``labels`` (shared out in turn), all at once."""
    planned: list[tuple[str, str, bool]] = []
    for kind, count in MIX.items():
        for index in range(count):
            label = labels[(index + len(planned)) % len(labels)]
            impatient = kind in ("load", "unload") and index % 3 == 2
            planned.append((kind, host.instances[label].name, impatient))
    rng.shuffle(planned)
    starts = sorted(rng.uniform(0, spread) for _ in planned)
    outcomes: list[Optional[Outcome]] = [None] * len(planned)
    began = time.monotonic()

    def go(slot: int) -> None:
        kind, name, impatient = planned[slot]
        time.sleep(max(0.0, began + starts[slot] - time.monotonic()))
        extra = {"KVC_LOCK_TIMEOUT": IMPATIENT} if impatient else {}
        started = time.monotonic()
        done = host.kvc(*command_args(host, kind, name), **extra)
        outcomes[slot] = Outcome(
            kind, name, impatient, done.returncode, time.monotonic() - started, done.stdout, done.stderr
        )

    threads = [threading.Thread(target=go, args=(slot,)) for slot in range(len(planned))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [outcome for outcome in outcomes if outcome is not None]


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)


def check_outcomes(findings: Findings, outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        label = f"{outcome.kind} {outcome.instance}{' (impatient)' if outcome.impatient else ''}"
        findings.check("Traceback" not in outcome.stderr, f"{label}: traceback: {outcome.stderr[-800:]}")
        if outcome.returncode == BUSY:
            findings.check(outcome.impatient, f"{label}: busy after waiting the default 600 s")
            first = outcome.stderr.splitlines()[0] if outcome.stderr else ""
            findings.check(
                "locked by another kvc run" in first or "in use by another kvc run" in first,
                f"{label}: busy without saying so: {first!r}",
            )
        else:
            findings.check(
                outcome.returncode == 0,
                f"{label}: exit {outcome.returncode}: {(outcome.stdout + outcome.stderr)[-800:]}",
            )
        if outcome.kind == "status" and outcome.returncode == 0:
            try:
                json.loads(outcome.stdout)
            except ValueError:
                findings.problems.append(f"{label}: output is not JSON: {outcome.stdout[:200]!r}")


def check_kernel_events(findings: Findings, events: list[dict[str, Any]]) -> None:
    """Replay the fake kernel's changes: no module inserted while loaded, none removed while absent."""
    loaded: set[str] = set()
    for event in events:
        if event["event"] == "double":
            findings.problems.append(f"the fake kernel held a module twice: {event['modules']}")
        elif event["event"] == "insert":
            findings.check(event["module"] not in loaded, f"{event['module']} inserted while loaded")
            loaded.add(event["module"])
        elif event["event"] == "remove":
            findings.check(event["module"] in loaded, f"{event['module']} removed while not loaded")
            loaded.discard(event["module"])


def lock_holds(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each hold of a lock: lock file, shared, start, end, pid, wait."""
    open_holds: dict[tuple[int, str], dict[str, Any]] = {}
    holds = []
    for event in sorted(events, key=lambda e: e["t"]):
        key = (event["pid"], event.get("lock", ""))
        if event["event"] == "locked":
            open_holds[key] = {
                "lock": event["lock"],
                "shared": event["shared"],
                "start": event["t"],
                "pid": event["pid"],
                "cmd": event["cmd"],
                "waited": event["waited"],
            }
        elif event["event"] == "unlocked" and key in open_holds:
            hold = open_holds.pop(key)
            hold["end"] = event["t"]
            holds.append(hold)
    for hold in open_holds.values():  # a process that died holding it: the kernel dropped the flock
        holds.append({**hold, "end": hold["start"]})
    return holds


def check_lock_holds(findings: Findings, holds: list[dict[str, Any]]) -> None:
    by_lock: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for hold in holds:
        by_lock[hold["lock"]].append(hold)
    for lock, group in by_lock.items():
        group.sort(key=lambda h: h["start"])
        for index, hold in enumerate(group):
            for other in group[index + 1 :]:
                if other["start"] >= hold["end"]:
                    break
                findings.check(
                    hold["shared"] and other["shared"],
                    f"{lock}: held by pid {hold['pid']} and pid {other['pid']} at once "
                    f"({'shared' if hold['shared'] else 'exclusive'}/{'shared' if other['shared'] else 'exclusive'})",
                )


def status_loaded(host: Host, instance: Instance) -> set[str]:
    """The modules ``kvc status --json`` says are loaded."""
    data = json.loads(host.ok("status", instance.name, "--json"))
    (entry,) = data["instances"]
    names = set()
    for kernel in entry["kernels"]:
        for module in kernel.get("modules", []):
            if module.get("loaded"):
                names.add(module["name"].replace("-", "_"))
    return names


def check_state(findings: Findings, host: Host, when: str) -> None:
    loaded = set(host.loaded())
    for instance in host.instances.values():
        says = status_loaded(host, instance)
        holds = loaded & instance.kernel_names
        findings.check(says == holds, f"{when}: kvc status {instance.name} says {sorted(says)}, kernel {sorted(holds)}")


def check_final(findings: Findings, host: Host) -> None:
    for instance in host.instances.values():
        done = host.kvc("load", instance.name)
        findings.check(done.returncode == 0, f"final load {instance.name}: {done.stderr[-400:]}")
    wanted = set().union(*(i.kernel_names for i in host.instances.values()))
    findings.check(sorted(host.loaded()) == sorted(wanted), f"after loading both: kernel holds {host.loaded()}")
    check_state(findings, host, "after loading both")
    for instance in host.instances.values():
        data = json.loads(host.ok("status", instance.name, "--json"))
        for kernel in data["instances"][0]["kernels"]:
            image = kernel.get("image") or {}
            findings.check(
                bool(image.get("exists")) and bool(image.get("up_to_date")),
                f"{instance.name}: status shows the image {image}",
            )
        done = host.kvc("unload", instance.name)
        findings.check(done.returncode == 0, f"final unload {instance.name}: {done.stderr[-400:]}")
    findings.check(host.loaded() == [], f"after unloading both: kernel holds {host.loaded()}")
    check_leftovers(findings, host)


def check_leftovers(findings: Findings, host: Host) -> None:
    for directory, dirnames, filenames in os.walk(host.root):
        relative = os.path.relpath(directory, host.root)
        if relative == "lib/modules" or relative.startswith(STATE_DIR):
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            if name.startswith(".") and not (relative == "." and name == STATE_DIR):
                findings.problems.append(f"left behind: {os.path.join(relative, name)}")
    findings.check(not any((host.root / "tmp").iterdir()), f"left in TMPDIR: {sorted(os.listdir(host.root / 'tmp'))}")
    lock_dir = host.root / "run" / "kvc"
    for lock in sorted(lock_dir.glob("*.lock")) if lock_dir.exists() else []:
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                findings.problems.append(f"{lock.name} is still held")
    for instance in host.instances.values():
        tags = podman("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference=*{instance.name}*")
        wanted = [f"localhost/{instance.name}-1.0.0:{host.release}"]
        findings.check(
            sorted(set(tags.split())) == wanted, f"{instance.name}: podman holds {sorted(set(tags.split()))}"
        )


def figures(outcomes: list[Outcome], events: list[dict[str, Any]], holds: list[dict[str, Any]]) -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        mine = [o for o in outcomes if o.kind == kind]
        waits = [e["waited"] for e in events if e["event"] in ("locked", "busy") and e["cmd"] == kind]
        kinds[kind] = {
            "runs": len(mine),
            "exits": dict(sorted(Counter(str(o.returncode) for o in mine).items())),
            "median_run_s": round(statistics.median([o.seconds for o in mine]), 2) if mine else 0.0,
            "longest_run_s": round(max((o.seconds for o in mine), default=0.0), 2),
            "longest_lock_wait_s": round(max(waits, default=0.0), 2),
        }
    verify_holds = [h for h in holds if h["cmd"] == "verify"]
    load_holds = [h for h in holds if h["cmd"] in ("load", "unload")]
    beside_verify = sum(
        1
        for h in load_holds
        if any(
            v["lock"] == h["lock"].replace(".lock", ".images.lock") and v["start"] < h["end"] and h["start"] < v["end"]
            for v in verify_holds
        )
    )
    vms = [e for e in events if e["event"] == "vm"]
    return {
        "kinds": kinds,
        "inserts": sum(1 for e in events if e["event"] == "insert"),
        "removes": sum(1 for e in events if e["event"] == "remove"),
        "refused_by_kernel": dict(Counter(f"{e['call']} {e['errno']}" for e in events if e["event"] == "refused")),
        "busy_exits": sum(1 for o in outcomes if o.returncode == BUSY),
        "loads_unloads_during_a_verification": beside_verify,
        "load_unload_holds": len(load_holds),
        "verifications": len(vms),
        "vm_image_steady": sum(1 for v in vms if v["image_steady"]),
    }


def print_figures(data: dict[str, Any], rounds: int, wall: float) -> None:
    print(f"\n{rounds} round(s) x 2 scenarios x 20 commands, {wall:.0f} s")
    print(f"{'kind':8} {'runs':>5}  {'exit codes':18} {'median s':>9} {'longest s':>10} {'longest wait s':>15}")
    for kind, row in data["kinds"].items():
        exits = ", ".join(f"{code}: {count}" for code, count in row["exits"].items())
        print(
            f"{kind:8} {row['runs']:>5}  {exits:18} {row['median_run_s']:>9.2f} {row['longest_run_s']:>10.2f}"
            f" {row['longest_lock_wait_s']:>15.2f}"
        )
    print(
        f"fake kernel: {data['inserts']} inserts, {data['removes']} removals, refused: "
        f"{data['refused_by_kernel'] or 'none'}; busy exits: {data['busy_exits']}"
    )
    print(
        f"verifications: {data['verifications']} (image unchanged under each: {data['vm_image_steady']}); "
        f"loads/unloads that held the instance lock during a verification of it: "
        f"{data['loads_unloads_during_a_verification']} of {data['load_unload_holds']}"
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both scenarios (default 3)")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--spread", type=float, default=2.0, help="start times spread over S seconds (default 2)")
    parser.add_argument("--vm-seconds", type=float, default=3.0, help="how long the fake guest runs (default 3)")
    parser.add_argument("--json", metavar="FILE", help="write the figures and problems as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the host directory")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="kvc-cc-"))
    host: Optional[Host] = None
    findings = Findings()
    started = time.monotonic()
    try:
        host = make_host(base, args.vm_seconds)
        check_double_insert_refused(findings, host)
        for instance in host.instances.values():
            host.ok("build", instance.name)
        for number in range(args.rounds):
            for scenario, labels in (("one instance", ["a"]), ("two instances", ["a", "b"])):
                outcomes = one_round(host, labels, rng, args.spread)
                check_outcomes(findings, outcomes)
                findings.outcomes.extend(outcomes)
                check_state(findings, host, f"round {number + 1}, {scenario}")
                print(
                    f"round {number + 1}, {scenario}: "
                    + ", ".join(f"{k} {c}" for k, c in sorted(Counter(o.returncode for o in outcomes).items())),
                    flush=True,
                )
        check_final(findings, host)
        events = read_events(host.events)
        check_kernel_events(findings, events)
        holds = lock_holds(events)
        check_lock_holds(findings, holds)
        data = figures(findings.outcomes, events, holds)
        print_figures(data, args.rounds, time.monotonic() - started)
        for vm in (e for e in events if e["event"] == "vm"):
            findings.check(vm["image_steady"], f"verification of {vm['instance']}: the image changed under the guest")
    finally:
        if host is not None:
            for instance in host.instances.values():
                ids = podman("images", "-q", "--filter", f"reference=*{instance.name}*", check=False).split()
                if ids:
                    run(["podman", "rmi", "-f", *sorted(set(ids))])
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    for problem in findings.problems:
        print(f"PROBLEM: {problem}")
    print(f"{len(findings.problems)} problem(s)" + (f"; host kept in {base}" if args.keep else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({**data, "problems": findings.problems}, indent=2) + "\n")
    return 1 if findings.problems else 0


def check_double_insert_refused(findings: Findings, host: Host) -> None:
    """The fake kernel refuses a second insert of a module with EEXIST, as Linux does; on a scratch root."""
    from support.modbuild import ModuleSpec, build_module

    scratch = host.root.parent / "scratch-kernel"
    kernel = FakeKernel.create(HostPaths(str(scratch)), host.release)
    module = scratch / "twice.ko"
    module.write_bytes(build_module(ModuleSpec("twice", f"{host.release} SMP preempt mod_unload modversions ")))
    kernel.finit_module(str(module))
    try:
        kernel.finit_module(str(module))
        findings.problems.append("the fake kernel inserted a module twice")
    except KernelError as error:
        findings.check(error.errno == 17, f"a second insert failed with errno {error.errno}, not EEXIST")
    shutil.rmtree(scratch)


if __name__ == "__main__":
    sys.exit(main())
