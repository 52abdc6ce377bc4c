"""Every command with bad input, run as the user runs it (``python -m kvc`` in a subprocess under a
``KVC_ROOT`` with kvc's fake kernel): one ``kvc: error:`` line (details indented below it, at most
one ``kvc: hint:`` line), the documented exit code, no traceback, no external program started, and
the root's tree exactly as before (nothing half-written, no temporary files, nothing written or
removed anywhere). Then what install and uninstall must never do to files that are not kvc's."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from kvc.errors import ExitCode
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support import fakeprog

RELEASE = "6.1.0-99-amd64"
OTHER = "6.1.0-98-amd64"
CONF = 'KMOD_CONTAINER_BUILD_CONTEXT=/nonexistent\nKMOD_SOFTWARE_VERSION=1\nKMOD_NAMES="demo_mod"\n'
BUNDLE_CONF = (
    'KMOD_CONTAINER_BUILD_CONTEXT=.\nKMOD_SOFTWARE_VERSION=1\nKMOD_NAMES="demo_mod"\nKVC_WRAPPER_TOOLS="demotool"\n'
)


@dataclass
class World:
    """A host root with a fake kernel, a bundle beside it, and recording fakes of podman and
    systemctl on PATH."""

    tmp: Path
    root: Path
    bundle: Path
    log: Path
    bin: Path
    fake_kernel: bool = True

    def env(self) -> dict[str, str]:
        env = {**os.environ, "KVC_ROOT": str(self.root), "PATH": fakeprog.path_with(self.bin)}
        env.pop("KVC_KERNEL", None)
        if self.fake_kernel:
            env["KVC_KERNEL"] = "fake"
        return env

    def kvc(self, *args: str, user: Optional[int] = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=self.env(), user=user
        )

    def legacy(self, *args: str) -> subprocess.CompletedProcess[str]:
        code = "import sys; from kvc.cli import legacy_main; sys.exit(legacy_main())"
        return subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, env=self.env(), cwd=self.tmp
        )

    def conf(self, text: str, name: str = "demo") -> Path:
        path = self.root / "etc" / "kvc" / f"{name}.conf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def bundle_conf(self, text: str) -> None:
        (self.bundle / "demo.conf").write_text(text)


def make_world(tmp: Path) -> World:
    root = tmp / "root"
    FakeKernel.create(HostPaths(str(root)), RELEASE)
    bundle = tmp / "bundle"
    (bundle / "src").mkdir(parents=True)
    (bundle / "demo.conf").write_text(BUNDLE_CONF)
    (bundle / "Containerfile").write_text("FROM scratch\n")
    (bundle / "src" / "demo_mod.c").write_text("/* a module */\n")
    log = tmp / "calls.jsonl"
    for program in ("podman", "systemctl"):
        fakeprog.install(tmp / "bin", program, log)
    return World(tmp, root, bundle, log, tmp / "bin")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def snapshot(root: Path) -> dict[str, str]:
    """Every path below ``root``: its type, mode and content (a digest) or link target."""
    found = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                what = "-> " + os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                what = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                what = "dir"
            found[os.path.relpath(path, root)] = f"{stat.filemode(info.st_mode)} {what}"
    return found


def assert_one_clear_error(result: subprocess.CompletedProcess[str], code: ExitCode, message: str) -> None:
    said = result.stdout + result.stderr
    assert "Traceback" not in said, said
    assert result.returncode == code, said
    lines = result.stderr.splitlines()
    assert lines and lines[0].startswith("kvc: error: "), said
    assert message in lines[0], said
    hints = [line for line in lines if line.startswith("kvc: hint: ")]
    assert len(hints) <= 1 and all(line.startswith(("  ", "kvc: hint: ")) for line in lines[1:]), said
    assert not hints or lines[-1] == hints[0], said


Setup = Callable[[World], None]


def _nothing(world: World) -> None:
    pass


def _conf(text: str) -> Setup:
    def setup(world: World) -> None:
        world.conf(text)

    return setup


def _bundle_conf(text: str) -> Setup:
    return lambda world: world.bundle_conf(text)


def _no_fake_kernel(world: World) -> None:
    world.conf(CONF)
    shutil.rmtree(world.root / ".kvc-fake-kernel")


def _symlink(name: str, target: str) -> Setup:
    return lambda world: (world.bundle / name).symlink_to(target)


def _second_conf(world: World) -> None:
    (world.bundle / "other.conf").write_text(CONF)


def _host_command(world: World) -> None:
    command = world.root / "usr" / "bin" / "demotool"
    command.parent.mkdir(parents=True)
    command.write_text("#!/bin/sh\necho the host's own\n")
    command.chmod(0o755)


def _foreign_wrapper(world: World) -> None:
    target = world.root / "usr" / "local" / "bin" / "demotool"
    target.parent.mkdir(parents=True)
    target.write_text("#!/bin/sh\necho someone else's\n")
    target.chmod(0o755)


def _foreign_kernel_hook(world: World) -> None:
    target = world.root / "etc" / "kernel" / "postinst.d" / "kvc"
    target.parent.mkdir(parents=True)
    target.write_text("#!/bin/sh\necho someone else's hook\n")
    target.chmod(0o755)


def _global(text: str) -> Setup:
    def setup(world: World) -> None:
        world.conf(CONF)
        (world.root / "etc" / "kvc" / "kmods-via-containers.conf").write_text(text)

    return setup


def _binary_conf(world: World) -> None:
    world.conf(CONF).write_bytes(b"KMOD_NAMES=\xff\xfe\n")


def _conf_is_a_directory(world: World) -> None:
    (world.root / "etc" / "kvc" / "demo.conf").mkdir(parents=True)


def _delivery_record(text: str) -> Setup:
    """The instance and a delivery record for the running kernel that kvc did not write."""

    def setup(world: World) -> None:
        world.conf(CONF)
        record = world.root / "var" / "lib" / "kvc" / "demo" / "tree" / f"{RELEASE}.json"
        record.parent.mkdir(parents=True)
        record.write_text(text)

    return setup


ALTERED_RECORD = json.dumps(
    {
        "schema": 1,
        "name": "demo",
        "kernel": RELEASE,
        "delivery": "tree",
        "image_id": "",
        "files": [{"path": "/etc/passwd", "kind": "module", "sha256": ["0" * 64]}],
        "dirs": [],
        "overlay": None,
        "firmware_path": None,
    }
)


E = ExitCode
CASES: list[tuple[str, Setup, tuple[str, ...], ExitCode, str]] = [
    # the command line
    ("unknown command", _nothing, ("frobnicate",), E.USAGE, "invalid choice: 'frobnicate'"),
    ("unknown flag", _conf(CONF), ("load", "demo", "--bogus"), E.USAGE, "unrecognized arguments: --bogus"),
    ("missing name", _nothing, ("load",), E.USAGE, "required: name"),
    ("bad accel", _conf(CONF), ("verify", "demo", "--accel", "xen"), E.USAGE, "invalid choice: 'xen'"),
    ("tiny memory", _conf(CONF), ("verify", "demo", "--memory", "16"), E.USAGE, "--memory of at least 256"),
    ("memory not a number", _conf(CONF), ("verify", "demo", "--memory", "lots"), E.USAGE, "invalid int value"),
    ("wrapper without a command", _conf(CONF), ("wrapper", "demo"), E.USAGE, "wrapper needs a command"),
    ("kernel release with a path", _conf(CONF), ("build", "demo", "--kernel", "../../etc"), E.CONFIG, "kernel release"),
    # names
    ("instance name with a path", _nothing, ("build", "../etc", "--kernel", RELEASE), E.CONFIG, "instance name"),
    ("uninstall a path", _nothing, ("uninstall", "../../etc/passwd"), E.CONFIG, "instance name"),
    ("no such instance", _nothing, ("load", "nosuch"), E.CONFIG, "no such file"),
    # garbled confs
    ("command substitution", _conf('KMOD_NAMES="$(rm -rf /)"\n'), ("load", "demo"), E.CONFIG, "command substitution"),
    ("not an assignment", _conf("echo hello\n"), ("load", "demo"), E.CONFIG, "not a KEY=value assignment"),
    ("unterminated quote", _conf('KMOD_NAMES="demo_mod\n'), ("load", "demo"), E.CONFIG, "unterminated double quote"),
    ("missing key", _conf("KMOD_SOFTWARE_VERSION=1\nKMOD_NAMES=a\n"), ("load", "demo"), E.CONFIG, "is not set"),
    (
        "unset $VAR in double quotes",
        _conf(CONF + 'KVC_SMOKE_TEST="test -d /sys/module/$m/parameters"\n'),
        ("load", "demo"),
        E.CONFIG,
        "$m is not set",
    ),
    (
        "unset ${VAR} unquoted",
        _conf(CONF + "KVC_BUILD_ARGS=X=${NOPE}\n"),
        ("load", "demo"),
        E.CONFIG,
        "$NOPE is not set",
    ),
    ("conf not UTF-8", _binary_conf, ("load", "demo"), E.CONFIG, "cannot read"),
    ("conf is a directory", _conf_is_a_directory, ("load", "demo"), E.CONFIG, "cannot read"),
    ("keep kernels", _conf(CONF + "KVC_KEEP_KERNELS=x\n"), ("load", "demo"), E.CONFIG, "whole number"),
    (
        "params of no module",
        _conf(CONF + "KVC_MODULE_PARAMS_other=x=1\n"),
        ("load", "demo"),
        E.CONFIG,
        "names no module",
    ),
    ("bad runtime", _global("KVC_CONTAINER_RUNTIME=rkt\n"), ("status", "demo"), E.CONFIG, "is not supported"),
    # conf values that become paths
    (
        "module name traversal",
        _conf(CONF + 'KMOD_NAMES="../../etc/passwd"\n'),
        ("build", "demo", "--kernel", RELEASE),
        E.CONFIG,
        "not a kernel module name",
    ),
    (
        "wrapper traversal",
        _conf(CONF + 'KVC_WRAPPER_TOOLS="../../../usr/bin/evil"\n'),
        ("status", "demo"),
        E.CONFIG,
        "not a plain command name",
    ),
    (
        "build file traversal",
        _conf(CONF + "KMOD_CONTAINER_BUILD_FILE=../../etc/shadow\n"),
        ("build", "demo", "--kernel", RELEASE),
        E.CONFIG,
        "points outside the build context",
    ),
    (
        "option as a build context",
        _conf(CONF + "KMOD_CONTAINER_BUILD_CONTEXT=--privileged\n"),
        ("build", "demo", "--kernel", RELEASE),
        E.CONFIG,
        "is not allowed",
    ),
    # bundles
    (
        "bundle wrapper traversal",
        _bundle_conf(BUNDLE_CONF + 'KVC_WRAPPER_TOOLS="../../../usr/bin/evil"\n'),
        ("install", "{bundle}"),
        E.CONFIG,
        "not a plain command name",
    ),
    (
        "bundle module traversal",
        _bundle_conf(BUNDLE_CONF + 'KMOD_NAMES="../x"\n'),
        ("install", "{bundle}"),
        E.CONFIG,
        "not a kernel module name",
    ),
    (
        "bundle context outside",
        _bundle_conf(BUNDLE_CONF + "KMOD_CONTAINER_BUILD_CONTEXT=../..\n"),
        ("install", "{bundle}"),
        E.CONFIG,
        "points outside the bundle",
    ),
    (
        "bundle absolute symlink",
        _symlink("passwd", "/etc/passwd"),
        ("install", "{bundle}"),
        E.CONFIG,
        "outside the bundle",
    ),
    (
        "bundle escaping symlink",
        _symlink("up", "../../secret"),
        ("install", "{bundle}"),
        E.CONFIG,
        "outside the bundle",
    ),
    (
        "bundle context on the host",
        _bundle_conf(BUNDLE_CONF + "KMOD_CONTAINER_BUILD_CONTEXT=/etc\n"),
        ("install", "{bundle}"),
        E.CONFIG,
        "KMOD_CONTAINER_BUILD_CONTEXT '/etc' is a host path",
    ),
    (
        "bundle build file on the host",
        _bundle_conf(BUNDLE_CONF + "KMOD_CONTAINER_BUILD_FILE=/etc/kvc/bundles/demo/Containerfile\n"),
        ("install", "{bundle}"),
        E.CONFIG,
        "KMOD_CONTAINER_BUILD_FILE '/etc/kvc/bundles/demo/Containerfile' is a host path",
    ),
    ("bundle with two confs", _second_conf, ("install", "{bundle}"), E.CONFIG, "exactly one NAME.conf (found 2)"),
    ("bundle missing", _nothing, ("install", "{tmp}/nosuch"), E.CONFIG, "not a bundle directory"),
    (
        "wrapper shadows a host command",
        _host_command,
        ("install", "{bundle}"),
        E.STATE,
        "would shadow the host command",
    ),
    ("wrapper over someone's file", _foreign_wrapper, ("install", "{bundle}"), E.STATE, "was not written by kvc"),
    ("install over a hand-written conf", _conf(CONF), ("install", "{bundle}"), E.STATE, "was not written by kvc"),
    ("uninstall without a manifest", _conf(CONF), ("uninstall", "demo"), E.STATE, "was not installed by 'kvc install'"),
    # registries and archives
    ("inspect a repository", _nothing, ("inspect", "reg.example/kvc/x"), E.USAGE, "names a repository, not an image"),
    ("inspect without a registry", _nothing, ("inspect", "kvc/x:1"), E.USAGE, "does not start with a registry host"),
    ("inspect a bad tag", _nothing, ("inspect", "reg.example/x:-1"), E.USAGE, "is not a valid tag"),
    ("push nowhere", _conf(CONF), ("push", "demo", "--kernel", RELEASE), E.USAGE, "no repository to push demo to"),
    ("push to a tag", _conf(CONF), ("push", "demo", "reg.example/x:1"), E.STATE, "names an image, not a repository"),
    (
        "pull from nowhere",
        _conf(CONF),
        ("pull", "demo", "--kernel", RELEASE),
        E.USAGE,
        "no repository to pull demo from",
    ),
    ("pull from a bad reference", _conf(CONF), ("pull", "demo", "x/y"), E.USAGE, "does not start with a registry"),
    ("import a missing archive", _nothing, ("import", "{tmp}/nosuch.tar"), E.STATE, "no such file"),
    ("import a non-archive", _conf(CONF), ("import", "{tmp}/bundle/Containerfile"), E.STATE, "not a kvc archive"),
    ("export nowhere", _conf(CONF), ("export", "demo", "-k", RELEASE, "-o", "{tmp}/no/x.tar"), E.USAGE, "existing"),
    ("export without kernels", _conf(CONF), ("export", "demo", "-o", "{tmp}/x.tar"), E.USAGE, "--kernel"),
    ("modules-dir missing", _conf(CONF), ("load", "demo", "--modules-dir", "{tmp}/no"), E.USAGE, "not a directory"),
    (
        "registry and image",
        _conf(CONF + "KVC_REGISTRY=reg.example/x\nKVC_IMAGE=reg.example/y\n"),
        ("build", "demo"),
        E.CONFIG,
        "KVC_IMAGE and KVC_REGISTRY are both set",
    ),
    ("bad TLS switch", _global("KVC_REGISTRY_TLS_VERIFY=perhaps\n"), ("status", "demo"), E.CONFIG, "yes/no"),
    # kernels
    ("load another kernel", _conf(CONF), ("load", "demo", "--kernel", OTHER), E.STATE, "the running kernel is"),
    ("unload another kernel", _conf(CONF), ("unload", "demo", "--kernel", OTHER), E.STATE, "the running kernel is"),
    ("reload another kernel", _conf(CONF), ("reload", "demo", "-k", OTHER, "--dry-run"), E.STATE, "running kernel"),
    ("status without the fake kernel", _no_fake_kernel, ("status",), E.KERNEL_MISSING, "no fake kernel under"),
    ("load without the fake kernel", _no_fake_kernel, ("load", "demo"), E.KERNEL_MISSING, "no fake kernel under"),
    # kernel updates
    ("check without a name", _nothing, ("check",), E.USAGE, "check needs NAME or --next-boot"),
    ("check a name at next boot", _conf(CONF), ("check", "demo", "--next-boot"), E.USAGE, "it takes no NAME"),
    ("check --json of one instance", _conf(CONF), ("check", "demo", "--json"), E.USAGE, "--json goes with --next-boot"),
    ("next-boot kernel with a path", _nothing, ("check", "--next-boot", "-k", "../etc"), E.CONFIG, "kernel release"),
    ("kernel-added a path", _nothing, ("kernel-added", "../../etc/passwd"), E.CONFIG, "kernel release"),
    ("next kernel unknown", _nothing, ("check", "--next-boot"), E.KERNEL_MISSING, "cannot tell which kernel"),
    ("kernel-added unknown kernel", _nothing, ("kernel-added",), E.KERNEL_MISSING, "cannot tell which kernel"),
    (
        "kernel hook over someone's file",
        _foreign_kernel_hook,
        ("install", "{bundle}"),
        E.STATE,
        "was not written by kvc; not replacing it with kvc's kernel hook",
    ),
    # tree delivery and shipped files
    (
        "delivery not a mode",
        _conf(CONF + "KVC_DELIVERY=sideways\n"),
        ("load", "demo"),
        E.CONFIG,
        "KVC_DELIVERY='sideways' is not one of direct, tree",
    ),
    (
        "firmware outside the firmware directory",
        _conf(CONF + "KVC_FIRMWARE=../../etc/shadow\n"),
        ("load", "demo"),
        E.CONFIG,
        "is not a path inside the image's /lib/firmware",
    ),
    (
        "absolute firmware path",
        _conf(CONF + "KVC_FIRMWARE=/etc/shadow\n"),
        ("load", "demo"),
        E.CONFIG,
        "is not a path inside the image's /lib/firmware",
    ),
    (
        "relative modprobe.d file",
        _conf(CONF + "KVC_MODPROBE_CONF=options.conf\n"),
        ("load", "demo"),
        E.CONFIG,
        "is not an absolute image path of a *.conf file",
    ),
    (
        "udev rule without .rules",
        _conf(CONF + "KVC_UDEV_RULES=/etc/udev/demo.conf\n"),
        ("load", "demo"),
        E.CONFIG,
        "is not an absolute image path of a *.rules file",
    ),
    (
        "two udev rules of one name",
        _conf(CONF + 'KVC_UDEV_RULES="/a/99-demo.rules /b/99-demo.rules"\n'),
        ("load", "demo"),
        E.CONFIG,
        "names two files called 99-demo.rules",
    ),
    (
        "modprobe.d file named as kvc's own",
        _conf(CONF + "KVC_MODPROBE_CONF=/etc/kvc-demo.conf\n"),
        ("load", "demo"),
        E.CONFIG,
        "names kvc-demo.conf, the file kvc writes itself",
    ),
    ("modules-load not yes or no", _conf(CONF + "KVC_MODULES_LOAD=maybe\n"), ("load", "demo"), E.CONFIG, "yes/no"),
    ("unknown delivery flag", _conf(CONF), ("load", "demo", "--delivery", "sideways"), E.USAGE, "invalid choice"),
    (
        "kernel-dir without a dry run",
        _conf(CONF),
        ("load", "demo", "--kernel-dir", "{tmp}"),
        E.USAGE,
        "--kernel-dir goes with --dry-run",
    ),
    ("deliver a path", _nothing, ("deliver", "../etc"), E.CONFIG, "instance name"),
    ("instance named as kvc's directory", _nothing, ("load", "modules"), E.CONFIG, "is reserved"),
    (
        "remove a delivery that is not there",
        _conf(CONF),
        ("deliver", "demo", "--remove"),
        E.STATE,
        f"demo has no delivery for kernel {RELEASE}",
    ),
    (
        "a delivery record listing a host file",
        _delivery_record(ALTERED_RECORD),
        ("deliver", "demo", "--remove"),
        E.STATE,
        "the delivery record lists /etc/passwd, outside the places kvc delivers to",
    ),
    (
        "a garbled delivery record",
        _delivery_record("{not json"),
        ("deliver", "demo", "--remove"),
        E.STATE,
        "the delivery record is unreadable",
    ),
    # keys
    (
        "keys: a weak RSA size",
        _nothing,
        ("keys", "generate", "--out", "{tmp}", "--bits", "1024"),
        E.CONFIG,
        "not a supported RSA size",
    ),
    (
        "keys: no such directory",
        _nothing,
        ("keys", "generate", "--out", "{tmp}/nosuch"),
        E.HOST_FILES,
        "not a directory",
    ),
    ("keys: an empty name", _nothing, ("keys", "generate", "--out", "{tmp}", "--cn", ""), E.CONFIG, "--cn is empty"),
    ("keys: status of an unknown instance", _nothing, ("keys", "status", "nosuch"), E.CONFIG, "nosuch"),
    ("keys: status before a load", _conf(CONF), ("keys", "status", "demo"), E.STATE, "demo has no extraction for"),
    # the instance's signer
    (
        "signer: key without a certificate",
        _conf(CONF + "KVC_SIGN_KEY=/etc/kvc/demo.key\n"),
        ("load", "demo"),
        E.CONFIG,
        "KVC_SIGN_CERT is not set",
    ),
    (
        "signer: a PKCS#11 key",
        _conf(CONF + "KVC_SIGN_KEY=pkcs11:token=kvc\nKVC_SIGN_CERT=/etc/kvc/demo.pem\n"),
        ("load", "demo"),
        E.CONFIG,
        "PKCS#11 keys are not supported",
    ),
    (
        "signer: a key file and a command",
        _conf(CONF + "KVC_SIGN_KEY=/k.key\nKVC_SIGN_COMMAND=/usr/bin/sign\nKVC_SIGN_CERT=/k.pem\n"),
        ("load", "demo"),
        E.CONFIG,
        "KVC_SIGN_KEY and KVC_SIGN_COMMAND are both set",
    ),
    ("sign: an instance without a signer", _conf(CONF), ("sign", "demo"), E.USAGE, "demo has no signer"),
]


@pytest.mark.parametrize(("setup", "args", "code", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_and_changes_nothing(
    world: World, setup: Setup, args: tuple[str, ...], code: ExitCode, message: str
) -> None:
    setup(world)
    before = snapshot(world.root)
    result = world.kvc(*(arg.format(bundle=world.bundle, tmp=world.tmp) for arg in args))
    assert_one_clear_error(result, code, message)
    after = snapshot(world.root)
    # A run that took the instance lock leaves its lock file (the kernel drops the lock itself).
    assert {k: v for k, v in after.items() if not k.startswith("run")} == before
    assert fakeprog.calls(world.log) == []  # refused before any external program ran


def test_the_legacy_command_line_shares_the_boundary(world: World) -> None:
    world.conf(CONF + 'KVC_SMOKE_TEST="ls /sys/module/$m"\n')
    before = snapshot(world.root)
    assert_one_clear_error(world.legacy("load", "demo", RELEASE), E.CONFIG, "$m is not set")
    world.conf(CONF)
    assert_one_clear_error(world.legacy("load", "demo", OTHER), E.STATE, "the running kernel is")
    assert snapshot(world.root) == {**before, "etc/kvc/demo.conf": snapshot(world.root)["etc/kvc/demo.conf"]}


# ---- the host refuses a write ---------------------------------------------------------------------------


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)


def mount_tmpfs(path: Path, options: str, mounted: list[Path]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    mounted.append(path)


def test_no_space_rolls_the_install_back(world: World, mounts: list[Path]) -> None:
    mount_tmpfs(world.root / "etc" / "kvc", "size=64k", mounts)
    (world.bundle / "src" / "blob.bin").write_bytes(os.urandom(256 * 1024))
    before = snapshot(world.root)
    result = world.kvc("install", str(world.bundle))
    assert_one_clear_error(result, E.HOST_FILES, "No space left on device")
    assert "kvc: hint: free space" in result.stderr
    assert {k: v for k, v in snapshot(world.root).items() if not k.startswith("run")} == before


def test_a_read_only_state_dir_is_one_line_with_a_hint(world: World, mounts: list[Path]) -> None:
    mount_tmpfs(world.root / "var" / "lib" / "kvc", "size=64k,ro", mounts)
    before = snapshot(world.root)
    result = world.kvc("install", str(world.bundle))
    assert_one_clear_error(result, E.HOST_FILES, "Read-only file system")
    assert "KVC_ROOT" in result.stderr
    assert {k: v for k, v in snapshot(world.root).items() if not k.startswith("run")} == before


def test_permission_denied_says_run_as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run kvc as another user")
    top = Path(tempfile.mkdtemp(prefix="kvc-eacces-"))
    try:
        top.chmod(0o755)
        world = make_world(top)
        world.fake_kernel = False  # the live kernel's release; the fake one is root's to read
        for path in (top, world.bundle, world.bundle / "src", world.bin):
            path.chmod(0o755)
        before = snapshot(world.root)
        try:
            result = world.kvc("install", str(world.bundle), user=65534)
        except PermissionError:
            pytest.skip("this Python cannot be run by an unprivileged user here")
        assert_one_clear_error(result, E.HOST_FILES, "Permission denied")
        assert "kvc: hint: run kvc as root" in result.stderr
        assert snapshot(world.root) == before
    finally:
        shutil.rmtree(top)


# ---- install and uninstall touch only kvc's own files ------------------------------------------------


def test_uninstall_removes_only_what_install_wrote(world: World) -> None:
    (world.bundle / "link").symlink_to("src/demo_mod.c")
    installed = world.kvc("install", str(world.bundle))
    assert installed.returncode == 0, installed.stderr
    wrapper = world.root / "usr" / "local" / "bin" / "demotool"
    assert "# kvc wrapper for demo" in wrapper.read_text()
    assert (world.root / "etc" / "kvc" / "bundles" / "demo" / "link").readlink() == Path("src/demo_mod.c")
    manifest = world.root / "var" / "lib" / "kvc" / "demo" / "install.json"
    assert manifest.exists()
    # The conf now names a host file as a wrapper, someone adds a file to the bundle copy, and the
    # wrapper is edited by hand: none of those may go.
    precious = world.root / "etc" / "precious"
    precious.write_text("not kvc's\n")
    conf = world.root / "etc" / "kvc" / "demo.conf"
    conf.write_text(conf.read_text() + 'KVC_WRAPPER_TOOLS="demotool ../../../etc/precious"\n')
    extra = world.root / "etc" / "kvc" / "bundles" / "demo" / "src" / "notes.txt"
    extra.write_text("mine\n")
    wrapper.write_text(wrapper.read_text() + "# local change\n")
    dry = world.kvc("uninstall", "demo", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "systemctl disable --now kmods-via-containers@demo.service" in dry.stdout
    assert f"keep {wrapper} (changed since kvc installed it)" in dry.stdout
    result = world.kvc("uninstall", "demo")
    assert result.returncode == 0, result.stderr
    assert precious.read_text() == "not kvc's\n"
    assert extra.read_text() == "mine\n" and wrapper.exists() and conf.exists()  # all changed since install
    assert not manifest.exists()
    assert not (world.root / "etc" / "kvc" / "bundles" / "demo" / "Containerfile").exists()
    assert f"kept {wrapper}: changed since kvc installed it" in result.stdout


def test_uninstall_refuses_a_manifest_that_lists_a_path_outside_kvcs_places(world: World) -> None:
    installed = world.kvc("install", str(world.bundle))
    assert installed.returncode == 0, installed.stderr
    precious = world.root / "etc" / "precious"
    precious.write_text("not kvc's\n")
    manifest = world.root / "var" / "lib" / "kvc" / "demo" / "install.json"
    data = json.loads(manifest.read_text())
    digest = hashlib.sha256(precious.read_bytes()).hexdigest()
    data["entries"].append({"path": str(precious), "kind": "file", "sha256": [digest]})
    manifest.write_text(json.dumps(data))
    before = snapshot(world.root)
    result = world.kvc("uninstall", "demo")
    assert_one_clear_error(result, E.STATE, f"the install manifest lists {precious}, outside kvc's places")
    assert snapshot(world.root) == before


def test_install_dry_run_lists_every_file_and_systemctl_call_and_a_reinstall_replaces_its_own(world: World) -> None:
    before = snapshot(world.root)
    dry = world.kvc("install", str(world.bundle), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert snapshot(world.root) == before
    root = world.root
    for line in (
        f"write the install manifest {root}/var/lib/kvc/demo/install.json",
        f"write conf {root}/etc/kvc/demo.conf",
        f"write wrapper demotool {root}/usr/local/bin/demotool",
        "skip 'systemctl daemon-reload'",
        "skip 'systemctl enable kmods-via-containers@demo.service'",
    ):
        assert line in dry.stdout
    assert world.kvc("install", str(world.bundle)).returncode == 0
    (world.bundle / "Containerfile").write_text("FROM scratch\nRUN true\n")
    again = world.kvc("install", str(world.bundle))
    assert again.returncode == 0, again.stderr
    assert f"replace conf {root}/etc/kvc/demo.conf" in again.stdout
    assert (root / "etc" / "kvc" / "bundles" / "demo" / "Containerfile").read_text().endswith("RUN true\n")
    leftovers = [path for path in snapshot(root) if ".kvc-old-" in path or ".new-" in path]
    assert leftovers == []


def test_shadow_installs_a_wrapper_over_a_host_command_name(world: World) -> None:
    _host_command(world)
    result = world.kvc("install", str(world.bundle), "--shadow")
    assert result.returncode == 0, result.stderr
    assert (world.root / "usr" / "bin" / "demotool").read_text() == "#!/bin/sh\necho the host's own\n"
