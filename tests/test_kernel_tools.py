"""The kernel interface and lsmod/insmod/rmmod: a fake kernel that refuses what Linux refuses,
and our tools against kmod 30's on the same state (kmod's tools read the fake files through a
private mount namespace with the fake /proc and /sys/module bound over the real ones)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvc.kmod.fakekernel import FakeKernel
from kvc.kmod.kernel import KernelError, LiveKernel, kernel_from_env
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.module import ModuleFile
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel
from support.elfbuild import ElfSpec, SymbolSpec, build, modinfo_section, this_module_section
from support.oracle import Result, kmod_tool, run_kmod, run_kvc


def wireguard_chain(kernel: DebianKernel) -> list[str]:
    """wireguard and its dependencies as modules.dep lists them, deepest first."""
    entry = ModuleDirectory(str(kernel.moddir)).lookup_module("wireguard")
    assert entry is not None and entry.path is not None
    return [*reversed(entry.dependencies), entry.path]


def module_path(kernel: DebianKernel, name: str) -> str:
    found = [p for p in kernel.modules() if p.name == f"{name}.ko"]
    assert found, name
    return str(found[0])


@pytest.fixture
def fake(indexed_kernel_tree: DebianKernel, tmp_path: Path) -> FakeKernel:
    return FakeKernel.create(HostPaths(str(tmp_path / "root")), indexed_kernel_tree.release,
                             symvers=str(indexed_kernel_tree.symvers))


def env_for(fake: FakeKernel) -> dict[str, str]:
    return {**os.environ, "KVC_ROOT": fake.paths.root, "KVC_KERNEL": "fake"}


def run_kmod_on(fake: FakeKernel, tool: str, args: list[str]) -> Result:
    """kmod's real tool, seeing the fake kernel's /proc and /sys/module."""
    script = ('mount --bind "$1/proc" /proc && mount --bind "$1/sys/module" /sys/module && '
              'shift && exec "$@"')
    env = {**os.environ, "PATH": f"{os.path.dirname(kmod_tool(tool))}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", fake.paths.root, tool, *args],
                          capture_output=True, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def load_wireguard(fake: FakeKernel, kernel: DebianKernel) -> int:
    chain = wireguard_chain(kernel)
    for path in chain:
        fake.insert(path, "", 0)
    return len(chain)


def test_dependencies_take_references_and_lsmod_matches_kmod(
        fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    load_wireguard(fake, indexed_kernel_tree)
    fake.insert(module_path(indexed_kernel_tree, "vxlan"), "", 0)
    state = fake.module_state("udp_tunnel")
    assert state is not None and state.refcnt == 2 and sorted(state.holders) == ["vxlan", "wireguard"]
    loaded = {m.name: m for m in fake.loaded_modules()}
    assert loaded["wireguard"].refcnt == 0 and loaded["libchacha"].refcnt >= 1
    assert next(m.name for m in fake.loaded_modules()) == "vxlan"  # newest first, like /proc/modules
    ours = run_kvc("lsmod", [], env_for(fake))
    theirs = run_kmod_on(fake, "lsmod", [])
    assert theirs.returncode == 0 and b"wireguard" in theirs.stdout
    assert ours == theirs


def test_unknown_symbols_are_refused_with_the_kernels_log_lines(
        fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    with pytest.raises(KernelError) as refused:
        fake.insert(module_path(indexed_kernel_tree, "wireguard"), "", 0)
    assert refused.value.errno == 2
    assert "wireguard: Unknown symbol curve25519_arch (err -2)" in refused.value.log_lines
    assert "wireguard: Unknown symbol curve25519_arch (err -2)" in fake.dmesg()
    assert fake.loaded_modules() == []
    ours = run_kvc("insmod", [module_path(indexed_kernel_tree, "wireguard")], env_for(fake))
    assert ours.returncode == 1
    assert ours.stderr.decode().endswith("wireguard.ko: Unknown symbol in module\n")


def test_crc_mismatch_and_second_insert(fake: FakeKernel, indexed_kernel_tree: DebianKernel, tmp_path: Path) -> None:
    source = module_path(indexed_kernel_tree, "dummy")
    fake.insert(source, "numdummies=2", 0)
    with pytest.raises(KernelError) as again:
        fake.insert(source, "", 0)
    assert again.value.errno == 17
    params = fake.module_state("dummy")
    assert params is not None and params.parameters["numdummies"] == "2"
    fake.remove("dummy", 0)
    data = bytearray(Path(source).read_bytes())
    module = ModuleFile.open(source)
    versions = module.elf.section("__versions")
    assert versions is not None
    entries = module.elf.modversions()
    index = next(i for i, (_crc, name) in enumerate(entries) if name != b"module_layout")
    struct.pack_into("<Q", data, versions.offset + 64 * index, entries[index][0] ^ 0xFFFF)
    bad = tmp_path / "dummy.ko"
    bad.write_bytes(bytes(data))
    with pytest.raises(KernelError) as mismatch:
        fake.insert(str(bad), "", 0)
    symbol = entries[index][1].decode()
    assert mismatch.value.errno == 22
    assert f"dummy: disagrees about version of symbol {symbol}" in mismatch.value.log_lines
    fake.insert(str(bad), "", 1)  # ignore modversions: loads
    with pytest.raises(KernelError) as bad_param:
        fake.remove("dummy", 0)
        fake.insert(source, "numdummies=many", 0)
    assert bad_param.value.errno == 22


def test_vermagic_for_another_kernel_is_refused(fake: FakeKernel, tmp_path: Path) -> None:
    spec = ElfSpec(symbols=[SymbolSpec("_printk")])
    spec.add(".modinfo", modinfo_section([("vermagic", "5.10.0-1-amd64 SMP mod_unload modversions "),
                                          ("license", "GPL")]))
    spec.add(".gnu.linkonce.this_module", this_module_section("oldmod"))
    path = tmp_path / "oldmod.ko"
    path.write_bytes(build(spec))
    with pytest.raises(KernelError) as refused:
        fake.insert(str(path), "", 0)
    assert refused.value.errno == 8
    assert any("version magic '5.10.0-1-amd64" in line for line in refused.value.log_lines)
    fake.insert(str(path), "", 2)  # ignore vermagic
    assert fake.module_state("oldmod") is not None
    assert [m.taints for m in fake.loaded_modules()] == ["OFE"]


@pytest.mark.parametrize("args", [["udp_tunnel"], ["nosuch"], ["udp_tunnel", "nosuch", "udp-tunnel"], [],
                                  ["--bogus"], ["-h"]])
def test_rmmod_refusals_match_kmod(fake: FakeKernel, indexed_kernel_tree: DebianKernel, args: list[str]) -> None:
    count = load_wireguard(fake, indexed_kernel_tree)
    ours = run_kvc("rmmod", args, env_for(fake))
    theirs = run_kmod_on(fake, "rmmod", args)
    assert ours == theirs
    assert len(fake.loaded_modules()) == count


def test_rmmod_removes_what_is_unused(fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    load_wireguard(fake, indexed_kernel_tree)
    assert run_kvc("rmmod", ["wireguard"], env_for(fake)).returncode == 0
    state = fake.module_state("udp_tunnel")
    assert state is not None and state.refcnt == 0 and state.holders == ()
    forced = run_kvc("rmmod", ["-f", "libchacha"], env_for(fake))
    assert forced.returncode == 1
    assert forced.stderr.decode().endswith("could not remove module libchacha: Resource temporarily unavailable\n")


def test_insmod_and_lsmod_on_this_hosts_real_kernel_match_kmod(indexed_kernel_tree: DebianKernel) -> None:
    """This machine's kernel has no module support: both tools get the same refusals from it."""
    env = {k: v for k, v in os.environ.items() if k not in ("KVC_ROOT", "KVC_KERNEL")}
    dummy = module_path(indexed_kernel_tree, "dummy")
    for tool, args in [("insmod", [dummy]), ("insmod", [dummy, "numdummies=1"]), ("insmod", ["/nonexistent.ko"]),
                       ("insmod", []), ("insmod", ["-z"]), ("insmod", ["--help"]), ("lsmod", []),
                       ("lsmod", ["x"]), ("rmmod", ["dummy"])]:
        ours = run_kvc(tool, args, env)
        assert ours == run_kmod(tool, args, env), (tool, args)


def test_live_kernel_reports_the_syscall_errno(indexed_kernel_tree: DebianKernel) -> None:
    live = kernel_from_env(HostPaths("/"), {})
    assert isinstance(live, LiveKernel)
    with pytest.raises(KernelError) as refused:
        live.insert(module_path(indexed_kernel_tree, "dummy"), "", 0)
    assert refused.value.errno == 38  # ENOSYS: no module support here
    assert live.loaded_modules() == []


def test_state_is_shared_between_processes(fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    code = ("from kvc.kmod.kernel import kernel_from_env; k = kernel_from_env(); "
            f"k.insert({module_path(indexed_kernel_tree, 'udp_tunnel')!r}, '', 0)")
    subprocess.run([sys.executable, "-c", code], env=env_for(fake), check=True)
    assert [m.name for m in FakeKernel(fake.paths).loaded_modules()] == ["udp_tunnel"]
    shutil.rmtree(os.path.join(fake.paths.root, "proc"))
    assert fake.loaded_modules() == []
