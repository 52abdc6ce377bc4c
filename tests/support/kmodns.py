"""kmod's tools run against a fake kernel in a private mount namespace, and small fake-kernel
helpers; shared by the tool and modprobe tests."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel, dependency_chain
from support.oracle import Result, kmod_tool

NAMESPACE = r"""
set -e
root=$1; moddir=$2; shift 2
mount --bind "$root/proc" /proc
mount --bind "$root/sys/module" /sys/module
if [ -n "$moddir" ]; then
    release=$(uname -r)
    mount -t tmpfs kvc-test /usr/lib/modules
    mkdir -p "/usr/lib/modules/$release"
    mount --bind "$moddir" "/usr/lib/modules/$release"
fi
exec "$@"
"""


def env_for(fake: FakeKernel) -> dict[str, str]:
    return {**os.environ, "KVC_ROOT": fake.paths.root, "KVC_KERNEL": "fake"}


def run_kmod_on(
    fake: FakeKernel,
    tool: str,
    args: list[str],
    *,
    inject: Optional[dict[str, str]] = None,
    moddir: str = "",
    trace: Optional[Path] = None,
) -> Result:
    """kmod's tool seeing the fake kernel's /proc and /sys/module; ``inject`` maps syscalls to
    strace's answer for them (``error=EAGAIN`` or ``retval=0``)."""
    command = [tool, *args]
    if inject is not None or trace is not None:
        strace = ["strace", "-o", str(trace or "/dev/null"), "-qq", "-s", "4096"]
        names = sorted(inject or {})
        strace += ["-e", f"trace={','.join(names) if names else 'none'}"]
        for syscall, answer in (inject or {}).items():
            strace += ["-e", f"inject={syscall}:{answer}"]
        command = [*strace, tool, *args]  # strace finds it on PATH; argv[0] stays the bare name
    env = {**os.environ, "PATH": f"{os.path.dirname(kmod_tool(tool))}:{os.environ.get('PATH', '')}"}
    env.pop("KVC_ROOT", None)
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", NAMESPACE, "sh", fake.paths.root, moddir, *command], capture_output=True, env=env
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def answer(err: int) -> str:
    return f"error={errno.errorcode[err]}" if err else "retval=0"


def copy_of(fake: FakeKernel, tmp_path: Path) -> FakeKernel:
    target = tmp_path / f"copy-{len(list(tmp_path.glob('copy-*')))}"
    shutil.copytree(fake.paths.root, target, symlinks=True)
    return FakeKernel(HostPaths(str(target)))


def load(fake: FakeKernel, kernel: DebianKernel, *names: str) -> None:
    for name in names:
        for path in dependency_chain(kernel, name):
            if fake.module_state(Path(path).name.split(".")[0].replace("-", "_")) is None:
                fake.insert(path, "", 0)
