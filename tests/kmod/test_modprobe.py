"""kvc's modprobe against Debian's kmod 30 modprobe, byte for byte (stdout, stderr, exit status).

* ``--show-depends`` for every module name of the real Debian tree and 500 aliases drawn from
  its modules.alias, and ``-c``, under a configuration directory that uses every directive and a
  kernel command line of our own (kmod's ``/proc/cmdline`` is a bind mount in a private mount
  namespace; ours is read under ``KVC_ROOT``). Both sides run many names per process.
* Loading and removal against the fake kernel, kmod seeing the same ``/proc`` and
  ``/sys/module`` and its syscalls answered by strace (see tests/kmod/test_tools_kernel.py).
* The configuration parser: kmod's ``-c`` on random configuration files and command lines, and
  hypothesis for robustness.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvc.kmod.config import ModprobeConfig, load_config, parse_config, parse_softdep, underscores, wrapped_lines
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.kernel.libkmod import LibkmodView
from kvc.kmod.kernel.protocol import KernelError
from kvc.kmod.moddir import ModuleDirectory
from kvc.kmod.modprobe import (
    ACTION_BUILTIN,
    ACTION_INSMOD,
    ACTION_INSTALL,
    PlannedModule,
    load_plan,
    options_concat,
)
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel, module_path
from support.indexmodel import concrete
from support.kmodns import NAMESPACE, answer, copy_of, env_for, load
from support.oracle import Result

TESTS = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare for a private mount namespace"
)
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

# Every directive, with kmod's quirks: a tab in options, a pattern install, softdeps with words
# before pre:, an unbalanced bracket, deprecated and unknown directives, joined lines.
CONFIG_FILES = {
    "10-kvc.conf": (
        "# kvc test configuration\n"
        "alias my-net e1000e\n"
        "alias snd-card-kvc* snd-hda-intel\n"
        "alias blk-alias pcspkr\n"
        "alias ghost no_such_module\n"
        "alias twice loop\n"
        "alias twice dummy\n"
        "alias pci:v00008086d000015FAsv*sd*bc*sc*i* igb\n"
        "options e1000e InterruptThrottleRate=3000\tdebug=1\n"
        "options my_net copybreak=64\n"
        "options loop max_loop=8\n"
        "options   vxlan    udp_port=4790\n"
        "install dummy /bin/echo installing $MODPROBE_MODULE [$CMDLINE_OPTS]\n"
        "install nbd* /bin/sh -c 'echo failing >&2; exit 3'\n"
        "install tun /bin/echo tun-installed\n"
        "remove dummy /bin/echo removing $MODPROBE_MODULE\n"
        "remove bonding /bin/false\n"
        "blacklist igb\n"
        "blacklist pc-spkr\n"
        "softdep snd-hda-intel pre: snd-hda-codec-generic post: snd-hda-codec-hdmi\n"
        "softdep wireguard ignored pre: dummy tun post: loop\n"
        "softdep tun post: nbd\n"
        "softdep geneve pre: nonexistent-mod a]b\n"
        "softdep veth pre: loop\n"
        "softdep veth pre: dummy\n"
        "weakdep xfs crc32c\n"
        "  # an indented comment is a bad line\n"
        "bogus directive\n"
        "include /etc/other.conf\n"
        "options lonely\n"
        "alias a[b c\n"
        "alias joined-\\\nalias loop\n"
    ),
    "20-more.alias": "alias kvc-extra vxlan\n",
    "05-first.conf": "options loop max_part=2\nblacklist nouveau\n",
}
CMDLINE = (
    "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet e1000e.debug=2 loop.max_part=4 "
    'modprobe.blacklist=pcspkr,floppy "dummy.numdummies=2 x" ivrs[.x=1 snd-hda-intel.model=auto '
    'vxlan.a.b=1 =x.y=1 bonding.mode="active backup"\n'
)


@dataclass(frozen=True)
class Setup:
    kernel: DebianKernel
    conf: Path  # the -C directory
    root: Path  # KVC_ROOT for ours: proc/cmdline
    cmdline: Path

    @property
    def args(self) -> list[str]:
        return ["-C", str(self.conf), "-d", str(self.kernel.root), "-S", self.kernel.release]


@pytest.fixture(scope="module")
def setup(indexed_kernel_tree: DebianKernel, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    base = tmp_path_factory.mktemp("modprobe")
    conf = base / "modprobe.d"
    conf.mkdir()
    for name, text in CONFIG_FILES.items():
        (conf / name).write_text(text)
    (conf / ".hidden.conf").write_text("options loop hidden=1\n")
    (conf / "README").write_text("options loop readme=1\n")
    root = base / "root"
    (root / "proc").mkdir(parents=True)
    cmdline = root / "proc" / "cmdline"
    cmdline.write_text(CMDLINE)
    return Setup(indexed_kernel_tree, conf, root, cmdline)


def ours_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KVC_ROOT", "KVC_KERNEL", "MODPROBE_OPTIONS")}
    return {**env, "KVC_ROOT": str(root), "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])}


def kmod_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("KVC_ROOT", "KVC_KERNEL", "MODPROBE_OPTIONS")}


BATCH = r"""
set -e
mount --bind "$1" /proc/cmdline
shift
set +e
while IFS= read -r a; do
    printf '\036\n'; printf '\036\n' >&2
    "$@" -- "$a"
    echo "$?" >&3
done
"""


def run_kmod_batch(cmdline: Path, args: list[str], queries: list[str], tmp: Path) -> list[Result]:
    rc_file = tmp / f"rc-{random.random()}"
    script = f'exec 3>"{rc_file}"\n{BATCH}'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(cmdline), "modprobe", *args],
        input="".join(f"{q}\n" for q in queries).encode(),
        capture_output=True,
        env={**kmod_env(), "PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = proc.stdout.split(b"\x1e\n")[1:]
    errs = proc.stderr.split(b"\x1e\n")[1:]
    codes = [int(line) for line in rc_file.read_text().split()]
    assert len(outs) == len(errs) == len(codes) == len(queries)
    return [Result(code, out, err) for code, out, err in zip(codes, outs, errs)]


def run_ours_batch(root: Path, args: list[str], queries: list[str]) -> list[Result]:
    proc = subprocess.run(
        [sys.executable, "-m", "support.modprobe_driver", *args],
        input="".join(f"{q}\n" for q in queries).encode(),
        capture_output=True,
        env=ours_env(root),
        cwd=str(TESTS),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = []
    for line in proc.stdout.decode().splitlines():
        code, out, err = json.loads(line)
        results.append(Result(code, bytes.fromhex(out), bytes.fromhex(err)))
    assert len(results) == len(queries)
    return results


def compare_batches(setup: Setup, args: list[str], queries: list[str], tmp: Path) -> dict[str, tuple[Result, Result]]:
    """Both tools on every query, two kmod and two kvc processes at a time."""
    from concurrent.futures import ThreadPoolExecutor

    half = len(queries) // 2
    chunks = [queries[:half], queries[half:]]
    with ThreadPoolExecutor(4) as pool:
        theirs = [pool.submit(run_kmod_batch, setup.cmdline, args, chunk, tmp) for chunk in chunks]
        ours = [pool.submit(run_ours_batch, setup.root, args, chunk) for chunk in chunks]
        expected = theirs[0].result() + theirs[1].result()
        found = ours[0].result() + ours[1].result()
    return {q: (o, t) for q, o, t in zip(queries, found, expected) if o != t}


def all_queries(kernel: DebianKernel) -> tuple[list[str], list[str]]:
    directory = ModuleDirectory(str(kernel.moddir))
    names = sorted({dep.name for dep in directory.modules_dep()})
    rng = random.Random(20261201)
    patterns = sorted({pattern for pattern, _module in directory.modules_alias()})
    aliases = sorted({concrete(pattern, rng) for pattern in rng.sample(patterns, 500)})
    return names, aliases


# -- --show-depends and -c on the real tree -----------------------------------------------------


@needs_root
@pytest.mark.oracle
def test_show_depends_every_module_and_500_aliases(setup: Setup, tmp_path: Path) -> None:
    names, aliases = all_queries(setup.kernel)
    assert len(names) > 3500 and len(aliases) >= 480
    rng = random.Random(5)
    dashed = [name.replace("_", "-") for name in rng.sample([n for n in names if "_" in n], 50)]
    extra = [
        "my-net",
        "snd-card-kvc0",
        "blk-alias",
        "ghost",
        "twice",
        "kvc-extra",
        "joined-alias",
        "pcspkr",
        "igb",
        "nonexistent",
        "symbol:drm_*",
        "a]",
        "x[y",
        "ext4",
        "fs-ext4",
        "crc32",
        "dummy",
        "tun",
        "nbd",
        "geneve",
        "veth",
        "wireguard",
        "snd-hda-intel",
        "pci:v00008086d000015FAsv0sd0bc02sc00i00",
        *dashed,
    ]
    queries = names + aliases + extra
    mismatches = compare_batches(setup, ["-D", *setup.args], queries, tmp_path)
    assert mismatches == {}


@needs_root
@pytest.mark.oracle
def test_show_depends_with_flags(setup: Setup, tmp_path: Path) -> None:
    queries = [
        "wireguard",
        "snd-hda-intel",
        "my-net",
        "dummy",
        "tun",
        "geneve",
        "blk-alias",
        "pcspkr",
        "igb",
        "e1000e",
        "ghost",
        "nonexistent",
    ]
    for flags in (["-i"], ["-b"], ["-q"], ["-R"], ["-a"], ["-v"], ["-n"], ["--first-time"]):
        mismatches = compare_batches(setup, ["-D", *flags, *setup.args], queries, tmp_path)
        assert mismatches == {}, flags


def run_pair(setup: Setup, args: list[str], env_extra: Optional[dict[str, str]] = None) -> tuple[Result, Result]:
    env = {**kmod_env(), **(env_extra or {})}
    script = 'mount --bind "$1" /proc/cmdline; shift; exec "$@"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(setup.cmdline), "modprobe", *args],
        capture_output=True,
        env={**env, "PATH": f"/usr/sbin:/sbin:{env.get('PATH', '')}"},
    )
    theirs = Result(proc.returncode, proc.stdout, proc.stderr)
    mine = subprocess.run(
        [sys.executable, "-m", "kvc", "kmod", "modprobe", *args],
        capture_output=True,
        env={**ours_env(setup.root), **(env_extra or {})},
    )
    return Result(mine.returncode, mine.stdout, mine.stderr), theirs


@needs_root
@pytest.mark.oracle
def test_show_config(setup: Setup) -> None:
    ours, theirs = run_pair(setup, ["-c", *setup.args])
    assert b"softdep wireguard pre: dummy tunpost: loop\n" in theirs.stdout
    assert b"options e1000e debug=2\n" in theirs.stdout and b"blacklist floppy\n" in theirs.stdout
    assert b"ignoring bad line starting with 'weakdep'" in theirs.stderr
    assert theirs.stdout.count(b"\nalias ") > 20000
    assert ours == theirs


@needs_root
@pytest.mark.oracle
@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-h"],
        ["--help"],
        ["-V"],
        ["--bogus"],
        ["-z"],
        ["--show-"],
        ["--remove-", "-D", "loop"],
        ["--config"],
        ["-C"],
        ["-w", "x", "-r", "loop"],
        ["--dirname=/nonexistent", "-D", "loop"],
        ["-S", "0.0", "-D", "loop"],
        ["-c", "extra", "args"],
        ["-D", "e1000e", "a=1", "b=x y", "c='q r'"],
        ["-a"],
        ["-r"],
        ["-q", "-D", "nonexistent"],
        ["-D", "nonexistent", "loop"],
        ["-a", "-D", "nonexistent", "loop"],
        ["-r", "-q", "nonexistent", "loop"],
        ["-R", "snd-card-kvc1"],
        ["-R", "twice"],
        ["-D", "./relative.ko"],
        ["-D", "/nonexistent.ko"],
    ],
)
def test_cli_edges(setup: Setup, args: list[str]) -> None:
    full = [*args, *setup.args] if args and args[0] not in ("-h", "--help", "-V", "-z", "--bogus") else args
    ours, theirs = run_pair(setup, full)
    assert ours == theirs


@needs_root
@pytest.mark.oracle
def test_show_depends_from_a_path_and_modprobe_options(setup: Setup) -> None:
    path = module_path(setup.kernel, "wireguard")
    for args, env in [
        (["-D", path], None),
        (["-D", "wireguard"], {"MODPROBE_OPTIONS": "-v -i"}),
        (["-D", "wireguard"], {"MODPROBE_OPTIONS": "'-i' -b"}),
    ]:
        ours, theirs = run_pair(setup, [*args, *setup.args], env)
        assert ours == theirs, (args, env)


# -- the library function ------------------------------------------------------------------------


def test_load_plan_matches_show_depends(setup: Setup) -> None:
    directory = ModuleDirectory(str(setup.kernel.moddir))
    config = load_config([str(setup.conf)], module_dir=str(setup.kernel.moddir), paths=HostPaths(str(setup.root)))
    plan = load_plan(directory, config, "wireguard", extra_options="x=1")
    (dummy,) = [step for step in plan if step.name == "dummy"]
    assert dummy.action == ACTION_INSTALL and not dummy.required and dummy.command is not None
    assert dummy.command.startswith("/bin/echo installing $MODPROBE_MODULE")
    assert plan[-2].target and plan[-2].name == "wireguard" and plan[-2].options == "x=1"
    assert plan[-1] == PlannedModule(
        "loop",
        ACTION_INSMOD,
        module_path(setup.kernel, "loop"),
        "max_part=2 max_loop=8 max_part=4 ",
        None,
        False,
        False,
    )
    assert all(step.required for step in plan if step.name in ("udp_tunnel", "wireguard"))
    ours, _theirs = run_pair(setup, ["-D", "wireguard", "x=1", *setup.args])
    assert "".join(f"{step.show()}\n" for step in plan).encode() == ours.stdout
    assert load_plan(directory, config, "blk-alias") == []
    builtin = directory.modules_builtin()[0]
    assert load_plan(directory, config, builtin) == [PlannedModule(builtin, ACTION_BUILTIN, None, "", None, True)]
    with pytest.raises(LookupError, match="nonexistent"):
        load_plan(directory, config, "nonexistent")


def test_load_plan_skips_loaded_modules(fake: FakeKernel, setup: Setup) -> None:
    load(fake, setup.kernel, "udp_tunnel")
    directory = ModuleDirectory(str(setup.kernel.moddir))
    config = load_config([str(setup.conf)], module_dir=str(setup.kernel.moddir), paths=HostPaths(str(setup.root)))
    everything = load_plan(directory, config, "vxlan")
    remaining = load_plan(directory, config, "vxlan", view=LibkmodView(fake.paths))
    assert "udp_tunnel" in [step.name for step in everything]
    assert [step.name for step in remaining] == [s.name for s in everything if s.name != "udp_tunnel"]
    assert load_plan(directory, config, "udp_tunnel", view=LibkmodView(fake.paths)) == []


# -- loading and removal against the fake kernel ----------------------------------------------------


def run_kmod_fake(fake: FakeKernel, args: list[str], inject: dict[str, str], trace: Path) -> Result:
    calls = ",".join(sorted({*inject, "openat"}))
    strace = ["strace", "-f", "-o", str(trace), "-qq", "-s", "4096", "-e", f"trace={calls}"]
    for syscall, reply in inject.items():
        strace += ["-e", f"inject={syscall}:{reply}"]
    env = {**kmod_env(), "PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", NAMESPACE, "sh", fake.paths.root, "", *strace, "modprobe", *args],
        capture_output=True,
        env=env,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_ours_fake(fake: FakeKernel, args: list[str]) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "kvc", "kmod", "modprobe", *args],
        capture_output=True,
        env={**env_for(fake), "PYTHONPATH": str(TESTS)},
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def traced_paths(trace: Path, syscall: str) -> list[str]:
    """The module files kmod handed to ``syscall``: strace cannot name fds under the fake /proc,
    so each fd is matched with the file openat last returned it for."""
    fds: dict[str, str] = {}
    last = ""
    paths = []
    for line in trace.read_text().splitlines():
        call = line.split(None, 1)[-1]
        if call.startswith("openat(") and "= " in call:
            path = call.split('"', 2)[1]
            fds[call.rsplit("= ", 1)[1].split()[0]] = path
            last = path
        elif call.startswith(f"{syscall}(") and syscall == "finit_module":
            paths.append(fds.get(call[len("finit_module(") :].split(",", 1)[0], ""))
        elif call.startswith(f"{syscall}("):
            paths.append(call.split('"', 2)[1] if syscall == "delete_module" else last)
    return paths


@pytest.fixture
def fake_setup(fake: FakeKernel, setup: Setup) -> tuple[FakeKernel, Setup]:
    (Path(fake.paths.proc) / "cmdline").write_text(CMDLINE)
    return fake, setup


LOAD_CASES = [
    ["-v", "wireguard"],
    ["wireguard"],
    ["-n", "-v", "wireguard"],
    ["-n", "wireguard"],
    ["-v", "my-net"],
    ["snd-card-kvc3"],
    ["blk-alias"],
    ["-v", "-b", "pcspkr"],
    ["-v", "pcspkr"],
    ["-v", "-i", "loop"],
    ["-v", "dummy", "a=1"],
    ["dummy"],
    ["-v", "-a", "loop", "nosuch", "vxlan"],
    ["-v", "udp_tunnel"],
    ["--first-time", "udp_tunnel"],
    ["-v", "--first-time", "vxlan"],
    ["-v", "tun"],
    ["-v", "nbd"],
    ["ghost"],
    ["-v", "geneve"],
    ["-v", "veth"],
    ["-v", "twice"],
    ["-v", "-f", "loop"],
    ["--force-vermagic", "loop"],
    ["-v", "kvc-extra"],
    ["-v", "-i", "wireguard"],
]


@needs_root
@needs_strace
@pytest.mark.oracle
@pytest.mark.parametrize("args", LOAD_CASES)
def test_loading_matches_kmod(fake_setup: tuple[FakeKernel, Setup], tmp_path: Path, args: list[str]) -> None:
    """Every insert succeeds for kmod (strace answers 0); the fake kernel really loads ours. kmod
    does not see its own loads (the fake /sys/module does not change), so a module it reaches
    twice is inserted twice where a real kernel would have it live: -v cases avoid that, and
    the comparison of loads keeps the first of each."""
    fake, setup = fake_setup
    load(fake, setup.kernel, "udp_tunnel")
    before = [m.name for m in fake.loaded_modules()]
    full = [*args, *setup.args]
    trace = tmp_path / "trace"
    theirs = run_kmod_fake(fake, full, {"finit_module": "retval=0", "init_module": "retval=0"}, trace)
    ours = run_ours_fake(fake, full)
    assert ours == theirs
    loaded = [m.name for m in reversed(fake.loaded_modules()) if m.name not in before]
    expected = [Path(p).name.split(".")[0].replace("-", "_") for p in traced_paths(trace, "finit_module")]
    assert loaded == list(dict.fromkeys(expected))


@needs_root
@needs_strace
@pytest.mark.oracle
@pytest.mark.parametrize(
    "args", [["loop", "max_part=x"], ["loop", "max_loop=99999999999"], ["-v", "dummy", "-i"], ["loop", "bogus=1"]]
)
def test_load_errors_match_kmod(fake_setup: tuple[FakeKernel, Setup], tmp_path: Path, args: list[str]) -> None:
    fake, setup = fake_setup
    name = "dummy" if "dummy" in args else "loop"
    err = 0
    config = load_config([str(setup.conf)], module_dir=str(setup.kernel.moddir), paths=HostPaths(fake.paths.root))
    options = options_concat(config.module_options(name), " ".join(a for a in args if "=" in a) or None) or ""
    try:
        copy_of(fake, tmp_path).insert(module_path(setup.kernel, name), options, 0)
    except KernelError as exc:
        err = exc.errno
    full = [*args, *setup.args]
    theirs = run_kmod_fake(fake, full, {"finit_module": answer(err), "init_module": answer(err)}, tmp_path / "t")
    ours = run_ours_fake(fake, full)
    assert ours == theirs


REMOVE_CASES = [
    ["-r", "loop"],
    ["-r", "nosuch"],
    ["-r", "nosuch", "loop"],
    ["-r", "-a", "nosuch", "loop"],
    ["-r", "held"],
    ["-r", "--first-time", "vxlan"],
    ["-r", "vxlan"],
    ["-r", "-n", "-v", "wireguard"],
    ["-r", "-v", "dummy"],
    ["-r", "-n", "-v", "--remove-holders", "udp_tunnel"],
    ["-r", "bonding"],
    ["-r", "-i", "-n", "-v", "dummy"],
    ["-r", "-q", "held"],
    ["-r", "-v", "-n", "my-net"],
    ["-r", "-n", "-v", "twice"],
    ["-r", "{builtin}"],
    ["-r", "--first-time", "-n", "-v", "loop"],
]


@needs_root
@needs_strace
@pytest.mark.oracle
@pytest.mark.parametrize("args", REMOVE_CASES)
def test_removal_matches_kmod(fake_setup: tuple[FakeKernel, Setup], tmp_path: Path, args: list[str]) -> None:
    fake, setup = fake_setup
    load(fake, setup.kernel, "wireguard", "loop", "dummy", "e1000e")
    fake.insert(module_path(setup.kernel, "nbd"), "", 0)
    fake.module_get("nbd")
    builtin = ModuleDirectory(str(setup.kernel.moddir)).modules_builtin()[0]
    args = [arg.replace("{builtin}", builtin).replace("held", "nbd") for arg in args]
    full = [*args, *setup.args]
    theirs = run_kmod_fake(fake, full, {"delete_module": "retval=0"}, tmp_path / "trace")
    ours = run_ours_fake(fake, full)
    assert ours == theirs
    removed_by_kmod = traced_paths(tmp_path / "trace", "delete_module")
    loaded = {m.name for m in fake.loaded_modules()}
    assert not loaded & set(removed_by_kmod)


# -- the configuration parser ----------------------------------------------------------------------

WORDS = [
    "alias",
    "options",
    "install",
    "remove",
    "blacklist",
    "softdep",
    "weakdep",
    "include",
    "config",
    "pre:",
    "post:",
    "m-a",
    "m_b",
    "x[y]",
    "a]",
    "[",
    "*",
    "?",
    "#",
    "$CMDLINE_OPTS",
    "=",
    '"',
    "'",
    ".",
    "k=v",
]
SEPARATORS = [" ", "  ", "\t", "\\\n", "\n", "\\", "\r", "\v"]


def random_text(rng: random.Random, size: int) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(size))


def random_cmdline(rng: random.Random) -> str:
    parts = ["a", "b-c", "modprobe", "blacklist", ".", "=", '"', " ", "x", "[", "]", ",", "\n", "1", "  "]
    return "".join(rng.choice(parts) for _ in range(rng.randrange(0, 30)))


@needs_root
@pytest.mark.oracle
def test_random_configs_show_like_kmod(tmp_path: Path) -> None:
    """300 random configuration files and kernel command lines: kmod's ``-c`` (stdout and the
    libkmod messages) and ours agree."""
    rng = random.Random(42)
    cases = []
    for number in range(300):
        case = tmp_path / f"case{number}"
        (case / "conf").mkdir(parents=True)
        (case / "conf" / "a.conf").write_text(random_text(rng, rng.randrange(1, 12)))
        (case / "conf" / "b.conf").write_text(random_text(rng, rng.randrange(0, 4)))
        (case / "proc").mkdir()
        (case / "proc" / "cmdline").write_text(random_cmdline(rng))
        cases.append(case)
    script = (
        'for c in "$@"; do mount --bind "$c/proc/cmdline" /proc/cmdline; printf "\\036\\n"; '
        'printf "\\036\\n" >&2; modprobe -C "$c/conf" -d "$c" -S 0 -c; umount /proc/cmdline; done'
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *map(str, cases)],
        capture_output=True,
        env={**kmod_env(), "PATH": f"/usr/sbin:/sbin:{os.environ.get('PATH', '')}"},
    )
    outs = proc.stdout.split(b"\x1e\n")[1:]
    errs = proc.stderr.split(b"\x1e\n")[1:]
    assert len(outs) == len(errs) == len(cases)
    for case, out, err in zip(cases, outs, errs):
        config = load_config([str(case / "conf")], module_dir=f"{case}/lib/modules/0", paths=HostPaths(str(case)))
        mine = "".join(f"{line}\n" for line in config.show_lines()).encode("utf-8", "surrogateescape")
        assert mine + b"\n# End of configuration files. Dumping indexes now:\n\n" == out, case
        messages = "".join(f"libkmod: ERROR {r.file}:{r.line} {r.function}: {r.message}" for r in config.logs)
        assert messages.encode("utf-8", "surrogateescape") == err, case


@settings(max_examples=10000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.binary(max_size=200))
def test_parser_never_raises(data: bytes, cmdline: bytes) -> None:
    config = parse_config([("/etc/modprobe.d/x.conf", data)], cmdline)
    assert isinstance(config, ModprobeConfig)
    config.show_lines()
    for name in ("a", "m_a", "x"):
        config.module_options(name, "alias")
        config.install_command(name)
        config.softdep(name)


def test_parser_units() -> None:
    assert underscores("a-b[c-d]-e") == "a_b[c-d]_e"
    assert underscores("a]") is None and underscores("a[b") is None
    assert wrapped_lines(b"a\\\nb\nc\\d\n\n#x") == [("ab", 2), ("cd", 3), ("", 4), ("#x", 5)]
    assert parse_softdep("m", "x pre: a b post: c").pre == ("a", "b")
    assert parse_softdep("m", " pre: a").pre == ()  # one leading separator sticks to "pre:"
    assert parse_softdep("m", "  pre: a").pre == ("a",)
    config = parse_config(
        [("f", b"options m a=1\too\nalias x* m\ninstall m* cmd\n")], b'm.b=2 "m.c=d e" modprobe.blacklist=q,r'
    )
    assert config.options == (("m", "a=1 oo"), ("m", "b=2"), ("m", 'c="d e"'))
    assert config.module_options("m") == 'a=1 oo b=2 c="d e"'
    assert config.blacklists == ("q", "r") and config.alias_targets("xy") == ["m"]
    assert config.install_command("mod") == "cmd" and config.has_command("m") is False


@needs_root
@needs_strace
@pytest.mark.oracle
@pytest.mark.parametrize("args", [["-v", "loop"], ["-r", "-v", "-n", "loop"], ["-r", "loop"]])
def test_a_coming_module_is_not_in_the_kernel_for_kmod_30(
    fake_setup: tuple[FakeKernel, Setup], tmp_path: Path, args: list[str]
) -> None:
    """kmod 30 counts only live and built-in modules as loaded: a 'coming' one is inserted again
    or removed, and the kernel's answer (the fake kernel's, injected for kmod) is reported."""
    fake, setup = fake_setup
    load(fake, setup.kernel, "loop")
    fake.set_initstate("loop", "coming")
    copy = copy_of(fake, tmp_path)
    if "-r" in args:
        err = copy.sys_delete_module("loop", os.O_NONBLOCK)
    else:
        try:
            copy.insert(module_path(setup.kernel, "loop"), "max_part=2 max_loop=8 max_part=4 ", 0)
            err = 0
        except KernelError as exc:
            err = exc.errno
    full = [*args, *setup.args]
    theirs = run_kmod_fake(
        fake,
        full,
        {"finit_module": answer(err), "init_module": answer(err), "delete_module": answer(err)},
        tmp_path / "trace",
    )
    ours = run_ours_fake(fake, full)
    assert ours == theirs
