"""Targets of another architecture than the build host's (issue 16's build side).

Fast: the names (local and registry tags keep architectures apart), the cross build's command line
(``--platform``, KVC_ARCH, KVC_CROSS_COMPILE and the platform args) against a recording fake podman,
a digest that does not depend on the build host, the build's refusal of modules of another
architecture, and the load's refusal of another architecture's modules before any insert.

With podman (``-m podman``): ``examples/simple-kmod`` built by ``kvc build`` for Debian's current
6.1 arm64 ABI on this amd64 host, without emulation (the machine has no binfmt handler for arm64);
its modules are EM_AARCH64 with an aarch64 vermagic, spkut and the image's shell are arm64 programs,
the image's OCI platform and kvc.arch label say arm64; ``kvc status`` shows it apart from the amd64
image; and ``kvc load`` on an amd64 (fake) kernel refuses it with one line, loading nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from kvc.arch import Arch, tag_suffix
from kvc.build import BuildPlan, context_digest, execute_build, plan_build
from kvc.config import InstanceConfig
from kvc.distribute import remote_problems
from kvc.errors import BuildError, LoadError
from kvc.images import LABEL_ARCH, candidate_tag, image_labels, image_tag, prune_plan, registry_tags
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.module import ModuleFile
from kvc.kmod.paths import HostPaths
from kvc.loader import check_architecture, plan_load
from kvc.registry import Reference, RemoteImage
from kvc.runtime import ImageInfo, PodmanRuntime
from support import fakeprog
from support.debian_kernel import current_release
from support.example import unique_prefix, write_example_conf
from support.fakeruntime import FakeRuntime, fake, module_bytes
from support.modbuild import ModuleSpec, build_module

__all__ = ["fake"]  # the fixture, imported for these tests

ROOT = Path(__file__).resolve().parents[2]
ARM = "6.1.0-57-arm64"  # a name only, for the fast tests; the podman tests use Debian's current ABI
ARCHLESS = "6.8.0-45-generic"


def instance(tmp_path: Path) -> InstanceConfig:
    context = tmp_path / "ctx"
    context.mkdir(exist_ok=True)
    (context / "Containerfile").write_text("FROM scratch\n")
    values = {"KMOD_CONTAINER_BUILD_CONTEXT": str(context), "KMOD_SOFTWARE_VERSION": "1.0", "KMOD_NAMES": "demo-mod"}
    return InstanceConfig.from_values("demo", str(tmp_path / "demo.conf"), values)


@pytest.fixture
def amd64_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process runs on an amd64 host, whatever the machine."""
    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result((*real[:4], "x86_64")))


# ---- names ----------------------------------------------------------------------------------------


def test_names_keep_architectures_apart(tmp_path: Path, amd64_host: None) -> None:
    config = instance(tmp_path)
    # A release that names its architecture is the key alone: names as before.
    assert image_tag(config, ARM) == image_tag(config, ARM, Arch.ARM64) == f"demo-1.0:{ARM}"
    assert registry_tags(config, ARM) == (f"1.0-{ARM}", ARM)
    # One that names none: the host's architecture (amd64 here) keeps the plain name, arm64 gets -arm64.
    assert image_tag(config, ARCHLESS) == image_tag(config, ARCHLESS, Arch.AMD64) == f"demo-1.0:{ARCHLESS}"
    assert image_tag(config, ARCHLESS, Arch.ARM64) == f"demo-1.0:{ARCHLESS}-arm64"
    assert candidate_tag(config, ARCHLESS, Arch.ARM64) == f"demo-1.0:{ARCHLESS}-arm64-kvc-candidate"
    assert registry_tags(config, ARCHLESS, Arch.ARM64) == (f"1.0-{ARCHLESS}-arm64", f"{ARCHLESS}-arm64")
    assert registry_tags(config, ARCHLESS) == (f"1.0-{ARCHLESS}", ARCHLESS)
    # The suffix depends on the target only, so build host, registry and loading host agree.
    assert [tag_suffix(ARCHLESS, arch) for arch in Arch] == ["", "-arm64"]
    assert tag_suffix("6.11.4-301.fc41.aarch64", Arch.ARM64) == ""
    assert image_labels(config, ARM, "d")[LABEL_ARCH] == "arm64"
    assert image_labels(config, ARCHLESS, "d")[LABEL_ARCH] == "amd64"


# ---- the cross build's plan ---------------------------------------------------------------------------


def _build_args(command: tuple[str, ...]) -> dict[str, str]:
    values = [command[i + 1] for i, arg in enumerate(command) if arg == "--build-arg"]
    return dict(value.split("=", 1) for value in values)


def test_an_arm64_build_on_amd64_is_a_cross_build(tmp_path: Path, fake: FakeRuntime, amd64_host: None) -> None:
    fake.install([fakeprog.Rule(["image", "inspect"], "", 125, "Error: image not known\n")])
    config = instance(tmp_path)
    plan = plan_build(config, ARM, PodmanRuntime())
    assert (plan.action, plan.tag, plan.arch) == ("build", f"demo-1.0:{ARM}", Arch.ARM64)
    assert plan.labels[LABEL_ARCH] == "arm64"
    command = plan.command
    assert command[command.index("--platform") + 1] == "linux/arm64"
    args = _build_args(command)
    assert {key: args[key] for key in args if key not in ("KVER", "KMODVER")} == {
        "KVC_ARCH": "arm64",
        "KVC_KERNEL_ARCH": "arm64",
        "TARGETARCH": "arm64",
        "TARGETPLATFORM": "linux/arm64",
        "KVC_CROSS_COMPILE": "aarch64-linux-gnu-",
        "BUILDARCH": "amd64",
        "BUILDPLATFORM": "linux/amd64",
    }
    # A native build passes no --platform, and an empty cross prefix.
    native = plan_build(config, "6.1.0-57-amd64", PodmanRuntime()).command
    assert "--platform" not in native and _build_args(native)["KVC_CROSS_COMPILE"] == ""
    # --arch for a release that names none.
    archless = plan_build(config, ARCHLESS, PodmanRuntime(), arch=Arch.ARM64)
    assert archless.tag == f"demo-1.0:{ARCHLESS}-arm64" and "--platform" in archless.command


def test_the_digest_names_the_target_not_the_build_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = instance(tmp_path)
    real = os.uname()
    digests = {}
    for machine in ("x86_64", "aarch64"):
        monkeypatch.setattr(os, "uname", lambda machine=machine: os.uname_result((*real[:4], machine)))
        digests[machine] = (context_digest(config, ARM), context_digest(config, ARCHLESS, Arch.ARM64))
    assert digests["x86_64"] == digests["aarch64"]
    assert context_digest(config, ARCHLESS, Arch.ARM64) != context_digest(config, ARCHLESS, Arch.AMD64)


def test_the_build_refuses_modules_of_another_architecture(tmp_path: Path, fake: FakeRuntime, amd64_host: None) -> None:
    # An amd64 module (module_bytes makes EM_X86_64 objects) with the arm64 release's vermagic.
    fake.files({f"/lib/modules/{ARM}/extra/demo-mod.ko": module_bytes("demo-mod", f"{ARM} SMP mod_unload aarch64")})
    fake.install([(["build"], "STEP 1/1: FROM scratch\n", 0), (["images"], "", 0), (["image", "inspect"], "[]", 0)])
    tag = f"demo-1.0:{ARM}"
    plan = BuildPlan(instance(tmp_path), ARM, tag, {}, "build", "test", arch=Arch.ARM64)
    with pytest.raises(BuildError) as failed:
        execute_build(plan, PodmanRuntime())
    assert failed.value.details == (
        f"demo_mod (/lib/modules/{ARM}/extra/demo-mod.ko): built for amd64, not arm64 (ELF machine 62, not 183)"
    )
    assert "KVC_CROSS_COMPILE" in failed.value.hint
    assert ["rmi", f"{tag}-kvc-candidate"] in fake.calls()


# ---- registries ---------------------------------------------------------------------------------------------


def test_a_registry_image_of_another_architecture_is_refused(tmp_path: Path, amd64_host: None) -> None:
    values = {"KMOD_SOFTWARE_VERSION": "1.0", "KMOD_NAMES": "demo-mod", "KVC_REGISTRY": "reg.example/x"}
    config = InstanceConfig.from_values("demo", str(tmp_path / "demo.conf"), values)
    labels = {"name": "demo", "kvc.kernel": ARCHLESS, "kvc.version": "1.0"}

    def remote(labels: dict[str, str], architecture: str = "") -> RemoteImage:
        digest = "sha256:" + "1" * 64
        return RemoteImage(Reference.parse("reg.example/x:1"), digest, "", digest, labels, architecture=architecture)

    assert remote_problems(config, ARCHLESS, remote({**labels, LABEL_ARCH: "amd64"})) == []
    wrong = [f"it is an arm64 image, and kernel {ARCHLESS} here is amd64"]
    assert remote_problems(config, ARCHLESS, remote({**labels, LABEL_ARCH: "arm64"})) == wrong
    # An image from before the label: its config's architecture.
    assert remote_problems(config, ARCHLESS, remote(labels, "arm64")) == wrong
    assert remote_problems(config, ARCHLESS, remote(labels)) == []
    # A release that names its architecture: the same on any host.
    arm_labels = {**labels, "kvc.kernel": ARM, LABEL_ARCH: "arm64"}
    assert remote_problems(config, ARM, remote(arm_labels)) == []


# ---- loading -----------------------------------------------------------------------------------------------


def test_the_load_refuses_another_architectures_modules(tmp_path: Path) -> None:
    kernel = FakeKernel.create(HostPaths(str(tmp_path)), ARM)  # an amd64 kernel (EM_X86_64), whatever its name
    path = tmp_path / "demo_mod.ko"
    path.write_bytes(build_module(ModuleSpec("demo_mod", f"{ARM} SMP mod_unload aarch64", machine=183)))
    brief = (
        f"demo's modules are built for arm64 (ELF machine 183), but kernel {ARM} takes amd64 (ELF machine 62) modules"
    )
    with pytest.raises(LoadError) as refused:
        check_architecture("demo", ARM, {"demo_mod": ModuleFile.open(str(path))}, kernel)
    assert refused.value.brief == brief and "--arch" in refused.value.hint
    with pytest.raises(LoadError, match=re.escape(brief)):
        plan_load("demo", ARM, [str(path)], {}, kernel, None)
    assert kernel.loaded_modules() == []
    # Without the preflight (kvc verify wants the kernel's verdict) the kernel refuses it as Linux does.
    plan = plan_load("demo", ARM, [str(path)], {}, kernel, None, preflight=False)
    assert [step.name for step in plan.steps] == ["demo_mod"]
    fine = tmp_path / "fine.ko"
    fine.write_bytes(build_module(ModuleSpec("fine", f"{ARM} SMP mod_unload")))
    check_architecture("demo", ARM, {"fine": ModuleFile.open(str(fine))}, kernel)


# ---- with podman ----------------------------------------------------------------------------------------------


def elf_machine(path: Path) -> int:
    """e_machine of a little-endian ELF file."""
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", path
    return int(struct.unpack_from("<H", header, 18)[0])


@dataclass
class Built:
    root: Path
    name: str
    arm: str
    amd: str
    seconds: float

    def env(self) -> dict[str, str]:
        return {**os.environ, "KVC_ROOT": str(self.root), "PYTHONPATH": str(ROOT / "src")}

    def kvc(self, *args: str, fake_kernel: bool = False) -> subprocess.CompletedProcess[str]:
        env = self.env()
        if fake_kernel:
            env["KVC_KERNEL"] = "fake"
        return subprocess.run([sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=env)

    def podman(self, *args: str) -> str:
        return subprocess.run(["podman", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """simple-kmod built by kvc for Debian's current arm64 ABI (the amd64 ABI's number, arm64's
    flavour) on this amd64 host."""
    if os.uname().machine != "x86_64" or os.geteuid() != 0:
        pytest.skip("cross-builds for arm64 from an amd64 host, as root")
    for script in ("setup-podman.sh", "bootstrap-base-image.sh"):
        subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True, capture_output=True)
    amd = current_release()
    arm = re.sub(r"-amd64$", "-arm64", amd)
    root = tmp_path_factory.mktemp("cross")
    with unique_prefix("kvccross") as name:
        write_example_conf(root, name)
        build = Built(root, name, arm, amd, 0.0)
        start = time.monotonic()
        result = build.kvc("build", name, "--kernel", arm)
        build.seconds = time.monotonic() - start
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"built {name}-1.0.0:{arm} ("), result.stdout
        print(f"\nkvc build for {arm} (cross, from amd64): {build.seconds:.1f} s")
        yield build


@pytest.mark.podman
def test_the_arm64_image_holds_arm64_modules_and_programs(built: Built) -> None:
    tag = f"localhost/{built.name}-1.0.0:{built.arm}"
    info = json.loads(built.podman("image", "inspect", tag))[0]
    assert (info["Architecture"], info["Os"]) == ("arm64", "linux")
    assert info["Labels"][LABEL_ARCH] == "arm64" and info["Labels"]["kvc.kernel"] == built.arm
    mount = Path(built.podman("image", "mount", tag).strip())
    try:
        extra = mount / "lib" / "modules" / built.arm / "extra"
        for module in ("simple-kmod", "simple-procfs-kmod"):
            path = extra / f"{module}.ko"
            assert ModuleFile.open(str(path)).elf.machine == Arch.ARM64.elf_machine
            vermagic = subprocess.run(
                [sys.executable, "-m", "kvc", "kmod", "modinfo", "-F", "vermagic", str(path)],
                check=True,
                capture_output=True,
                text=True,
                env=built.env(),
            ).stdout.strip()
            assert vermagic.startswith(f"{built.arm} ") and vermagic.endswith(" aarch64"), vermagic
        # What kvc verify's smoke test runs in the arm64 guest: sh, grep, dmesg (busybox) and spkut.
        assert elf_machine(mount / "usr" / "local" / "bin" / "spkut") == 183
        assert elf_machine(mount / "bin" / "busybox") == 183
        for applet in ("sh", "grep", "dmesg"):
            assert os.readlink(mount / "bin" / applet) == "/bin/busybox"
        assert elf_machine(mount / "bin" / "kmod") == 183
        assert (mount / "lib" / "ld-linux-aarch64.so.1").exists()
        depmod = (mount / "lib" / "modules" / built.arm / "modules.dep").read_text()
        assert depmod.split() == ["extra/simple-kmod.ko:", "extra/simple-procfs-kmod.ko:"]
    finally:
        built.podman("image", "unmount", tag)


@pytest.mark.podman
def test_status_shows_the_architectures_apart(built: Built) -> None:
    result = built.kvc("build", built.name, "--kernel", built.amd)
    assert result.returncode == 0, result.stderr
    status = built.kvc("status", built.name, "--kernel", built.arm, "--kernel", built.amd, "--json")
    assert status.returncode == 0, status.stderr
    entries = {entry["kernel"]: entry for entry in json.loads(status.stdout)["instances"][0]["kernels"]}
    assert {kernel: entry["arch"] for kernel, entry in entries.items()} == {built.arm: "arm64", built.amd: "amd64"}
    assert all(entry["image"]["exists"] and entry["image"]["up_to_date"] for entry in entries.values())
    assert entries[built.arm]["image"]["id"] != entries[built.amd]["image"]["id"]
    text = built.kvc("status", built.name, "--kernel", built.arm).stdout
    assert f"kernel {built.arm} (arm64): image {built.name}-1.0.0:{built.arm} up to date" in text
    # Up to date: the second build of each is a single image inspect.
    again = built.kvc("build", built.name, "--kernel", built.arm)
    assert again.stdout.strip() == f"{built.name}-1.0.0:{built.arm} is up to date"


@pytest.mark.podman
def test_an_amd64_kernel_refuses_the_arm64_image_with_one_line(built: Built) -> None:
    # The fake kernel takes amd64 modules; named with the arm64 release, the load finds the arm64 image.
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_example_conf(root, built.name)
        FakeKernel.create(HostPaths(str(root)), built.arm)
        host = Built(root, built.name, built.arm, built.amd, 0.0)
        result = host.kvc("load", built.name, fake_kernel=True)
        assert result.returncode != 0
        lines = result.stderr.splitlines()
        assert lines[0] == (
            f"kvc: error: {built.name}'s modules are built for arm64 (ELF machine 183), but kernel {built.arm} "
            "takes amd64 (ELF machine 62) modules"
        ), result.stderr
        assert FakeKernel(HostPaths(str(root))).loaded_modules() == []
        assert "Invalid architecture" not in "\n".join(FakeKernel(HostPaths(str(root))).dmesg())


def test_build_dry_run_with_arch(tmp_path: Path, fake: FakeRuntime) -> None:
    fake.install([fakeprog.Rule(["image", "inspect"], "", 125, "Error: image not known\n")])
    root = tmp_path / "root"
    write_example_conf(root, "demo")
    env = {**os.environ, "KVC_ROOT": str(root), "PYTHONPATH": str(ROOT / "src")}

    def kvc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=env)

    dry = kvc("build", "demo", "--kernel", ARCHLESS, "--arch", "aarch64", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"demo-1.0.0:{ARCHLESS}-arm64: build (no image yet)\n")
    assert "KVC_ARCH=arm64" in dry.stdout
    assert ("--platform linux/arm64" in dry.stdout) == (os.uname().machine != "aarch64")
    contradiction = kvc("build", "demo", "--kernel", ARM, "--arch", "amd64", "--dry-run")
    assert contradiction.returncode == 2
    assert f"--arch amd64 contradicts kernel {ARM}, which is an arm64 kernel" in contradiction.stderr


def test_pruning_keeps_the_newest_kernels_of_each_architecture(tmp_path: Path) -> None:
    config = dataclasses.replace(instance(tmp_path), keep_kernels=2)

    def image(index: int, release: str, arch: Arch) -> ImageInfo:
        labels = {"name": "demo", "kvc.version": "1.0", "kvc.kernel": release, LABEL_ARCH: arch.value}
        created = f"2026-11-{10 + index}T00:00:00Z"
        return ImageInfo(f"{index:064x}", (f"localhost/{image_tag(config, release, arch)}",), labels, created)

    images = [image(i, f"6.1.0-{i}-{arch.value}", arch) for i in range(3) for arch in Arch]
    images += [image(5, f"{ARCHLESS}", Arch.ARM64), image(6, f"{ARCHLESS}", Arch.AMD64)]
    assert images[-2].names == (f"localhost/demo-1.0:{ARCHLESS}-arm64",)
    keep, steps = prune_plan(images, config)
    kept = sorted(name for info in keep for name in info.names)
    assert kept == sorted(
        [
            f"localhost/demo-1.0:{ARCHLESS}",
            f"localhost/demo-1.0:{ARCHLESS}-arm64",
            "localhost/demo-1.0:6.1.0-2-amd64",
            "localhost/demo-1.0:6.1.0-2-arm64",
        ]
    )
    assert sorted(name for step in steps for name in step.names) == [
        f"localhost/demo-1.0:6.1.0-{i}-{arch.value}" for i in range(2) for arch in Arch
    ]
