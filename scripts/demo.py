"""What scripts/demo.sh prints: kvc.kmod at work on a real Debian kernel module tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.debian_kernel import indexed_debian_kernel  # noqa: E402

from kvc.kmod.fakekernel import FakeKernel  # noqa: E402
from kvc.kmod.moddir import ModuleDirectory  # noqa: E402
from kvc.kmod.paths import HostPaths  # noqa: E402

KVC = str(Path(sys.executable).parent / "kvc")


def show(title: str, argv: list[str], env: dict[str, str] | None = None, lines: int = 0) -> None:
    print(f"\n$ {' '.join(argv if len(argv) < 8 else [*argv[:6], '...'])}   # {title}")
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    out = proc.stdout.splitlines()
    for line in out[:lines] if lines else out:
        print(f"  {line}")
    if lines and len(out) > lines:
        print(f"  ... ({len(out) - lines} more lines)")
    for line in proc.stderr.splitlines():
        print(f"  {line}")


def main() -> int:
    kernel = indexed_debian_kernel()
    modules = [str(p) for p in kernel.modules()]
    print(f"Debian kernel {kernel.release}: {len(modules)} modules in {kernel.moddir}")
    started = time.perf_counter()
    proc = subprocess.run([KVC, "kmod", "modinfo", *modules], capture_output=True)
    ours = time.perf_counter() - started
    started = time.perf_counter()
    theirs = subprocess.run(["modinfo", *modules], capture_output=True)
    c_time = time.perf_counter() - started
    same = "identical to" if proc.stdout == theirs.stdout else "DIFFERENT FROM"
    print(f"kvc kmod modinfo over all of them: {ours:.2f}s, output {same} kmod's modinfo ({c_time:.2f}s)")
    base = ["-b", str(kernel.root), "-k", kernel.release]
    show("a real, signed module", [KVC, "kmod", "modinfo", *base, "wireguard"], lines=18)
    moddir = ModuleDirectory(str(kernel.moddir))
    entry = moddir.lookup_module("wireguard")
    assert entry is not None
    print("\nwireguard depends on (modules.dep, loaded deepest first):")
    for dep in reversed(entry.dependencies):
        print(f"  {os.path.relpath(dep, kernel.moddir)}")
    root = tempfile.mkdtemp(prefix="kvc-demo-")
    try:
        FakeKernel.create(HostPaths(root), kernel.release, symvers=str(kernel.symvers))
        env = {"KVC_ROOT": root, "KVC_KERNEL": "fake"}
        for dep in [*reversed(entry.dependencies), entry.path]:
            assert dep is not None
            show(f"load {Path(dep).name} into a fake {kernel.release} kernel", [KVC, "kmod", "insmod", dep], env)
        show("what the kernel now holds", [KVC, "kmod", "lsmod"], env)
        show("a module in use cannot go", [KVC, "kmod", "rmmod", "udp_tunnel"], env)
        show("a module loaded before its dependency is refused",
             [KVC, "kmod", "insmod", str(next(p for p in kernel.modules() if p.name == "vxlan.ko"))], env)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
