"""``kvc verify``: the instance's modules on the real target kernel, in a VM.

Fast tests cover the initramfs (unpacked by busybox's own cpio), the boot-module closure on the
real Debian tree, where kernel files are found, and the error paths with fake ``podman`` and
``qemu-system-x86_64`` programs (image missing, kernel missing, qemu failing, a guest that hangs).

The ``vm`` tests boot Debian's real kernel under qemu (TCG): simple-kmod built with podman and
verified with the kernel fetched as Debian's package into the cache; the same with a smoke test
that fails (exit 8), and with a runtime that cannot mount images (docker's path, podman standing
in); a module that needs in-tree modules, which come from the guest kernel's own tree; and three
modules built
from tests/kmods against Debian's headers that go wrong on a real kernel: one built for another
kernel release (Debian's 6.12 headers, tests/support/debian_headers.py), one importing a symbol
nobody exports, one that hits BUG() in its init.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvc.kmod import depmod
from kvc.kmod.moddir import ModuleDirectory
from kvc.verify.bootimage import has_pvh_note, pvh_kernel
from kvc.verify.guesttree import write_tree_layer
from kvc.verify.initramfs import BOOT_MODULE_ROOTS, CpioEntry, boot_modules, find_busybox, write_cpio
from kvc.verify.kernelfiles import find_in_tree, index_module_tree
from support import fakeprog
from support.debian_headers import foreign_headers
from support.debian_kernel import DebianKernel
from support.example import EDU_EXAMPLE, unique_prefix, write_example_conf
from support.kvccli import kvc
from support.modbuild import ModuleSpec, build_module
from support.oracle import run_kmod

ROOT = Path(__file__).resolve().parents[2]
KMODS = ROOT / "tests" / "kmods"
SHARED_CACHE = Path(os.environ.get("KVC_TEST_CACHE") or Path.home() / ".cache" / "kvc-test") / "kvc"
BASE_IMAGE = "localhost/debian:bookworm"


def write_conf(root: Path, name: str, values: dict[str, str]) -> None:
    conf_dir = root / "etc" / "kvc"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / f"{name}.conf").write_text("".join(f"{key}={json.dumps(value)}\n" for key, value in values.items()))


# ---- the initramfs ----------------------------------------------------------------------------------


def test_cpio_archive_unpacks_with_busybox(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    entries = [
        CpioEntry("dir", stat.S_IFDIR | 0o755),
        CpioEntry("dir/script", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
        CpioEntry("odd", stat.S_IFREG | 0o600, b"12345"),
        CpioEntry("empty", stat.S_IFREG | 0o644),
        CpioEntry("console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
    ]
    with open(archive, "wb") as out:
        write_cpio(out, entries)
    assert archive.stat().st_size % 4 == 0
    busybox = find_busybox()
    listing = (
        subprocess.run([busybox, "cpio", "-tv"], input=archive.read_bytes(), capture_output=True, check=True)
        .stdout.decode()
        .splitlines()
    )
    assert [line.split()[-1] for line in listing] == ["dir", "dir/script", "odd", "empty", "console"]
    assert listing[-1].startswith("crw-------")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    subprocess.run(
        [busybox, "cpio", "-i", "-d"], input=archive.read_bytes(), cwd=out_dir, check=True, capture_output=True
    )
    assert (out_dir / "dir" / "script").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((out_dir / "dir" / "script").stat().st_mode) == 0o755
    assert (out_dir / "odd").read_bytes() == b"12345"
    assert (out_dir / "empty").read_bytes() == b""


def test_boot_modules_are_the_virtio_and_9p_closure_deepest_first(indexed_kernel_tree: DebianKernel) -> None:
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    order = [name for name, _ in boot_modules(moddir)]
    for root in BOOT_MODULE_ROOTS:
        assert f"{root}.ko" in order
    assert order.index("virtio_ring.ko") < order.index("virtio.ko") < order.index("virtio_pci.ko")
    assert order.index("9pnet.ko") < order.index("9pnet_virtio.ko")
    assert order.index("netfs.ko") < order.index("9p.ko")
    assert len(order) == len(set(order))
    for _, path in boot_modules(moddir):
        assert os.path.isfile(path)


def test_busybox_must_be_static(tmp_path: Path) -> None:
    dynamic = tmp_path / "busybox"
    shutil.copyfile("/bin/sh", dynamic)
    with pytest.raises(Exception, match="statically linked busybox"):
        find_busybox([str(dynamic), str(tmp_path / "missing")])


# ---- kernel files -----------------------------------------------------------------------------------


def test_kernel_files_in_the_layouts_people_have(tmp_path: Path) -> None:
    release = "6.1.0-99-amd64"
    debian = tmp_path / "debian"
    (debian / "boot").mkdir(parents=True)
    (debian / "boot" / f"vmlinuz-{release}").write_bytes(b"k")
    (debian / "lib" / "modules" / release / "kernel").mkdir(parents=True)
    found, problem = find_in_tree(str(debian), release)
    assert found is None and "has no modules.dep" in problem and f"depmod -b {debian} {release}" in problem
    (debian / "lib" / "modules" / release / "modules.dep").write_text("")
    found, problem = find_in_tree(str(debian), release)
    assert found is not None and found.vmlinuz == str(debian / "boot" / f"vmlinuz-{release}") and not problem
    bootc = tmp_path / "bootc"  # Fedora, CoreOS and bootc keep vmlinuz in the module directory
    moddir = bootc / "usr" / "lib" / "modules" / release
    (moddir / "kernel").mkdir(parents=True)
    (moddir / "modules.dep.bin").write_bytes(b"")
    (moddir / "vmlinuz").write_bytes(b"k")
    found, _ = find_in_tree(str(bootc), release)
    assert found is not None and found.vmlinuz == str(moddir / "vmlinuz") and found.moddir == str(moddir)
    found, problem = find_in_tree(str(tmp_path / "nothing"), release)
    assert found is None and f"no vmlinuz-{release}" in problem


def test_a_fetched_kernel_is_indexed_by_kvcs_depmod_as_debians_would_be(
    tmp_path: Path, indexed_kernel_tree: DebianKernel
) -> None:
    copy = tmp_path / "tree"
    subprocess.run(["cp", "-al", str(indexed_kernel_tree.root), str(copy)], check=True)
    moddir = copy / "lib" / "modules" / indexed_kernel_tree.release
    package_files = {"modules.order", "modules.builtin", "modules.builtin.modinfo"}
    written = sorted(p.name for p in moddir.glob("modules.*") if p.name not in package_files)
    assert "modules.dep.bin" in written
    for name in written:
        (moddir / name).unlink()
    assert index_module_tree(str(copy), indexed_kernel_tree.release) == ""
    for name in written:  # Debian's depmod wrote the originals
        assert (moddir / name).read_bytes() == (indexed_kernel_tree.moddir / name).read_bytes(), name
    found, problem = find_in_tree(str(copy), indexed_kernel_tree.release)
    assert found is not None and not problem


def test_the_kernel_boots_uncompressed_through_pvh(tmp_path: Path, indexed_kernel_tree: DebianKernel) -> None:
    vmlinux = pvh_kernel(str(indexed_kernel_tree.vmlinuz), str(tmp_path))
    assert vmlinux is not None and vmlinux.startswith(str(tmp_path / "vmlinux"))
    elf = Path(vmlinux).read_bytes()
    assert elf[:4] == b"\x7fELF" and has_pvh_note(elf)
    assert len(elf) > 3 * indexed_kernel_tree.vmlinuz.stat().st_size
    assert pvh_kernel(str(indexed_kernel_tree.vmlinuz), str(tmp_path)) == vmlinux  # cached
    assert not has_pvh_note(elf.replace(b"Xen\0", b"Nax\0"))  # every note renamed: none is Xen's
    not_a_kernel = tmp_path / "vmlinuz-x"
    not_a_kernel.write_bytes(b"MZ" + bytes(4096))
    assert pvh_kernel(str(not_a_kernel), str(tmp_path)) is None
    assert pvh_kernel(str(not_a_kernel), str(tmp_path)) is None  # and remembered as unusable


# ---- error paths with fake programs -----------------------------------------------------------------

RELEASE = "6.1.0-57-amd64"


@pytest.fixture
def fake_host(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A KVC_ROOT with an instance whose image a fake podman "mounts" from a directory, a kernel
    directory, and a fake qemu; the caller adds qemu's behaviour."""
    root = tmp_path / "root"
    image_root = tmp_path / "image"
    extra = image_root / "lib" / "modules" / RELEASE / "extra"
    extra.mkdir(parents=True)
    (extra / "kvc_hello.ko").write_bytes(build_module(ModuleSpec("kvc_hello", f"{RELEASE} SMP mod_unload ")))
    kernel = tmp_path / "kernel"
    (kernel / "boot").mkdir(parents=True)
    (kernel / "boot" / f"vmlinuz-{RELEASE}").write_bytes(b"not really a kernel")
    moddir = kernel / "lib" / "modules" / RELEASE
    (moddir / "kernel").mkdir(parents=True)
    (moddir / "modules.dep").write_text("".join(f"kernel/{name}.ko:\n" for name in BOOT_MODULE_ROOTS))
    for name in BOOT_MODULE_ROOTS:
        (moddir / "kernel" / f"{name}.ko").write_bytes(build_module(ModuleSpec(name, f"{RELEASE} SMP ")))
    write_conf(
        root,
        "hello",
        {"KMOD_CONTAINER_BUILD_CONTEXT": str(tmp_path), "KMOD_SOFTWARE_VERSION": "1.0", "KMOD_NAMES": "kvc-hello"},
    )
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls.log"
    image = json.dumps(
        [{"Id": "sha256:" + "ab" * 32, "RepoTags": [f"hello-1.0:{RELEASE}"], "Labels": {"name": "hello"}}]
    )
    fakeprog.install(
        bin_dir,
        "podman",
        log,
        rules=[
            (["image", "inspect", f"hello-1.0:{RELEASE}"], image, 0),
            fakeprog.Rule(["image", "inspect"], code=125, stderr="Error: image not known\n"),
            (["image", "mount", "**"], f"{image_root}\n", 0),
            (["image", "unmount", "**"], "", 0),
        ],
    )
    env = {"KVC_ROOT": str(root), "KVC_CACHE_DIR": str(tmp_path / "cache"), "PATH": fakeprog.path_with(bin_dir)}
    yield {"root": root, "env": env, "bin": bin_dir, "log": log, "kernel": kernel, "tmp": tmp_path}


def test_a_missing_build_is_exit_6_before_any_kernel_lookup(fake_host: dict[str, Any]) -> None:
    write_conf(
        fake_host["root"],
        "other",
        {"KMOD_CONTAINER_BUILD_CONTEXT": str(fake_host["tmp"]), "KMOD_SOFTWARE_VERSION": "2.0", "KMOD_NAMES": "x"},
    )
    result = kvc(["verify", "other", "--kernel", "6.1.0-0-nowhere-amd64"], fake_host["env"])
    assert result.returncode == 6, result.stderr
    assert result.stderr.splitlines()[0] == (
        "kvc: error: image other-2.0:6.1.0-0-nowhere-amd64 does not exist: other is not built for 6.1.0-0-nowhere-amd64"
    )
    assert "kvc build other --kernel 6.1.0-0-nowhere-amd64" in result.stderr
    assert not (fake_host["tmp"] / "cache").exists()


def test_a_kernel_nobody_has_is_exit_7_naming_every_source(fake_host: dict[str, Any]) -> None:
    release = "6.1.0-0-nowhere-amd64"
    write_conf(
        fake_host["root"],
        "gone",
        {"KMOD_CONTAINER_BUILD_CONTEXT": str(fake_host["tmp"]), "KMOD_SOFTWARE_VERSION": "1.0", "KMOD_NAMES": "x"},
    )
    fakeprog.install(
        fake_host["bin"],
        "podman",
        fake_host["log"],
        rules=[(["image", "inspect", "**"], json.dumps([{"Id": "sha256:" + "cd" * 32}]), 0)],
    )
    result = kvc(["verify", "gone", "--kernel", release], fake_host["env"])
    assert result.returncode == 7, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"kvc: error: kernel {release} not found"
    assert f"host: no vmlinuz-{release} in {fake_host['root']}/boot" in result.stderr
    assert (
        f"distribution package: no package linux-image-{release} in this machine's apt sources" in result.stderr
    )  # asked the real apt-cache
    assert not (fake_host["tmp"] / "cache" / "kernels" / release).exists()
    assert lines[-1].startswith("kvc: hint: pass --kernel-dir DIR")
    result = kvc(["verify", "gone", "--kernel", release, "--kernel-dir", str(fake_host["tmp"])], fake_host["env"])
    assert result.returncode == 7, result.stderr
    assert f"--kernel-dir {fake_host['tmp']}: no vmlinuz-{release} in {fake_host['tmp']}/boot" in result.stderr


def test_qemu_gets_no_network_bounded_memory_and_read_only_host(fake_host: dict[str, Any]) -> None:
    fakeprog.install(
        fake_host["bin"],
        "qemu-system-x86_64",
        fake_host["log"],
        default_code=1,
        rules=[fakeprog.Rule(["**"], code=1, stderr="qemu: could not load kernel\n")],
    )
    result = kvc(
        [
            "verify",
            "hello",
            "--kernel",
            RELEASE,
            "--kernel-dir",
            str(fake_host["kernel"]),
            "--accel",
            "tcg",
            "--memory",
            "768",
        ],
        fake_host["env"],
    )
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith(
        "kvc: error: qemu-system-x86_64 exited with status 1\n  qemu: could not load kernel"
    )
    (argv,) = fakeprog.calls(fake_host["log"], "qemu-system-x86_64")
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-m") + 1] == "768M"
    assert argv[argv.index("-nic") + 1] == "none" and "-no-reboot" in argv
    assert argv[argv.index("-kernel") + 1] == str(fake_host["kernel"] / "boot" / f"vmlinuz-{RELEASE}")
    shares = {
        opt.split("mount_tag=")[1].split(",")[0]: opt
        for opt in (argv[i + 1] for i, arg in enumerate(argv) if arg == "-virtfs")
    }
    assert set(shares) == {"kvcroot", "kvcwork", "kvcmods", "kvcimage"}
    assert shares["kvcroot"].startswith("local,path=/,") and "readonly=on" in shares["kvcroot"]
    assert "readonly=on" not in shares["kvcwork"] and "readonly=on" in shares["kvcimage"]
    append = argv[argv.index("-append") + 1]
    assert "panic=-1" in append and "oops=panic" in append and "noapictimer" in append  # TCG
    kept = fake_host["root"] / "var" / "lib" / "kvc" / "hello" / "verify" / RELEASE
    job = json.loads((kept / "job.json").read_text())
    assert job["modules"] == ["/kvc/work/modules/kvc_hello.ko"] and job["moddir"] == f"/lib/modules/{RELEASE}"
    assert (kept / "modules" / "kvc_hello.ko").exists() and (kept / "initramfs.cpio").exists()
    assert fakeprog.calls(fake_host["log"], "podman")[-1][:2] == ["image", "unmount"]


def test_a_guest_that_hangs_is_killed_at_the_timeout(fake_host: dict[str, Any]) -> None:
    qemu = fake_host["bin"] / "qemu-system-x86_64"
    qemu.write_text(
        "#!/bin/sh\nfor arg; do case $arg in file:*) echo 'kvc-guest: init started' > ${arg#file:};; "
        "esac; done\nexec sleep 60\n"
    )
    qemu.chmod(0o755)
    result = kvc(
        [
            "verify",
            "hello",
            "--kernel",
            RELEASE,
            "--kernel-dir",
            str(fake_host["kernel"]),
            "--accel",
            "tcg",
            "--timeout",
            "2",
            "--json",
        ],
        fake_host["env"],
        timeout=30,
    )
    assert result.returncode == 9, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == 1 and report["status"] == "timed-out" and report["vm"]["qemu_exit"] is None
    assert report["crash"]["during"] == "boot" and report["crash"]["lines"] == ["kvc-guest: init started"]
    assert 2 <= report["timings"]["vm_seconds"] < 10
    assert Path(report["console_log"]).read_text() == "kvc-guest: init started\n"
    status = kvc(["status", "hello", "--kernel", RELEASE], fake_host["env"]).stdout
    assert ", verification timed-out 20" in status.splitlines()[1], status


def fake_qemu(path: Path, console: str, code: int = 0, log: Path | None = None) -> None:
    """A qemu that writes ``console`` to the serial log file it is given and exits with ``code``;
    with ``log``, it appends its argv there first (one JSON line per call)."""
    record = f"import json; open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')" if log else ""
    path.write_text(
        f"#!{sys.executable}\nimport sys\n{record}\n"
        f"serial = sys.argv[sys.argv.index('-serial') + 1][len('file:'):]\n"
        f"open(serial, 'w').write({console!r})\nsys.exit({code})\n"
    )
    path.chmod(0o755)


def test_the_guest_tree_layer_has_the_indexes_kmods_depmod_writes(
    tmp_path: Path, indexed_kernel_tree: DebianKernel
) -> None:
    """The layer above the kernel's tree in the guest (tree delivery): the instance's module at
    updates/kvc/NAME/ and indexes made by kvc's depmod over symbolic links to the kernel's tree,
    the same bytes kmod's depmod writes for the kernel's tree with that module in it."""
    release = indexed_kernel_tree.release
    module = tmp_path / "kvc_demo.ko"
    spec = ModuleSpec(
        "kvc_demo",
        f"{release} SMP preempt mod_unload modversions ",
        imports=[("_printk", 1), ("udp_tunnel_sock_release", 2)],
        modinfo=[("license", "GPL"), ("alias", "pci:v00001234d000011E8sv*sd*bc*sc*i*"), ("softdep", "pre: crc7")],
    )
    module.write_bytes(build_module(spec))
    layer = tmp_path / "layer"
    cache = tmp_path / "cache"
    for _ in range(2):  # the second run from depmod's parse cache
        relative = write_tree_layer(
            release, str(indexed_kernel_tree.moddir), "demo", [str(module)], str(layer), str(cache)
        )
    assert relative == ["updates/kvc/demo/kvc_demo.ko"]
    assert (layer / relative[0]).read_bytes() == module.read_bytes()
    assert sorted(path.name for path in layer.iterdir()) == sorted(["updates", *depmod.OUTPUTS])
    assert not (cache / "verify-tree" / "demo" / release).exists()  # the scratch tree goes
    copy = tmp_path / "kmod" / "lib" / "modules" / release
    shutil.copytree(indexed_kernel_tree.moddir, copy, copy_function=os.link)
    for name in depmod.OUTPUTS:
        (copy / name).unlink()
    (copy / "updates" / "kvc" / "demo").mkdir(parents=True)
    shutil.copyfile(module, copy / relative[0])
    theirs = run_kmod("depmod", ["-C", "/dev/null", "-b", str(tmp_path / "kmod"), release])
    assert theirs.returncode == 0, theirs.stderr
    for name in depmod.OUTPUTS:
        assert (layer / name).read_bytes() == (copy / name).read_bytes(), name
    assert "updates/kvc/demo/kvc_demo.ko: kernel/net/ipv4/udp_tunnel.ko\n" in (layer / "modules.dep").read_text()


def fake_qemu_guest(path: Path, console: str, progress: list[dict[str, Any]]) -> None:
    """A qemu whose "guest" writes the agent's progress to the work share and ``console`` to the
    serial log, then exits as a panicked guest does (0, no result)."""
    path.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        "work = next(a.split('path=')[1].split(',')[0] for a in sys.argv if 'mount_tag=kvcwork' in a)\n"
        f"steps = ''.join(json.dumps(step) + '\\n' for step in {progress!r})\n"
        "open(work + '/progress', 'w').write(steps + '{\"step\": \"cut')\n"
        "serial = sys.argv[sys.argv.index('-serial') + 1][len('file:'):]\n"
        f"open(serial, 'w').write({console!r})\n"
    )
    path.chmod(0o755)


def test_the_report_tells_the_agents_steps_then_the_oops(fake_host: dict[str, Any]) -> None:
    """A guest that dies leaves no result: the report takes the agent's steps from its progress file
    (with the kernel lines of each; a step cut short by the crash is left out), then the oops."""
    steps = [
        {"step": "agent started", "log": []},
        {"step": "inserting kvc_a (instance)", "log": []},
        {"step": "inserted kvc_a in 0.02 s", "log": ["kvc_a: loaded"]},
        {"step": "inserting kvc_b (instance)", "log": []},
        {"step": "refused kvc_b: EINVAL (Invalid argument)", "log": ["kvc_b: no table, refusing"]},
        {"step": "rollback started: removing kvc_a", "log": []},
        {"step": "removing kvc_a", "log": []},
    ]
    console = (
        "kvc-guest: agent starting\n[ 9.4] kernel BUG at kvc-a.c:18!\n"
        "[ 9.5] Kernel panic - not syncing: Fatal exception\n"
    )
    fake_qemu_guest(fake_host["bin"] / "qemu-system-x86_64", console, steps)
    args = ["verify", "hello", "--kernel", RELEASE, "--kernel-dir", str(fake_host["kernel"]), "--accel", "tcg"]
    result = kvc(args, fake_host["env"])
    assert result.returncode == 9, result.stderr
    lines = result.stdout.splitlines()
    story = lines.index("  what kvc's agent did, step by step:")
    assert lines[story - 1] == "  the guest crashed during: removing kvc_a"
    assert lines[story + 1 : story + 13] == [
        "    agent started",
        "    inserting kvc_a (instance)",
        "    inserted kvc_a in 0.02 s",
        "      kernel: kvc_a: loaded",
        "    inserting kvc_b (instance)",
        "    refused kvc_b: EINVAL (Invalid argument)",
        "      kernel: kvc_b: no table, refusing",
        "    rollback started: removing kvc_a",
        "    removing kvc_a",
        "  then the console:",
        "    [ 9.4] kernel BUG at kvc-a.c:18!",
        "    [ 9.5] Kernel panic - not syncing: Fatal exception",
    ]
    assert lines[story + 13].startswith("FAILED: the guest kernel crashed (VM ")
    report = json.loads(kvc([*args, "--json"], fake_host["env"]).stdout)
    assert report["steps"] == steps and report["crash"]["during"] == "removing kvc_a"


def test_devices_the_modprobe_helper_and_the_tree_layer_reach_the_guest(fake_host: dict[str, Any]) -> None:
    conf = fake_host["root"] / "etc" / "kvc" / "hello.conf"
    conf.write_text(
        conf.read_text() + 'KVC_DELIVERY=tree\nKVC_VERIFY_DEVICES="edu virtio-rng-pci,id=rng0"\n'
        'KVC_MODULE_PARAMS_kvc_hello="greeting=1"\nKVC_INTREE_MODULES=crc7\n'
    )
    fakeprog.install(fake_host["bin"], "qemu-system-x86_64", fake_host["log"], default_code=1)
    args = ["verify", "hello", "--kernel", RELEASE, "--kernel-dir", str(fake_host["kernel"]), "--accel", "tcg"]
    dry = kvc([*args, "--dry-run"], fake_host["env"])
    assert dry.returncode == 0, dry.stderr
    assert ", -device edu, -device virtio-rng-pci,id=rng0" in dry.stdout
    assert "load in-tree crc7, then kvc-hello from the module tree (updates/kvc/hello)" in dry.stdout
    kvc(args, fake_host["env"])
    (argv,) = fakeprog.calls(fake_host["log"], "qemu-system-x86_64")
    assert [argv[i + 1] for i, arg in enumerate(argv) if arg == "-device"] == ["edu", "virtio-rng-pci,id=rng0"]
    kept = fake_host["root"] / "var" / "lib" / "kvc" / "hello" / "verify" / RELEASE
    job = json.loads((kept / "job.json").read_text())
    assert job["delivery"] == "tree" and job["intree_modules"] == ["crc7"]
    assert job["modules"] == [f"/lib/modules/{RELEASE}/updates/kvc/hello/kvc_hello.ko"]
    assert (kept / "tree" / "updates" / "kvc" / "hello" / "kvc_hello.ko").is_file()
    assert "updates/kvc/hello/kvc_hello.ko:\n" in (kept / "tree" / "modules.dep").read_text()
    busybox = find_busybox()
    unpacked = fake_host["tmp"] / "unpacked"
    unpacked.mkdir()
    initramfs = (kept / "initramfs.cpio").read_bytes()
    subprocess.run([busybox, "cpio", "-i", "-d"], input=initramfs, cwd=unpacked, check=True, capture_output=True)
    helper = unpacked / "kvc" / "modprobe"
    assert stat.S_IMODE(helper.stat().st_mode) == 0o755
    text = helper.read_text()
    assert text.startswith("#!/kvc/busybox sh\n")
    assert f'{sys.executable} -I -S /kvc/agent.pyz kmod modprobe -C /kvc/modprobe.d "$@" </dev/null 2>&1)' in text
    assert zipfile.is_zipfile(unpacked / "kvc" / "agent.pyz")
    assert ">>/kvc/requests" in text
    assert (unpacked / "kvc" / "modprobe.d" / "kvc-hello.conf").read_text() == "options kvc_hello greeting=1\n"


def test_a_failing_guest_agent_is_not_a_kernel_crash(fake_host: dict[str, Any]) -> None:
    console = (
        "kvc-guest: init started\nkvc-guest: agent starting\nTraceback (most recent call last):\n"
        "ModuleNotFoundError: No module named 'kvc'\nkvc-guest: agent exited with status 1\n"
        "[    4.7] reboot: Power down\n"
    )
    fake_qemu(fake_host["bin"] / "qemu-system-x86_64", console)
    result = kvc(
        ["verify", "hello", "--kernel", RELEASE, "--kernel-dir", str(fake_host["kernel"]), "--accel", "tcg"],
        fake_host["env"],
    )
    assert result.returncode == 9, result.stderr
    lines = result.stdout.splitlines()
    assert "  the guest failed during: boot" in lines
    assert "    ModuleNotFoundError: No module named 'kvc'" in lines
    assert lines[-2].startswith("FAILED: kvc's guest setup or agent failed")
    assert lines[-1].startswith("  console log and artifacts kept in ")


def test_kvm_only_after_a_probe_boot_works_and_the_verdict_is_cached(fake_host: dict[str, Any]) -> None:
    calls = fake_host["tmp"] / "qemu-calls"
    fake_qemu(fake_host["bin"] / "qemu-system-x86_64", "", code=1, log=calls)
    args = ["verify", "hello", "--kernel", RELEASE, "--kernel-dir", str(fake_host["kernel"])]
    for _ in range(2):
        kvc(args, fake_host["env"])
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    accels = [argv[argv.index("-accel") + 1] for argv in runs]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert accels == ["tcg", "tcg"]
        return
    # A KVM that cannot boot the kernel (here: the probe "fails") means TCG, and is asked once.
    assert accels == ["kvm", "tcg", "tcg"]
    assert "kvc.probe" in runs[0][runs[0].index("-append") + 1] and "-virtfs" not in runs[0]
    verdicts = json.loads((fake_host["tmp"] / "cache" / "accel-probe.json").read_text())
    assert list(verdicts.values()) == [False]
    probe_ok = "kvc-guest: probe ok\n"
    fake_qemu(fake_host["bin"] / "qemu-system-x86_64", probe_ok, log=calls)
    (fake_host["tmp"] / "cache" / "accel-probe.json").unlink()
    kvc(args, fake_host["env"])
    runs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [argv[argv.index("-accel") + 1] for argv in runs[3:]] == ["kvm", "kvm"]
    assert runs[-1][runs[-1].index("-cpu") + 1] == "host"


# ---- in a real VM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vm_ready() -> None:
    for program in ("qemu-system-x86_64", "podman", "make"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    find_busybox()


@pytest.fixture(scope="module")
def vm_env(
    tmp_path_factory: pytest.TempPathFactory, indexed_kernel_tree: DebianKernel, vm_ready: None
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("verify")
    release = indexed_kernel_tree.release
    assert (Path("/usr/src") / f"linux-headers-{release}").is_dir(), "headers and kernel ABI differ"
    env = {"KVC_ROOT": str(tmp / "root"), "KVC_CACHE_DIR": str(SHARED_CACHE)}
    with unique_prefix("kvcvm") as prefix:
        yield {
            "tmp": tmp,
            "release": release,
            "env": env,
            "prefix": prefix,
            "kernel_dir": str(indexed_kernel_tree.root),
        }


def verify_test_module(
    vm_env: dict[str, Any],
    source: str,
    *extra: str,
    headers: Path | None = None,
    build_with_kvc: bool = True,
    conf: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Build tests/kmods/SOURCE.c (SOURCE: one or more names, space-separated, the instance's
    KMOD_NAMES) against ``headers`` (default: the target kernel's), put them in a FROM-scratch
    image of its own instance (``conf``: more keys) -- built by kvc, or (for a module kvc build
    would refuse) tagged directly, as a prebuilt image from elsewhere would be -- and verify that
    on the real kernel from the test cache's tree."""
    release = vm_env["release"]
    headers = headers or Path("/usr/src") / f"linux-headers-{release}"
    name = f"{vm_env['prefix']}-{source.split()[0]}"
    work = vm_env["tmp"] / name
    shutil.copytree(KMODS, work / "src")
    built = subprocess.run(
        ["make", f"KDIR={headers}", f"MODULES={source}", "modules"],
        cwd=work / "src",
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    context = work / "context"
    context.mkdir()
    for module in source.split():
        shutil.copyfile(work / "src" / f"{module}.ko", context / f"{module}.ko")
    (context / "Containerfile").write_text("FROM scratch\nARG KVER\nCOPY *.ko /lib/modules/${KVER}/extra/\n")
    write_conf(
        Path(vm_env["env"]["KVC_ROOT"]),
        name,
        {
            "KMOD_CONTAINER_BUILD_CONTEXT": str(context),
            "KMOD_SOFTWARE_VERSION": "1.0",
            "KMOD_NAMES": source,
            **(conf or {}),
        },
    )
    if build_with_kvc:
        result = kvc(["build", name, "--kernel", release], vm_env["env"])
        assert result.returncode == 0, result.stderr
    else:
        subprocess.run(
            [
                "podman",
                "build",
                "-q",
                "--build-arg",
                f"KVER={release}",
                "--label",
                f"name={name}",
                "-t",
                f"{name}-1.0:{release}",
                str(context),
            ],
            check=True,
            capture_output=True,
        )
    return verify_json(vm_env, name, "--kernel-dir", vm_env["kernel_dir"], *extra)


def verify_json(vm_env: dict[str, Any], name: str, *extra: str) -> tuple[int, dict[str, Any]]:
    result = kvc(
        ["verify", name, "--kernel", vm_env["release"], "--json", "--accel", "tcg", *extra], vm_env["env"], timeout=400
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.vm
@pytest.mark.podman
def test_simple_kmod_verified_on_the_real_kernel(vm_env: dict[str, Any]) -> None:
    root = Path(vm_env["env"]["KVC_ROOT"])
    name = f"{vm_env['prefix']}-simple"
    write_example_conf(root, name)
    built = kvc(["build", name, "--kernel", vm_env["release"]], vm_env["env"])
    assert built.returncode == 0, built.stderr
    # No --kernel-dir: this host has no vmlinuz for it, so Debian's package is fetched (once) into the cache.
    code, report = verify_json(vm_env, name)
    assert code == 0, json.dumps(report, indent=2)
    assert report["status"] == "verified" and report["kernel"] == vm_env["release"]
    assert report["vm"]["boot"] == "pvh" and report["vm"]["kernel_image"].endswith(".elf")
    assert report["kernel_files"]["source"].startswith(f"Debian package linux-image-{vm_env['release']}")
    modules = {m["name"]: m for m in report["modules"]}
    assert list(modules) == ["simple_kmod", "simple_procfs_kmod"]
    assert all(m["loaded"] and m["origin"] == "instance" and m["refcnt"] == 0 for m in modules.values())
    assert "O" in modules["simple_kmod"]["taint"]  # out of tree, as the real kernel marks it
    assert "Hello world from simple_kmod." in modules["simple_kmod"]["log"]
    assert modules["simple_procfs_kmod"]["params"] == "number=0"
    smoke = report["smoke"]
    assert smoke["exit_code"] == 0 and smoke["in_image"], smoke
    assert "simple-procfs-kmod number = 0" in smoke["stdout"] and "simple-procfs-kmod number = 44" in smoke["stdout"]
    assert "Hello world from simple_kmod." in smoke["stdout"]  # the smoke test's dmesg check
    assert [(u["name"], u["removed"]) for u in report["unload"]] == [
        ("simple_procfs_kmod", True),
        ("simple_kmod", True),
    ]
    assert "Goodbye world from simple_kmod." in report["unload"][1]["log"]
    assert report["tainted"] & (1 << 12)  # TAINT_OOT_MODULE
    assert 0 < report["timings"]["boot_seconds"] < report["timings"]["vm_seconds"]
    assert report["artifacts"] is None
    assert not (root / "var" / "lib" / "kvc" / name / "verify" / vm_env["release"]).exists()
    status = json.loads(kvc(["status", name, "--kernel", vm_env["release"], "--json"], vm_env["env"]).stdout)
    (entry,) = status["instances"][0]["kernels"]
    assert entry["verification"]["status"] == "verified" and entry["verification"]["current"]
    assert entry["verification"]["image_id"] == report["image"]["id"]
    human = kvc(
        ["verify", name, "--kernel", vm_env["release"], "--accel", "tcg", "--keep-artifacts"],
        vm_env["env"],
        timeout=400,
    )
    assert human.returncode == 0, human.stdout + human.stderr
    assert "      kernel: Hello world from simple_kmod." in human.stdout
    assert human.stdout.splitlines()[-2].startswith("VERIFIED (boot ")
    kept = root / "var" / "lib" / "kvc" / name / "verify" / vm_env["release"]
    assert "kvc-guest: agent starting" in (kept / "console.log").read_text()
    assert json.loads((kept / "result.json").read_text())["schema"] == 1


@pytest.mark.vm
@pytest.mark.podman
def test_a_failing_smoke_test_is_exit_8_and_the_modules_still_unload(vm_env: dict[str, Any]) -> None:
    name = f"{vm_env['prefix']}-smokefail"
    write_example_conf(
        Path(vm_env["env"]["KVC_ROOT"]),
        name,
        "KVC_SMOKE_TEST=\"spkut 44 && grep -x 'simple-procfs-kmod number = 45' /proc/simple-procfs-kmod\"\n",
    )
    built = kvc(["build", name, "--kernel", vm_env["release"]], vm_env["env"])
    assert built.returncode == 0, built.stderr
    code, report = verify_json(vm_env, name, "--kernel-dir", vm_env["kernel_dir"])
    assert code == 8, json.dumps(report, indent=2)
    assert report["status"] == "smoke-failed" and report["smoke"]["exit_code"] == 1
    assert "simple-procfs-kmod number = 44" in report["smoke"]["stdout"]
    assert [u["removed"] for u in report["unload"]] == [True, True]
    assert Path(report["console_log"]).is_file()


@pytest.mark.vm
@pytest.mark.podman
def test_without_image_mounts_the_smoke_test_gets_the_images_tools(vm_env: dict[str, Any]) -> None:
    """The docker runtime cannot mount images: the wrapper tools are copied out of the image and the
    smoke test runs on the guest's own root with them on PATH (podman stands in for docker here)."""
    root = vm_env["tmp"] / "docker-root"
    name = f"{vm_env['prefix']}-docker"
    # /run and /tmp of the guest's root are writable (tmpfs) for the smoke test.
    write_example_conf(root, name, 'KVC_SMOKE_TEST="touch /run/kvc-smoke /tmp/kvc-smoke && $KVC_SMOKE_TEST"\n')
    (root / "etc" / "kvc" / "kmods-via-containers.conf").write_text("KVC_CONTAINER_RUNTIME=docker\n")
    bin_dir = vm_env["tmp"] / "docker-bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f'#!/bin/sh\nexec {shutil.which("podman")} "$@"\n')
    (bin_dir / "docker").chmod(0o755)
    env = {**vm_env["env"], "KVC_ROOT": str(root), "PATH": fakeprog.path_with(bin_dir)}
    built = kvc(["build", name, "--kernel", vm_env["release"]], env)
    assert built.returncode == 0, built.stderr
    code, report = verify_json({**vm_env, "env": env}, name, "--kernel-dir", vm_env["kernel_dir"])
    assert code == 0, json.dumps(report, indent=2)
    smoke = report["smoke"]
    assert not smoke["in_image"] and smoke["exit_code"] == 0
    assert "simple-procfs-kmod number = 44" in smoke["stdout"]


@pytest.mark.vm
@pytest.mark.podman
def test_in_tree_dependencies_come_from_the_guest_kernels_tree(vm_env: dict[str, Any]) -> None:
    code, report = verify_test_module(vm_env, "kvc-uses-intree")
    assert code == 0, json.dumps(report, indent=2)
    loaded = [(m["name"], m["origin"], m["loaded"]) for m in report["modules"]]
    assert sorted(loaded[:2]) == [("crc_itu_t", "in-tree", True), ("udp_tunnel", "in-tree", True)]
    assert loaded[2] == ("kvc_uses_intree", "instance", True)
    in_tree = {m["name"]: m for m in report["modules"][:2]}
    # The guest's own /lib/modules/KVER: the target kernel's tree.
    assert in_tree["udp_tunnel"]["path"].startswith(f"/lib/modules/{vm_env['release']}/kernel/net/ipv4/udp_tunnel.ko")
    assert in_tree["udp_tunnel"]["refcnt"] == 1 and in_tree["crc_itu_t"]["refcnt"] == 1  # held by ours
    # The kernel names the module the function came from.
    assert any(
        line.startswith("kvc_uses_intree: crc_itu_t(kvc) = 0x")
        and line.endswith("using udp_tunnel_sock_release [udp_tunnel]")
        for line in report["modules"][2]["log"]
    )
    assert [(u["name"], u["removed"]) for u in report["unload"]] == [
        ("kvc_uses_intree", True),
        (loaded[1][0], True),
        (loaded[0][0], True),
    ]


@pytest.mark.vm
@pytest.mark.podman
def test_a_module_for_another_kernel_is_refused_by_the_real_kernel(vm_env: dict[str, Any]) -> None:
    code, report = verify_test_module(vm_env, "kvc-hello", headers=foreign_headers(), build_with_kvc=False)
    assert code == 5, json.dumps(report, indent=2)
    (entry,) = report["modules"]
    assert report["status"] == "load-refused" and not entry["loaded"] and entry["errno"] == "ENOEXEC"
    # With modversions Linux checks module_layout's symbol version, not the release in the vermagic.
    assert any("module_layout" in line for line in entry["log"]), entry["log"]
    assert all(line.startswith("kvc_hello: ") for line in entry["log"])
    assert report["smoke"] is None and report["unload"] == []
    assert Path(report["console_log"]).is_file()


@pytest.mark.vm
@pytest.mark.podman
def test_an_unknown_symbol_is_reported_with_the_kernels_lines(vm_env: dict[str, Any]) -> None:
    code, report = verify_test_module(vm_env, "kvc-unknown-symbol")
    assert code == 5, json.dumps(report, indent=2)
    (entry,) = report["modules"]
    assert entry["errno"] == "ENOENT" and entry["error"] == "No such file or directory"
    assert "kvc_unknown_symbol: Unknown symbol kvc_symbol_nobody_exports (err -2)" in entry["log"]


@pytest.mark.vm
@pytest.mark.podman
def test_a_module_that_crashes_the_kernel_is_a_crash_with_the_console_kept(vm_env: dict[str, Any]) -> None:
    code, report = verify_test_module(vm_env, "kvc-bug-on-init", "--timeout", "120")
    assert code == 9, json.dumps(report, indent=2)
    assert report["status"] == "crashed" and report["vm"]["qemu_exit"] == 0
    assert report["crash"]["during"] == "inserting kvc_bug_on_init (instance)"
    assert any("kernel BUG at" in line for line in report["crash"]["lines"]), report["crash"]["lines"]
    console = Path(report["console_log"]).read_text()
    assert "Kernel panic" in console
    assert report["timings"]["vm_seconds"] < 120


@pytest.mark.vm
@pytest.mark.podman
def test_the_kernels_request_module_is_served_by_kvcs_modprobe(vm_env: dict[str, Any]) -> None:
    """kvc-requests-intree's init calls request_module("ip_tables") and fails unless ip_tables is
    then loaded: the kernel runs /proc/sys/kernel/modprobe, kvc's modprobe on the guest's
    /lib/modules/KVER. The in-tree module the instance names loads first and its softdep after it."""
    code, report = verify_test_module(vm_env, "kvc-requests-intree", conf={"KVC_INTREE_MODULES": "crc-itu-t"})
    assert code == 0, json.dumps(report, indent=2)
    loaded = [(m["name"], m["origin"], m["required"], m["loaded"]) for m in report["modules"]]
    assert loaded == [
        ("crc_itu_t", "in-tree", True, True),
        ("kvc_requests_intree", "instance", True, True),
        ("xt_tcpudp", "in-tree", False, True),  # MODULE_SOFTDEP("post: xt_tcpudp"); x_tables came with ip_tables
    ], loaded
    ours = report["modules"][1]
    assert [(call["module"], call["exit_code"]) for call in ours["requests"]] == [("ip_tables", 0)]
    assert "kvc_requests_intree: request_module(ip_tables) returned 0, ip_tables is loaded" in ours["log"]
    assert "x_tables is loaded already" in [step["step"] for step in report["steps"]]


@pytest.mark.vm
@pytest.mark.podman
def test_a_refusal_and_a_rollback_that_crashes_are_told_before_the_oops(vm_env: dict[str, Any]) -> None:
    """The xtables-addons story: one module loads, the kernel refuses the next (its reason logged
    without a trailing newline), the rollback removes the first and its exit crashes the kernel."""
    code, report = verify_test_module(vm_env, "kvc-exit-bug kvc-refuse-no-newline", "--timeout", "120")
    assert code == 9, json.dumps(report, indent=2)
    assert report["status"] == "crashed" and report["crash"]["during"] == "removing kvc_exit_bug"
    steps = [step["step"] for step in report["steps"]]
    assert steps[0] == "agent started" and steps[2].startswith("inserted kvc_exit_bug in ")
    assert steps[1:2] + steps[3:] == [
        "inserting kvc_exit_bug (instance)",
        "inserting kvc_refuse_no_newline (instance)",
        "refused kvc_refuse_no_newline: EINVAL (Invalid argument)",
        "rollback started: removing kvc_exit_bug",
        "removing kvc_exit_bug",
    ]
    # The line the kernel held back for a continuation is there too.
    assert report["steps"][4]["log"] == ["kvc_refuse_no_newline: no table for this family, refusing"]
    assert any("kernel BUG at" in line for line in report["crash"]["lines"]), report["crash"]["lines"]
    console = Path(report["console_log"]).read_text()
    told = [console.index(f"kvc-agent: {text}") for text in steps[1:]]
    assert told == sorted(told) and told[-1] < console.index("kernel BUG at")


@pytest.mark.vm
@pytest.mark.podman
def test_the_edu_driver_is_loaded_by_its_devices_alias_and_computes_on_the_card(vm_env: dict[str, Any]) -> None:
    """examples/edu-kmod, delivered into the tree, with QEMU's edu device in the VM: coldplug runs
    kvc's modprobe for every device's modalias, the edu card's loads kvc_edu from
    updates/kvc/NAME, it binds, and the smoke test reads 10! computed by the card. The image's own
    kmod (Debian's) sees the guest's tree, and /run and /tmp are writable."""
    root = Path(vm_env["env"]["KVC_ROOT"])
    name = f"{vm_env['prefix']}-edu"
    write_example_conf(
        root,
        name,
        'KVC_SMOKE_TEST="touch /run/kvc-smoke /tmp/kvc-smoke && modinfo -F alias kvc_edu && $KVC_SMOKE_TEST"\n',
        EDU_EXAMPLE,
    )
    built = kvc(["build", name, "--kernel", vm_env["release"]], vm_env["env"])
    assert built.returncode == 0, built.stderr
    code, report = verify_json(vm_env, name, "--kernel-dir", vm_env["kernel_dir"])
    assert code == 0, json.dumps(report, indent=2)
    assert report["delivery"] == "tree" and report["vm"]["devices"] == ["edu"]
    (edu,) = [m for m in report["coldplug"]["matches"] if m["alias"].startswith("pci:v00001234d000011E8")]
    assert edu["modules"] == ["kvc_edu"] and edu["inserted"] == ["kvc_edu"]
    (module,) = report["modules"]
    assert module["name"] == "kvc_edu" and module["loaded"] and module["by"] == f"by alias {edu['alias']}"
    assert module["path"] == f"/lib/modules/{vm_env['release']}/updates/kvc/{name}/kvc-edu.ko"
    assert any(line.endswith("edu card version 1.0 bound") for line in module["log"]), module["log"]
    smoke = report["smoke"]
    assert smoke["exit_code"] == 0 and smoke["in_image"], smoke
    assert "pci:v00001234d000011E8sv*sd*bc*sc*i*" in smoke["stdout"]
    assert ": 10! = 3628800" in smoke["stdout"]
    assert [(u["name"], u["removed"]) for u in report["unload"]] == [("kvc_edu", True)]
