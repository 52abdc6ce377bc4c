#!/usr/bin/env python3
"""No space left (ENOSPC) and read-only file systems (EROFS) under kvc's extraction, tree
delivery, depmod output, load record and caches.

Every case runs on a fresh fake-kernel host (a root directory: the fake kernel, a small copy of
Debian's module tree, the instance's image built FROM the simple-kmod example's with firmware, a
modprobe.d file and a udev rule) inside a private mount namespace, where one directory of the host
is replaced by a tiny tmpfs holding a copy of its files (``mount -t tmpfs -o size=...``, sized to
what it holds plus a margin) or bound read-only onto itself. Then one kvc command runs. A case
passes when:

* a fault case ends with exactly one ``kvc: error:`` line (a hint may follow), no traceback, the
  documented exit status (10: "the host refused a file operation: ... no space left, read-only"),
  and the host as it was: every host file (module tree with its indexes, firmware, /etc), kvc's
  state (/var/lib/kvc) and the modules the fake kernel holds, compared before and after;
* a cache case (a cache that cannot be written is only slower) exits 0 with the host as a clean
  run leaves it.

Prints one line per case and the totals; exit status 1 when any case failed. Needs root (mount),
podman, unshare/nsenter, the simple-kmod example's image (built when missing) and Debian's kernel
package (tests/support/debian_kernel.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "src", REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

if TYPE_CHECKING:
    from support.faulthost import Host
    from support.treehost import MountNamespace

HOST_FILES = 10
PAGE = 4096


@dataclass(frozen=True)
class Case:
    what: str  # the step that meets the fault
    fault: str  # "ENOSPC" or "EROFS"
    where: str  # the directory replaced, relative to the host root
    delivery: str  # the conf's KVC_DELIVERY
    before: tuple[tuple[str, ...], ...]  # kvc commands that make the previous state
    command: tuple[str, ...]  # NAME stands for the instance
    margin: int = 0  # ENOSPC: bytes free on the tmpfs beyond what it holds
    margin_modules: bool = False  # ENOSPC: plus the size of the modules the delivery writes
    expect_ok: bool = False  # a cache: the command succeeds
    reference: str = ""  # expect_ok: the host files a clean run leaves ("tree")
    clear: bool = False  # emptied first (a cache: so that the command writes to it)


LOAD = ("load", "NAME")
DELIVER = ("deliver", "NAME")
EXTRACTED = (("load", "NAME"), ("unload", "NAME"))
# Tree delivery: extracted, not delivered.
UNDELIVERED = (*EXTRACTED, ("deliver", "NAME", "--remove"))
CASES = (
    Case("extraction", "ENOSPC", "var/lib/kvc", "direct", EXTRACTED, ("load", "NAME", "--force")),
    Case("extraction", "EROFS", "var/lib/kvc", "direct", EXTRACTED, ("load", "NAME", "--force")),
    Case("extraction (first)", "ENOSPC", "var/lib/kvc", "direct", (), LOAD, margin=PAGE),
    Case("tree install: modules", "ENOSPC", "lib/modules/KVER", "tree", UNDELIVERED, DELIVER),
    Case("tree install: modprobe.d", "EROFS", "etc/modprobe.d", "tree", UNDELIVERED, DELIVER),
    Case("tree install: record", "EROFS", "var/lib/kvc", "tree", UNDELIVERED, DELIVER),
    Case("tree install: record", "ENOSPC", "var/lib/kvc", "tree", UNDELIVERED, DELIVER),
    Case("tree removal: record", "EROFS", "var/lib/kvc", "tree", ((*DELIVER,),), ("deliver", "NAME", "--remove")),
    Case("depmod output", "ENOSPC", "lib/modules/KVER", "tree", UNDELIVERED, DELIVER, PAGE, margin_modules=True),
    Case(
        "tree load: depmod output", "ENOSPC", "lib/modules/KVER", "tree", UNDELIVERED, LOAD, PAGE, margin_modules=True
    ),
    Case("load record", "ENOSPC", "var/lib/kvc", "direct", EXTRACTED, LOAD),
    Case("load record", "EROFS", "var/lib/kvc", "direct", EXTRACTED, LOAD),
    Case(
        "depmod cache",
        "ENOSPC",
        "var/cache/kvc",
        "tree",
        UNDELIVERED,
        DELIVER,
        expect_ok=True,
        reference="tree",
        clear=True,
    ),
    Case(
        "depmod cache",
        "EROFS",
        "var/cache/kvc",
        "tree",
        UNDELIVERED,
        DELIVER,
        expect_ok=True,
        reference="tree",
        clear=True,
    ),
)


@dataclass
class Fixture:
    work: Path
    name: str
    release: str
    tree: Path
    symvers: Path
    bundle: Path
    module_bytes: int  # what the delivery's module files take on a tmpfs (whole pages)
    references: dict[str, dict[str, str]]


def pages(size: int) -> int:
    return (size + PAGE - 1) // PAGE * PAGE


def set_up(work: Path, name: str, say: Callable[[str], None]) -> Fixture:
    from support.debian_kernel import indexed_debian_kernel
    from support.faulthost import example_image, host_digest, instance_conf, new_host, podman, small_tree, write_bundle

    kernel = indexed_debian_kernel()
    say(f"setting up in {work} (kernel {kernel.release})")
    tree = work / "tree"
    small_tree(kernel.moddir, tree, kernel.release)
    base = f"localhost/{name}-base:1"
    podman("tag", example_image(kernel.release), base)
    bundle = work / "bundle"
    write_bundle(bundle, base)
    host = new_host(
        work, "reference", name, kernel.release, tree, kernel.symvers, instance_conf(bundle, delivery="tree")
    )
    host.ok("build", name)
    host.ok("deliver", name)
    references = {"tree": host_digest(host.root)}
    delivered = host.root / "lib" / "modules" / kernel.release / "updates" / "kvc" / name
    module_bytes = sum(pages(path.stat().st_size) for path in delivered.iterdir())
    shutil.rmtree(host.root)
    return Fixture(work, name, kernel.release, tree, kernel.symvers, bundle, module_bytes, references)


def snapshot(namespace: MountNamespace, host: Host) -> dict[str, object]:
    """The host's files, kvc's state and the modules the fake kernel holds, as kvc sees them."""
    from support.faulthost import host_digest

    seen = namespace.path(host.root)
    state = seen / "var" / "lib" / "kvc"
    return {
        "host files": host_digest(seen),
        "kvc state": host_digest(state, ()) if state.exists() else {},
        "loaded": host.loaded(),
    }


def fault(namespace: MountNamespace, host: Host, case: Case, fixture: Fixture) -> str:
    """Replace ``case.where`` in the namespace: a tmpfs with a copy of its files and
    ``case.margin`` bytes free (plus the modules' size), or a read-only bind. What was done."""
    target = host.root / case.where.replace("KVER", fixture.release)
    if case.clear:
        shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    if case.fault == "EROFS":
        namespace.read_only_bind(target, target)
        return f"read-only bind of {case.where}"
    copy = Path(tempfile.mkdtemp(dir=fixture.work, prefix="copy-"))
    subprocess.run(["cp", "-a", f"{target}/.", str(copy)], check=True)
    namespace.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(target)])
    namespace.run(["cp", "-a", f"{copy}/.", str(target)])
    shutil.rmtree(copy)
    used = os.statvfs(namespace.path(target))
    held = (used.f_blocks - used.f_bfree) * used.f_frsize
    size = held + case.margin + (fixture.module_bytes if case.margin_modules else 0)
    size = max(size, PAGE)
    namespace.run(["mount", "-o", f"remount,size={size}", str(target)])
    return f"tmpfs of {size // 1024} KiB ({held // 1024} KiB held) on {case.where}"


def run_case(fixture: Fixture, case: Case, index: int) -> tuple[bool, str]:
    from support.faulthost import host_digest, instance_conf, new_host, tree_differences
    from support.treehost import MountNamespace

    host = new_host(
        fixture.work,
        f"case{index}",
        fixture.name,
        fixture.release,
        fixture.tree,
        fixture.symvers,
        instance_conf(fixture.bundle, delivery=case.delivery),
    )
    (host.root / "etc" / "modprobe.d").mkdir(parents=True, exist_ok=True)
    for args in case.before:
        host.ok(*(fixture.name if arg == "NAME" else arg for arg in args))
    namespace = MountNamespace()
    try:
        how = fault(namespace, host, case, fixture)
        before = snapshot(namespace, host)
        command = [fixture.name if arg == "NAME" else arg for arg in case.command]
        done = namespace.run([*host.argv(*command)], env=host.env(), check=False)
        after = snapshot(namespace, host)
        seen = host_digest(namespace.path(host.root))
    finally:
        namespace.close()
    errors = [line for line in done.stderr.splitlines() if line.startswith("kvc: error:")]
    problems = []
    if "Traceback" in done.stderr:
        problems.append("traceback")
    if case.expect_ok:
        if done.returncode != 0:
            problems.append(f"exit {done.returncode}: {done.stderr.strip()}")
        problems += tree_differences(seen, fixture.references[case.reference])[:5]
        outcome = f"exit {done.returncode}"
    else:
        if done.returncode != HOST_FILES:
            problems.append(f"exit {done.returncode}, not {HOST_FILES}")
        if len(errors) != 1:
            problems.append(f"{len(errors)} error lines")
        for key in ("host files", "kvc state", "loaded"):
            if before[key] != after[key]:
                if isinstance(before[key], dict) and isinstance(after[key], dict):
                    changed = tree_differences(after[key], before[key])  # type: ignore[arg-type]
                    problems.append(f"{key} changed: " + "; ".join(changed[:4]))
                else:
                    problems.append(f"{key} changed: {before[key]} -> {after[key]}")
        outcome = f"exit {done.returncode}: {errors[0] if errors else done.stderr.strip()[:200]}"
    shutil.rmtree(host.root, ignore_errors=True)
    text = f"{case.what} / {case.fault} ({how}), kvc {' '.join(case.command)}: {outcome}"
    if problems:
        text += "\n    FAILED: " + "\n    FAILED: ".join(problems)
    return not problems, text


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    from support.faulthost import instance_name, podman

    def say(text: str) -> None:
        print(text, flush=True)

    work = Path(tempfile.mkdtemp(prefix="kvc-diskfull-"))
    name = instance_name("kvcdf")
    results: list[tuple[Case, bool, str]] = []
    began = time.monotonic()
    try:
        fixture = set_up(work, name, say)
        for index, case in enumerate(CASES):
            passed, text = run_case(fixture, case, index)
            results.append((case, passed, text))
            say(("ok   " if passed else "FAIL ") + text)
    finally:
        ids = podman("images", "-q", "--filter", f"label=name={name}").stdout.split()
        podman("rmi", "-f", *sorted(set(ids)), f"localhost/{name}-base:1", check=False)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    failed = sum(1 for _case, passed, _text in results if not passed)
    faults = [case for case, _passed, _text in results if not case.expect_ok]
    say(
        f"\ndisk full / read-only: {len(results)} cases in {time.monotonic() - began:.0f} s: "
        f"{len(faults)} faults ({sum(c.fault == 'ENOSPC' for c in faults)} ENOSPC, "
        f"{sum(c.fault == 'EROFS' for c in faults)} EROFS), {len(results) - len(faults)} cache cases; "
        f"{len(results) - failed} passed, {failed} failed"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cases": [
                        {"what": c.what, "fault": c.fault, "where": c.where, "passed": p, "text": t}
                        for c, p, t in results
                    ],
                    "failed": failed,
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if failed or len(results) != len(CASES) else 0


if __name__ == "__main__":
    sys.exit(main())
