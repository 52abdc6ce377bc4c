#!/usr/bin/env python3
"""kill -9 at random points of kvc's build, pull, extract, tree install, load and sign.

Each run starts one kvc command on a fake-kernel host (a root directory: the fake kernel, a small
copy of Debian's module tree, the instance's conf; real podman, a real local registry for pulls),
kills its process group with SIGKILL after a random delay (uniform between 0 and the command's
calibrated duration; a command that finished first counts as not killed), then runs the command
again, without help, and checks:

* the second run exits 0 (recovered), without a traceback;
* every module the fake kernel holds, after the kill and after the recovery, is byte for byte a
  complete module of one of the instance's images (the fake kernel records the sha256 of what it
  was given): no half-extracted or half-installed module is ever loaded;
* the host's files (module tree with its depmod indexes, firmware, /etc) are byte for byte those
  of a clean run of the same command on a fresh host, with no temporary file left;
* ``kvc status --json`` agrees with that clean run (image, extraction, delivery, loaded modules),
  kvc's state directory holds no leftover scratch, and podman holds no candidate tag.

Commands (the second run is the same command, except where noted):

============ ==================================================================================
build        ``kvc build NAME --force`` (every step a cache hit: podman build, the image's
             verification, the tag move, pruning); recovery ``kvc build NAME``
pull         ``kvc pull NAME`` on a host with a podman storage of its own, the image removed
             first (so layers are downloaded) from a local TLS registry
extract      ``kvc load NAME --force`` (extracted again, modules reloaded), direct delivery
tree install ``kvc deliver NAME`` into the module tree (files, depmod, records) and
             ``kvc deliver NAME --remove`` (alternately)
load         ``kvc load NAME`` from unloaded modules, direct and tree delivery (alternately)
sign         ``kvc sign NAME`` (the image's modules signed into a new image under the same tag)
============ ==================================================================================

A kill can also land in podman's own image write (``podman build`` under kvc's build and sign):
podman 4.3 then leaves its storage with a damaged image, and every listing fails until it is
removed. The run checks that kvc either does its work anyway (a command that lists no images) or
stops with one error line naming the image and the repair (``podman rmi -f ID``), carries the
repair out as a user would, and then checks the recovery as above; such runs are counted apart.

Prints per command: runs, killed mid-way, recovered, inconsistencies (with what they were).
Exit status 1 when any run was inconsistent or did not recover. Needs root, podman, the simple-kmod
example's image (built when missing) and Debian's kernel package (tests/support/debian_kernel.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "src", REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

if TYPE_CHECKING:
    from support.faulthost import Host
    from support.registry import LocalRegistry

COMMANDS = ("build", "pull", "extract", "tree install", "load", "sign")
LABEL_SIGNER_KEY = "kvc.signer-key-id"


@dataclass
class Tally:
    runs: int = 0
    killed: int = 0
    recovered: int = 0
    inconsistent: int = 0
    finished: int = 0  # recoveries that found the killed run's work done (a removal: nothing left)
    damaged: int = 0  # kills that left podman's storage with a damaged image (podman killed mid-write)
    problems: Counter[str] = field(default_factory=Counter)


@dataclass
class Fixture:
    """Everything the runs share: the hosts, the images' ids and module digests, the references."""

    work: Path
    host: Host  # build, extract, tree install, load, sign
    puller: Optional[Host]  # pull (its own podman storage)
    conf_direct: str
    conf_tree: str
    conf_signer: str
    unsigned_id: str
    module_digests: set[str]  # the instance's modules in the unsigned and in the signed image
    signed_digests: set[str]
    key_id: str
    references: dict[str, dict[str, str]]  # host files after clean runs: pristine, direct, tree
    statuses: dict[str, dict[str, object]]  # kvc status after clean runs
    pulled_id: str = ""  # the image a clean pull gives (the registry's copy of the unsigned one)
    durations: dict[str, float] = field(default_factory=dict)


# ---- set-up ---------------------------------------------------------------------------------------------


def image_module_digests(host: Host, ref: str) -> set[str]:
    """sha256 of the instance's modules in image ``ref`` (read through a mount)."""
    from kvc.kmod.digest import file_sha256
    from support.faulthost import MODULES

    mount = host.podman("image", "mount", ref).stdout.strip().splitlines()[-1]
    try:
        found = set()
        for directory, _dirs, files in os.walk(os.path.join(mount, "lib", "modules", host.release)):
            for name in files:
                if name.removesuffix(".ko") in MODULES:
                    found.add(file_sha256(os.path.join(directory, name)).hex())
        return found
    finally:
        host.podman("image", "unmount", ref, check=False)


def status_view(status: dict[str, object]) -> dict[str, object]:
    """What a run's ``kvc status --json`` must agree on with a clean run's."""
    kernel = status["instances"][0]["kernels"][0]  # type: ignore[index]
    delivery = kernel["delivery"]
    return {
        "image": {key: kernel["image"][key] for key in ("exists", "up_to_date")},
        "extracted": kernel["extracted"],
        "delivery": None if delivery is None else {key: delivery[key] for key in ("mode", "files")},
        "loaded": sorted(m["name"] for m in kernel["modules"] if m["loaded"]),
    }


def set_up(
    work: Path, name: str, with_pull: bool, say: Callable[[str], None]
) -> tuple[Fixture, Optional[LocalRegistry]]:
    from support.debian_kernel import indexed_debian_kernel
    from support.faulthost import (
        example_image,
        host_digest,
        instance_conf,
        new_host,
        podman,
        small_tree,
        write_bundle,
    )

    kernel = indexed_debian_kernel()
    release = kernel.release
    say(f"setting up in {work} (kernel {release})")
    tree = work / "tree"
    small_tree(kernel.moddir, tree, release)
    base = f"localhost/{name}-base:1"
    podman("tag", example_image(release), base)
    bundle = work / "bundle"
    write_bundle(bundle, base)
    keys = work / "keys"
    conf_direct = instance_conf(bundle)
    conf_tree = instance_conf(bundle, delivery="tree")
    conf_signer = instance_conf(
        bundle, extra=f"KVC_SIGN_CERT={keys}/kvc-signing.pem\nKVC_SIGN_KEY={keys}/kvc-signing.key\n"
    )
    host = new_host(work, "host", name, release, tree, kernel.symvers, conf_direct)
    host.ok("build", name)
    keys.mkdir()
    host.ok("keys", "generate", "--out", str(keys), "--cn", "kvc kill9")
    unsigned_id = host.image_id()
    unsigned = image_module_digests(host, host.tag)

    # Clean runs on a host of their own give the references.
    ref = new_host(work, "reference", name, release, tree, kernel.symvers, conf_direct)
    references = {"pristine": host_digest(ref.root)}
    statuses = {}
    ref.ok("load", name)
    references["direct"] = host_digest(ref.root)
    statuses["direct loaded"] = status_view(ref.status())
    ref.ok("unload", name)
    ref.conf.write_text(conf_tree)
    ref.ok("deliver", name)
    references["tree"] = host_digest(ref.root)
    statuses["tree"] = status_view(ref.status())
    ref.ok("load", name)
    statuses["tree loaded"] = status_view(ref.status())
    ref.ok("unload", name)
    ref.ok("deliver", name, "--remove")
    statuses["none"] = status_view(ref.status())
    if host_digest(ref.root) != references["pristine"]:
        raise RuntimeError("a clean delivery and removal did not give the pristine tree back")

    ref.conf.write_text(conf_signer)
    ref.ok("sign", name)
    signed = image_module_digests(ref, ref.tag)
    labels = json.loads(host.podman("image", "inspect", "--format", "{{json .Labels}}", host.tag).stdout)
    key_id = labels[LABEL_SIGNER_KEY]
    restore_unsigned(host, unsigned_id)
    shutil.rmtree(ref.root)

    registry = None
    puller = None
    if with_pull:
        from support.registry import LocalRegistry

        registry = LocalRegistry().start()
        repo = f"{registry.host}/kvc/{name}"
        settings = f"KVC_REGISTRY_AUTH_FILE={registry.auth_file}\nKVC_REGISTRY_CERTS_DIR={registry.certs_dir}\n"
        (host.conf.parent / "kmods-via-containers.conf").write_text(settings)
        host.ok("push", name, repo)
        runroot = tempfile.mkdtemp(prefix="kvck9-", dir="/tmp")
        storage = ("--root", str(work / "pull-storage"), "--runroot", runroot)
        puller = new_host(
            work,
            "puller",
            name,
            release,
            tree,
            kernel.symvers,
            instance_conf(bundle, extra=f"KVC_REGISTRY={repo}\n"),
            settings=settings + f"KVC_RUNTIME_ARGS='{' '.join(storage)}'\n",
            storage=storage,
        )
        puller.ok("pull", name)
    fixture = Fixture(
        work,
        host,
        puller,
        conf_direct,
        conf_tree,
        conf_signer,
        unsigned_id,
        unsigned | signed,
        signed,
        key_id,
        references,
        statuses,
        puller.image_id() if puller is not None else "",
    )
    return fixture, registry


def restore_unsigned(host: Host, unsigned_id: str) -> None:
    """The tag back on the unsigned image; the instance's other images (signed ones, and what a
    killed signing build left) removed."""
    host.podman("tag", unsigned_id, host.tag)
    ids = set(host.podman("images", "-q", "--no-trunc", "--filter", f"label=name={host.name}").stdout.split())
    others = sorted(i for i in ids if i.removeprefix("sha256:") != unsigned_id.removeprefix("sha256:"))
    if others:
        host.podman("rmi", "-f", *others, check=False)
    # The tag moved by hand, outside kvc: as a user then does, have kvc ask podman again (it
    # trusts its record of the images otherwise).
    host.ok("status", host.name, "--refresh")


# ---- scenarios ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    command: str
    host: Host
    argv: tuple[str, ...]
    recovery: tuple[str, ...]
    reference: Optional[str]  # the host files expected afterwards (None: unchanged by the command)
    status: Optional[str]  # the status expected afterwards (None: not compared)
    # A state error the recovery may answer when the killed run had finished its work ("": none).
    finished: str = ""


def delivered_mode(host: Host) -> Optional[str]:
    path = host.root / "var" / "lib" / "kvc" / host.name / "tree" / f"{host.release}.json"
    try:
        return str(json.loads(path.read_text())["delivery"])
    except (OSError, ValueError, KeyError):
        return None


def prepare(fixture: Fixture, command: str, variant: int) -> Scenario:
    """Put the host in the state the command starts from (with kvc commands run to completion),
    and say what to run and expect."""
    host = fixture.host
    name = host.name

    def unloaded() -> None:
        if host.loaded():
            host.ok("unload", name)

    def mode(delivery: str) -> None:
        if delivery == "direct" and delivered_mode(host) == "tree":
            unloaded()
            host.ok("deliver", name, "--remove")
        host.conf.write_text(fixture.conf_tree if delivery == "tree" else fixture.conf_direct)

    if command != "sign" and host.conf.read_text() == fixture.conf_signer:
        host.conf.write_text(fixture.conf_direct)
        restore_unsigned(host, fixture.unsigned_id)
    if command == "build":
        return Scenario(command, host, ("build", name, "--force"), ("build", name), None, None)
    if command == "pull":
        assert fixture.puller is not None
        fixture.puller.podman("rmi", "-f", fixture.puller.tag, check=False)
        return Scenario(command, fixture.puller, ("pull", name), ("pull", name), None, None)
    if command == "extract":
        mode("direct")
        return Scenario(command, host, ("load", name, "--force"), ("load", name), "direct", "direct loaded")
    if command == "tree install":
        unloaded()
        mode("tree")
        if variant % 2 == 0:
            if delivered_mode(host) is not None:
                host.ok("deliver", name, "--remove")
            return Scenario(command, host, ("deliver", name), ("deliver", name), "tree", "tree")
        if delivered_mode(host) != "tree":
            host.ok("deliver", name)
        args = ("deliver", name, "--remove")
        return Scenario(command, host, args, args, "pristine", "none", f"{name} has no delivery for kernel")
    if command == "load":
        unloaded()
        delivery = ("direct", "tree")[variant % 2]
        mode(delivery)
        return Scenario(command, host, ("load", name), ("load", name), delivery, f"{delivery} loaded")
    if command == "sign":
        restore_unsigned(host, fixture.unsigned_id)
        host.conf.write_text(fixture.conf_signer)
        return Scenario(command, host, ("sign", name), ("sign", name), None, None)
    raise ValueError(command)


def leftovers(host: Host) -> list[str]:
    """kvc's scratch left in its state directory (dot files: temporary files and directories)."""
    state = host.root / "var" / "lib" / "kvc" / host.name
    found = []
    for directory, dirnames, filenames in os.walk(state):
        for entry in [*dirnames, *filenames]:
            if entry.startswith("."):
                found.append(os.path.relpath(os.path.join(directory, entry), host.root))
    return found


def loaded_problems(fixture: Fixture, host: Host, when: str) -> list[str]:
    return [
        f"{when}: the kernel holds {module} whose bytes are no complete module of the instance"
        for module, digest in host.loaded().items()
        if digest not in fixture.module_digests
    ]


def check(fixture: Fixture, scenario: Scenario, before: dict[str, str]) -> list[str]:
    from support.faulthost import host_digest, tree_differences

    host = scenario.host
    problems = loaded_problems(fixture, host, "after recovery")
    want = before if scenario.reference is None else fixture.references[scenario.reference]
    problems += [f"host file {line}" for line in tree_differences(host_digest(host.root), want)]
    problems += [f"scratch left: {path}" for path in leftovers(host)]
    tags = [tag for tag in host.tags() if host.name in tag and not tag.endswith("-base:1")]
    if tags != [host.tag]:
        problems.append(f"image names {tags}, expected [{host.tag}]")
    status = host.kvc("status", host.name, "--json")
    if status.returncode != 0:
        problems.append(f"kvc status exited {status.returncode}: {status.stderr.strip()}")
        return problems
    view = status_view(json.loads(status.stdout))
    if view["image"] != {"exists": True, "up_to_date": True}:
        problems.append(f"status: image {view['image']}")
    if scenario.status is not None:
        want_status = fixture.statuses[scenario.status]
        for key in ("extracted", "delivery", "loaded"):
            if view[key] != want_status[key]:
                problems.append(f"status: {key} {view[key]}, expected {want_status[key]}")
    if scenario.command == "sign":
        labels = json.loads(host.podman("image", "inspect", "--format", "{{json .Labels}}", host.tag).stdout)
        if labels.get(LABEL_SIGNER_KEY) != fixture.key_id:
            problems.append(f"signed image labelled {labels.get(LABEL_SIGNER_KEY)!r}")
        if image_module_digests(host, host.tag) != fixture.signed_digests:
            problems.append("the signed image's modules are not the signed modules")
    if scenario.command == "build" and host.image_id() != fixture.unsigned_id:
        problems.append(f"the tag names {host.image_id()[:12]}, not the cached build {fixture.unsigned_id[:12]}")
    if scenario.command == "pull" and host.image_id() != fixture.pulled_id:
        problems.append(f"the pulled tag names {host.image_id()[:12]}, not the pushed {fixture.pulled_id[:12]}")
    return problems


# ---- runs -----------------------------------------------------------------------------------------------


def start(host: Host, args: tuple[str, ...], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            host.argv(*args), stdout=out, stderr=subprocess.STDOUT, env=host.env(), start_new_session=True
        )


def calibrate(fixture: Fixture, commands: tuple[str, ...], say: Callable[[str], None]) -> None:
    """How long each command takes unkilled (the kill delays are drawn up to that)."""
    for command in commands:
        scenario = prepare(fixture, command, 0)
        began = time.monotonic()
        scenario.host.ok(*scenario.argv)
        fixture.durations[command] = time.monotonic() - began
        say(f"  {command}: {fixture.durations[command]:.2f} s unkilled")


def damaged_image(host: Host) -> str:
    """The id of an image podman's storage holds damaged (a listing fails naming it), or ""."""
    listing = host.podman("images", "-q", check=False)
    found = re.search(r'for image with ID "([0-9a-f]{64})" \(consider removing', listing.stderr)
    return found.group(1) if listing.returncode != 0 and found else ""


def run_one(fixture: Fixture, command: str, variant: int, rng: random.Random, tally: Tally, log_dir: Path) -> list[str]:
    from support.faulthost import host_digest

    scenario = prepare(fixture, command, variant)
    host = scenario.host
    before = host_digest(host.root)
    delay = rng.uniform(0.0, fixture.durations[command])
    log = log_dir / "killed.log"
    process = start(host, scenario.argv, log)
    killed = False
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed = True
    output = log.read_text(errors="replace")
    problems = loaded_problems(fixture, host, "after the kill")
    if not killed and process.returncode != 0:
        problems.append(f"the unkilled run exited {process.returncode}: {output.strip()[-300:]}")
    if "Traceback" in output:
        problems.append("traceback in the killed run")
    damaged = damaged_image(host)
    if damaged:
        # podman 4.3's own write was killed half-way: every listing fails until the image goes. kvc
        # must say so in one line with the repair, which is then carried out as a user would.
        tally.damaged += 1
        # A command that lists no images (sign) goes on; one that does must name the repair.
        tried = host.kvc(*scenario.recovery)
        named = tried.returncode == 0 or f"rmi -f {damaged}" in tried.stderr
        if not named or "Traceback" in tried.stderr:
            problems.append(f"with a damaged image, kvc exited {tried.returncode}: {tried.stderr.strip()[-300:]}")
        host.podman("rmi", "-f", damaged)
    recovery = host.kvc(*scenario.recovery)
    finished = bool(scenario.finished) and recovery.returncode == 6 and scenario.finished in recovery.stderr
    recovered = (recovery.returncode == 0 or finished) and "Traceback" not in recovery.stderr
    tally.finished += finished
    if not recovered:
        problems.append(f"recovery exited {recovery.returncode}: {recovery.stderr.strip()[-400:]}")
    problems += check(fixture, scenario, before)
    tally.runs += 1
    tally.killed += killed
    tally.recovered += recovered
    if problems:
        tally.inconsistent += 1
        tally.problems.update(
            problem.split(":", 1)[0] if problem.startswith("host file") else problem[:160] for problem in problems
        )
    what = f"killed after {delay:.2f} s" if killed else f"finished within {delay:.2f} s"
    if damaged:
        what += f"; podman's storage damaged (image {damaged[:12]}), repaired as kvc's hint says"
    return [what, *problems]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs in all, spread evenly over the commands")
    parser.add_argument("--seed", type=int, default=20261205)
    parser.add_argument(
        "--commands", default=",".join(COMMANDS), help="comma-separated subset of: " + ", ".join(COMMANDS)
    )
    parser.add_argument("--json", help="write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    args = parser.parse_args(argv)
    commands = tuple(c.strip() for c in args.commands.split(",") if c.strip())
    unknown = [c for c in commands if c not in COMMANDS]
    if unknown or not commands:
        parser.error(f"unknown command(s) {unknown}; choose from {', '.join(COMMANDS)}")

    def say(text: str) -> None:
        print(text, flush=True)

    from support.faulthost import instance_name, podman

    work = Path(tempfile.mkdtemp(prefix="kvc-kill9-"))
    name = instance_name("kvck9")
    rng = random.Random(args.seed)
    tallies = {command: Tally() for command in commands}
    registry = None
    fixture = None
    began = time.monotonic()
    try:
        fixture, registry = set_up(work, name, "pull" in commands, say)
        say("calibrating:")
        calibrate(fixture, commands, say)
        order: list[str] = []
        while len(order) < args.runs:
            cycle = list(commands)
            rng.shuffle(cycle)
            order += cycle
        for index, command in enumerate(order[: args.runs]):
            lines = run_one(fixture, command, index // len(commands), rng, tallies[command], work)
            if args.verbose or len(lines) > 1 or "damaged" in lines[0]:
                say(f"run {index + 1} {command}: " + "; ".join(lines))
    finally:
        if fixture is not None:
            restore_unsigned(fixture.host, fixture.unsigned_id)
            if fixture.puller is not None:
                fixture.puller.podman("rmi", "-af", check=False)
                shutil.rmtree(fixture.puller.storage[3], ignore_errors=True)
        ids = podman("images", "-q", "--filter", f"label=name={name}").stdout.split()
        podman("rmi", "-f", *sorted(set(ids)), f"localhost/{name}-base:1", check=False)
        if registry is not None:
            registry.stop()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    elapsed = time.monotonic() - began
    say(f"\nkill -9: {args.runs} runs, seed {args.seed}, {elapsed:.0f} s")
    say(f"{'command':<14}{'runs':>6}{'killed mid-way':>16}{'recovered':>11}{'inconsistencies':>17}")
    for command, tally in tallies.items():
        say(f"{command:<14}{tally.runs:>6}{tally.killed:>16}{tally.recovered:>11}{tally.inconsistent:>17}")
    total = Tally(
        sum(t.runs for t in tallies.values()),
        sum(t.killed for t in tallies.values()),
        sum(t.recovered for t in tallies.values()),
        sum(t.inconsistent for t in tallies.values()),
    )
    say(f"{'all':<14}{total.runs:>6}{total.killed:>16}{total.recovered:>11}{total.inconsistent:>17}")
    for command, tally in tallies.items():
        if tally.finished:
            say(
                f"  {command}: {tally.finished} recoveries found the killed run's work done "
                "(a removal: 'has no delivery', exit 6, the tree pristine)"
            )
        if tally.damaged:
            say(
                f"  {command}: {tally.damaged} kills left podman's storage with a damaged image (podman killed "
                "mid-write); kvc named it and the repair ('podman rmi -f ID'), and recovered after it"
            )
        for problem, count in tally.problems.most_common():
            say(f"  {command}: {count} x {problem}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "runs": args.runs,
                    "seed": args.seed,
                    "seconds": round(elapsed),
                    "commands": {
                        c: {
                            "runs": t.runs,
                            "killed": t.killed,
                            "recovered": t.recovered,
                            "inconsistent": t.inconsistent,
                            "podman_damaged": t.damaged,
                        }
                        for c, t in tallies.items()
                    },
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if total.inconsistent or total.recovered < total.runs else 0


if __name__ == "__main__":
    sys.exit(main())
