"""Runtime adapters and the build flow against a recording fake podman: argv shapes, verification
that refuses an image with the wrong modules (leaving no tag), failure causes and pruning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import pytest

from kvc.build import BuildPlan, classify_failure, execute_build, plan_build, prune_images
from kvc.config import GlobalConfig, InstanceConfig
from kvc.errors import BuildError
from kvc.runtime import BuildahRuntime, DockerRuntime, PodmanRuntime, runtime_for
from support import fakeprog
from support.elfbuild import ElfSpec, SymbolSpec, build, modinfo_section, this_module_section

KVER = "6.1.0-56-amd64"


def instance(tmp_path: Path, keep: int = 3) -> InstanceConfig:
    context = tmp_path / "ctx"
    context.mkdir(exist_ok=True)
    (context / "Containerfile").write_text("FROM scratch\n")
    return InstanceConfig.from_values("demo", str(tmp_path / "demo.conf"), {
        "KMOD_CONTAINER_BUILD_CONTEXT": str(context), "KMOD_SOFTWARE_VERSION": "1.0",
        "KMOD_NAMES": "demo-mod", "KVC_KEEP_KERNELS": str(keep)})


def module_bytes(vermagic: str) -> bytes:
    spec = ElfSpec(symbols=[SymbolSpec("_printk")])
    spec.add(".modinfo", modinfo_section([("vermagic", vermagic), ("license", "GPL")]))
    spec.add(".gnu.linkonce.this_module", this_module_section("demo_mod"))
    return build(spec)


def inspect_json(tag: str, labels: Mapping[str, str], created: str = "2026-11-24T10:00:00Z") -> str:
    return json.dumps([{"Id": "sha256:" + "ab" * 32, "RepoTags": [tag], "Labels": dict(labels), "Created": created}])


@pytest.fixture
def podman(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATH", fakeprog.path_with(tmp_path / "bin"))
    return tmp_path / "calls.jsonl"


def test_run_argv_has_no_tty_without_a_terminal_and_keeps_global_args(tmp_path: Path, podman: Path) -> None:
    fakeprog.install(tmp_path / "bin", "podman", podman, default_code=7)
    runtime = runtime_for(GlobalConfig("podman", ("--log-level=error",)))
    assert isinstance(runtime, PodmanRuntime)
    assert runtime.run("img:1", ["spkut", "44"], privileged=True, host_network=True) == 7
    assert fakeprog.calls(podman) == [["--log-level=error", "run", "--rm", "-i", "--privileged", "--network=host",
                                       "img:1", "spkut", "44"]]


def test_docker_and_buildah_build_argv(tmp_path: Path, podman: Path) -> None:
    for program in ("docker", "buildah"):
        fakeprog.install(tmp_path / "bin", program, podman)
    labels = {"name": "demo"}
    DockerRuntime().build("/ctx", "/ctx/Containerfile", "demo-1:K", {"KVER": "K"}, labels)
    BuildahRuntime().build("/ctx", "/ctx/Containerfile", "demo-1:K", {"KVER": "K"}, labels)
    assert fakeprog.calls(podman) == [
        ["build", "-t", "demo-1:K", "--file", "/ctx/Containerfile", "--label=name=demo", "--build-arg", "KVER=K",
         "/ctx"],
        ["bud", "-t", "demo-1:K", "-f", "/ctx/Containerfile", "--label=name=demo", "--build-arg", "KVER=K", "/ctx"],
    ]
    assert isinstance(runtime_for(GlobalConfig("buildah")), BuildahRuntime)


def fake_image(tmp_path: Path, podman: Path, vermagic: str, *, inspect: str = "") -> None:
    mount = tmp_path / "mnt"
    (mount / "lib" / "modules" / KVER / "extra").mkdir(parents=True, exist_ok=True)
    (mount / "lib" / "modules" / KVER / "extra" / "demo-mod.ko").write_bytes(module_bytes(vermagic))
    fakeprog.install(tmp_path / "bin", "podman", podman, rules=[
        (["image", "inspect"], inspect, 0 if inspect else 1),
        (["image", "mount"], f"{mount}\n", 0),
        (["run", "--rm", "--network=none", "--entrypoint", "find"], f"/lib/modules/{KVER}/extra/demo-mod.ko\n", 0),
    ])


def test_a_build_with_modules_for_another_kernel_leaves_no_tag(tmp_path: Path, podman: Path) -> None:
    fake_image(tmp_path, podman, "5.10.0-9-amd64 SMP mod_unload ")
    runtime = PodmanRuntime()
    plan = plan_build(instance(tmp_path), KVER, runtime)
    assert plan.action == "build" and plan.reason == "no image yet"
    with pytest.raises(BuildError) as failed:
        execute_build(plan, runtime)
    assert "not built for kernel 6.1.0-56-amd64" in failed.value.brief
    assert "5.10.0-9-amd64" in failed.value.details
    calls = fakeprog.calls(podman)
    assert not [c for c in calls if c[0] == "tag"]
    assert ["rmi", f"demo-1.0:{KVER}-kvc-candidate"] in calls


def test_a_good_build_is_tagged_and_then_up_to_date(tmp_path: Path, podman: Path) -> None:
    fake_image(tmp_path, podman, f"{KVER} SMP preempt mod_unload modversions ")
    runtime = PodmanRuntime()
    plan = plan_build(instance(tmp_path), KVER, runtime)
    assert execute_build(plan, runtime) == f"built demo-1.0:{KVER}"
    assert ["tag", f"demo-1.0:{KVER}-kvc-candidate", f"demo-1.0:{KVER}"] in fakeprog.calls(podman)
    fake_image(tmp_path, podman, f"{KVER} SMP", inspect=inspect_json(f"localhost/demo-1.0:{KVER}", plan.labels))
    again = plan_build(instance(tmp_path), KVER, runtime)
    assert again.action == "up-to-date"
    config = instance(tmp_path)
    (tmp_path / "ctx" / "Containerfile").write_text("FROM scratch\nRUN true\n")
    assert plan_build(config, KVER, runtime).reason == "build context, version or args changed"


def test_failure_causes() -> None:
    headers = "E: Unable to locate package linux-headers-6.1.0-99-amd64\n"
    assert "no kernel headers for 6.1.0-99-amd64" in classify_failure(headers, "6.1.0-99-amd64")[0]
    assert "network" in classify_failure("W: Failed to fetch http://deb.debian.org/x", KVER)[0]
    assert "compile" in classify_failure("simple.c:3:1: error: expected ';'", KVER)[0]


def test_prune_keeps_the_newest_kernels(tmp_path: Path, podman: Path) -> None:
    images = [{"Id": f"id{i}", "RepoTags": [f"localhost/demo-1.0:6.1.0-{i}-amd64"],
               "Labels": {"name": "demo", "kvc.kernel": f"6.1.0-{i}-amd64"}, "Created": f"2026-11-{10 + i}"}
              for i in range(5)]
    fakeprog.install(tmp_path / "bin", "podman", podman, rules=[
        (["images"], "".join(f"id{i}\n" for i in range(5)), 0),
        (["image", "inspect"], json.dumps(images), 0),
    ])
    removed = prune_images(PodmanRuntime(), instance(tmp_path, keep=3), keep_tag="demo-1.0:6.1.0-0-amd64")
    assert sorted(removed) == ["localhost/demo-1.0:6.1.0-1-amd64"]
    assert ["rmi", "-f", "id1"] in fakeprog.calls(podman)


def test_describe_plans() -> None:
    plan = BuildPlan(InstanceConfig("d", "s", "/c", "Containerfile", "1", ("m",)), KVER, "d-1:K", {}, "pull",
                     "prebuilt image configured", "registry.example/d:K")
    assert plan.describe() == "d-1:K: pull registry.example/d:K (prebuilt image configured)"
