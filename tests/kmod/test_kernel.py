"""kvc.kmod.kernel: /proc and /sys parsing (readers), libkmod's insert strategy and its readers of
odd sysfs files (libkmod), the live kernel (live), and choosing a kernel from the environment."""

from __future__ import annotations

import ctypes
import errno
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from kvc.kmod.kernel.environment import kernel_from_env
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.kernel.libkmod import KMOD_MODULE_COMING, KMOD_MODULE_LIVE, LibkmodView, SyscallKernel
from kvc.kmod.kernel.live import LiveKernel, syscall_numbers
from kvc.kmod.kernel.protocol import (
    MODULE_INIT_COMPRESSED_FILE,
    MODULE_INIT_IGNORE_MODVERSIONS,
    MODULE_INIT_IGNORE_VERMAGIC,
    O_NONBLOCK,
    O_TRUNC,
    KernelError,
)
from kvc.kmod.kernel.readers import (
    Export,
    parse_proc_modules,
    read_module_state,
    read_symvers,
    read_symvers_exports,
    read_system_map_exports,
)
from kvc.kmod.module import ModuleFile
from kvc.kmod.names import modname_normalize, path_to_modname
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel
from support.modbuild import ModuleSpec, build_module


def test_proc_modules_lines() -> None:
    text = (
        "vxlan 118784 0 - Live 0x0000000000000000\n"
        "udp_tunnel 28672 2 vxlan,wireguard, Live 0xffffffffc0a00000 (OE)\n"
        "forever 16384 0 [permanent], Live 0x0000000000000000\n"
        "nounload 16384 - - Loading 0x0000000000000000 (O+)\n"
        "garbage\n"
    )
    mods = parse_proc_modules(text)
    assert [m.name for m in mods] == ["vxlan", "udp_tunnel", "forever", "nounload"]
    assert mods[1].users == ("vxlan", "wireguard") and mods[1].refcnt == 2 and mods[1].taints == "OE"
    assert mods[2].permanent and mods[2].users == ()
    assert not mods[3].unload and mods[3].refcnt == 0 and mods[3].state == "Loading" and mods[3].taints == "O+"
    assert mods[0].unload


def test_sysfs_module_state(tmp_path: Path) -> None:
    base = tmp_path / "demo"
    (base / "holders").mkdir(parents=True)
    (base / "parameters").mkdir()
    (base / "initstate").write_text("live\n")
    (base / "refcnt").write_text("1\n")
    (base / "coresize").write_text("16384\n")
    (base / "taint").write_text("OE\n")
    (base / "version").write_text("1.2\n")
    (base / "parameters" / "debug").write_text("Y\n")
    (base / "holders" / "user").symlink_to("../../user")
    state = read_module_state(str(tmp_path), "demo")
    assert state is not None
    assert (state.initstate, state.refcnt, state.coresize, state.taint, state.holders, state.version) == (
        "live",
        1,
        16384,
        "OE",
        ("user",),
        "1.2",
    )
    assert state.parameters == {"debug": "Y"} and state.initsize is None
    assert read_module_state(str(tmp_path), "absent") is None
    (tmp_path / "builtin").mkdir()
    builtin = read_module_state(str(tmp_path), "builtin")
    assert builtin is not None and builtin.initstate is None and builtin.refcnt is None


def test_symbol_tables(tmp_path: Path, indexed_kernel_tree: DebianKernel) -> None:
    owners = read_symvers_exports(str(indexed_kernel_tree.symvers))
    assert owners is not None
    core = owners["vmlinux"]
    assert core["module_layout"] == Export(0x9060323F, False, "")
    assert core["crypto_cipher_setkey"].gpl and core["crypto_cipher_setkey"].namespace == "CRYPTO_INTERNAL"
    assert "udp_tunnel_sock_release" in owners["net/ipv4/udp_tunnel"]
    for owner in ("vmlinux", "net/ipv4/udp_tunnel"):
        assert read_symvers_exports(str(indexed_kernel_tree.symvers), owner) == {owner: owners[owner]}
    assert read_symvers_exports(str(indexed_kernel_tree.symvers), "no/such/owner") == {}
    plain = read_symvers(str(indexed_kernel_tree.symvers))
    assert plain is not None and plain["module_layout"] == 0x9060323F and "udp_tunnel_sock_release" not in plain
    system_map = tmp_path / "System.map"
    system_map.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff82000000 r __ksymtab_printk\n"
        "ffffffff82000010 R __start___ksymtab_gpl\n"
        "ffffffff82000010 r __ksymtab_gpl_only\n"
        "ffffffff82000020 R __stop___ksymtab_gpl\n"
        "00000000deadbeef A __crc_printk\n"
    )
    assert read_system_map_exports(str(system_map)) == {
        "printk": Export(0xDEADBEEF, False),
        "gpl_only": Export(None, True),
    }
    assert read_system_map_exports(str(tmp_path / "missing")) is None


def test_syscall_numbers_per_architecture() -> None:
    assert syscall_numbers("x86_64", 8) == (175, 176, 313)
    assert syscall_numbers("aarch64", 8) == (105, 106, 273)
    assert syscall_numbers("i686", 4) == (128, 129, 350)
    assert syscall_numbers("armv7l", 4) == (128, 129, 379)
    assert syscall_numbers("ppc64le", 8) == (128, 129, 353)
    assert syscall_numbers("s390x", 8) == (128, 129, 344)
    assert syscall_numbers("vax", 4) is None


class Recorder(SyscallKernel):
    """Records the syscalls libkmod's insert strategy makes and answers from a script."""

    def __init__(self, answers: Optional[dict[str, int]] = None, kernel_compression: Optional[str] = None) -> None:
        self.calls: list[tuple[str, object, str, int]] = []
        self.answers = answers or {}
        self.kernel_compression = kernel_compression

    def compression(self) -> Optional[str]:
        return self.kernel_compression

    def sys_finit_module(self, fd: int, params: str, flags: int) -> int:
        self.calls.append(("finit", os.fstat(fd).st_size, params, flags))
        return self.answers.get("finit", 0)

    def sys_init_module(self, image: bytes, params: str) -> int:
        self.calls.append(("init", image, params, 0))
        return self.answers.get("init", 0)

    def sys_delete_module(self, name: str, flags: int) -> int:
        self.calls.append(("delete", name, "", flags))
        return self.answers.get("delete", 0)


@pytest.fixture
def module_file(tmp_path: Path) -> Path:
    path = tmp_path / "demo.ko"
    path.write_bytes(
        build_module(ModuleSpec("demo", "6.1.0-1-amd64 SMP preempt mod_unload modversions ", imports=[("_printk", 1)]))
    )
    return path


def test_insert_uses_finit_module_and_falls_back_to_init_module(module_file: Path, tmp_path: Path) -> None:
    raw = module_file.read_bytes()
    kernel = Recorder()
    kernel.insert(str(module_file), "a=1", MODULE_INIT_IGNORE_VERMAGIC)
    assert kernel.calls == [("finit", len(raw), "a=1", MODULE_INIT_IGNORE_VERMAGIC)]
    old = Recorder({"finit": errno.ENOSYS})  # no finit_module: read, strip, init_module
    old.insert(module_file, "", MODULE_INIT_IGNORE_VERMAGIC | MODULE_INIT_IGNORE_MODVERSIONS)
    assert [call[0] for call in old.calls] == ["finit", "init"]
    stripped = old.calls[1][1]
    assert isinstance(stripped, bytes) and len(stripped) == len(raw) and b"vermagic=" not in stripped
    assert ModuleFile.open(str(module_file)).vermagic is not None
    xz = tmp_path / "demo.ko.xz"
    xz.write_bytes(lzma.compress(raw, format=lzma.FORMAT_XZ))
    userspace = Recorder()
    userspace.insert(str(xz), "", 0)  # the kernel does not decompress xz: we do
    assert userspace.calls == [("init", raw, "", 0)]
    in_kernel = Recorder(kernel_compression="xz")
    in_kernel.insert(str(xz), "", 0)
    assert in_kernel.calls == [("finit", xz.stat().st_size, "", MODULE_INIT_COMPRESSED_FILE)]
    memory = Recorder()
    memory.insert(raw, "x", 0)
    assert memory.calls == [("init", raw, "x", 0)]
    memory.insert(ModuleFile.open(str(module_file)), "", 0)
    assert memory.calls[-1][0] == "finit"


@pytest.mark.parametrize(
    "content, err", [(b"", errno.EINVAL), (b"abc", errno.EINVAL), (b"\xfd7zXZ\x00garbage-garbage", errno.EINVAL)]
)
def test_insert_refuses_what_libkmod_cannot_open(tmp_path: Path, content: bytes, err: int) -> None:
    path = tmp_path / "bad.ko.xz"
    path.write_bytes(content)
    kernel = Recorder()
    with pytest.raises(KernelError) as caught:
        kernel.insert(str(path), "", 0)
    assert caught.value.errno == err and kernel.calls == []


def test_insert_errors_from_the_file_system(tmp_path: Path) -> None:
    kernel = Recorder()
    for path, err in ((tmp_path / "missing.ko", errno.ENOENT), (tmp_path, errno.EISDIR)):
        with pytest.raises(KernelError) as caught:
            kernel.insert(str(path), "", 0)
        assert caught.value.errno == err


def test_remove_passes_nonblock_and_the_force_flag() -> None:
    kernel = Recorder({"delete": errno.EWOULDBLOCK})
    with pytest.raises(KernelError) as caught:
        kernel.remove("demo", O_TRUNC)
    assert caught.value.errno == errno.EWOULDBLOCK and caught.value.strerror == os.strerror(errno.EWOULDBLOCK)
    assert kernel.calls == [("delete", "demo", "", O_NONBLOCK | O_TRUNC)]


def test_live_kernel_on_this_machine(module_file: Path, tmp_path: Path) -> None:
    live = LiveKernel(HostPaths())
    if os.path.exists("/proc/modules"):
        pytest.skip("this kernel has module support")
    with pytest.raises(KernelError) as caught:
        live.insert(str(module_file), "", 0)
    assert caught.value.errno in (errno.ENOSYS, errno.EPERM)
    with pytest.raises(KernelError) as caught:
        live.remove("demo", 0)
    assert caught.value.errno in (errno.ENOSYS, errno.EPERM)
    assert live.loaded_modules() == [] and live.compression() is None
    rooted = LiveKernel(HostPaths(str(tmp_path)))
    (tmp_path / "sys" / "module").mkdir(parents=True)
    (tmp_path / "sys" / "module" / "compression").write_text("zstd\n")
    assert rooted.compression() == "zstd"


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (apt-get install gcc)")

# An LD_PRELOAD library like kmod's testsuite's: it traps init_module and delete_module, and
# finit_module among syscall()'s calls, records each call's arguments in $TRAP_LOG and fails
# with $TRAP_ERRNO; every other syscall() goes on to libc's.
TRAP_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

static void record(const char *format, ...)
{
    va_list args;
    FILE *log = fopen(getenv("TRAP_LOG"), "a");
    va_start(args, format);
    vfprintf(log, format, args);
    va_end(args);
    fclose(log);
}

static int fail(void)
{
    errno = atoi(getenv("TRAP_ERRNO"));
    return -1;
}

int init_module(void *image, unsigned long size, const char *params)
{
    record("init_module %lu [%.*s] [%s]\n", size, (int)size, (const char *)image, params);
    return fail();
}

int delete_module(const char *name, unsigned int flags)
{
    record("delete_module [%s] %u\n", name, flags);
    return fail();
}

long syscall(long number, ...)
{
    long arg[6];
    va_list args;
    va_start(args, number);
    for (int i = 0; i < 6; i++)
        arg[i] = va_arg(args, long);
    va_end(args);
    if (number == SYS_finit_module) {
        char fd_path[64], target[4096];
        snprintf(fd_path, sizeof(fd_path), "/proc/self/fd/%ld", arg[0]);
        ssize_t n = readlink(fd_path, target, sizeof(target) - 1);
        target[n < 0 ? 0 : n] = '\0';
        record("finit_module [%s] [%s] %ld\n", target, (const char *)arg[1], arg[2]);
        return fail();
    }
    long (*next)(long, ...) = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return next(number, arg[0], arg[1], arg[2], arg[3], arg[4], arg[5]);
}
"""

TRAPPED_CALLS = """
import sys
from kvc.kmod.kernel.live import LiveKernel
from kvc.kmod.kernel.protocol import REMOVE_FORCE, KernelError

kernel = LiveKernel()
for call in (
    lambda: kernel.insert(b"module-image", "a=1 b=x"),
    lambda: kernel.remove("mod-x", REMOVE_FORCE),
    lambda: kernel.insert(sys.argv[1], "p=2"),
):
    try:
        call()
        print(0)
    except KernelError as error:
        print(error.errno)
"""


@needs_gcc
@pytest.mark.parametrize("err", [errno.EEXIST, errno.EPERM])
def test_live_kernel_calls_libc_so_that_preloaded_fakes_see_them(tmp_path: Path, err: int) -> None:
    source = tmp_path / "trap.c"
    source.write_text(TRAP_SOURCE)
    library = tmp_path / "trap.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"], check=True)
    module = tmp_path / "plain.ko"
    module.write_bytes(b"an uncompressed module\n")
    log = tmp_path / "calls.log"
    env = dict(os.environ, LD_PRELOAD=str(library), TRAP_LOG=str(log), TRAP_ERRNO=str(err))
    proc = subprocess.run(
        [sys.executable, "-c", TRAPPED_CALLS, str(module)], capture_output=True, text=True, env=env, check=True
    )
    assert proc.stdout.split() == [str(err)] * 3
    assert log.read_text().splitlines() == [
        "init_module 12 [module-image] [a=1 b=x]",
        f"delete_module [mod-x] {os.O_NONBLOCK | os.O_TRUNC}",
        f"finit_module [{module}] [p=2] 0",
    ]


# A library without init_module and delete_module and without libc beneath it: its syscall()
# keeps each call's number and first two arguments and fails without setting errno.
BARE_SYSCALL_SOURCE = r"""
long calls[4][3];
int call_count;

long syscall(long number, long first, long second)
{
    calls[call_count][0] = number;
    calls[call_count][1] = first;
    calls[call_count][2] = second;
    call_count++;
    return -1;
}
"""


@needs_gcc
@pytest.mark.skipif(syscall_numbers() is None, reason="no syscall numbers for this machine")
def test_live_kernel_falls_back_to_syscall_for_functions_libc_lacks(tmp_path: Path) -> None:
    source = tmp_path / "bare.c"
    source.write_text(BARE_SYSCALL_SOURCE)
    library_path = tmp_path / "bare.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-nostdlib", "-o", str(library_path), str(source)], check=True)
    library = ctypes.CDLL(str(library_path))
    kernel = LiveKernel(HostPaths(str(tmp_path)), libc=library)
    with pytest.raises(KernelError) as inserted:
        kernel.insert(b"image", "")
    with pytest.raises(KernelError) as removed:
        kernel.remove("demo")
    assert inserted.value.errno == removed.value.errno == errno.EIO
    numbers = syscall_numbers()
    assert numbers is not None
    calls = (ctypes.c_long * 12).in_dll(library, "calls")
    assert ctypes.c_int.in_dll(library, "call_count").value == 2
    assert (calls[0], calls[2]) == (numbers[0], len(b"image"))
    assert (calls[3], calls[5]) == (numbers[1], O_NONBLOCK)


def test_kernel_from_env(tmp_path: Path) -> None:
    assert isinstance(kernel_from_env(environ={}), LiveKernel)
    env = {"KVC_ROOT": str(tmp_path), "KVC_KERNEL": "fake"}
    fake = kernel_from_env(environ=env)
    assert isinstance(fake, FakeKernel) and fake.paths.root == str(tmp_path)
    with pytest.raises(KernelError) as caught:
        fake.release()  # nothing was created there
    assert caught.value.errno == errno.ENOSYS


def test_module_names_like_libkmod() -> None:
    assert modname_normalize("udp-tunnel.ko.xz") == "udp_tunnel"
    assert modname_normalize(".hidden") == ""
    assert path_to_modname("/lib/modules/x/foo-bar.ko") == "foo_bar"
    assert path_to_modname("/tmp/") is None


def test_libkmod_view_of_odd_files(tmp_path: Path) -> None:
    sys_module = tmp_path / "sys" / "module"
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "modules").write_text("good 100 0 - Live 0x0\nnocore abc 0 - Live 0x0\n")
    for name in ("good", "nocore", "weird", "dirinit"):
        (sys_module / name / "holders").mkdir(parents=True)
    (sys_module / "good" / "initstate").write_text("live\n")
    (sys_module / "good" / "refcnt").write_text(" 7\n")
    (sys_module / "good" / "coresize").write_text("4096\n")
    (sys_module / "good" / "holders" / "a-b").symlink_to("../../a-b")
    (sys_module / "weird" / "initstate").write_text("weird\n")
    (sys_module / "weird" / "refcnt").write_text("7")
    (sys_module / "dirinit" / "initstate").mkdir()
    view = LibkmodView(HostPaths(str(tmp_path)))
    assert view.loaded_names() == ["good", "nocore"]
    assert (view.initstate("good"), view.refcnt("good"), view.size("good"), view.holders("good")) == (
        KMOD_MODULE_LIVE,
        7,
        4096,
        ["a_b"],
    )
    assert view.take_logs() == []
    assert view.initstate("nocore") == KMOD_MODULE_COMING  # a directory without initstate
    assert view.initstate("absent") == -errno.ENOENT and view.size("absent") == -errno.ENOENT
    assert view.size("nocore") == -errno.ENOENT
    assert view.initstate("weird") == -errno.EINVAL and view.refcnt("weird") == -errno.EINVAL
    assert view.initstate("dirinit") == -errno.EISDIR
    assert view.holders("absent") == []
    messages = [(log.line, log.function, log.message) for log in view.take_logs()]
    assert messages == [
        (1919, "kmod_module_get_size", "invalid line format at /proc/modules:2\n"),
        (1847, "kmod_module_get_initstate", "unknown /sys/module/weird/initstate: 'weird\n'\n"),
        (
            1967,
            "kmod_module_get_refcnt",
            "could not read integer from '/sys/module/weird/refcnt': 'Invalid argument'\n",
        ),
        (1835, "kmod_module_get_initstate", "could not read from '/sys/module/dirinit/initstate': Is a directory\n"),
        (1998, "kmod_module_get_holders", "could not open '/sys/module/absent/holders': No such file or directory\n"),
    ]
    (tmp_path / "proc" / "modules").unlink()
    with pytest.raises(OSError):
        view.loaded_names()
    assert view.take_logs()[0].line == 1725
