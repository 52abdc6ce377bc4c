"""The loader's softdeps of an instance's own modules and the in-tree modules an instance names
(``KVC_INTREE_MODULES``), planned on Debian's real module tree and loaded into the fake kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest

from kvc.config import InstanceConfig
from kvc.errors import ConfigError, LoadError
from kvc.kmod.config import load_config
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.paths import HostPaths
from kvc.loader import LoadStep, execute_load, execute_unload, plan_load, plan_unload
from support.debian_kernel import DebianKernel
from support.modbuild import Export, ModuleSpec, build_module


def symvers_crc(kernel: DebianKernel, symbol: str) -> int:
    for line in kernel.symvers.read_text().splitlines():
        fields = line.split("\t")
        if fields[1] == symbol:
            return int(fields[0], 16)
    raise AssertionError(f"{symbol} is not in {kernel.symvers}")


def module(
    tmp_path: Path,
    kernel: DebianKernel,
    name: str,
    *,
    softdep: str = "",
    imports: tuple[str, ...] = (),
    exports: tuple[str, ...] = (),
) -> str:
    """An instance module shaped as kbuild makes them, with ``softdep=`` as MODULE_SOFTDEP writes it."""
    crcs = {"_printk": symvers_crc(kernel, "_printk")}
    spec = ModuleSpec(
        name=name,
        vermagic=f"{kernel.release} SMP preempt mod_unload modversions ",
        imports=[(sym, crcs.get(sym, 0x12345678)) for sym in ("_printk", *imports)],
        exports=[Export(sym) for sym in exports],
        modinfo=[("license", "GPL"), *([("softdep", softdep)] if softdep else [])],
    )
    path = tmp_path / f"{name}.ko"
    path.write_bytes(build_module(spec))
    return str(path)


@pytest.fixture
def fake_kernel(tmp_path: Path, indexed_kernel_tree: DebianKernel) -> FakeKernel:
    return FakeKernel.create(
        HostPaths(str(tmp_path / "root")), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers)
    )


def plan_of(steps: Sequence[LoadStep]) -> list[tuple[str, str, bool]]:
    return [(step.name, step.origin.value, step.required) for step in steps]


def test_softdeps_of_an_instance_module_load_around_it(
    tmp_path: Path, indexed_kernel_tree: DebianKernel, fake_kernel: FakeKernel
) -> None:
    """pre: modules just before it, post: modules just after, each with its own dependencies and
    none of them required; a name nobody has is skipped, as modprobe skips it."""
    release = indexed_kernel_tree.release
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    user = module(tmp_path, indexed_kernel_tree, "user_mod", softdep="pre: crc-itu-t no_such_module post: vxlan")
    plan = plan_load("demo", release, [user], {}, fake_kernel, moddir)
    steps = plan_of(plan.steps)
    assert steps[:2] == [("crc_itu_t", "in-tree", False), ("user_mod", "instance", True)]
    assert sorted(steps[2:4]) == [("ip6_udp_tunnel", "in-tree", False), ("udp_tunnel", "in-tree", False)]
    assert steps[4:] == [("vxlan", "in-tree", False)]
    assert "(in-tree, softdep)" in plan.describe()
    assert execute_load(plan, fake_kernel, None) == [name for name, _, _ in steps]


def test_a_softdep_the_kernel_refuses_is_skipped_and_configuration_wins(
    tmp_path: Path, indexed_kernel_tree: DebianKernel, fake_kernel: FakeKernel
) -> None:
    release = indexed_kernel_tree.release
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    user = module(tmp_path, indexed_kernel_tree, "user_mod", softdep="pre: crc-itu-t")
    conf_dir = tmp_path / "modprobe.d"
    conf_dir.mkdir()
    (conf_dir / "kvc.conf").write_text("options loop max_part=lots\nsoftdep user_mod pre: loop post: crc7\n")
    config = load_config([str(conf_dir)], module_dir=moddir.path, paths=HostPaths(str(tmp_path / "root")))
    plan = plan_load("demo", release, [user], {}, fake_kernel, moddir, modprobe_config=config)
    # A softdep line of the configuration replaces the module's own, as in modprobe.
    assert plan_of(plan.steps) == [
        ("loop", "in-tree", False),
        ("user_mod", "instance", True),
        ("crc7", "in-tree", False),
    ]
    # The fake kernel refuses loop's bad parameter value, as Linux does: skipped, the rest loads.
    assert execute_load(plan, fake_kernel, None) == ["user_mod", "crc7"]


def test_softdeps_between_instance_modules_order_them_unless_a_dependency_says_otherwise(
    tmp_path: Path, indexed_kernel_tree: DebianKernel, fake_kernel: FakeKernel
) -> None:
    release = indexed_kernel_tree.release
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    later = module(tmp_path, indexed_kernel_tree, "later_mod")
    first = module(tmp_path, indexed_kernel_tree, "first_mod", softdep="post: later-mod")
    plan = plan_load("demo", release, [later, first], {}, fake_kernel, moddir)
    assert [step.name for step in plan.steps] == ["first_mod", "later_mod"]
    needs = module(tmp_path, indexed_kernel_tree, "user_sym_mod", imports=("pre_mod_sym",))
    provider = module(tmp_path, indexed_kernel_tree, "pre_mod", softdep="pre: user_sym_mod", exports=("pre_mod_sym",))
    plan = plan_load("demo", release, [needs, provider], {}, fake_kernel, moddir)
    # user_sym_mod imports pre_mod's symbol: the dependency wins over pre_mod's softdep.
    assert [step.name for step in plan.steps] == ["pre_mod", "user_sym_mod"]


def test_in_tree_modules_the_instance_names_load_first_with_their_dependencies(
    tmp_path: Path, indexed_kernel_tree: DebianKernel, fake_kernel: FakeKernel
) -> None:
    release = indexed_kernel_tree.release
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    user = module(tmp_path, indexed_kernel_tree, "user_mod")
    plan = plan_load("demo", release, [user], {}, fake_kernel, moddir, intree_modules=("vxlan", "crc-itu-t"))
    steps = plan_of(plan.steps)
    assert sorted(steps[:2]) == [("ip6_udp_tunnel", "in-tree", True), ("udp_tunnel", "in-tree", True)]
    assert steps[2:] == [("vxlan", "in-tree", True), ("crc_itu_t", "in-tree", True), ("user_mod", "instance", True)]
    record = tmp_path / "loaded.json"
    execute_load(plan, fake_kernel, str(record))
    unload = plan_unload("demo", release, ["user_mod"], fake_kernel, record_path=str(record))
    assert set(unload.in_tree) == {"vxlan", "udp_tunnel", "ip6_udp_tunnel", "crc_itu_t"}
    with pytest.raises(LoadError) as missing:
        plan_load("demo", release, [user], {}, fake_kernel, moddir, intree_modules=("no_such_module",))
    assert missing.value.brief == (
        f"in-tree module no_such_module is needed (KVC_INTREE_MODULES names it) but not found in {moddir.path}"
    )
    assert "KVC_INTREE_MODULES" in (missing.value.hint or "")


def test_modules_another_loader_loads_or_unloads_between_plan_and_execution_are_skipped(
    tmp_path: Path, indexed_kernel_tree: DebianKernel, fake_kernel: FakeKernel
) -> None:
    """A racing loader (udev, modprobe, another kvc) that loads a planned module first makes the
    kernel answer EEXIST: skipped as the plan skips a module loaded before, neither a refusal with
    a rollback nor recorded as the instance's; a module already gone at unload (ENOENT) is not a
    failure either, and a pulled-in module held by another pulled-in one (ip6_udp_tunnel by vxlan)
    goes once its holder is gone."""
    release = indexed_kernel_tree.release
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    user = module(tmp_path, indexed_kernel_tree, "user_mod")
    plan = plan_load("demo", release, [user], {}, fake_kernel, moddir, intree_modules=("vxlan", "crc-itu-t"))
    raced = next(step for step in plan.steps if step.name == "udp_tunnel")
    fake_kernel.insert(raced.path, "", 0)
    record = tmp_path / "loaded.json"
    assert "udp_tunnel" not in execute_load(plan, fake_kernel, str(record))
    loaded = {m.name for m in fake_kernel.loaded_modules()}
    assert loaded == {"user_mod", "vxlan", "udp_tunnel", "ip6_udp_tunnel", "crc_itu_t"}
    unload = plan_unload("demo", release, ["user_mod"], fake_kernel, record_path=str(record))
    assert "udp_tunnel" not in unload.in_tree and {"vxlan", "crc_itu_t"} <= set(unload.in_tree)
    fake_kernel.remove("user_mod", 0)
    execute_unload(unload, fake_kernel, force=False, record_path=str(record))
    # udp_tunnel was the other loader's: it stays; the rest the instance loaded is gone.
    assert {m.name for m in fake_kernel.loaded_modules()} == {"udp_tunnel"}


BASE = {"KMOD_CONTAINER_BUILD_CONTEXT": "/ctx", "KMOD_SOFTWARE_VERSION": "1", "KMOD_NAMES": "a"}


def test_the_keys_parse_and_refuse_what_is_not_a_module_or_a_device() -> None:
    instance = InstanceConfig.from_values(
        "x",
        "x.conf",
        {**BASE, "KVC_INTREE_MODULES": "ip_tables xt_tcpudp", "KVC_VERIFY_DEVICES": "edu virtio-rng-pci,id=rng0"},
    )
    assert instance.intree_modules == ("ip_tables", "xt_tcpudp")
    assert instance.verify_devices == ("edu", "virtio-rng-pci,id=rng0")
    for key, value, message in (
        ("KVC_INTREE_MODULES", "../evil", "KVC_INTREE_MODULES item '../evil' is not a kernel module name"),
        ("KVC_VERIFY_DEVICES", "loader,file=/etc/shadow", "is not a qemu device"),
        ("KVC_VERIFY_DEVICES", "-device", "is not a qemu device"),
        ("KVC_VERIFY_DEVICES", "edu,$x", "is not a qemu device"),
    ):
        with pytest.raises(ConfigError) as refused:
            InstanceConfig.from_values("x", "x.conf", {**BASE, key: value})
        assert message in refused.value.brief


def test_a_load_record_left_by_another_boot_names_nothing_of_this_one(
    tmp_path: Path, indexed_kernel_tree: DebianKernel, fake_kernel: FakeKernel
) -> None:
    """A host that went down without an unload leaves its load record behind. After the reboot an
    in-tree module it names may be loaded by someone else before kvc: kvc neither merges the old
    record into the new one nor unloads that module as its own."""
    release = indexed_kernel_tree.release
    moddir = ModuleDirectory(str(indexed_kernel_tree.moddir))
    user = module(tmp_path, indexed_kernel_tree, "user_mod")
    record = tmp_path / "loaded.json"
    execute_load(
        plan_load("demo", release, [user], {}, fake_kernel, moddir, intree_modules=("crc-itu-t",)),
        fake_kernel,
        str(record),
    )
    assert plan_unload("demo", release, ["user_mod"], fake_kernel, record_path=str(record)).in_tree == ("crc_itu_t",)
    # The reboot: a new kernel (a new boot id), in which another loader loads crc_itu_t first.
    before = fake_kernel.boot_id()
    rebooted = FakeKernel.create(HostPaths(str(tmp_path / "root")), release, symvers=str(indexed_kernel_tree.symvers))
    assert before is not None and rebooted.boot_id() not in (None, before)
    rebooted.insert(str(indexed_kernel_tree.moddir / "kernel" / "lib" / "crc-itu-t.ko"))
    assert plan_unload("demo", release, ["user_mod"], rebooted, record_path=str(record)).in_tree == ()
    plan = plan_load("demo", release, [user], {}, rebooted, moddir, intree_modules=("crc-itu-t",))
    assert [step.name for step in plan.steps] == ["user_mod"]
    execute_load(plan, rebooted, str(record))
    unload = plan_unload("demo", release, ["user_mod"], rebooted, record_path=str(record))
    assert (unload.names, unload.in_tree) == (("user_mod",), ())
    execute_unload(unload, rebooted, force=False, record_path=str(record))
    assert "crc_itu_t" in {entry.name for entry in rebooted.loaded_modules()}
