"""Tree delivery against the fake kernel, with the real Debian module tree and a real image: the
example's modules plus firmware, a modprobe.d file and a udev rule (a test bundle built FROM the
example's image with podman).

On a writable tree and on a read-only one (a read-only bind in a private mount namespace, made
writable by kvc's overlay, really mounted), Debian's modprobe (kmod 30, its inserts answered by
strace, the files it inserts traced) and kvc's modprobe load the instance by name and by an alias
its shipped modprobe.d file gives; the indexes after delivery are what Debian's depmod writes for
a copy of the same tree; after removal the tree (every file's bytes, every directory) is as
before. Shipped files appear with the delivery and go with it, a file kvc did not write is never
overwritten or removed, and ``kvc load --dry-run`` plans everything from the image without
changing anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

from kvc.kmod import depmod
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from kvc.layout import Layout
from kvc.overlay import mount_unit_name, overlay_for
from support.debian_kernel import DebianKernel
from support.example import unique_prefix, write_example_conf
from support.offlineunit import needs_systemd_analyze, prepare_root, verify_unit
from support.treehost import MountNamespace, kmod_modprobe, tree_digest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("simple-kmod", "simple-procfs-kmod")
FIRMWARE = {"kvc-test/fw-main.bin": b"\x00kvc main firmware\xff", "kvc-test/sub/fw-extra.bin": b"extra firmware\n"}
OPTIONS = "alias kvc-test-alias simple_kmod\n"
RULES = 'ACTION=="add", SUBSYSTEM=="misc", KERNEL=="kvc-test", MODE="0660"\n'

needs_root_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "nsenter", "strace", "mount")),
    reason="needs root, unshare, nsenter, strace and mount",
)


@dataclass(frozen=True)
class Built:
    """The test instance's image (``NAME-1.0.0:KVER``) and the bundle it was built from."""

    name: str
    release: str
    bundle: Path

    def conf(self, extra: str = "") -> str:
        text = (self.bundle / f"{self.name}.conf").read_text()
        return text.replace("KMOD_CONTAINER_BUILD_CONTEXT=.", f"KMOD_CONTAINER_BUILD_CONTEXT={self.bundle}") + extra


def run_kvc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def built(indexed_kernel_tree: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    for script in ("setup-podman.sh", "bootstrap-base-image.sh"):
        subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True, capture_output=True)
    release = indexed_kernel_tree.release
    example_root = tmp_path_factory.mktemp("example-root")
    write_example_conf(example_root)
    env = {**os.environ, "KVC_ROOT": str(example_root)}
    example = run_kvc(env, "build", "simple-kmod", "--kernel", release)
    assert example.returncode == 0, example.stderr
    with unique_prefix("kvctree") as name:
        bundle = tmp_path_factory.mktemp("bundle")
        for relative, data in FIRMWARE.items():
            path = bundle / "lib" / "firmware" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (bundle / "etc" / "kvc-test").mkdir(parents=True)
        (bundle / "etc" / "kvc-test" / "kvc-test-options.conf").write_text(OPTIONS)
        (bundle / "etc" / "kvc-test" / "99-kvc-test.rules").write_text(RULES)
        (bundle / "Containerfile").write_text(
            f"FROM localhost/simple-kmod-1.0.0:{release}\nCOPY lib/ /lib/\nCOPY etc/ /etc/\n"
        )
        (bundle / f"{name}.conf").write_text(
            "KMOD_CONTAINER_BUILD_CONTEXT=.\n"
            "KMOD_SOFTWARE_VERSION=1.0.0\n"
            f'KMOD_NAMES="{" ".join(MODULES)}"\n'
            'KVC_MODULE_PARAMS_simple_procfs_kmod="number=0"\n'
            "KVC_DELIVERY=tree\n"
            "KVC_FIRMWARE=kvc-test\n"
            "KVC_MODPROBE_CONF=/etc/kvc-test/kvc-test-options.conf\n"
            "KVC_MODULES_LOAD=yes\n"
            "KVC_UDEV_RULES=/etc/kvc-test/99-kvc-test.rules\n"
        )
        image = f"localhost/{name}-1.0.0:{release}"
        done = subprocess.run(["podman", "build", "-q", "-t", image, str(bundle)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        yield Built(name, release, bundle)


@dataclass
class Host:
    root: Path
    built: Built
    tree: DebianKernel
    namespace: Optional[MountNamespace] = None

    @property
    def name(self) -> str:
        return self.built.name

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.built.release

    @property
    def delivered(self) -> Path:
        return self.moddir / "updates" / "kvc" / self.name

    def env(self) -> dict[str, str]:
        return {**os.environ, "KVC_ROOT": str(self.root), "KVC_KERNEL": "fake"}

    def kvc(self, *args: str) -> subprocess.CompletedProcess[str]:
        if self.namespace is None:
            return run_kvc(self.env(), *args)
        return self.namespace.run([sys.executable, "-m", "kvc", *args], env=self.env(), check=False)

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.kvc(*args)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    def seen(self, path: Path) -> Path:
        """``path`` as kvc sees it (through the namespace's mounts)."""
        return self.namespace.path(path) if self.namespace is not None else path

    def kernel(self) -> FakeKernel:
        return FakeKernel(HostPaths(str(self.root)))

    def loaded(self) -> list[str]:
        return [module.name for module in reversed(self.kernel().loaded_modules())]


def make_host(tmp_path: Path, built: Built, tree: DebianKernel, *, copy_tree: bool = True, extra: str = "") -> Host:
    """A root with the fake kernel, the instance's conf and (``copy_tree``) a copy of Debian's
    indexed tree (hard links: every writer renames new files into place), or an empty directory
    for a read-only bind of it."""
    root = tmp_path / "root"
    moddir = root / "lib" / "modules" / built.release
    moddir.parent.mkdir(parents=True)
    if copy_tree:
        subprocess.run(["cp", "-al", str(tree.moddir), str(moddir)], check=True)
    else:
        moddir.mkdir()
    FakeKernel.create(HostPaths(str(root)), built.release, symvers=str(tree.symvers))
    conf = root / "etc" / "kvc" / f"{built.name}.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(built.conf(extra))
    return Host(root, built, tree)


def assert_indexes_are_kmods(host: Host, tmp_path: Path, upper: Optional[Path] = None) -> None:
    """The tree's modules.* are what Debian's depmod writes for a copy of the same tree (the
    read-only tree plus kvc's upper layer, when there is one)."""
    copy = tmp_path / "copy"
    target = copy / "lib" / "modules" / host.built.release
    target.parent.mkdir(parents=True)
    if upper is None:
        subprocess.run(["cp", "-al", str(host.moddir), str(target)], check=True)
    else:
        subprocess.run(["cp", "-al", str(host.tree.moddir), str(target)], check=True)
        subprocess.run(["cp", "-a", str(upper / "updates"), str(target / "updates")], check=True)
    subprocess.run(["depmod", "-C", "/dev/null", "-b", str(copy), host.built.release], check=True)
    for name in depmod.OUTPUTS:
        assert host.seen(host.moddir / name).read_bytes() == (target / name).read_bytes(), name
    shutil.rmtree(copy)


def assert_both_modprobes_load_it(host: Host, tmp_path: Path) -> None:
    """Debian's modprobe and kvc's load the instance by name, and one module by the alias of its
    shipped modprobe.d file, from the delivered tree, with the configured options."""
    common = ["-v", "-C", str(host.root / "etc" / "modprobe.d"), "-d", str(host.root), "-S", host.built.release]
    cases = {
        ("-a", *MODULES): [host.delivered / f"{module}.ko" for module in MODULES],
        ("kvc-test-alias",): [host.delivered / "simple-kmod.ko"],
    }
    for names, files in cases.items():
        assert host.loaded() == []
        theirs, inserted = kmod_modprobe(host.root, [*common, *names], tmp_path / "trace", host.namespace)
        assert theirs.returncode == 0, theirs.stderr
        assert inserted == [str(path) for path in files]
        ours = host.kvc("kmod", "modprobe", *common, *names)
        assert (ours.returncode, ours.stdout.encode(), ours.stderr.encode()) == (
            theirs.returncode,
            theirs.stdout,
            theirs.stderr,
        )
        assert host.loaded() == [path.name[: -len(".ko")].replace("-", "_") for path in files]
        if "simple-procfs-kmod" in names:
            assert b"simple-procfs-kmod.ko number=0" in theirs.stdout
            state = host.kernel().module_state("simple_procfs_kmod")
            assert state is not None and state.parameters["number"] == "0"
        host.ok("unload", host.name)


@pytest.mark.podman
@needs_root_tools
def test_tree_delivery_on_a_writable_tree(tmp_path: Path, built: Built, indexed_kernel_tree: DebianKernel) -> None:
    host = make_host(tmp_path, built, indexed_kernel_tree)
    before = tree_digest(host.moddir)
    loaded = host.ok("load", host.name)
    assert f"deliver {host.name} (tree) into the module tree of {built.release}:" in loaded.stdout
    assert host.loaded() == ["simple_kmod", "simple_procfs_kmod"]
    state = host.kernel().module_state("simple_procfs_kmod")
    assert state is not None and state.parameters["number"] == "0"
    assert sorted(os.listdir(host.delivered)) == ["simple-kmod.ko", "simple-procfs-kmod.ko"]
    assert_indexes_are_kmods(host, tmp_path)
    again = host.ok("load", host.name)
    assert "up to date" in again.stdout and "nothing to load" in again.stdout
    host.ok("unload", host.name)
    assert_both_modprobes_load_it(host, tmp_path)
    status = host.ok("status", host.name)
    assert f"delivery: tree, 8 files into {host.delivered}" in status.stdout
    removed = host.ok("deliver", host.name, "--remove")
    assert f"removed the delivery of {host.name} for {built.release}" in removed.stdout
    assert tree_digest(host.moddir) == before
    assert not (host.root / "var" / "lib" / "kvc" / host.name / "tree").exists()


@pytest.mark.podman
@needs_root_tools
def test_tree_delivery_through_kvcs_overlay_on_a_read_only_tree(
    tmp_path: Path, built: Built, indexed_kernel_tree: DebianKernel
) -> None:
    host = make_host(tmp_path, built, indexed_kernel_tree, copy_tree=False)
    firmware = host.root / "lib" / "firmware"
    firmware.mkdir(parents=True)
    parameter = host.root / "sys" / "module" / "firmware_class" / "parameters" / "path"
    parameter.parent.mkdir(parents=True)
    parameter.write_text("\n")
    host.namespace = MountNamespace()
    try:
        host.namespace.read_only_bind(indexed_kernel_tree.moddir, host.moddir)
        host.namespace.read_only_bind(firmware, firmware)
        merged = host.seen(host.moddir)
        before = tree_digest(merged)
        base = host.root / "var" / "lib" / "kvc" / "modules" / built.release
        loaded = host.ok("load", host.name)
        assert f"mount -t overlay overlay -o lowerdir={host.moddir},upperdir={base}/upper" in loaded.stdout
        assert f"upperdir={base}/upper" in host.namespace.mountinfo()
        assert f"upperdir={base}/upper" not in Path("/proc/self/mountinfo").read_text()
        assert host.loaded() == ["simple_kmod", "simple_procfs_kmod"]
        assert (base / "upper" / "updates" / "kvc" / host.name / "simple-kmod.ko").is_file()
        assert not (indexed_kernel_tree.moddir / "updates").exists()
        # /lib/firmware is read-only too: kvc's directory, and the kernel's one custom path to it.
        for relative, data in FIRMWARE.items():
            assert (host.root / "var" / "lib" / "kvc" / "firmware" / relative).read_bytes() == data
        assert parameter.read_text() == "/var/lib/kvc/firmware\n"
        assert "firmware_class.path=/var/lib/kvc/firmware" in loaded.stdout
        assert_indexes_are_kmods(host, tmp_path, upper=base / "upper")
        host.ok("unload", host.name)
        assert_both_modprobes_load_it(host, tmp_path)
        # As after a reboot without systemd: the next load mounts kvc's tree again, nothing else.
        host.namespace.run(["umount", str(host.moddir)])
        assert "not mounted, by kvc" in host.ok("status", host.name).stdout
        again = host.ok("load", host.name)
        assert f"mount -t overlay overlay -o lowerdir={host.moddir}," in again.stdout
        assert "depmod" not in again.stdout
        assert f"delivered {host.name} for {built.release}: 0 files written, 0 removed\n" in again.stdout
        assert host.loaded() == ["simple_kmod", "simple_procfs_kmod"]
        host.ok("unload", host.name)
        status = host.ok("status", host.name)
        assert "through kvc's overlay" in status.stdout and "mounted, by kvc" in status.stdout
        removed = host.ok("deliver", host.name, "--remove")
        assert f"umount --lazy {host.moddir}" in removed.stdout
        assert f"upperdir={base}" not in host.namespace.mountinfo()
        assert tree_digest(merged) == before
        assert not (host.root / "var" / "lib" / "kvc" / "modules").exists()
        assert not (host.root / "var" / "lib" / "kvc" / "firmware").exists()
        assert parameter.read_text() == "\n"
    finally:
        host.namespace.close()


def shipped_paths(host: Host) -> dict[Path, bytes]:
    etc = host.root / "etc"
    header = f"# Written by kvc for {host.name}; 'kvc deliver {host.name} --remove' removes it.\n"
    files = {host.root / "lib" / "firmware" / "updates" / relative: data for relative, data in FIRMWARE.items()}
    files[etc / "modprobe.d" / "kvc-test-options.conf"] = OPTIONS.encode()
    files[etc / "modprobe.d" / f"kvc-{host.name}.conf"] = (header + "options simple_procfs_kmod number=0\n").encode()
    files[etc / "modules-load.d" / f"kvc-{host.name}.conf"] = (header + "simple_kmod\nsimple_procfs_kmod\n").encode()
    files[etc / "udev" / "rules.d" / "99-kvc-test.rules"] = RULES.encode()
    return files


def host_files(host: Host) -> dict[str, str]:
    """The tree, the firmware and the /etc directories deliveries write to."""
    found = tree_digest(host.root / "lib")
    for directory in ("modprobe.d", "modules-load.d", "udev"):
        found[f"etc/{directory}"] = str(tree_digest(host.root / "etc" / directory))
    return found


@pytest.mark.podman
@needs_root_tools
def test_shipped_files_appear_with_the_delivery_and_go_with_uninstall(
    tmp_path: Path, built: Built, indexed_kernel_tree: DebianKernel
) -> None:
    host = make_host(tmp_path, built, indexed_kernel_tree)
    (host.root / "etc" / "kvc" / f"{host.name}.conf").unlink()
    before = host_files(host)
    host.ok("install", str(built.bundle))
    host.ok("load", host.name)
    for path, data in shipped_paths(host).items():
        assert path.read_bytes() == data, path
    planned = host.ok("uninstall", host.name, "--dry-run")
    uninstalled = host.ok("uninstall", host.name)
    assert uninstalled.stdout.startswith(planned.stdout)  # the plan printed is the one executed, in its order
    assert f"removed the delivery of {host.name} for {built.release}" in uninstalled.stdout
    for path in shipped_paths(host):
        assert not path.exists(), path
    assert host_files(host) == before
    assert not (host.root / "var" / "lib" / "kvc" / host.name).exists()


@pytest.mark.podman
@needs_root_tools
def test_a_direct_delivery_installs_firmware_and_udev_rules_only(
    tmp_path: Path, built: Built, indexed_kernel_tree: DebianKernel
) -> None:
    host = make_host(tmp_path, built, indexed_kernel_tree, extra="KVC_DELIVERY=direct\n")
    before = host_files(host)
    loaded = host.ok("load", host.name)
    assert f"deliver {host.name} (direct) into the host:" in loaded.stdout
    extracted = host.root / "var" / "lib" / "kvc" / host.name / built.release
    assert f"insmod {extracted}/simple-kmod.ko  (instance)" in loaded.stdout
    assert host.loaded() == ["simple_kmod", "simple_procfs_kmod"]
    for path, data in shipped_paths(host).items():
        direct = "firmware" in path.parts or "udev" in path.parts
        assert (path.read_bytes() == data) if direct else not path.exists(), path
    assert not (host.moddir / "updates").exists()
    host.ok("unload", host.name)
    host.ok("deliver", host.name, "--remove")
    assert host_files(host) == before


@pytest.mark.podman
@needs_root_tools
def test_deliver_extracts_the_kernels_image_first(
    tmp_path: Path, built: Built, indexed_kernel_tree: DebianKernel
) -> None:
    host = make_host(tmp_path, built, indexed_kernel_tree)
    before = tree_digest(host.root)
    image = f"{host.name}-1.0.0:{built.release}"
    extraction = host.root / "var" / "lib" / "kvc" / host.name / built.release
    dry = host.ok("deliver", host.name, "--kernel", built.release, "--dry-run")
    assert f"  extract the modules from image {image} (id " in dry.stdout
    assert f") into {extraction}\n" in dry.stdout
    assert tree_digest(host.root) == before
    done = host.ok("deliver", host.name, "--kernel", built.release)
    assert done.stdout.startswith(dry.stdout)
    assert (extraction / "manifest.json").is_file() and host.loaded() == []
    assert (host.delivered / "simple-procfs-kmod.ko").read_bytes() == (
        extraction / "simple-procfs-kmod.ko"
    ).read_bytes()
    assert "up to date (8 files" in host.ok("deliver", host.name).stdout


def assert_one_clear_error(result: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    said = result.stdout + result.stderr
    assert "Traceback" not in said and result.returncode == code, said
    lines = result.stderr.splitlines()
    assert lines[0].startswith("kvc: error: ") and message in lines[0], said
    assert all(line.startswith(("  ", "kvc: hint: ")) for line in lines[1:]), said


@pytest.mark.podman
@needs_root_tools
def test_a_file_kvc_did_not_write_is_never_overwritten_or_removed(
    tmp_path: Path, built: Built, indexed_kernel_tree: DebianKernel
) -> None:
    host = make_host(tmp_path, built, indexed_kernel_tree)
    foreign = host.root / "lib" / "firmware" / "updates" / "kvc-test" / "fw-main.bin"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"the vendor's own firmware")
    before = host_files(host)
    refused = host.kvc("load", host.name)
    assert_one_clear_error(refused, 6, f"{foreign} exists and was not written by kvc for {host.name}")
    assert host_files(host) == before and host.loaded() == []
    shutil.rmtree(foreign.parent)
    host.ok("load", host.name)
    # Changed since kvc wrote it, or put into kvc's directory by someone else: kept.
    rule = host.root / "etc" / "udev" / "rules.d" / "99-kvc-test.rules"
    rule.write_text("# the admin's own rule now\n")
    stranger = host.delivered / "stranger.ko"
    stranger.write_bytes(b"not kvc's")
    again = host.kvc("load", host.name)
    assert_one_clear_error(again, 6, f"{rule} exists and was not written by kvc for {host.name}")
    host.ok("unload", host.name)
    removed = host.ok("deliver", host.name, "--remove")
    assert f"kept {rule}: changed since kvc wrote it" in removed.stdout
    assert f"kept {host.delivered}: holds files kvc did not deliver" in removed.stdout
    assert rule.read_text() == "# the admin's own rule now\n" and stranger.read_bytes() == b"not kvc's"
    assert not (host.delivered / "simple-kmod.ko").exists()
    assert not (host.root / "etc" / "modprobe.d" / f"kvc-{host.name}.conf").exists()


def plan_block(output: str) -> list[str]:
    """The load plan's lines (from 'load NAME for KVER:' on)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("load "))
    return [line for line in lines[start:] if line.startswith(("load ", "  "))]


@pytest.mark.podman
@needs_root_tools
def test_load_dry_run_plans_everything_from_the_image_and_changes_nothing(
    tmp_path: Path, built: Built, indexed_kernel_tree: DebianKernel
) -> None:
    host = make_host(tmp_path, built, indexed_kernel_tree, extra='KVC_INTREE_MODULES="udp_tunnel"\n')
    before = tree_digest(host.root)
    release = built.release
    udp_tunnel = f"insmod {host.moddir}/kernel/net/ipv4/udp_tunnel.ko  (in-tree)"
    tree = host.ok("load", host.name, "--dry-run")
    assert f"modules: image {host.name}-1.0.0:{release} (read into a scratch directory" in tree.stdout
    for line in (
        f"  write {host.delivered}/simple-kmod.ko (module)",
        f"  write {host.root}/lib/firmware/updates/kvc-test/sub/fw-extra.bin (firmware)",
        f"  write {host.root}/etc/modprobe.d/kvc-{host.name}.conf (modprobe.d)",
        f"in-tree modules: the host's tree {host.moddir}",
    ):
        assert line in tree.stdout.splitlines(), line
    assert plan_block(tree.stdout) == [
        f"load {host.name} for {release}:",
        f"  {udp_tunnel}",
        f"  insmod {host.delivered}/simple-kmod.ko  (instance)",
        f"  insmod {host.delivered}/simple-procfs-kmod.ko number=0  (instance)",
    ]
    direct = host.ok("load", host.name, "--dry-run", "--delivery", "direct")
    extracted = host.root / "var" / "lib" / "kvc" / host.name / release
    assert f"deliver {host.name} (direct) into the host:" in direct.stdout
    assert f"  write {host.root}/lib/firmware/updates/kvc-test/fw-main.bin (firmware)" in direct.stdout
    assert "(module)" not in direct.stdout and "modprobe.d" not in direct.stdout
    assert plan_block(direct.stdout)[-1] == f"  insmod {extracted}/simple-procfs-kmod.ko number=0  (instance)"
    assert tree_digest(host.root) == before
    # The real load does what the dry run said.
    loaded = host.ok("load", host.name)
    assert plan_block(loaded.stdout)[: len(plan_block(tree.stdout))] == plan_block(tree.stdout)
    assert host.loaded() == ["udp_tunnel", "simple_kmod", "simple_procfs_kmod"]


@pytest.mark.podman
@needs_root_tools
def test_load_dry_run_without_a_host_tree_says_where_in_tree_modules_come_from(
    tmp_path: Path, built: Built, indexed_kernel_tree: DebianKernel
) -> None:
    host = make_host(tmp_path, built, indexed_kernel_tree, copy_tree=False, extra='KVC_INTREE_MODULES="udp_tunnel"\n')
    host.moddir.rmdir()
    before = tree_digest(host.root)
    args = ("load", host.name, "--dry-run", "--delivery", "direct")
    given = host.ok(*args, "--kernel-dir", str(indexed_kernel_tree.root))
    assert (
        f"in-tree modules: --kernel-dir: {indexed_kernel_tree.moddir} (the host has no {host.moddir})" in given.stdout
    )
    assert f"  insmod {indexed_kernel_tree.moddir}/kernel/net/ipv4/udp_tunnel.ko  (in-tree)" in given.stdout
    cache = tmp_path / "cache"
    (cache / "kernels" / built.release).mkdir(parents=True)
    (cache / "kernels" / built.release / "tree").symlink_to(indexed_kernel_tree.root)
    cached = subprocess.run(
        [sys.executable, "-m", "kvc", *args],
        capture_output=True,
        text=True,
        env={**host.env(), "KVC_CACHE_DIR": str(cache)},
    )
    assert cached.returncode == 0, cached.stderr
    assert "in-tree modules: the verify cache: " in cached.stdout and "udp_tunnel.ko  (in-tree)" in cached.stdout
    nowhere = host.kvc(*args)
    assert nowhere.returncode == 5 and "in-tree module udp_tunnel is needed" in nowhere.stderr
    assert "in-tree modules: none: the host has no" in nowhere.stdout
    assert tree_digest(host.root) == before


# ---- the mount unit ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("release", ["6.1.0-57-amd64", "6.12.118+deb12-amd64", "5.14.0-427.13.1.el9_4.x86_64"])
def test_the_mount_unit_is_named_as_systemd_names_it(release: str) -> None:
    overlay = overlay_for(Layout(HostPaths("/")), release, systemd=True)
    escaped = subprocess.run(
        ["systemd-escape", "--path", "--suffix=mount", overlay.where], capture_output=True, text=True, check=True
    )
    assert overlay.unit_name == mount_unit_name(overlay.where) == escaped.stdout.strip()
    assert overlay.where == os.path.realpath(f"/lib/modules/{release}") or not os.path.exists("/lib/modules")


@needs_systemd_analyze
def test_the_mount_unit_verifies(tmp_path: Path) -> None:
    overlay = overlay_for(Layout(HostPaths("/")), "6.1.0-57-amd64", systemd=True)
    root = prepare_root(tmp_path / "root", ())
    unit = root / "etc" / "systemd" / "system" / overlay.unit_name
    unit.parent.mkdir(parents=True)
    unit.write_text(overlay.unit_text())
    status, said = verify_unit(root, overlay.unit_name)
    assert (status, said) == (0, "")
    text = overlay.unit_text()
    assert f"Where={overlay.where}\n" in text and "WantedBy=local-fs.target\n" in text
    assert "Before=systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service\n" in text
    assert f"Options=lowerdir={overlay.where},upperdir=/var/lib/kvc/modules/6.1.0-57-amd64/upper," in text
    assert "RequiresMountsFor=/var/lib/kvc\n" in text
