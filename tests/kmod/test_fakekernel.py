"""The fake kernel: real Debian 6.1 modules and kbuild-shaped test modules loaded into it, checked
against what Linux 6.1 does (kernel/module/main.c, version.c, params.c, procfs.c)."""

from __future__ import annotations

import errno
import lzma
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

from kvc.kmod.kernel.environment import kernel_from_env
from kvc.kmod.kernel.fake import FakeKernel, KernelConfig, kconfig_options, make_fake_kernel
from kvc.kmod.kernel.protocol import (
    MODULE_INIT_COMPRESSED_FILE,
    MODULE_INIT_IGNORE_MODVERSIONS,
    MODULE_INIT_IGNORE_VERMAGIC,
    O_TRUNC,
    KernelError,
)
from kvc.kmod.kernel.readers import read_symvers
from kvc.kmod.module import ModuleFile
from support.debian_kernel import DebianKernel, dependency_chain, module_path
from support.modbuild import Export, ModuleSpec, Param, build_module, signature_trailer


@pytest.fixture
def crcs(indexed_kernel_tree: DebianKernel) -> dict[str, int]:
    found = read_symvers(str(indexed_kernel_tree.symvers))
    assert found is not None
    return found


class Builder:
    def __init__(self, tmp_path: Path, release: str, crcs: dict[str, int]) -> None:
        self.dir = tmp_path
        self.vermagic = f"{release} SMP preempt mod_unload modversions "
        self.crcs = crcs

    def __call__(
        self,
        name: str,
        *,
        imports: tuple[str, ...] = ("_printk",),
        license: str = "GPL",
        vermagic: Optional[str] = None,
        crc_overrides: Optional[dict[str, int]] = None,
        **spec: Any,
    ) -> str:
        overrides = crc_overrides or {}
        modinfo = [("license", license)] if license else []
        modinfo += spec.pop("modinfo", [])
        built = build_module(
            ModuleSpec(
                name,
                self.vermagic if vermagic is None else vermagic,
                imports=[(sym, overrides.get(sym, self.crcs.get(sym, 0x12345678))) for sym in imports],
                modinfo=modinfo,
                crcs={**self.crcs, **overrides},
                **spec,
            )
        )
        path = self.dir / f"{name}.ko"
        path.write_bytes(built)
        return str(path)


@pytest.fixture
def build(tmp_path: Path, indexed_kernel_tree: DebianKernel, crcs: dict[str, int]) -> Builder:
    return Builder(tmp_path, indexed_kernel_tree.release, crcs)


def refused(fake: FakeKernel, module: Any, params: str = "", flags: int = 0) -> KernelError:
    with pytest.raises(KernelError) as caught:
        fake.insert(module, params, flags)
    return caught.value


# -- real Debian modules ---------------------------------------------------------------------------


def test_wireguard_and_its_dependencies_load_in_order(fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    paths = dependency_chain(indexed_kernel_tree, "wireguard")
    for path in paths:
        fake.insert(path, "", 0)
    fake.insert(module_path(indexed_kernel_tree, "vxlan"), "", 0)
    loaded = {m.name: m for m in fake.loaded_modules()}
    assert [m.name for m in fake.loaded_modules()][:2] == ["vxlan", "wireguard"]  # newest first
    assert loaded["udp_tunnel"].refcnt == 2 and loaded["udp_tunnel"].users == ("vxlan", "wireguard")
    assert loaded["wireguard"].refcnt == 0 and loaded["wireguard"].users == ()
    assert loaded["libcurve25519_generic"].users == ("wireguard", "curve25519_x86_64")
    # Sizes as Linux 6.1 lays modules out (pages for text, rodata, ro_after_init, data+symbols).
    assert loaded["wireguard"].size == 98304 and loaded["libchacha"].size == 16384
    assert all(m.taints == "" and m.state == "Live" and m.address == "0x0000000000000000" for m in loaded.values())
    state = fake.module_state("udp_tunnel")
    assert state is not None and state.refcnt == 2 and sorted(state.holders) == ["vxlan", "wireguard"]
    assert state.initstate == "live" and state.coresize == loaded["udp_tunnel"].size and state.taint == ""
    assert fake.dmesg() == [] and fake.tainted() == 0  # signed in-tree modules: nothing to say
    line = (Path(fake.paths.root) / "proc" / "modules").read_text().splitlines()
    assert f"udp_tunnel {loaded['udp_tunnel'].size} 2 vxlan,wireguard, Live 0x0000000000000000" in line


def test_a_module_before_its_dependency_has_unknown_symbols(
    fake: FakeKernel, indexed_kernel_tree: DebianKernel
) -> None:
    error = refused(fake, module_path(indexed_kernel_tree, "wireguard"))
    assert error.errno == errno.ENOENT
    assert "wireguard: Unknown symbol curve25519_arch (err -2)" in error.log_lines
    assert "wireguard: Unknown symbol udp_tunnel_sock_release (err -2)" in error.log_lines
    assert fake.dmesg() == list(error.log_lines)
    assert fake.loaded_modules() == []


def test_removal_follows_delete_module(fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    for path in dependency_chain(indexed_kernel_tree, "wireguard"):
        fake.insert(path, "", 0)
    for flags in (0, O_TRUNC):  # a module other modules use stays, even when forced
        with pytest.raises(KernelError) as busy:
            fake.remove("udp_tunnel", flags)
        assert busy.value.errno == errno.EWOULDBLOCK
    with pytest.raises(KernelError) as missing:
        fake.remove("nosuch", 0)
    assert missing.value.errno == errno.ENOENT
    fake.remove("wireguard", 0)
    state = fake.module_state("udp_tunnel")
    assert state is not None and state.refcnt == 0 and state.holders == ()
    assert fake.module_state("wireguard") is None
    fake.module_get("udp_tunnel")  # someone holds a reference: in use without holders
    with pytest.raises(KernelError) as used:
        fake.remove("udp_tunnel", 0)
    assert used.value.errno == errno.EWOULDBLOCK
    fake.remove("udp_tunnel", O_TRUNC)  # forced: goes, and taints the kernel (R)
    assert fake.tainted() == 1 << 3 and "Disabling lock debugging due to kernel taint" in fake.dmesg()


def test_second_insert_is_eexist_and_params_reach_sysfs(fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    loop = module_path(indexed_kernel_tree, "loop")
    fake.insert(loop, "max_loop=4 bogus=1 dyndbg=+p", 0)
    assert refused(fake, loop).errno == errno.EEXIST
    state = fake.module_state("loop")
    assert state is not None
    assert state.parameters["max_loop"] == "4" and state.parameters["max_part"] == "0"
    assert state.parameters["hw_queue_depth"] == "128"  # module-defined ops over an int
    assert fake.dmesg() == ["loop: unknown parameter 'bogus' ignored"]
    dummy = module_path(indexed_kernel_tree, "dummy")
    fake.insert(dummy, "numdummies=2", 0)
    dummy_state = fake.module_state("dummy")
    assert dummy_state is not None and dummy_state.parameters == {}  # module_param(numdummies, int, 0)


@pytest.mark.parametrize(
    "params, err, line",
    [
        ("max_part=many", errno.EINVAL, "loop: `many' invalid for parameter `max_part'"),
        ("max_part=99999999999", errno.ERANGE, "loop: `99999999999' invalid for parameter `max_part'"),
        ("max_part", errno.EINVAL, "loop: `' invalid for parameter `max_part'"),
        ("max_part=x max_loop=1", errno.EINVAL, "loop: `x' invalid for parameter `max_part'"),
    ],
)
def test_bad_parameter_values_are_refused(
    fake: FakeKernel, indexed_kernel_tree: DebianKernel, params: str, err: int, line: str
) -> None:
    error = refused(fake, module_path(indexed_kernel_tree, "loop"), params)
    assert error.errno == err and line in error.log_lines
    assert fake.loaded_modules() == []


def test_crc_mismatch_and_forced_loads(fake: FakeKernel, indexed_kernel_tree: DebianKernel, tmp_path: Path) -> None:
    source = Path(module_path(indexed_kernel_tree, "dummy"))
    data = bytearray(source.read_bytes())
    marker = b"register_netdevice\0"
    at = data.index(marker) - 8  # the __versions entry: u64 crc, then the name
    data[at] ^= 0xFF
    bad = tmp_path / "dummy.ko"
    bad.write_bytes(bytes(data))
    error = refused(fake, str(bad))
    assert error.errno == errno.EINVAL
    assert error.log_lines[-2:] == (
        "dummy: disagrees about version of symbol register_netdevice",
        "dummy: Unknown symbol register_netdevice (err -22)",
    )
    fake.insert(str(bad), "", MODULE_INIT_IGNORE_MODVERSIONS)
    assert [m.taints for m in fake.loaded_modules()] == ["FE"]  # forced, and no longer signed
    assert "dummy: module_layout: kernel tainted." in fake.dmesg()


def test_vermagic_and_layout(fake: FakeKernel, build: Builder) -> None:
    old = build(
        "oldmod", vermagic="5.10.0-1-amd64 SMP preempt mod_unload modversions ", crc_overrides={"module_layout": 1}
    )
    error = refused(fake, old)
    assert error.errno == errno.ENOEXEC
    assert error.log_lines[-1] == "oldmod: disagrees about version of symbol module_layout"
    # A module built without modversions has no __versions: vermagic is then compared in full.
    plain = build("plain", vermagic="6.1.0-1-amd64 SMP preempt mod_unload ", modversions=False)
    error = refused(fake, plain)
    assert error.errno == errno.ENOEXEC
    assert error.log_lines[-1] == (
        f"plain: version magic '6.1.0-1-amd64 SMP preempt mod_unload ' should be '{fake.config.vermagic}'"
    )
    fake.insert(plain, "", MODULE_INIT_IGNORE_VERMAGIC | MODULE_INIT_IGNORE_MODVERSIONS)
    assert fake.loaded_modules()[0].taints == "FOE"
    assert "plain: module_layout: kernel tainted." in fake.dmesg()


def test_same_release_magic_with_crcs_ignores_the_release(fake: FakeKernel, build: Builder) -> None:
    path = build("other_release", vermagic="6.1.0-99-amd64 SMP preempt mod_unload modversions ")
    fake.insert(path, "", 0)  # same_magic() skips the release when the module has CRCs
    assert fake.loaded_modules()[0].name == "other_release"


def test_taints_and_their_messages(fake: FakeKernel, build: Builder) -> None:
    fake.insert(build("oot1"), "", 0)
    fake.insert(build("oot2"), "", 0)
    fake.insert(build("prop", license="Proprietary"), "", 0)
    fake.insert(build("stage", modinfo=[("intree", "Y"), ("staging", "Y")]), "", 0)
    taints = {m.name: m.taints for m in fake.loaded_modules()}
    assert taints == {"oot1": "OE", "oot2": "OE", "prop": "POE", "stage": "CE"}
    assert fake.dmesg() == [
        "oot1: loading out-of-tree module taints kernel.",
        "oot1: module verification failed: signature and/or required key missing - tainting kernel",
        "prop: module license 'Proprietary' taints kernel.",
        "Disabling lock debugging due to kernel taint",
        "stage: module is from the staging directory, the quality is unknown, you have been warned.",
    ]
    assert fake.tainted() == (1 << 0) | (1 << 10) | (1 << 12) | (1 << 13)
    assert (Path(fake.paths.root) / "proc/sys/kernel/tainted").read_text() == f"{fake.tainted()}\n"
    assert (Path(fake.paths.sys_module) / "prop" / "taint").read_text() == "POE\n"


def test_signatures(tmp_path: Path, indexed_kernel_tree: DebianKernel, build: Builder) -> None:
    trailer = signature_trailer(Path(module_path(indexed_kernel_tree, "dummy")).read_bytes())
    signed = Path(build("signed_oot"))
    signed.write_bytes(signed.read_bytes() + trailer)
    kernel = make_fake_kernel(
        str(tmp_path / "a"), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers)
    )
    kernel.insert(str(signed), "", 0)
    assert kernel.loaded_modules()[0].taints == "O"
    untrusting = make_fake_kernel(
        str(tmp_path / "b"),
        indexed_kernel_tree.release,
        symvers=str(indexed_kernel_tree.symvers),
        trusted_keys=["00:11"],
    )
    untrusting.insert(str(signed), "", 0)  # ENOKEY is not fatal: just unsigned
    assert untrusting.loaded_modules()[0].taints == "OE"
    enforcing = make_fake_kernel(
        str(tmp_path / "c"), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers), sig_enforce=True
    )
    error = refused(enforcing, build("unsigned"))
    assert error.errno == errno.EKEYREJECTED
    assert error.log_lines == ("Loading of unsigned module is rejected",)
    enforcing.insert(str(signed), "", 0)
    broken = Path(build("broken_sig"))
    broken.write_bytes(broken.read_bytes() + trailer[:40] + bytes(20) + trailer[60:])
    assert refused(enforcing, str(broken)).errno == errno.EBADMSG


def test_gpl_only_symbols_namespaces_and_duplicates(fake: FakeKernel, build: Builder) -> None:
    fake.insert(
        build(
            "provider",
            exports=[
                Export("pub_fn", 0x11),
                Export("gpl_fn", 0x22, gpl=True),
                Export("ns_fn", 0x33, namespace="MY_NS"),
            ],
        ),
        "",
        0,
    )
    prop = build(
        "prop_user",
        imports=("_printk", "pub_fn", "gpl_fn"),
        license="Proprietary",
        crc_overrides={"pub_fn": 0x11, "gpl_fn": 0x22},
    )
    error = refused(fake, prop)
    assert error.errno == errno.ENOENT and error.log_lines[-1] == "prop_user: Unknown symbol gpl_fn (err -2)"
    no_ns = build("ns_user", imports=("ns_fn",), crc_overrides={"ns_fn": 0x33})
    error = refused(fake, no_ns)
    assert error.errno == errno.EINVAL
    assert error.log_lines[-2:] == (
        "ns_user: module uses symbol (ns_fn) from namespace MY_NS, but does not import it.",
        "ns_user: Unknown symbol ns_fn (err -22)",
    )
    fake.insert(
        build("ns_user", imports=("ns_fn",), crc_overrides={"ns_fn": 0x33}, modinfo=[("import_ns", "MY_NS")]), "", 0
    )
    dup = build("dup", exports=[Export("pub_fn", 0x11)])
    error = refused(fake, dup)
    assert error.errno == errno.ENOEXEC
    assert error.log_lines[-1] == "dup: exports duplicate symbol pub_fn (owned by provider)"
    core_dup = build("core_dup", exports=[Export("_printk", 0x11)])
    assert refused(fake, core_dup).log_lines[-1] == "core_dup: exports duplicate symbol _printk (owned by kernel)"
    weak = build("weak_user", weak_imports=["no_such_symbol"])
    fake.insert(weak, "", 0)  # an unresolved weak symbol is fine
    provider = fake.module_state("provider")
    assert provider is not None and provider.refcnt == 1 and provider.holders == ("ns_user",)


def test_parameters_of_every_kind(fake: FakeKernel, build: Builder) -> None:
    path = build(
        "params",
        params=[
            Param("count", "int", 0o644, 7),
            Param("hidden", "int", 0, 3),
            Param("name", "charp", 0o444, "hello"),
            Param("none", "charp", 0o444, None),
            Param("flag", "bool", 0o444, True),
            Param("inv", "invbool", 0o444, False),
            Param("small", "byte", 0o444, 200),
            Param("hex", "hexint", 0o444, 16),
            Param("neg", "short", 0o444, -5),
            Param("danger", "int", 0o444, 0, unsafe=True),
        ],
    )
    fake.insert(path, 'count=0x10 name="a b" flag inv=0 small=7 -- ignored=1', 0)
    state = fake.module_state("params")
    assert state is not None
    assert state.parameters == {
        "count": "16",
        "name": "a b",
        "none": "(null)",
        "flag": "Y",
        "inv": "N",
        "small": "7",
        "hex": "0x000010",
        "neg": "-5",
        "danger": "0",
    }
    assert "params: parameters 'ignored=1' after `--' ignored" in fake.dmesg()
    assert oct(os.stat(Path(fake.paths.sys_module) / "params" / "parameters" / "count").st_mode & 0o777) == "0o644"
    fake.remove("params", 0)
    error = refused(fake, path, "small=256")
    assert error.errno == errno.ERANGE
    error = refused(fake, path, "flag=maybe")
    assert error.errno == errno.EINVAL and error.log_lines[-1] == "params: `maybe' invalid for parameter `flag'"
    fake.insert(path, "danger=1", 0)
    assert "Setting dangerous option danger - tainting kernel" in fake.dmesg()
    assert fake.tainted() & (1 << 6)


def test_not_a_module(fake: FakeKernel, tmp_path: Path, build: Builder) -> None:
    text = tmp_path / "text.ko"
    text.write_bytes(b"this is not an ELF file at all" * 4)
    error = refused(fake, str(text))
    assert error.errno == errno.ENOEXEC and error.log_lines == ("Invalid ELF header magic: != \x7fELF",)
    arm = build("armmod", machine=183)
    assert refused(fake, arm).log_lines == ("Invalid architecture in ELF header: 183",)
    short = tmp_path / "short.ko"
    short.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(20))
    assert refused(fake, str(short)).log_lines == ("Invalid ELF header len 27",)
    # init_module() gets the file as it is: the kernel does not decompress it
    compressed = lzma.compress(Path(build("xzmod")).read_bytes(), format=lzma.FORMAT_XZ)
    with pytest.raises(KernelError) as caught:
        fake.init_module(compressed, "")
    assert caught.value.errno == errno.ENOEXEC


def test_in_kernel_decompression(tmp_path: Path, indexed_kernel_tree: DebianKernel, build: Builder) -> None:
    xz = tmp_path / "xzmod.ko.xz"
    xz.write_bytes(lzma.compress(Path(build("xzmod")).read_bytes(), format=lzma.FORMAT_XZ))
    plain = make_fake_kernel(
        str(tmp_path / "plain"), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers)
    )
    assert plain.compression() is None
    with pytest.raises(KernelError) as caught:
        plain.finit_module(str(xz), "", MODULE_INIT_COMPRESSED_FILE)
    assert caught.value.errno == errno.EOPNOTSUPP
    plain.insert(str(xz), "", 0)  # insert() decompresses it here and uses init_module
    decompressing = make_fake_kernel(
        str(tmp_path / "xz"), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers), decompress="xz"
    )
    assert decompressing.compression() == "xz"
    assert (Path(decompressing.paths.sys_module) / "compression").read_text() == "xz\n"
    decompressing.finit_module(str(xz), "", MODULE_INIT_COMPRESSED_FILE)
    with pytest.raises(KernelError) as caught:
        decompressing.finit_module(build("raw"), "", MODULE_INIT_COMPRESSED_FILE)
    assert caught.value.errno == errno.EINVAL and caught.value.log_lines == ("not an xz compressed module",)
    with pytest.raises(KernelError) as caught:
        decompressing.finit_module(str(xz), "", 8)
    assert caught.value.errno == errno.EINVAL


def test_permanent_modules_and_states(fake: FakeKernel, build: Builder) -> None:
    fake.insert(build("forever", has_exit=False), "", 0)
    assert fake.loaded_modules()[0].permanent
    assert "forever 16384 0 [permanent], Live" in (Path(fake.paths.root) / "proc/modules").read_text()
    with pytest.raises(KernelError) as busy:
        fake.remove("forever", 0)
    assert busy.value.errno == errno.EBUSY
    fake.remove("forever", O_TRUNC)
    fake.insert(build("provider", exports=[Export("pub_fn", 0x11)]), "", 0)
    fake.set_initstate("provider", "coming")
    assert "(OE+)" in (Path(fake.paths.root) / "proc/modules").read_text()
    user = build("user", imports=("pub_fn",), crc_overrides={"pub_fn": 0x11})
    error = refused(fake, user)
    assert error.log_lines[-2:] == (
        "user: gave up waiting for init of module provider.",
        "user: Unknown symbol pub_fn (err -16)",
    )
    with pytest.raises(KernelError) as busy:
        fake.remove("provider", 0)
    assert busy.value.errno == errno.EBUSY
    fake.set_initstate("provider", "going")
    assert refused(fake, user).log_lines[-1] == "user: Unknown symbol pub_fn (err -2)"


def test_builtin_directories_blacklist_and_disabled_loading(
    tmp_path: Path, indexed_kernel_tree: DebianKernel, build: Builder
) -> None:
    kernel = make_fake_kernel(
        str(tmp_path / "root"),
        indexed_kernel_tree.release,
        symvers=str(indexed_kernel_tree.symvers),
        builtin_modules=["8250"],
        blacklist=["banned"],
    )
    error = refused(kernel, build("8250"))
    assert error.errno == errno.EINVAL and error.log_lines[-1] == "8250: module is already loaded"
    assert kernel.module_state("8250") is not None and kernel.module_state("8250").initstate is None  # type: ignore[union-attr]
    assert refused(kernel, build("banned")).log_lines == ("Module banned is blacklisted",)
    (tmp_path / "root" / "proc/sys/kernel/modules_disabled").write_text("1\n")
    assert refused(kernel, build("any")).errno == errno.EPERM


def test_no_unload_support(tmp_path: Path, indexed_kernel_tree: DebianKernel, build: Builder) -> None:
    kernel = make_fake_kernel(
        str(tmp_path / "root"),
        indexed_kernel_tree.release,
        symvers=str(indexed_kernel_tree.symvers),
        unload=False,
        modversions=False,
        vermagic=f"{indexed_kernel_tree.release} SMP preempt ",
    )
    kernel.insert(build("nounload", vermagic=f"{indexed_kernel_tree.release} SMP preempt ", modversions=False), "", 0)
    assert (Path(kernel.paths.root) / "proc/modules").read_text().startswith("nounload 16384 - - Live ")
    assert not kernel.loaded_modules()[0].unload
    assert not (Path(kernel.paths.sys_module) / "nounload" / "refcnt").exists()
    with pytest.raises(KernelError) as caught:
        kernel.remove("nounload", 0)
    assert caught.value.errno == errno.ENOSYS


def test_config_from_the_debian_kconfig(indexed_kernel_tree: DebianKernel) -> None:
    options = kconfig_options(str(indexed_kernel_tree.root / "boot" / f"config-{indexed_kernel_tree.release}"))
    assert options == {
        "modversions": True,
        "force_load": True,
        "unload": True,
        "force_unload": True,
        "module_sig": True,
        "sig_enforce": False,
        "allow_missing_namespace_imports": False,
        "dynamic_debug": True,
        "livepatch": True,
    }
    config = KernelConfig(indexed_kernel_tree.release, **options)
    assert config.vermagic == f"{indexed_kernel_tree.release} SMP preempt mod_unload modversions "
    assert ModuleFile.open(module_path(indexed_kernel_tree, "dummy")).vermagic == config.vermagic


def test_state_is_shared_between_processes(fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    code = (
        "from kvc.kmod.kernel.environment import kernel_from_env; k = kernel_from_env(); "
        f"k.insert({module_path(indexed_kernel_tree, 'udp_tunnel')!r}, '', 0)"
    )
    env = {**os.environ, "KVC_ROOT": fake.paths.root, "KVC_KERNEL": "fake"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert [m.name for m in FakeKernel(fake.paths).loaded_modules()] == ["udp_tunnel"]
    assert isinstance(kernel_from_env(environ=env), FakeKernel)
    assert FakeKernel(fake.paths).exported_symbols()["udp_tunnel_sock_release"] != 0
    leftovers = [name for name in os.listdir(Path(fake.paths.root) / ".kvc-fake-kernel") if name.startswith(".tmp")]
    assert leftovers == []
