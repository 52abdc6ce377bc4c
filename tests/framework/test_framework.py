"""The framework end to end on this machine: real podman builds the example for the current Debian
kernel ABI, and kvc loads it into a fake kernel (this machine's kernel cannot load modules)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvc.config import InstanceConfig
from kvc.errors import LoadError
from kvc.kmod.config import load_config
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.paths import HostPaths
from kvc.loader import execute_load, plan_load
from support import fakeprog
from support.debian_kernel import DebianKernel
from support.modbuild import Export, ModuleSpec, build_module

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "simple-kmod"


@dataclass
class Host:
    root: Path
    release: str
    log: Path
    bin: Path

    def env(self, *, fake_kernel: bool = True) -> dict[str, str]:
        env = {**os.environ, "KVC_ROOT": str(self.root), "PATH": fakeprog.path_with(self.bin)}
        if fake_kernel:
            env["KVC_KERNEL"] = "fake"
        return env

    def kvc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=self.env())

    def kernel(self) -> FakeKernel:
        return FakeKernel(HostPaths(str(self.root)))

    def conf(self) -> Path:
        return self.root / "etc" / "kvc" / "simple-kmod.conf"


@pytest.fixture(scope="session")
def podman_ready() -> None:
    for script in ("setup-podman.sh", "bootstrap-base-image.sh"):
        subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True, capture_output=True)


@pytest.fixture
def host(tmp_path: Path, indexed_kernel_tree: DebianKernel, podman_ready: None) -> Host:
    """A host root with the example installed, the kernel's module tree, and a fake kernel;
    podman on PATH is a recording pass-through to the real one."""
    root = tmp_path / "root"
    (root / "lib" / "modules").mkdir(parents=True)
    (root / "lib" / "modules" / indexed_kernel_tree.release).symlink_to(indexed_kernel_tree.moddir)
    FakeKernel.create(HostPaths(str(root)), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers))
    real = shutil.which("podman")
    assert real is not None
    fakeprog.install(tmp_path / "bin", "podman", tmp_path / "podman.jsonl", real=real)
    host = Host(root, indexed_kernel_tree.release, tmp_path / "podman.jsonl", tmp_path / "bin")
    installed = host.kvc("install", str(EXAMPLE))
    assert installed.returncode == 0, installed.stderr
    return host


def built(host: Host) -> None:
    result = host.kvc("build", "simple-kmod", "--kernel", host.release)
    assert result.returncode == 0, result.stderr


@pytest.mark.podman
def test_build_is_skipped_when_up_to_date_and_status_shows_it(host: Host) -> None:
    built(host)
    host.log.unlink(missing_ok=True)
    started = time.monotonic()
    again = host.kvc("build", "simple-kmod", "--kernel", host.release)
    elapsed = time.monotonic() - started
    assert again.returncode == 0 and "is up to date" in again.stdout
    assert elapsed <= 1.0, elapsed
    calls = fakeprog.calls(host.log)
    assert not [c for c in calls if c[:1] in (["run"], ["create"], ["build"])], calls
    status = json.loads(host.kvc("status", "--json").stdout)
    assert status["schema"] == 1
    (entry,) = status["instances"][0]["kernels"]
    assert entry["kernel"] == host.release and entry["image"]["exists"] and entry["image"]["up_to_date"]
    dry = host.kvc("build", "simple-kmod", "--kernel", host.release, "--force", "--dry-run")
    assert "build (--force)" in dry.stdout


@pytest.mark.podman
def test_load_in_order_with_parameters_and_unload_in_reverse(host: Host) -> None:
    built(host)
    result = host.kvc("load", "simple-kmod")
    assert result.returncode == 0, result.stderr
    kernel = host.kernel()
    assert [m.name for m in reversed(kernel.loaded_modules())] == ["simple_kmod", "simple_procfs_kmod"]
    state = kernel.module_state("simple_procfs_kmod")
    assert state is not None and state.parameters["number"] == "0"
    assert state.taint == "OE"
    again = host.kvc("load", "simple-kmod")
    assert "skip simple_kmod (already loaded)" in again.stdout
    unload = host.kvc("unload", "simple-kmod")
    assert unload.returncode == 0, unload.stderr
    assert unload.stdout.index("rmmod simple_procfs_kmod") < unload.stdout.index("rmmod simple_kmod")
    assert kernel.loaded_modules() == []


@pytest.mark.podman
def test_the_boot_path_load_starts_no_container_runtime(host: Host) -> None:
    """Once a load has extracted from the tag's image, a load of the unchanged instance (the unit's
    at every boot) trusts kvc's record and never runs podman; a build drops the record, so the next
    load asks podman again, as does --force."""
    built(host)
    assert host.kvc("load", "simple-kmod").returncode == 0
    assert host.kvc("unload", "simple-kmod").returncode == 0
    host.log.unlink(missing_ok=True)
    again = host.kvc("load", "simple-kmod")
    assert again.returncode == 0, again.stderr
    assert not host.log.exists() or fakeprog.calls(host.log) == []
    assert [m.name for m in host.kernel().loaded_modules()] == ["simple_procfs_kmod", "simple_kmod"]
    assert host.kvc("unload", "simple-kmod").returncode == 0
    built(host)
    host.log.unlink(missing_ok=True)
    assert host.kvc("load", "simple-kmod").returncode == 0
    assert ["image", "inspect"] in [call[:2] for call in fakeprog.calls(host.log)]
    host.log.unlink(missing_ok=True)
    assert host.kvc("load", "simple-kmod", "--force").returncode == 0
    assert ["image", "inspect"] in [call[:2] for call in fakeprog.calls(host.log)]


@pytest.mark.podman
def test_status_answers_from_the_record_until_the_images_change(host: Host) -> None:
    """The first status asks podman and records its answer; the next ones read the record (no
    podman) and say the same; a build drops the record; --refresh asks podman anyway."""
    built(host)
    assert host.kvc("load", "simple-kmod").returncode == 0
    host.log.unlink(missing_ok=True)
    first = host.kvc("status", "--json")
    assert first.returncode == 0, first.stderr
    assert ["images"] in [call[:1] for call in fakeprog.calls(host.log)]
    host.log.unlink(missing_ok=True)
    second = host.kvc("status", "--json")
    assert not host.log.exists() or fakeprog.calls(host.log) == []
    assert second.stdout == first.stdout
    (entry,) = json.loads(second.stdout)["instances"][0]["kernels"]
    assert entry["image"]["exists"] and entry["image"]["up_to_date"] and entry["extracted"]
    assert host.kvc("status", "--refresh").returncode == 0
    assert fakeprog.calls(host.log) != []
    built(host)
    host.log.unlink(missing_ok=True)
    assert host.kvc("status").returncode == 0
    assert ["images"] in [call[:1] for call in fakeprog.calls(host.log)]


@pytest.mark.podman
def test_a_refused_second_module_leaves_nothing_loaded(host: Host) -> None:
    built(host)
    conf = host.conf()
    conf.write_text(conf.read_text().replace('"number=0"', '"number=forty-four"'))
    result = host.kvc("load", "simple-kmod")
    assert result.returncode == 5
    assert "the kernel refused simple_procfs_kmod" in result.stderr
    assert "unloaded again: simple_kmod" in result.stderr
    assert "Traceback" not in result.stderr
    assert host.kernel().loaded_modules() == []


SYMVERS_CRCS = {"_printk": 0x92997ED8, "udp_tunnel_sock_release": 0xC810759E}


def crafted(
    tmp_path: Path, name: str, release: str, *, imports: tuple[str, ...] = (), exports: tuple[str, ...] = ()
) -> str:
    """A module shaped as kbuild makes them, importing with the CRCs the kernel's symvers has."""
    spec = ModuleSpec(
        name=name,
        vermagic=f"{release} SMP preempt mod_unload modversions ",
        imports=[(sym, SYMVERS_CRCS.get(sym, 0x12345678)) for sym in ("_printk", *imports)],
        exports=[Export(sym) for sym in exports],
        modinfo=[("license", "GPL")],
    )
    path = tmp_path / f"{name}.ko"
    path.write_bytes(build_module(spec))
    return str(path)


def test_preflight_names_unknown_symbols_before_any_syscall(tmp_path: Path, indexed_kernel_tree: DebianKernel) -> None:
    release = indexed_kernel_tree.release
    kernel = FakeKernel.create(HostPaths(str(tmp_path / "root")), release, symvers=str(indexed_kernel_tree.symvers))
    good = crafted(tmp_path, "good", release)
    bad = crafted(tmp_path, "bad", release, imports=("no_such_symbol_anywhere", "udp_tunnel_sock_release"))
    with pytest.raises(LoadError) as refused:
        plan_load("demo", release, [good, bad], {}, kernel, ModuleDirectory(str(indexed_kernel_tree.moddir)))
    assert "no_such_symbol_anywhere" in refused.value.details
    assert "udp_tunnel_sock_release" not in refused.value.details  # an in-tree module provides it
    assert kernel.loaded_modules() == [] and kernel.dmesg() == []


def test_plan_orders_providers_first_and_pulls_in_tree_dependencies(
    tmp_path: Path, indexed_kernel_tree: DebianKernel
) -> None:
    release = indexed_kernel_tree.release
    kernel = FakeKernel.create(HostPaths(str(tmp_path / "root")), release, symvers=str(indexed_kernel_tree.symvers))
    user = crafted(tmp_path, "user_mod", release, imports=("provider_sym", "udp_tunnel_sock_release"))
    provider = crafted(tmp_path, "provider_mod", release, exports=("provider_sym",))
    plan = plan_load(
        "demo", release, [user, provider], {"user_mod": "x=1"}, kernel, ModuleDirectory(str(indexed_kernel_tree.moddir))
    )
    assert [(s.name, s.origin) for s in plan.steps] == [
        ("udp_tunnel", "in-tree"),
        ("provider_mod", "instance"),
        ("user_mod", "instance"),
    ]
    execute_load(plan, kernel, None)
    provider_state = kernel.module_state("provider_mod")
    assert provider_state is not None and provider_state.holders == ("user_mod",)
    assert kernel.module_state("udp_tunnel") is not None


def test_in_tree_dependencies_are_planned_as_modprobe_would(tmp_path: Path, indexed_kernel_tree: DebianKernel) -> None:
    """modprobe.d options and softdeps apply to the in-tree modules an instance needs; a softdep the
    kernel refuses is skipped, and an install command is refused (never run)."""
    release = indexed_kernel_tree.release
    root = tmp_path / "root"
    kernel = FakeKernel.create(HostPaths(str(root)), release, symvers=str(indexed_kernel_tree.symvers))
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    user = crafted(tmp_path, "user_mod", release, imports=("udp_tunnel_sock_release",))
    conf_dir = tmp_path / "modprobe.d"
    conf_dir.mkdir()
    (conf_dir / "kvc.conf").write_text(
        "options udp_tunnel nosuchparam=1\noptions loop max_part=lots\nsoftdep udp_tunnel pre: crc-itu-t loop\n"
    )
    config = load_config([str(conf_dir)], module_dir=moddir.path, paths=HostPaths(str(root)))
    plan = plan_load("demo", release, [user], {}, kernel, moddir, modprobe_config=config)
    assert [(s.name, s.origin, s.params, s.required) for s in plan.steps] == [
        ("crc_itu_t", "in-tree", "", False),
        ("loop", "in-tree", "max_part=lots", False),
        ("udp_tunnel", "in-tree", "nosuchparam=1", True),
        ("user_mod", "instance", "", True),
    ]
    assert "(in-tree, softdep)" in plan.describe()
    # Linux ignores an unknown parameter but refuses a bad value: the softdep loop is skipped.
    assert execute_load(plan, kernel, None) == ["crc_itu_t", "udp_tunnel", "user_mod"]
    assert [m.name for m in kernel.loaded_modules()] == ["user_mod", "udp_tunnel", "crc_itu_t"]
    (conf_dir / "kvc.conf").write_text("install udp_tunnel /bin/true\n")
    config = load_config([str(conf_dir)], module_dir=moddir.path, paths=HostPaths(str(root)))
    fresh = FakeKernel.create(HostPaths(str(tmp_path / "fresh")), release, symvers=str(indexed_kernel_tree.symvers))
    with pytest.raises(LoadError) as install:
        plan_load("demo", release, [user], {}, fresh, moddir, modprobe_config=config)
    assert install.value.brief == (
        "in-tree module udp_tunnel has an install command in the modprobe configuration: /bin/true"
    )


@pytest.mark.parametrize(
    "conf, message",
    [
        ('KMOD_NAMES="$(rm -rf /)"\n', "command substitution is not allowed"),
        ("KMOD_SOFTWARE_VERSION=1\nKMOD_NAMES=a\n", "KMOD_CONTAINER_BUILD_CONTEXT is not set"),
        ("KMOD_CONTAINER_BUILD_CONTEXT=--privileged\nKMOD_SOFTWARE_VERSION=1\nKMOD_NAMES=a\n", "is not allowed"),
        ("KMOD_CONTAINER_BUILD_CONTEXT=.\nKMOD_SOFTWARE_VERSION=1\nKMOD_NAMES=a\nKVC_KEEP_KERNELS=x\n", "whole number"),
    ],
)
def test_bad_instance_confs_get_one_clear_line(tmp_path: Path, conf: str, message: str) -> None:
    etc = tmp_path / "etc" / "kvc"
    etc.mkdir(parents=True)
    (etc / "bad.conf").write_text(conf)
    env = {**os.environ, "KVC_ROOT": str(tmp_path), "KVC_KERNEL": "fake"}
    result = subprocess.run(
        [sys.executable, "-m", "kvc", "build", "bad", "--kernel", "6.1.0-1-amd64"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 3
    assert message in result.stderr.splitlines()[0]
    assert "Traceback" not in result.stderr


def test_bad_names_and_missing_instances(tmp_path: Path) -> None:
    env = {**os.environ, "KVC_ROOT": str(tmp_path), "KVC_KERNEL": "fake"}
    for args in (
        ["build", "../etc", "--kernel", "6.1.0-1-amd64"],
        ["load", "nosuch", "--kernel", "6.1.0-1-amd64"],
        ["build", "x", "--kernel", "--oops"],
    ):
        result = subprocess.run([sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=env)
        assert result.returncode in (2, 3), (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_instance_conf_parses_the_example() -> None:
    instance = InstanceConfig.load(str(EXAMPLE), "simple-kmod")
    assert instance.module_names == ("simple-kmod", "simple-procfs-kmod")
    assert instance.build_context == str(EXAMPLE)
    assert instance.module_params == {"simple_procfs_kmod": "number=0"}
    assert instance.wrapper_tools == ("spkut",)


@pytest.mark.podman
def test_modules_from_a_mounted_image_directory_are_checked_and_loaded(host: Host, tmp_path: Path) -> None:
    built(host)
    tag = f"simple-kmod-1.0.0:{host.release}"
    mounted = subprocess.run(["podman", "image", "mount", tag], check=True, capture_output=True, text=True)
    root = mounted.stdout.strip()
    try:
        checked = host.kvc("check", "simple-kmod", "--modules-dir", root)
        assert checked.returncode == 0, checked.stderr
        assert f"pass the preflight for {host.release}" in checked.stdout
        assert host.kernel().loaded_modules() == []
        assert not (host.root / "var" / "lib" / "kvc" / "simple-kmod" / host.release).exists()
        loaded = host.kvc("load", "simple-kmod", "--modules-dir", root)
        assert loaded.returncode == 0, loaded.stderr
    finally:
        subprocess.run(["podman", "image", "unmount", tag], capture_output=True)
    assert {m.name for m in host.kernel().loaded_modules()} == {"simple_kmod", "simple_procfs_kmod"}
    manifest = json.loads((host.root / "var/lib/kvc/simple-kmod" / host.release / "manifest.json").read_text())
    assert manifest["image"] == f"dir:{root}" and manifest["image_id"].startswith("dir-")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = host.kvc("check", "simple-kmod", "--modules-dir", str(empty))
    assert missing.returncode == 6 and f"has no lib/modules/{host.release}" in missing.stderr
