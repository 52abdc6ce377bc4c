"""kvc's agent inside the verification VM (``python -m kvc.verify.guest JOB``, or
``kvc __kvc_guest JOB`` from the single-file kvc; see kvc.verify).

It runs on the guest kernel with the host's Python and the host's kvc (mounted over 9p), or as the
single-file kvc itself (shared into the guest), and
does what ``kvc load`` does on a host, with the real kernel judging: it plans the instance's
modules and their in-tree dependencies from the guest kernel's own module tree, inserts them
with :class:`~kvc.kmod.kernel.live.LiveKernel` (``finit_module``), records per module the kernel's
answer and the kernel log lines it wrote, runs the smoke test inside the instance image (chroot),
unloads everything in reverse, and writes ``result.json`` (schema 1) to the work share.

Before each step it appends the step to ``progress`` so that the host can tell what the guest
was doing if the kernel dies.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from kvc import proc
from kvc.atomic import write_json
from kvc.errors import CommandTimeout, KvcError
from kvc.kmod.kernel.live import LiveKernel
from kvc.kmod.kernel.protocol import KernelError
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.paths import HostPaths
from kvc.loader import LoadStep, plan_load

RESULT_SCHEMA = 1
SMOKE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class KernelLog:
    """New lines of the kernel log (``/dev/kmsg``) since the last read."""

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
            _, _, text = record.decode("utf-8", "replace").partition(";")
            lines.append(text.split("\n", 1)[0])
        return lines


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


class Progress:
    def __init__(self, path: str) -> None:
        self.path = path

    def step(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _error_fields(exc: KernelError) -> dict[str, Any]:
    return {"errno": errno.errorcode.get(exc.errno, str(exc.errno)), "error": exc.strerror}


def _insert_all(
    steps: Sequence[LoadStep], kernel: LiveKernel, log: KernelLog, progress: Progress
) -> tuple[list[dict[str, Any]], list[LoadStep]]:
    results: list[dict[str, Any]] = []
    loaded: list[LoadStep] = []
    for step in steps:
        progress.step(f"insert {step.name}")
        entry: dict[str, Any] = {
            "name": step.name,
            "origin": step.origin,
            "path": step.path,
            "params": step.params,
            "required": step.required,
            "loaded": False,
        }
        started = time.monotonic()
        try:
            kernel.insert(step.path, step.params, 0)
        except KernelError as exc:
            entry.update(_error_fields(exc))
        else:
            entry["loaded"] = True
            loaded.append(step)
        entry["seconds"] = round(time.monotonic() - started, 3)
        entry["log"] = log.new_lines()
        results.append(entry)
        if not entry["loaded"] and step.required:
            break
    for entry in results:
        state = kernel.module_state(entry["name"]) if entry["loaded"] else None
        entry["refcnt"] = state.refcnt if state else None
        entry["taint"] = state.taint if state else None
    return results, loaded


def _smoke(
    command: str, image_root: str, tools: str, timeout: float, log: KernelLog, progress: Progress
) -> dict[str, Any]:
    """Run the smoke test in the image (chroot), or on the guest's root with the image's tools
    first on PATH when the image could not be mounted."""
    progress.step("smoke test")
    argv = ["chroot", image_root, "/bin/sh", "-c", command] if image_root else ["/bin/sh", "-c", command]
    path = f"{tools}:{SMOKE_PATH}" if tools else SMOKE_PATH
    started = time.monotonic()
    result: dict[str, Any] = {"command": command, "in_image": bool(image_root)}
    try:
        done = proc.run(
            argv, check=False, timeout=timeout, env={"PATH": path, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8"}
        )
        result.update(exit_code=done.returncode, stdout=done.stdout, stderr=done.stderr, timed_out=False)
    except CommandTimeout:
        result.update(exit_code=None, stdout="", stderr=f"did not finish in {timeout:g} s", timed_out=True)
    except KvcError as exc:
        result.update(exit_code=127, stdout="", stderr=exc.brief, timed_out=False)
    result["seconds"] = round(time.monotonic() - started, 3)
    result["log"] = log.new_lines()
    return result


def _unload_all(
    loaded: Sequence[LoadStep], kernel: LiveKernel, log: KernelLog, progress: Progress
) -> list[dict[str, Any]]:
    results = []
    for step in reversed(loaded):
        progress.step(f"remove {step.name}")
        entry: dict[str, Any] = {"name": step.name, "removed": False}
        try:
            kernel.remove(step.name, 0)
        except KernelError as exc:
            entry.update(_error_fields(exc))
        else:
            entry["removed"] = True
        entry["log"] = log.new_lines()
        results.append(entry)
    return results


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "boot_seconds": round(_uptime(), 3),
        "kernel_release": os.uname().release,
        "plan_error": None,
        "modules": [],
        "smoke": None,
        "unload": [],
    }
    progress = Progress(job["progress"])
    progress.step("agent started")
    log = KernelLog()
    kernel = LiveKernel(HostPaths("/"))
    try:
        plan = plan_load(
            job["instance"],
            job["kernel"],
            job["modules"],
            job["params"],
            kernel,
            ModuleDirectory(job["moddir"]),
            preflight=False,
        )
    except KvcError as exc:
        result["plan_error"] = exc.brief + (f": {exc.details}" if exc.details else "")
        plan = None
    if plan is not None:
        modules, loaded = _insert_all(plan.steps, kernel, log, progress)
        result["modules"] = modules
        if len(loaded) == len(plan.steps) and job.get("smoke_test"):
            result["smoke"] = _smoke(
                job["smoke_test"],
                job.get("image_root", ""),
                job.get("tools", ""),
                float(job["smoke_timeout"]),
                log,
                progress,
            )
        result["tainted"] = _tainted()
        result["unload"] = _unload_all(loaded, kernel, log, progress)
    result["agent_seconds"] = round(time.monotonic() - started, 3)
    progress.step("done")
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
