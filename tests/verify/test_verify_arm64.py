"""``kvc verify`` of an arm64 kernel on an amd64 host (issue 16's verify side).

Fast tests: the arm64 guest's qemu line and kernel command line, the refusals (KVM, --guest-root,
--secure-boot for an arm64 target), and the guest Python's package set resolved from apt's
metadata. The ``vm`` tests: examples/simple-kmod built by ``kvc build --kernel X-arm64`` on this
amd64 host and verified on Debian's real arm64 kernel under ``qemu-system-aarch64`` with the
example's own smoke test (its arm64 spkut); and modules kvc's build of the example does not make
(simple-kmod's for amd64, tests/kmods' for arm64), compiled here against Debian's headers of the
current 6.1 ABI (``aarch64-linux-gnu-gcc`` and the host-architecture kbuild for arm64), put with
an arm64 busybox into a FROM-scratch ``linux/arm64`` image tagged as kvc's image for the arm64
kernel: the amd64 build refused by the arm64 kernel with its own line, the kernel's
request_module() served by kvc's modprobe, a crash.
"""

from __future__ import annotations

import json
import marshal
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvc.arch import Arch
from kvc.verify.agentbundle import agent_bundle, agent_command
from kvc.verify.debarch import GuestPython, apt_environment, guest_python, library_closure
from kvc.verify.qemu import PLATFORMS, GuestMachine
from kvc.verify.run import GUEST_APPEND, guest_append
from support.debian_kernel import cache_dir, current_release, unpacked_packages
from support.example import EXAMPLE, unique_prefix, write_example_conf
from support.kvccli import kvc

SHARED_CACHE = cache_dir() / "kvc"
KMODS = Path(__file__).resolve().parents[1] / "kmods"
SMOKE = "dmesg | grep -F 'Hello world from simple_kmod.'"


def arm64_release() -> str:
    """The arm64 kernel of the 6.1 ABI linux-image-amd64 names (the flavour replaced)."""
    return current_release().rsplit("-", 1)[0] + "-arm64"


def write_conf(root: Path, name: str, values: dict[str, str]) -> None:
    conf_dir = root / "etc" / "kvc"
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / f"{name}.conf").write_text("".join(f"{key}={json.dumps(value)}\n" for key, value in values.items()))


# ---- without a VM -----------------------------------------------------------------------------------


def test_the_arm64_guest_is_the_virt_board_with_a_cortex_a57_and_its_uart_console(tmp_path: Path) -> None:
    machine = GuestMachine("Image", "init.cpio", guest_append(Arch.ARM64), str(tmp_path / "console"), arch=Arch.ARM64)
    argv = machine.argv()
    assert argv[0] == PLATFORMS[Arch.ARM64].program == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1] == "virt" and argv[argv.index("-cpu") + 1] == "cortex-a57"
    append = argv[argv.index("-append") + 1].split()
    assert "console=ttyAMA0" in append and "no_timer_check" not in append
    assert [word for word in GUEST_APPEND.split() if not word.startswith("console=") and word != "no_timer_check"] == [
        word for word in append if not word.startswith("console=")
    ]
    assert guest_append(Arch.AMD64) == GUEST_APPEND


@pytest.mark.parametrize(
    "extra",
    [["--accel", "kvm"], ["--guest-root", "/tmp"], ["--secure-boot", "--sb-cert", "/dev/null"]],
)
def test_what_an_arm64_target_cannot_have_is_a_usage_error(tmp_path: Path, extra: list[str]) -> None:
    root = tmp_path / "root"
    write_conf(
        root, "m", {"KMOD_CONTAINER_BUILD_CONTEXT": str(tmp_path), "KMOD_SOFTWARE_VERSION": "1", "KMOD_NAMES": "m"}
    )
    result = kvc(["verify", "m", "--kernel", "6.1.0-99-arm64", *extra], {"KVC_ROOT": str(root)})
    assert result.returncode == 2, result.stderr
    assert f"kvc verify of an arm64 kernel on this amd64 host cannot take {extra[0]}" in result.stderr


def test_the_bundle_for_a_guest_python_holds_its_standard_library_compiled_or_as_sources(tmp_path: Path) -> None:
    version = sys.version_info[:2]
    for name in (f"{version[0]}.{version[1]}", "3.99"):
        stdlib = tmp_path / "root" / "usr" / "lib" / f"python{name}"
        (stdlib / "json").mkdir(parents=True)
        (stdlib / "json" / "__init__.py").write_text("GUEST = True\n")
    same = GuestPython(str(tmp_path / "root"), version)
    assert agent_command("/kvc/agent.pyz", same)[0] == f"/usr/bin/python{version[0]}.{version[1]}"
    with zipfile.ZipFile(agent_bundle(str(tmp_path / "cache"), same)) as archive:
        names = set(archive.namelist())
        namespace: dict[str, object] = {}
        exec(marshal.loads(archive.read("json/__init__.pyc")[16:]), namespace)
        main = marshal.loads(archive.read("__main__.pyc")[16:])
    assert namespace["GUEST"] is True  # the guest's own module, not the host's
    assert "kvc/verify/guest.pyc" in names and "re/__init__.pyc" not in names  # the guest root has no re
    assert same.path[0] in main.co_consts and same.path[1] in main.co_consts
    other = GuestPython(str(tmp_path / "root"), (3, 99))
    with zipfile.ZipFile(agent_bundle(str(tmp_path / "cache"), other)) as archive:
        assert archive.read("json/__init__.py") == b"GUEST = True\n"
        assert not [name for name in archive.namelist() if name.endswith(".pyc")]
        assert "kvc/verify/guest.py" in archive.namelist() and "__main__.py" in archive.namelist()


@pytest.mark.vm
def test_the_guest_python_is_debians_with_the_libraries_its_packages_name() -> None:
    env = apt_environment(str(SHARED_CACHE), Arch.ARM64)
    closure = library_closure(env, ["python3.11-minimal:arm64", "libpython3.11-stdlib:arm64"], Arch.ARM64)
    assert {"libc6:arm64", "libffi8:arm64", "libssl3:arm64", "libsqlite3-0:arm64", "libexpat1:arm64"} <= set(closure)
    assert all(name.endswith(":arm64") for name in closure)
    assert not {"dpkg:arm64", "tar:arm64", "perl-base:arm64"} & set(closure)  # tools, not libraries
    guest = guest_python(str(SHARED_CACHE), Arch.ARM64)
    for path in (guest.executable, f"{guest.stdlib}/json/__init__.py", "/lib/ld-linux-aarch64.so.1"):
        assert os.path.exists(guest.root + path), path
    head = Path(guest.busybox).read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == Arch.ARM64.elf_machine


# ---- in an arm64 VM ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arm64_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    for program in ("qemu-system-aarch64", "aarch64-linux-gnu-gcc-12", "podman", "make"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    tmp = tmp_path_factory.mktemp("arm64")
    release = arm64_release()
    abi = release.rsplit("-", 1)[0]
    series = ".".join(abi.split(".")[:2])
    # The host-architecture kbuild: the arm64 one's fixdep and modpost do not run here.
    headers_root = unpacked_packages(
        cache_dir() / "headers" / release,
        [f"linux-headers-{release}:arm64", f"linux-headers-{abi}-common", f"linux-kbuild-{series}"],
        architecture="arm64",
    )
    headers = headers_root / "usr" / "src" / f"linux-headers-{release}"
    # The flavour's Makefile includes the common one by its installed, absolute path.
    include = f"include {headers_root / 'usr' / 'src' / f'linux-headers-{abi}-common' / 'Makefile'}\n"
    if (headers / "Makefile").read_text() != include:
        (headers / "Makefile").write_text(include)
    env = {"KVC_ROOT": str(tmp / "root"), "KVC_CACHE_DIR": str(SHARED_CACHE)}
    with unique_prefix("kvcarm") as prefix:
        yield {"tmp": tmp, "release": release, "headers": headers, "env": env, "prefix": prefix}


SIMPLE = ("simple-kmod", "simple-procfs-kmod")
SIMPLE_CONF = {"KVC_MODULE_PARAMS_simple_procfs_kmod": "number=0", "KVC_SMOKE_TEST": SMOKE}


def build_modules(
    arm64_env: dict[str, Any], cross: bool, sources: Path = EXAMPLE / "src", names: tuple[str, ...] = SIMPLE
) -> list[Path]:
    """The modules ``names`` of ``sources`` (default: simple-kmod's two), for arm64
    (cross-compiled against the arm64 headers) or, for the refusal, for amd64 (against the
    host's headers of the same ABI)."""
    work: Path = arm64_env["tmp"] / f"{'arm64' if cross else 'amd64'}-{names[0]}"
    shutil.copytree(sources, work)
    amd64_headers = Path("/usr/src") / f"linux-headers-{current_release()}"
    kdir = arm64_env["headers"] if cross else amd64_headers
    # MODULES and KBUILD_MODPOST_WARN: what tests/kmods' Makefile passes kbuild.
    make = ["make", "-C", str(kdir), f"M={work}", "KMODVER=1.0.0", f"MODULES={' '.join(names)}"]
    make += ["KBUILD_MODPOST_WARN=1", "modules", *(["CROSS_COMPILE=aarch64-linux-gnu-"] if cross else [])]
    built = subprocess.run(make, capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return [work / f"{name}.ko" for name in names]


def tag_image(arm64_env: dict[str, Any], name: str, modules: list[Path], conf: dict[str, str]) -> None:
    """An arm64 image of ``modules`` (the instance's KMOD_NAMES, in order) and busybox (a smoke
    test's sh, grep and dmesg), tagged as kvc's image of instance ``name`` for the arm64 kernel,
    with its conf (``conf``: more keys)."""
    release = arm64_env["release"]
    context = arm64_env["tmp"] / f"context-{name}"
    extra = context / "rootfs" / "lib" / "modules" / release / "extra"
    extra.mkdir(parents=True)
    for module in modules:
        shutil.copyfile(module, extra / module.name)
    bin_dir = context / "rootfs" / "bin"
    bin_dir.mkdir()
    shutil.copyfile(guest_python(str(SHARED_CACHE), Arch.ARM64).busybox, bin_dir / "busybox")
    (bin_dir / "busybox").chmod(0o755)
    for tool in ("sh", "grep", "dmesg"):
        (bin_dir / tool).symlink_to("busybox")
    (context / "Containerfile").write_text("FROM scratch\nCOPY rootfs/ /\n")
    subprocess.run(
        ["podman", "build", "-q", "--platform", "linux/arm64", "-t", f"{name}-1.0.0:{release}", str(context)],
        check=True,
        capture_output=True,
    )
    write_conf(
        Path(arm64_env["env"]["KVC_ROOT"]),
        name,
        {
            "KMOD_CONTAINER_BUILD_CONTEXT": str(context),
            "KMOD_SOFTWARE_VERSION": "1.0.0",
            "KMOD_NAMES": " ".join(module.name[: -len(".ko")] for module in modules),
            **conf,
        },
    )


def verify(arm64_env: dict[str, Any], name: str) -> tuple[int, dict[str, Any]]:
    result = kvc(["verify", name, "--kernel", arm64_env["release"], "--json"], arm64_env["env"], timeout=600)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.vm
@pytest.mark.podman
def test_the_example_built_by_kvc_for_arm64_is_verified_with_its_smoke_test(arm64_env: dict[str, Any]) -> None:
    name = f"{arm64_env['prefix']}-example"
    write_example_conf(Path(arm64_env["env"]["KVC_ROOT"]), name)
    built = kvc(["build", name, "--kernel", arm64_env["release"]], arm64_env["env"], timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    code, report = verify(arm64_env, name)
    assert code == 0, json.dumps(report, indent=2)
    assert report["status"] == "verified" and report["vm"]["arch"] == "arm64"
    modules = {m["name"]: m for m in report["modules"] if m["origin"] == "instance"}
    assert list(modules) == ["simple_kmod", "simple_procfs_kmod"] and all(m["loaded"] for m in modules.values())
    # The example's own smoke test: the procfs entry, its arm64 spkut setting 44, the hello line.
    smoke = report["smoke"]
    assert smoke["in_image"] and smoke["exit_code"] == 0 and "spkut 44" in smoke["command"], smoke
    assert all(u["removed"] for u in report["unload"]), report["unload"]


@pytest.mark.vm
@pytest.mark.podman
def test_simple_kmod_cross_built_for_arm64_is_verified_on_debians_arm64_kernel(arm64_env: dict[str, Any]) -> None:
    name = f"{arm64_env['prefix']}-simple"
    # wireguard: in-tree modules from the guest's own arm64 tree, dependencies with arm64's NEON
    # crypto (chacha-neon, poly1305-neon) among them, loaded first by kvc's loader in the guest.
    conf = {**SIMPLE_CONF, "KVC_INTREE_MODULES": "wireguard"}
    tag_image(arm64_env, name, build_modules(arm64_env, cross=True), conf)
    code, report = verify(arm64_env, name)
    assert code == 0, json.dumps(report, indent=2)
    in_tree = {m["name"]: m for m in report["modules"] if m["origin"] == "in-tree"}
    assert {"wireguard", "chacha_neon", "poly1305_neon"} <= set(in_tree), list(in_tree)
    assert all(m["loaded"] and m["path"].startswith(f"/lib/modules/{arm64_env['release']}/") for m in in_tree.values())
    assert {u["name"] for u in report["unload"] if u["removed"]} >= set(in_tree)
    assert report["status"] == "verified" and report["kernel"] == arm64_env["release"]
    vm = report["vm"]
    assert (vm["arch"], vm["machine"], vm["accel"], vm["boot"]) == ("arm64", "virt", "tcg", "image")
    assert vm["guest_root"].startswith(str(SHARED_CACHE / "guest-roots" / "arm64-python"))
    assert report["kernel_files"]["source"].startswith(f"Debian package linux-image-{arm64_env['release']}")
    modules = {m["name"]: m for m in report["modules"] if m["origin"] == "instance"}
    assert list(modules) == ["simple_kmod", "simple_procfs_kmod"]
    assert all(m["loaded"] and m["refcnt"] == 0 for m in modules.values())
    assert "Hello world from simple_kmod." in modules["simple_kmod"]["log"]
    assert report["smoke"]["exit_code"] == 0 and report["smoke"]["in_image"], report["smoke"]
    assert "Hello world from simple_kmod." in report["smoke"]["stdout"]
    assert [(u["name"], u["removed"]) for u in report["unload"]][:2] == [
        ("simple_procfs_kmod", True),
        ("simple_kmod", True),
    ]
    human = kvc(["verify", name, "--kernel", arm64_env["release"]], arm64_env["env"], timeout=600)
    assert human.returncode == 0, human.stdout + human.stderr
    assert "(qemu tcg, arm64 virt, Image boot, 1024 MiB, no network)" in human.stdout.splitlines()[0]
    assert {"kernel_boot", "boot_modules", "python_start", "agent_load"} <= set(report["timings"]["phases"])


@pytest.mark.vm
@pytest.mark.podman
def test_an_amd64_build_is_refused_by_the_arm64_kernel_with_its_elf_line(arm64_env: dict[str, Any]) -> None:
    name = f"{arm64_env['prefix']}-amd64"
    tag_image(arm64_env, name, build_modules(arm64_env, cross=False), SIMPLE_CONF)
    code, report = verify(arm64_env, name)
    assert code == 5, json.dumps(report, indent=2)
    assert report["status"] == "load-refused"
    first = report["modules"][0]
    assert first["name"] == "simple_kmod" and not first["loaded"] and first["errno"] == "ENOEXEC"
    assert any("Invalid architecture in ELF header: 62" in line for line in first["log"]), first["log"]
    assert report["artifacts"]  # a failed run is kept


@pytest.mark.vm
@pytest.mark.podman
def test_the_arm64_kernels_request_module_is_served_by_kvcs_modprobe_on_the_guest_python(
    arm64_env: dict[str, Any],
) -> None:
    """kvc-requests-intree's init asks for ip_tables: the arm64 kernel runs kvc's modprobe helper,
    the guest's arm64 Python running the agent bundle, on the guest's arm64 tree."""
    name = f"{arm64_env['prefix']}-requests"
    tag_image(arm64_env, name, build_modules(arm64_env, True, KMODS, ("kvc-requests-intree",)), {})
    code, report = verify(arm64_env, name)
    assert code == 0, json.dumps(report, indent=2)
    ours = next(m for m in report["modules"] if m["name"] == "kvc_requests_intree")
    assert [(call["module"], call["exit_code"]) for call in ours["requests"]] == [("ip_tables", 0)]
    assert "kvc_requests_intree: request_module(ip_tables) returned 0, ip_tables is loaded" in ours["log"]


@pytest.mark.vm
@pytest.mark.podman
def test_a_module_that_crashes_the_arm64_kernel_is_a_crash_with_its_oops(arm64_env: dict[str, Any]) -> None:
    name = f"{arm64_env['prefix']}-bug"
    tag_image(arm64_env, name, build_modules(arm64_env, True, KMODS, ("kvc-bug-on-init",)), {})
    result = kvc(["verify", name, "--kernel", arm64_env["release"], "--json", "--timeout", "120"], arm64_env["env"])
    report = json.loads(result.stdout)
    assert result.returncode == 9, json.dumps(report, indent=2)
    assert report["status"] == "crashed" and report["crash"]["during"] == "inserting kvc_bug_on_init (instance)"
    assert any("kernel BUG at" in line for line in report["crash"]["lines"]), report["crash"]["lines"]
    assert report["timings"]["vm_seconds"] < 120


def test_verify_takes_the_architecture_from_arch_where_the_release_names_none(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_conf(
        root, "m", {"KMOD_CONTAINER_BUILD_CONTEXT": str(tmp_path), "KMOD_SOFTWARE_VERSION": "1", "KMOD_NAMES": "m"}
    )
    contradicting = kvc(["verify", "m", "--kernel", "6.1.0-99-arm64", "--arch", "amd64"], {"KVC_ROOT": str(root)})
    assert contradicting.returncode == 2
    assert "--arch amd64 contradicts kernel 6.1.0-99-arm64" in contradicting.stderr
    # An arch-less release built for arm64 has its own tag, which verify looks for.
    missing = kvc(
        ["verify", "m", "--kernel", "6.8.0-45-generic", "--arch", "arm64", "--accel", "kvm"], {"KVC_ROOT": str(root)}
    )
    assert missing.returncode == 2 and "cannot take --accel kvm" in missing.stderr
