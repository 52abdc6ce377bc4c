"""lsmod, insmod and rmmod against Debian's kmod 30 tools, byte for byte (stdout, stderr, exit code).

kmod's tools run in a private mount namespace (``unshare -m``) where the fake kernel's ``proc``
is bound over ``/proc`` and its ``sys/module`` over ``/sys/module`` (this machine's kernel has no
module support, so there is nothing real there to hide), and, for the built-in check, a module
directory over ``/lib/modules/$(uname -r)``. Ours run with ``KVC_ROOT`` and ``KVC_KERNEL=fake``.

kmod's syscalls would reach this kernel (ENOSYS), so ``strace -e inject`` answers them with what
the fake kernel answers for the same request (computed on a copy of its state); kmod's messages
for that answer are then compared with ours, which got it from the fake kernel itself.
"""

from __future__ import annotations

import lzma
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import pytest

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.kernel.live import LiveKernel
from kvc.kmod.kernel.protocol import (
    MODULE_INIT_IGNORE_MODVERSIONS,
    MODULE_INIT_IGNORE_VERMAGIC,
    O_NONBLOCK,
    O_TRUNC,
    KernelError,
)
from kvc.kmod.kernel.readers import read_symvers
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel, module_path
from support.kmodns import answer, copy_of, env_for, load, run_kmod_on
from support.modbuild import Export, ModuleSpec, Param, build_module
from support.oracle import Result, run_kmod, run_kvc

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("unshare") is None,
        reason="needs root and unshare for a private mount namespace",
    ),
]
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")


class Crafted:
    def __init__(self, tmp_path: Path, kernel: DebianKernel) -> None:
        self.dir = tmp_path / "modules"
        self.dir.mkdir(exist_ok=True)
        crcs = read_symvers(str(kernel.symvers))
        assert crcs is not None
        self.crcs = crcs
        self.vermagic = f"{kernel.release} SMP preempt mod_unload modversions "

    def __call__(self, name: str, **spec: Any) -> str:
        imports: list[tuple[str, Optional[int]]] = [
            (sym, self.crcs.get(sym, 0x11)) for sym in spec.pop("imports", ("_printk",))
        ]
        vermagic = spec.pop("vermagic", self.vermagic)
        modinfo = [("license", "GPL"), *spec.pop("modinfo", [])]
        data = build_module(ModuleSpec(name, vermagic, imports=imports, modinfo=modinfo, crcs=self.crcs, **spec))
        path = self.dir / f"{name}.ko"
        path.write_bytes(data)
        return str(path)


@pytest.fixture
def crafted(tmp_path: Path, indexed_kernel_tree: DebianKernel) -> Crafted:
    return Crafted(tmp_path, indexed_kernel_tree)


# -- lsmod --------------------------------------------------------------------------------------------


def test_lsmod_with_many_modules_and_holders(
    fake: FakeKernel, indexed_kernel_tree: DebianKernel, crafted: Crafted
) -> None:
    load(fake, indexed_kernel_tree, "wireguard", "vxlan", "loop", "dummy", "geneve", "bonding")
    fake.insert(crafted("oot_provider", exports=[Export("oot_fn", 0x11)]), "", 0)
    fake.insert(crafted("oot_user", imports=("oot_fn",)), "", 0)
    fake.insert(crafted("forever", has_exit=False), "", 0)
    fake.module_get("loop", 3)
    assert len(fake.loaded_modules()) > 15
    ours = run_kvc("lsmod", [], env_for(fake))
    theirs = run_kmod_on(fake, "lsmod", [])
    assert theirs.returncode == 0 and b"udp_tunnel" in theirs.stdout and theirs.stderr == b""
    assert b"oot_provider           16384  1 oot_user\n" in theirs.stdout
    assert ours == theirs


def test_lsmod_on_odd_sysfs_states(fake: FakeKernel, indexed_kernel_tree: DebianKernel) -> None:
    load(fake, indexed_kernel_tree, "wireguard")
    sys_module = Path(fake.paths.sys_module)
    shutil.rmtree(sys_module / "libchacha" / "holders")  # no holders dir: libkmod logs an error
    (sys_module / "udp_tunnel" / "refcnt").write_text("x\n")  # unreadable count: -EINVAL
    (sys_module / "ip6_udp_tunnel" / "coresize").unlink()  # size from /proc/modules instead
    (sys_module / "libchacha20poly1305" / "coresize").write_text("12")  # no trailing space: size 0
    shutil.rmtree(sys_module / "curve25519_x86_64")  # no directory at all: -ENOENT everywhere
    (sys_module / "wireguard" / "holders" / "x-y").symlink_to("../../x-y")  # normalized name
    proc = Path(fake.paths.proc) / "modules"
    proc.write_text(proc.read_text() + "tabbed\t123 0 - Live 0x0000000000000000\nlonely\n")
    ours = run_kvc("lsmod", [], env_for(fake))
    theirs = run_kmod_on(fake, "lsmod", [])
    assert b"kmod_module_get_holders" in theirs.stderr and b"kmod_module_get_refcnt" in theirs.stderr
    assert ours == theirs


@pytest.mark.parametrize("args", [[], ["x"], ["-h"], ["--help"], ["-V"]])
def test_lsmod_arguments_and_missing_proc_modules(fake: FakeKernel, args: list[str]) -> None:
    (Path(fake.paths.proc) / "modules").unlink()
    ours = run_kvc("lsmod", args, env_for(fake))
    theirs = run_kmod_on(fake, "lsmod", args)
    assert theirs.returncode == 1
    assert ours == theirs


# -- rmmod --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["udp_tunnel"],
        ["nosuch"],
        ["udp_tunnel", "nosuch", "udp-tunnel"],
        [],
        ["--bogus"],
        ["-h"],
        ["--help"],
        ["-w", "x"],
        ["-h", "-z"],
        ["-z", "-h"],
        ["--ver", "x"],
        ["--force=1"],
        ["-fz", "x"],
        ["-s", "udp_tunnel"],
        ["-v", "libcurve25519_generic"],
        ["-vv", "nosuch"],
        [""],
        ["--", "-h"],
        ["-"],
        ["held"],
        ["libchacha.ko.xz"],
        ["/"],
        ["{tmp}/"],
        ["{tmp}/udp_tunnel.ko", "nosuch"],
        ["x/"],
        ["held", "--", "nosuch"],
    ],
)
def test_rmmod_refusals_match_kmod(
    fake: FakeKernel, indexed_kernel_tree: DebianKernel, crafted: Crafted, tmp_path: Path, args: list[str]
) -> None:
    load(fake, indexed_kernel_tree, "wireguard")
    fake.insert(crafted("held"), "", 0)
    fake.module_get("held")
    fake.insert(crafted("coming"), "", 0)
    fake.set_initstate("coming", "coming")
    (tmp_path / "udp_tunnel.ko").write_bytes(b"")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    count = len(fake.loaded_modules())
    ours = run_kvc("rmmod", args, env_for(fake))
    theirs = run_kmod_on(fake, "rmmod", args)
    assert ours == theirs
    assert len(fake.loaded_modules()) == count


@needs_strace
@pytest.mark.parametrize(
    "args, removed",
    [
        (["wireguard"], ["wireguard"]),
        (["-f", "libchacha"], []),
        (["-f", "nosuch"], []),
        (["-f", "held"], ["held"]),
        (["-f", "udp_tunnel"], []),
        (["--force", "forever"], ["forever"]),
        (["forever"], []),
        (["-v", "wireguard"], ["wireguard"]),
        (["-f", "coming"], []),
        (["coming"], []),
    ],
)
def test_rmmod_removals_match_kmod(
    fake: FakeKernel,
    indexed_kernel_tree: DebianKernel,
    crafted: Crafted,
    tmp_path: Path,
    args: list[str],
    removed: list[str],
) -> None:
    load(fake, indexed_kernel_tree, "wireguard")
    fake.insert(crafted("held"), "", 0)
    fake.module_get("held")
    fake.insert(crafted("forever", has_exit=False), "", 0)
    fake.insert(crafted("coming"), "", 0)
    fake.set_initstate("coming", "coming")
    name = args[-1]
    flags = O_NONBLOCK | (O_TRUNC if args[0] in ("-f", "--force") else 0)
    err = copy_of(fake, tmp_path).sys_delete_module(name, flags)
    before = {m.name for m in fake.loaded_modules()}
    theirs = run_kmod_on(fake, "rmmod", args, inject={"delete_module": answer(err)})
    ours = run_kvc("rmmod", args, env_for(fake))
    assert ours == theirs
    assert sorted(before - {m.name for m in fake.loaded_modules()}) == removed


def test_rmmod_builtin_check_uses_the_running_releases_index(
    fake: FakeKernel, indexed_kernel_tree: DebianKernel
) -> None:
    moddir = Path(fake.paths.module_dir(indexed_kernel_tree.release))
    moddir.mkdir(parents=True)
    shutil.copy(indexed_kernel_tree.moddir / "modules.builtin.bin", moddir)
    builtin = (indexed_kernel_tree.moddir / "modules.builtin").read_text().split()[0]
    name = Path(builtin).name.split(".")[0].replace("-", "_")
    for args in ([name], [name, "nosuch"], ["-f", "nosuch", name]):
        if args[0] == "-f":
            continue
        ours = run_kvc("rmmod", args, env_for(fake))
        theirs = run_kmod_on(fake, "rmmod", args, moddir=str(moddir))
        assert f"Module {name} is builtin.".encode() in theirs.stderr
        assert ours == theirs


# -- insmod -------------------------------------------------------------------------------------------


def _insmod_case(
    fake: FakeKernel, tmp_path: Path, args: list[str], *, trace: Optional[Path] = None
) -> tuple[Result, Result]:
    """kmod's insmod with the fake kernel's answer injected, then ours on the fake kernel."""
    err = 0
    operands = [arg for arg in args if not arg.startswith("-")]
    if operands and os.path.isfile(operands[0]):
        flags = MODULE_INIT_IGNORE_MODVERSIONS | MODULE_INIT_IGNORE_VERMAGIC if "-f" in args else 0
        copy = copy_of(fake, tmp_path)
        try:
            copy.insert(operands[0], " ".join(operands[1:]), flags)
        except KernelError as exc:
            err = exc.errno
    theirs = run_kmod_on(
        fake, "insmod", args, inject={"finit_module": answer(err), "init_module": answer(err)}, trace=trace
    )
    ours = run_kvc("insmod", args, env_for(fake))
    return ours, theirs


@needs_strace
def test_insmod_messages_match_kmod(
    fake: FakeKernel, indexed_kernel_tree: DebianKernel, crafted: Crafted, tmp_path: Path
) -> None:
    dummy = module_path(indexed_kernel_tree, "dummy")
    loop = module_path(indexed_kernel_tree, "loop")
    bad_crc = bytearray(Path(dummy).read_bytes())
    at = bad_crc.index(b"register_netdevice\0") - 8
    bad_crc[at] ^= 0xFF
    (tmp_path / "badcrc.ko").write_bytes(bytes(bad_crc))
    xz = tmp_path / "xzmod.ko.xz"
    xz.write_bytes(lzma.compress(Path(crafted("xzmod")).read_bytes(), format=lzma.FORMAT_XZ))
    (tmp_path / "empty.ko").write_bytes(b"")
    (tmp_path / "short.ko").write_bytes(b"abc")
    (tmp_path / "corrupt.ko.xz").write_bytes(b"\xfd7zXZ\x00garbage-garbage")
    (tmp_path / "text.ko").write_text("not a module\n" * 10)
    old = crafted("oldmod", vermagic="5.10.0-1-amd64 SMP preempt mod_unload ", modversions=False)
    cases = [
        [dummy, "numdummies=2"],
        [dummy],
        [loop, "max_part=x"],
        [loop, "max_part=99999999999"],
        [module_path(indexed_kernel_tree, "wireguard")],
        [str(tmp_path / "badcrc.ko")],
        ["-f", str(tmp_path / "badcrc.ko")],
        [old],
        ["-f", old],
        [str(xz)],
        [str(tmp_path / "empty.ko")],
        [str(tmp_path / "short.ko")],
        [str(tmp_path / "corrupt.ko.xz")],
        [str(tmp_path / "text.ko")],
        ["/nonexistent.ko"],
        [str(tmp_path)],
        [f"{tmp_path}/"],
        ["/etc/passwd/x"],
        [],
        ["-"],
        ["--bogus"],
        ["-z"],
        ["-h"],
        ["--he"],
        ["-ps", dummy],
        [loop, "max_loop=2", "bogus=1"],
    ]
    for args in cases:
        ours, theirs = _insmod_case(fake, tmp_path, args)
        assert ours == theirs, args


@needs_strace
def test_insmod_passes_arguments_unquoted(fake: FakeKernel, crafted: Crafted, tmp_path: Path) -> None:
    """kmod 30 joins the arguments with spaces and quotes nothing: 'name=a b' reaches the kernel
    as ``name=a b``, which sets ``name`` to ``a`` and ignores ``b``."""
    path = crafted("quoting", params=[Param("name", "charp", 0o444, "x"), Param("other", "charp", 0o444, "y")])
    trace = tmp_path / "trace"
    ours, theirs = _insmod_case(fake, tmp_path, [path, "name=a b", 'other="c d"'], trace=trace)
    assert ours == theirs
    assert 'finit_module(3, "name=a b other=\\"c d\\"", 0)' in trace.read_text()
    state = fake.module_state("quoting")
    assert state is not None and state.parameters == {"name": "a", "other": "c d"}
    assert fake.dmesg()[-1] == "quoting: unknown parameter 'b' ignored"


def test_tools_on_this_hosts_real_kernel_match_kmod(indexed_kernel_tree: DebianKernel) -> None:
    """This machine's kernel has no module support: both tools get the same answers from it."""
    env = {k: v for k, v in os.environ.items() if k not in ("KVC_ROOT", "KVC_KERNEL")}
    dummy = module_path(indexed_kernel_tree, "dummy")
    for tool, args in [
        ("insmod", [dummy]),
        ("insmod", [dummy, "numdummies=1"]),
        ("insmod", ["-f", dummy]),
        ("lsmod", []),
        ("rmmod", ["dummy"]),
        ("rmmod", ["-f", "dummy"]),
        ("rmmod", ["8250"]),
    ]:
        ours = run_kvc(tool, args, env)
        assert ours == run_kmod(tool, args, env), (tool, args)
    assert LiveKernel(HostPaths()).loaded_modules() == []
