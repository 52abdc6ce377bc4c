"""The single-file kvc of scripts/build-onefile.sh, built once per session (in a Debian 11 root,
from the build cache): everything it bundles needs glibc 2.29 at most, and it runs in a Debian 11
minbase root -- no Python at all, glibc 2.31, older than RHEL 9.4's 2.34 -- with the same output
and exit status as the Python kvc in .venv for the same input (the .venv kvc runs on this host;
both see the files they read at the same paths, bound into the root in a private mount
namespace)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support.debian_kernel import DebianKernel
from support.onefile import CACHE, PRIVATE_MOUNTS, SCRIPT, TOP, minbase_root
from support.registry import LocalRegistry

pytestmark = [
    pytest.mark.onefile,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and chroot need root"),
]

PYTHON_KVC = Path(sys.prefix) / "bin" / "kvc"
PYTHON_LEGACY = Path(sys.prefix) / "bin" / "kmods-via-containers"
GLIBC_FLOOR = (2, 29)  # Debian 11's libpython3.9: what RHEL 9.4 (2.34) and older fleets can run
# Installed in the root with the executable; the paths kvc reads are bound to the same path inside.
ROOT_BIN = "/usr/local/bin"
# No image exists: podman's answer when asked about a missing one.
FAKE_PODMAN = (
    '#!/bin/sh\nif [ "$1" = image ] && [ "$2" = inspect ]; then echo "Error: $3: image not known" >&2; exit 125; fi\n'
)


@pytest.fixture(scope="session")
def bare_root(onefile_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the minbase root with the one-file kvc (and its legacy name) in ROOT_BIN."""
    root = tmp_path_factory.mktemp("bare") / "root"
    subprocess.run(["cp", "-a", str(minbase_root()), str(root)], check=True)
    shutil.copy2(onefile_build / "kvc", root / ROOT_BIN.lstrip("/") / "kvc")
    (root / ROOT_BIN.lstrip("/") / "kmods-via-containers").symlink_to("kvc")
    return root


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_in_root(root: Path, share: Path, env: dict[str, str], *argv: str) -> Outcome:
    """ARGV chrooted into ROOT with only ENV, SHARE bound at its own path, /proc mounted."""
    script = (
        'root=$1 share=$2; shift 2; mkdir -p "$root$share" && mount --bind "$share" "$root$share" '
        '&& mount -t proc proc "$root/proc" && exec chroot "$root" /usr/bin/env -i "$@"'
    )
    assignments = [f"{name}={value}" for name, value in env.items()]
    proc = subprocess.run(
        [*PRIVATE_MOUNTS, "/bin/sh", "-c", script, "sh", str(root), str(share), *assignments, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def run_on_host(env: dict[str, str], *argv: str) -> Outcome:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, env=env)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def glibc_versions(path: Path) -> set[tuple[int, ...]]:
    """The GLIBC_x.y symbol versions PATH's dynamic symbol table asks for (objdump -T)."""
    table = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=True).stdout
    return {tuple(int(part) for part in found.split(".")) for found in re.findall(r"\bGLIBC_([0-9.]+[0-9])", table)}


def elf_files(directory: Path) -> list[Path]:
    found = []
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def test_the_build_is_cached_and_leaves_no_mount(onefile_build: Path) -> None:
    started = time.monotonic()
    again = subprocess.run(
        ["bash", str(SCRIPT), "--output", str(onefile_build)], capture_output=True, text=True, timeout=300
    )
    elapsed = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert "(cached)" in again.stderr and "built before" in again.stderr, again.stderr
    assert elapsed < 10, f"a second run with unchanged sources took {elapsed:.1f} s"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        left = [line for line in mounts if f" {CACHE}/" in line]
    assert not left, left
    assert os.readlink(onefile_build / "kmods-via-containers") == "kvc"


def test_usage_errors_exit_2() -> None:
    for args in (["--bogus"], ["--output"], ["--suite", "Bad Suite"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("build-onefile: error: "), proc.stderr


def test_the_mirror_of_another_suite_is_the_one_the_host_uses_for_its_own(tmp_path: Path) -> None:
    (tmp_path / "apt" / "sources.list.d").mkdir(parents=True)
    (tmp_path / "apt" / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example.org/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\n')

    def mirror_for(suite: str) -> str:
        lookup = '. "$1"; apt_mirror_for "$2"'
        env = {**os.environ, "APT_ETC": str(tmp_path / "apt"), "OS_RELEASE": str(tmp_path / "os-release")}
        library = str(TOP / "scripts/lib/apt-sources.sh")
        return subprocess.run(
            ["bash", "-c", lookup, "sh", library, suite], capture_output=True, text=True, env=env
        ).stdout

    assert mirror_for("bullseye") == "http://mirror.example.org/debian"
    assert mirror_for("bullseye-security") == "http://mirror.example.org/debian-security"
    (tmp_path / "apt" / "sources.list").write_text("deb http://old.example.org/debian bullseye main\n")
    assert mirror_for("bullseye") == "http://old.example.org/debian"


def test_everything_bundled_needs_at_most_glibc_2_29(onefile_build: Path) -> None:
    bundled = elf_files(onefile_build / "kvc-onedir")
    names = {path.name for path in bundled}
    # The unpacked bundle is what the one file carries: the interpreter and every extension.
    assert "libpython3.9.so.1.0" in names and any(name.startswith("backend_c.") for name in names), sorted(names)
    needs = {path: glibc_versions(path) for path in [onefile_build / "kvc", *bundled]}
    floor, neediest = max((max(versions, default=(0,)), path) for path, versions in needs.items())
    stated = ".".join(map(str, floor))
    assert floor <= GLIBC_FLOOR, f"{neediest.relative_to(onefile_build)} needs GLIBC_{stated}, above 2.29"
    # The floor is libpython's: were it lower, GLIBC_FLOOR (and the script's help) would be stale.
    assert floor == GLIBC_FLOOR, f"the bundle needs GLIBC_{stated} ({neediest.relative_to(onefile_build)}), not 2.29"


def test_the_root_has_no_python(bare_root: Path) -> None:
    pythons = [
        p
        for pattern in ("usr/bin/python*", "usr/lib/python3*", "usr/lib/*/libpython*")
        for p in bare_root.glob(pattern)
    ]
    assert not pythons, pythons
    found = run_in_root(bare_root, Path("/tmp"), {"PATH": "/usr/bin:/bin"}, "sh", "-c", "command -v python3 python")
    assert found.code != 0 and found.stdout == "", found


@pytest.fixture
def share(tmp_path: Path, indexed_kernel_tree: DebianKernel) -> Path:
    """What both kvcs read: a fake podman, module files (one zstd-compressed: the bundled
    zstandard), the example, and one fake-kernel root for each kvc."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "podman").write_text(FAKE_PODMAN)
    (tmp_path / "bin" / "podman").chmod(0o755)
    (tmp_path / "ko").mkdir()
    for name in ("af_key.ko", "xfrm_algo.ko"):
        (source,) = indexed_kernel_tree.moddir.rglob(name)
        shutil.copy(source, tmp_path / "ko" / name)
    subprocess.run(["zstd", "-q", str(tmp_path / "ko" / "af_key.ko"), "-o", str(tmp_path / "ko" / "af_key.ko.zst")])
    shutil.copytree(TOP / "examples" / "simple-kmod", tmp_path / "example")
    for which in ("python", "onefile"):
        FakeKernel.create(
            HostPaths(str(tmp_path / which)), indexed_kernel_tree.release, symvers=str(indexed_kernel_tree.symvers)
        )
    return tmp_path


def normalised(text: str, root: str) -> str:
    """TEXT with ROOT (each kvc's own) as ``ROOT``, and argparse's heading as Python >= 3.10 has it:
    the bundle's Python is 3.9, which still calls options "optional arguments"."""
    return text.replace(root, "ROOT").replace("\noptional arguments:\n", "\noptions:\n")


def same_behaviour(bare_root: Path, share: Path, python_argv: list[str], *args: str) -> None:
    """The one-file kvc in the bare root and the Python one on this host, each with its own
    fake-kernel root under SHARE, give the same output (but for the root's path) and status."""
    outcomes = {}
    for which in ("python", "onefile"):
        env = {"PATH": f"{share}/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "KVC_KERNEL": "fake"}
        env["KVC_ROOT"] = str(share / which)
        if which == "python":
            outcome = run_on_host(env, *python_argv, *args)
        else:
            outcome = run_in_root(bare_root, share, env, f"{ROOT_BIN}/{Path(python_argv[0]).name}", *args)
        outcomes[which] = Outcome(
            outcome.code, normalised(outcome.stdout, env["KVC_ROOT"]), normalised(outcome.stderr, env["KVC_ROOT"])
        )
    assert outcomes["onefile"] == outcomes["python"], args


def test_help_is_the_same(bare_root: Path, share: Path) -> None:
    same_behaviour(bare_root, share, [str(PYTHON_KVC)], "--help")


def test_modinfo_is_the_same(bare_root: Path, share: Path) -> None:
    ko = share / "ko"
    same_behaviour(bare_root, share, [str(PYTHON_KVC)], "kmod", "modinfo", f"{ko}/af_key.ko", f"{ko}/af_key.ko.zst")
    same_behaviour(bare_root, share, [str(PYTHON_KVC)], "kmod", "modinfo", "-F", "vermagic", f"{ko}/xfrm_algo.ko")
    same_behaviour(bare_root, share, [str(PYTHON_KVC)], "kmod", "modinfo", f"{ko}/missing.ko")


def test_install_and_status_are_the_same(bare_root: Path, share: Path) -> None:
    kvc = [str(PYTHON_KVC)]
    same_behaviour(bare_root, share, kvc, "install", str(share / "example"))
    installed = {
        which: {
            str(path.relative_to(share / which)): normalised(path.read_text(), str(share / which))
            for path in sorted((share / which).rglob("*"))
            # Each root's fake kernel: its own state and boot id (two kernels, two boots).
            if path.is_file() and ".kvc-fake-kernel" not in path.parts and path.name != "boot_id"
        }
        for which in ("python", "onefile")
    }
    # The systemd unit comes from kvc's package data.
    assert "etc/systemd/system/kmods-via-containers@.service" in installed["onefile"]
    assert installed["onefile"].keys() == installed["python"].keys()
    # The manifest holds the digest of the conf, which names its root: the one file that differs.
    manifest = "var/lib/kvc/simple-kmod/install.json"
    assert {name: text for name, text in installed["onefile"].items() if name != manifest} == {
        name: text for name, text in installed["python"].items() if name != manifest
    }
    same_behaviour(bare_root, share, kvc, "status")
    same_behaviour(bare_root, share, kvc, "status", "--json")


def test_the_legacy_name_runs_the_legacy_interface(bare_root: Path, share: Path) -> None:
    legacy = [str(PYTHON_LEGACY)]
    same_behaviour(bare_root, share, [str(PYTHON_KVC)], "install", str(share / "example"))
    # kvc's own instance: answered in Python; an unknown one: by the bash driver from the package data.
    same_behaviour(bare_root, share, legacy, "bogus", "simple-kmod", "6.1.0-1-amd64")
    same_behaviour(bare_root, share, legacy, "bogus", "nothing", "6.1.0-1-amd64")


@pytest.mark.registry
def test_registry_reads_are_the_same(bare_root: Path, share: Path, local_registry: LocalRegistry) -> None:
    """The one file bundles ssl: TLS with the registry's CA and basic auth from an auth file."""
    registry = local_registry
    ref = f"{registry.host}/kvc/onefile-base:1"
    subprocess.run(
        ["podman", "push", "--authfile", registry.auth_file, "--cert-dir", f"{registry.certs_dir}/{registry.host}",
         "localhost/debian:bookworm", f"docker://{ref}"],
        check=True, capture_output=True,
    )  # fmt: skip
    shutil.copytree(registry.certs_dir, share / "certs.d")
    shutil.copy(registry.auth_file, share / "auth.json")
    for which in ("python", "onefile"):
        settings = share / which / "etc" / "kvc" / "kmods-via-containers.conf"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(f"KVC_REGISTRY_AUTH_FILE={share}/auth.json\nKVC_REGISTRY_CERTS_DIR={share}/certs.d\n")
    same_behaviour(bare_root, share, [str(PYTHON_KVC)], "inspect", ref)
    same_behaviour(bare_root, share, [str(PYTHON_KVC)], "inspect", ref, "--json")
    same_behaviour(bare_root, share, [str(PYTHON_KVC)], "inspect", f"{registry.host}/kvc/onefile-base:missing")
