"""Tests of tree delivery: a private mount namespace held open by a sleeping process (overlays and
read-only binds made in it never reach this machine's mounts; its files are read through
``/proc/PID/root``), a digest of every file and directory of a tree, and kmod's own modprobe run
against a fake kernel (optionally inside such a namespace) with strace answering its insert
syscalls and telling which files it inserted."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from kvc.kmod.digest import file_sha256
from support.kmodns import NAMESPACE
from support.oracle import Result, kmod_tool


class MountNamespace:
    """``unshare -m`` around ``sleep``; commands join it with ``nsenter``."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "3600"])
        ours = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.process.pid}/ns/mnt") == ours:
            if time.monotonic() > deadline:
                raise RuntimeError("unshare did not start a mount namespace")
            time.sleep(0.01)

    @property
    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.process.pid), "-m", "--"]

    def run(
        self, argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self.prefix, *argv], capture_output=True, text=True, env=dict(env or os.environ))
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def path(self, path: str | Path) -> Path:
        """``path`` as processes in the namespace see it (through its mounts)."""
        return Path(f"/proc/{self.process.pid}/root{path}")

    def mountinfo(self) -> str:
        return Path(f"/proc/{self.process.pid}/mountinfo").read_text()

    def read_only_bind(self, source: str | Path, target: str | Path) -> None:
        self.run(["mount", "--bind", str(source), str(target)])
        self.run(["mount", "-o", "remount,bind,ro", str(target)])

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def tree_digest(top: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """Every entry below ``top`` but the directories ``skip`` names (relative to it): a directory,
    a link's target, or a file's mode and sha256."""
    found = {}
    skipped = set(skip)
    for directory, dirnames, filenames in os.walk(top):
        below = os.path.relpath(directory, top)
        dirnames[:] = sorted(name for name in dirnames if os.path.normpath(os.path.join(below, name)) not in skipped)
        for name in [*dirnames, *filenames]:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            relative = os.path.relpath(path, top)
            if stat.S_ISLNK(info.st_mode):
                found[relative] = "-> " + os.readlink(path)
            elif stat.S_ISDIR(info.st_mode):
                found[relative] = "dir"
            else:
                found[relative] = f"{stat.filemode(info.st_mode)} {file_sha256(path).hex()}"
    return found


def inserted_files(trace: Path) -> list[str]:
    """The module files kmod handed to finit_module, from a trace of openat and finit_module
    (each fd matched with the file openat last returned it for)."""
    fds: dict[str, str] = {}
    paths = []
    for line in trace.read_text().splitlines():
        call = line.split(None, 1)[-1]
        if call.startswith("openat(") and "= " in call and '"' in call:
            fds[call.rsplit("= ", 1)[1].split()[0]] = call.split('"', 2)[1]
        elif call.startswith("finit_module("):
            paths.append(fds.get(call[len("finit_module(") :].split(",", 1)[0], ""))
    return paths


def kmod_modprobe(
    fake_root: Path, args: Sequence[str], trace: Path, namespace: Optional[MountNamespace] = None
) -> tuple[Result, list[str]]:
    """Debian's modprobe seeing the fake kernel's /proc and /sys/module (in ``namespace`` when
    given), every insert answered 0 by strace; its result and the files it inserted."""
    strace = ["strace", "-f", "-o", str(trace), "-qq", "-s", "4096", "-e", "trace=openat,finit_module,init_module"]
    strace += ["-e", "inject=finit_module:retval=0", "-e", "inject=init_module:retval=0"]
    env = {**os.environ, "PATH": f"{os.path.dirname(kmod_tool('modprobe'))}:{os.environ.get('PATH', '')}"}
    env.pop("KVC_ROOT", None)
    command = ["unshare", "-m", "sh", "-c", NAMESPACE, "sh", str(fake_root), "", *strace, "modprobe", *args]
    done = subprocess.run([*(namespace.prefix if namespace else []), *command], capture_output=True, env=env)
    return Result(done.returncode, done.stdout, done.stderr), inserted_files(trace)
