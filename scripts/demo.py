"""What scripts/demo.sh prints: the main job (simple-kmod built with podman for Debian's current
kernel and verified on that real kernel in a VM; edu-kmod, a PCI driver delivered into the module
tree, verified in a VM with the device it drives), then kvc.kmod at work on the kernel's real module
tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.paths import HostPaths
from support.debian_kernel import indexed_debian_kernel
from support.example import EDU_EXAMPLE, write_example_conf

KVC = str(Path(sys.executable).parent / "kvc")
KERNEL_DIR = str(indexed_debian_kernel().moddir)


def show(title: str, argv: list[str], env: dict[str, str] | None = None, lines: int = 0) -> None:
    shown = ["kvc", *argv[1:]] if argv[0] == KVC else argv
    shown = [os.path.relpath(a, KERNEL_DIR) if a.startswith(KERNEL_DIR + "/") else a for a in shown]
    shown = ["$TREE" if a == str(indexed_debian_kernel().root) else a for a in shown]
    print(f"\n$ {' '.join(shown)}   # {title}")
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    out = proc.stdout.splitlines()
    for line in out[:lines] if lines else out:
        print(f"  {line}")
    if lines and len(out) > lines:
        print(f"  ... ({len(out) - lines} more lines)")
    for line in proc.stderr.splitlines():
        print(f"  {line}")


def timed_kvc(argv: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    print(f"\n$ kvc {' '.join(argv)}")
    started = time.monotonic()
    proc = subprocess.run([KVC, *argv], capture_output=True, text=True, env={**os.environ, **env})
    seconds = time.monotonic() - started
    for line in (proc.stdout + proc.stderr).splitlines():
        print(f"  {line}")
    return proc.returncode, seconds, proc.stdout


def main_job() -> int:
    """Build simple-kmod for Debian's current kernel, then prove it on that kernel in a VM."""
    release = indexed_debian_kernel().release
    root = tempfile.mkdtemp(prefix="kvc-demo-root-")
    try:
        write_example_conf(Path(root))
        # KVC_ROOT keeps the demo's configuration and state apart; kernels go to the real cache.
        env = {"KVC_ROOT": root, "KVC_CACHE_DIR": "/var/cache/kvc"}
        print(f"== simple-kmod for Debian's current kernel {release}: build it, then prove it on that kernel ==")
        code, build_seconds, _ = timed_kvc(["build", "simple-kmod", "--kernel", release], env)
        if code != 0:
            return code
        print(f"  ({build_seconds:.1f} s)")
        code, verify_seconds, _ = timed_kvc(["verify", "simple-kmod", "--kernel", release], env)
        print(
            f"\nbuild {build_seconds:.1f} s + verify {verify_seconds:.1f} s: "
            + (
                "simple-kmod works on the real kernel: loaded, smoke-tested (spkut 44 round trip, hello line in "
                "dmesg) and unloaded cleanly"
                if code == 0
                else f"verification FAILED (exit status {code})"
            )
        )
        if code != 0:
            return code
        return edu_job(release, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def edu_job(release: str, env: dict[str, str]) -> int:
    """A PCI driver delivered into the module tree and loaded by its device's alias, as udev loads
    drivers: examples/edu-kmod, verified in a VM that has QEMU's edu card."""
    write_example_conf(Path(env["KVC_ROOT"]), "edu-kmod", example=EDU_EXAMPLE)
    print(f"\n== edu-kmod: a PCI driver delivered into {release}'s module tree, autoloaded by its card ==")
    code, build_seconds, _ = timed_kvc(["build", "edu-kmod", "--kernel", release], env)
    if code != 0:
        return code
    code, verify_seconds, _ = timed_kvc(["verify", "edu-kmod", "--kernel", release], env)
    print(
        f"\nbuild {build_seconds:.1f} s + verify {verify_seconds:.1f} s: "
        + (
            "kvc's modprobe loaded kvc_edu from the delivered tree by the card's modalias, the driver bound, "
            "and the card computed 10!"
            if code == 0
            else f"verification FAILED (exit status {code})"
        )
    )
    return code


def main() -> int:
    code = main_job()
    if code != 0:
        return code
    print("\n== kvc's kmod tools on the same kernel's real module tree ==")
    kernel = indexed_debian_kernel()
    modules = [str(p) for p in kernel.modules()]
    print(f"Debian kernel {kernel.release}: {len(modules)} modules in {kernel.moddir}")

    def best_of(argv: list[str], runs: int = 3) -> tuple[float, bytes]:
        times = []
        out = b""
        for _ in range(runs):  # the first run also warms the page cache
            started = time.perf_counter()
            out = subprocess.run(argv, capture_output=True).stdout
            times.append(time.perf_counter() - started)
        return min(times), out

    ours, ours_out = best_of([KVC, "kmod", "modinfo", *modules])
    c_time, c_out = best_of(["modinfo", *modules])
    same = "identical to" if ours_out == c_out else "DIFFERENT FROM"
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
        chain = [*reversed(entry.dependencies), str(entry.path)]
        print(
            f"\nLoading wireguard and its dependencies into a fake {kernel.release} kernel "
            "(a directory standing in for /proc and /sys):"
        )
        for dep in chain:
            subprocess.run([KVC, "kmod", "insmod", dep], env={**os.environ, **env}, check=True)
            print(f"  kvc kmod insmod {os.path.relpath(dep, kernel.moddir)}")
        show("what the kernel now holds", [KVC, "kmod", "lsmod"], env)
        show("a module in use cannot go", [KVC, "kmod", "rmmod", "udp_tunnel"], env)
        ext4 = str(next(p for p in kernel.modules() if p.name == "ext4.ko"))
        show("ext4 before jbd2 and mbcache: refused, as the kernel would", [KVC, "kmod", "insmod", ext4], env)
        print("  the fake kernel's log (what dmesg would show):")
        for line in FakeKernel(HostPaths(root)).dmesg()[:3]:
            print(f"    {line}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
