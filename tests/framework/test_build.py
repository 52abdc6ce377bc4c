"""Build planning and execution against a recording fake podman (names, the context digest,
up-to-date detection that starts no container, verification that refuses an image and removes it,
failure causes, pruning), and for real with podman: a FROM-scratch image holding real Debian
modules is built, verified, extracted, found up to date, and refused for the wrong kernel."""

from __future__ import annotations

import dataclasses
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Mapping, Optional

import pytest

from kvc.build import BuildPlan, classify_failure, context_digest, execute_build, plan_build
from kvc.config import InstanceConfig
from kvc.errors import BuildError
from kvc.extract import extract, read_manifest
from kvc.images import (
    LABEL_DIGEST,
    LABEL_VERSION,
    candidate_tag,
    image_labels,
    image_tag,
    kernel_tag,
    kvc_names,
    prebuilt_ref,
    prune_images,
    prune_plan,
    repository_name,
)
from kvc.kmod.paths import HostPaths
from kvc.layout import Layout
from kvc.runtime import ImageInfo, PodmanRuntime, same_image_name
from support import fakeprog
from support.debian_kernel import DebianKernel
from support.fakeruntime import KVER, FakeRuntime, fake, inspect_entry, module_bytes

__all__ = ["fake"]  # the fixture, imported for these tests

ROOT = Path(__file__).resolve().parents[2]
TAG = f"demo-1.0:{KVER}"
CANDIDATE = f"demo-1.0:{KVER}-kvc-candidate"


def instance(tmp_path: Path, *, keep: int = 3, modules: str = "demo-mod", **extra: str) -> InstanceConfig:
    context = tmp_path / "ctx"
    if not context.exists():
        context.mkdir()
        (context / "Containerfile").write_text("FROM scratch\n")
        (context / "src").mkdir()
        (context / "src" / "demo-mod.c").write_text("int x;\n")
    values = {
        "KMOD_CONTAINER_BUILD_CONTEXT": str(context),
        "KMOD_SOFTWARE_VERSION": "1.0",
        "KMOD_NAMES": modules,
        "KVC_KEEP_KERNELS": str(keep),
        **extra,
    }
    return InstanceConfig.from_values("demo", str(tmp_path / "demo.conf"), values)


def good_image(fake: FakeRuntime, vermagic: str = f"{KVER} SMP preempt mod_unload modversions ") -> None:
    fake.files({f"/lib/modules/{KVER}/extra/demo-mod.ko": module_bytes("demo-mod", vermagic)})


# ---- names ----------------------------------------------------------------------------------------------


def test_image_names_follow_kvc() -> None:
    config = InstanceConfig("simple-kmod", "s", "/c", "Containerfile", "dd1a7d4", ("simple-kmod",))
    assert image_tag(config, "5.3.7-301.fc31.x86_64") == "simple-kmod-dd1a7d4:5.3.7-301.fc31.x86_64"
    assert candidate_tag(config, KVER) == f"simple-kmod-dd1a7d4:{KVER}-kvc-candidate"
    # A tag cannot hold '+' (Debian backports) and a repository is lowercase; the label keeps the release.
    upper = InstanceConfig("Demo", "s", "/c", "Containerfile", "V1", ("m",))
    assert image_tag(upper, "6.12.9+bpo-amd64") == "demo-v1:6.12.9_bpo-amd64"
    assert len(kernel_tag("9" * 200, "-kvc-candidate")) == 128


# The reference grammar of the distribution spec (what podman and docker parse), written out
# here independently of kvc's mapping: path components joined by "/", a tag of 1-128 characters.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REFERENCE = re.compile(rf"(?P<name>{_COMPONENT}(?:/{_COMPONENT})*):(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})")

VERSIONS = [
    ("0.0+git20231103", "demo-0.0_git20231103"),
    ("1.2~rc1", "demo-1.2-rc1"),
    ("2.0~rc1+dfsg-3", "demo-2.0-rc1_dfsg-3"),
    ("V1", "demo-v1"),
    ("1.0+", "demo-1.0"),
    ("1.0+.1", "demo-1.0-1"),
    ("1..2___3", "demo-1-2-3"),
    ("_1", "demo-1"),
    ("a/b:c@d%e=f,g#h", "demo-a_b_c_d_e_f_g_h"),
]
KERNELS = [
    ("6.1.0-57-amd64", "6.1.0-57-amd64"),
    ("6.12.0+rpt-rpi-v8", "6.12.0_rpt-rpi-v8"),
    ("6.12.9+bpo-amd64", "6.12.9_bpo-amd64"),
    ("5.15.0-1034-raspi", "5.15.0-1034-raspi"),
    ("6.8.0~rc3", "6.8.0-rc3"),
    ("5.14.0-427.13.1.el9_4.x86_64", "5.14.0-427.13.1.el9_4.x86_64"),
]


@pytest.mark.parametrize(("version", "repository"), VERSIONS)
@pytest.mark.parametrize(("kernel", "tag"), KERNELS)
def test_any_version_and_kernel_give_a_valid_reference(version: str, repository: str, kernel: str, tag: str) -> None:
    config = InstanceConfig("demo", "s", "/c", "Containerfile", version, ("m",))
    for ref, wanted_tag in ((image_tag(config, kernel), tag), (candidate_tag(config, kernel), tag + "-kvc-candidate")):
        match = REFERENCE.fullmatch(ref)
        assert match, ref
        assert (match["name"], match["tag"]) == (repository, wanted_tag)
        assert len("localhost/" + match["name"]) <= 255
    assert image_labels(config, kernel, "d")[LABEL_VERSION] == version


def test_long_versions_stay_valid_and_apart() -> None:
    long_a, long_b = "1." + "9" * 300 + "a", "1." + "9" * 300 + "b"
    first, second = repository_name("demo", long_a), repository_name("demo", long_b)
    assert first != second
    for name in (first, second):
        assert len(name) == 245 and REFERENCE.fullmatch(f"{name}:1")
    assert repository_name("demo", long_a) == first
    assert REFERENCE.fullmatch(f"{repository_name('demo', '1.' + '_.' * 200)}:1")


def test_the_build_command_carries_the_mapped_tag_and_the_exact_version(tmp_path: Path, fake: FakeRuntime) -> None:
    fake.install([NOT_KNOWN])
    plan = plan_build(instance(tmp_path, KMOD_SOFTWARE_VERSION="0.0+git20231103"), "6.12.0+rpt-rpi-v8", PodmanRuntime())
    assert plan.tag == "demo-0.0_git20231103:6.12.0_rpt-rpi-v8"
    assert plan.command[plan.command.index("-t") + 1] == "demo-0.0_git20231103:6.12.0_rpt-rpi-v8-kvc-candidate"
    assert "--label=kvc.version=0.0+git20231103" in plan.command
    assert "--label=kvc.kernel=6.12.0+rpt-rpi-v8" in plan.command
    assert "KMODVER=0.0+git20231103" in plan.command


def test_prebuilt_references() -> None:
    assert prebuilt_ref("registry.example.com/org/kmod", KVER) == f"registry.example.com/org/kmod:{KVER}"
    assert prebuilt_ref("localhost:5000/kmod", KVER) == f"localhost:5000/kmod:{KVER}"
    assert prebuilt_ref("registry.example.com/org/kmod:1.0", KVER) == f"registry.example.com/org/kmod:1.0-{KVER}"
    assert prebuilt_ref("reg/kmod:{kver}-v2", KVER) == f"reg/kmod:{KVER}-v2"
    pinned = "reg/kmod@sha256:" + "0" * 64
    assert prebuilt_ref(pinned, KVER) == pinned


# ---- the context digest --------------------------------------------------------------------------------------


def test_the_digest_covers_files_modes_version_args_and_kernel(tmp_path: Path) -> None:
    config = instance(tmp_path)
    source = tmp_path / "ctx" / "src" / "demo-mod.c"
    first = context_digest(config, KVER)
    assert context_digest(config, KVER) == first
    os.utime(source, (1, 1))  # times do not count
    assert context_digest(config, KVER) == first
    assert context_digest(config, "6.1.0-57-amd64") != first
    assert context_digest(instance(tmp_path, KMOD_SOFTWARE_VERSION="1.1"), KVER) != first
    assert context_digest(instance(tmp_path, KVC_BUILD_ARGS="X=1"), KVER) != first
    assert context_digest(instance(tmp_path, KMOD_CONTAINER_BUILD_FILE="Other"), KVER) != first
    changes = []
    source.write_text("int y;\n")
    changes.append(context_digest(config, KVER))
    source.chmod(0o600)
    changes.append(context_digest(config, KVER))
    (tmp_path / "ctx" / "src" / "new.h").write_text("")
    changes.append(context_digest(config, KVER))
    (tmp_path / "ctx" / "src" / "new.h").rename(tmp_path / "ctx" / "src" / "renamed.h")
    changes.append(context_digest(config, KVER))
    (tmp_path / "ctx" / "link").symlink_to("src")
    changes.append(context_digest(config, KVER))
    assert len({first, *changes}) == 6
    # .git is left out.
    (tmp_path / "ctx" / ".git").mkdir()
    (tmp_path / "ctx" / ".git" / "HEAD").write_text("ref: x\n")
    assert context_digest(config, KVER) == changes[-1]


def test_a_build_file_outside_the_context_counts(tmp_path: Path) -> None:
    outside = tmp_path / "Containerfile.demo"
    outside.write_text("FROM scratch\n")
    config = instance(tmp_path, KMOD_CONTAINER_BUILD_FILE=str(outside))
    first = context_digest(config, KVER)
    outside.write_text("FROM scratch\nRUN true\n")
    assert context_digest(config, KVER) != first


def test_a_url_context_counts_by_its_url_only(tmp_path: Path, fake: FakeRuntime) -> None:
    url = "git://github.com/kmods-via-containers/kvc-simple-kmod.git"
    config = instance(tmp_path, KMOD_CONTAINER_BUILD_CONTEXT=url, KMOD_CONTAINER_BUILD_FILE="Dockerfile.fedora")
    assert context_digest(config, KVER) != context_digest(
        instance(tmp_path, KMOD_CONTAINER_BUILD_CONTEXT=url + "#main", KMOD_CONTAINER_BUILD_FILE="Dockerfile.fedora"),
        KVER,
    )
    fake.install([fakeprog.Rule(["image", "inspect"], "", 125, "Error: image not known\n")])
    plan = plan_build(config, KVER, PodmanRuntime())
    assert plan.command[-1] == url and plan.command[plan.command.index("--file") + 1] == "Dockerfile.fedora"
    assert "its digest covers the URL string only" in plan.describe()


# ---- planning ----------------------------------------------------------------------------------------------


def inspect_rule(tag: str, labels: Mapping[str, str], image_id: str = "ab" * 32) -> fakeprog.RuleSpec:
    return (["image", "inspect", tag], json.dumps([inspect_entry(image_id, [f"localhost/{tag}"], labels)]), 0)


NOT_KNOWN = fakeprog.Rule(["image", "inspect"], "", 125, "Error: image not known\n")


def test_plan_without_an_image_builds(tmp_path: Path, fake: FakeRuntime) -> None:
    fake.install([NOT_KNOWN])
    config = instance(tmp_path, KVC_BUILD_ARGS="EXTRA=1 KVER=ignored")
    plan = plan_build(config, KVER, PodmanRuntime())
    assert (plan.action, plan.reason, plan.tag) == ("build", "no image yet", TAG)
    assert plan.labels == {
        "name": "demo",
        "kvc.kernel": KVER,
        "kvc.version": "1.0",
        "kvc.modules": "demo-mod",
        "kvc.digest": context_digest(config, KVER),
        "kvc.arch": "amd64",
    }
    context = str(tmp_path / "ctx")
    assert list(plan.command) == [
        "podman",
        "build",
        "-t",
        CANDIDATE,
        "--file",
        f"{context}/Containerfile",
        "--label=name=demo",
        f"--label=kvc.kernel={KVER}",
        "--label=kvc.version=1.0",
        "--label=kvc.modules=demo-mod",
        f"--label=kvc.digest={plan.digest}",
        "--label=kvc.arch=amd64",
        "--build-arg",
        f"KVER={KVER}",
        "--build-arg",
        "KMODVER=1.0",
        "--build-arg",
        "KVC_ARCH=amd64",
        "--build-arg",
        "KVC_KERNEL_ARCH=x86",
        "--build-arg",
        "TARGETARCH=amd64",
        "--build-arg",
        "TARGETPLATFORM=linux/amd64",
        "--build-arg",
        "EXTRA=1",
        "--build-arg",
        "KVC_CROSS_COMPILE=",
        "--build-arg",
        "BUILDARCH=amd64",
        "--build-arg",
        "BUILDPLATFORM=linux/amd64",
        context,
    ]
    described = plan.describe().splitlines()
    assert described[0] == f"{TAG}: build (no image yet)"
    assert f"verify demo_mod under /lib/modules/{KVER} (vermagic {KVER}), then tag {TAG}" in described[2]
    assert fake.calls() == [["image", "inspect", TAG]]


def test_up_to_date_is_one_inspect_and_fast(tmp_path: Path, fake: FakeRuntime) -> None:
    config = instance(tmp_path)
    fake.install([inspect_rule(TAG, {LABEL_DIGEST: context_digest(config, KVER)})])
    started = time.monotonic()
    plan = plan_build(config, KVER, PodmanRuntime())
    summary = execute_build(plan, PodmanRuntime())
    elapsed = time.monotonic() - started
    assert plan.action == "up-to-date" and summary == f"{TAG} is up to date"
    assert plan.describe() == f"{TAG}: up to date (image matches the build context)"
    assert fake.calls() == [["image", "inspect", TAG]]
    assert elapsed < 1.0, elapsed


def test_plan_reasons(tmp_path: Path, fake: FakeRuntime) -> None:
    config = instance(tmp_path)
    fake.install([inspect_rule(TAG, {"name": "demo"})])
    assert plan_build(config, KVER, PodmanRuntime()).reason == "the image has no kvc.digest label (built outside kvc)"
    fake.install([inspect_rule(TAG, {LABEL_DIGEST: "0" * 64})])
    assert plan_build(config, KVER, PodmanRuntime()).reason == "build context, version or args changed"
    fake.install([inspect_rule(TAG, {LABEL_DIGEST: context_digest(config, KVER)})])
    forced = plan_build(config, KVER, PodmanRuntime(), force=True, pull="never", no_cache=True)
    assert (forced.action, forced.reason) == ("build", "--force")
    assert "--pull=never" in forced.command and "--no-cache" in forced.command
    assert forced.existing_id == "ab" * 32


def test_plan_for_a_prebuilt_image(tmp_path: Path, fake: FakeRuntime) -> None:
    config = instance(tmp_path, KVC_IMAGE="registry.example.com/org/demo")
    source = f"registry.example.com/org/demo:{KVER}"
    fake.install([NOT_KNOWN])
    plan = plan_build(config, KVER, PodmanRuntime())
    assert (plan.action, plan.source, plan.reason) == ("pull", source, "no image yet")
    assert plan.describe().splitlines() == [
        f"{TAG}: pull {source} (no image yet)",
        f"  tag {source} as {CANDIDATE}",
        f"  verify demo_mod under /lib/modules/{KVER} (vermagic {KVER}), then tag {TAG}",
    ]
    fake.install([inspect_rule(TAG, {}), inspect_rule(source, {})])
    assert plan_build(config, KVER, PodmanRuntime()).action == "up-to-date"
    fake.install([inspect_rule(TAG, {}), inspect_rule(source, {}, image_id="cd" * 32)])
    changed = plan_build(config, KVER, PodmanRuntime())
    assert (changed.action, changed.reason) == ("pull", f"{source} is a different image now")
    assert plan_build(config, KVER, PodmanRuntime(), force=True).reason == "--force"


# ---- execution ---------------------------------------------------------------------------------------------


def build_rules(listing: str = "", inspect: str = "[]") -> list[fakeprog.RuleSpec]:
    return [(["build"], "STEP 1/1: FROM scratch\n", 0), (["images"], listing, 0), (["image", "inspect"], inspect, 0)]


def test_a_good_build_is_verified_tagged_and_its_candidate_removed(tmp_path: Path, fake: FakeRuntime) -> None:
    good_image(fake)
    fake.install([NOT_KNOWN])
    config = instance(tmp_path)
    plan = plan_build(config, KVER, PodmanRuntime())
    fake.clear()
    fake.install(build_rules())
    assert execute_build(plan, PodmanRuntime()) == f"built {TAG} (demo_mod verified for {KVER})"
    calls = fake.calls()
    assert calls[0] == list(plan.command[1:])
    assert calls[1:] == [
        ["image", "mount", CANDIDATE],
        ["image", "unmount", CANDIDATE],
        ["image", "inspect", TAG],
        ["tag", CANDIDATE, TAG],
        ["rmi", CANDIDATE],
        ["images", "-q", "--no-trunc", "--filter", "label=name=demo"],
    ]
    assert not [c for c in calls if c[0] in ("run", "create")]


OLD_ID = "0e" * 32


@pytest.mark.parametrize(
    ("names_after", "removed"),
    [
        ([], True),  # the tag moved to the new image: the old one goes
        (["registry.example.com/me/mine:1"], False),  # someone else's name keeps it
        ([f"localhost/{TAG}"], False),  # every step cached: the same image, still tagged
    ],
)
def test_the_image_the_tag_named_before(
    tmp_path: Path, fake: FakeRuntime, names_after: list[str], removed: bool
) -> None:
    good_image(fake)
    before = inspect_entry(OLD_ID, sorted({f"localhost/{TAG}", *names_after}), {"name": "demo"})
    after = inspect_entry(OLD_ID, names_after, {"name": "demo"})
    fake.install(
        [
            (["build"], "", 0),
            (["images"], "", 0),
            (["image", "inspect", TAG], json.dumps([before]), 0),
            (["image", "inspect", OLD_ID], json.dumps([after]), 0),
        ]
    )
    plan = BuildPlan(instance(tmp_path), KVER, TAG, {}, "build", "test")
    summary = execute_build(plan, PodmanRuntime())
    assert summary.endswith("; removed 1 old image(s)") == removed
    assert (["rmi", OLD_ID] in fake.calls()) == removed
    tag_call = fake.calls().index(["tag", CANDIDATE, TAG])
    assert fake.calls()[tag_call - 1] == ["image", "inspect", TAG]


def test_a_module_for_another_kernel_fails_and_the_candidate_goes(tmp_path: Path, fake: FakeRuntime) -> None:
    good_image(fake, vermagic="5.10.0-9-amd64 SMP mod_unload ")
    fake.install(build_rules())
    plan = BuildPlan(instance(tmp_path), KVER, TAG, {}, "build", "test")
    with pytest.raises(BuildError) as failed:
        execute_build(plan, PodmanRuntime())
    assert failed.value.brief == f"image {CANDIDATE} has modules that are not built for kernel {KVER}"
    assert failed.value.details == (
        f"demo_mod (/lib/modules/{KVER}/extra/demo-mod.ko): vermagic "
        f"'5.10.0-9-amd64 SMP mod_unload' names kernel 5.10.0-9-amd64, not {KVER}"
    )
    assert "KVER" in failed.value.hint
    calls = fake.calls()
    assert ["rmi", CANDIDATE] in calls
    assert not [c for c in calls if c[0] == "tag"]
    assert not [c for c in calls if c[0] == "images"]  # no pruning after a failure


def test_a_missing_module_is_named_with_what_was_found(tmp_path: Path, fake: FakeRuntime) -> None:
    fake.files(
        {
            f"/lib/modules/{KVER}/extra/other.ko": module_bytes("other", KVER),
            "/lib/modules/5.10.0-9-amd64/extra/demo_mod.ko": module_bytes("demo_mod", "5.10.0-9-amd64"),
        }
    )
    fake.install(build_rules())
    plan = BuildPlan(instance(tmp_path), KVER, TAG, {}, "build", "test")
    with pytest.raises(BuildError) as failed:
        execute_build(plan, PodmanRuntime())
    assert failed.value.brief == f"image {CANDIDATE} lacks module(s) demo-mod for kernel {KVER}"
    assert failed.value.details.splitlines() == [
        f"missing: demo-mod (no demo_mod.ko[.xz|.zst|.gz] below /lib/modules/{KVER})",
        f"module files below /lib/modules/{KVER}: extra/other.ko",
        "found for another kernel: /lib/modules/5.10.0-9-amd64/extra/demo_mod.ko",
    ]
    assert ["rmi", CANDIDATE] in fake.calls()
    assert not [c for c in fake.calls() if c[0] == "tag"]


def test_modules_in_any_subdirectory_compressed_with_either_spelling(tmp_path: Path, fake: FakeRuntime) -> None:
    xz = lzma.compress(module_bytes("b_mod", KVER + " SMP"), check=lzma.CHECK_CRC32)
    fake.files(
        {
            f"/lib/modules/{KVER}/updates/dkms/a_mod.ko": module_bytes("a_mod", KVER + " SMP"),
            f"/lib/modules/{KVER}/kernel/drivers/b-mod.ko.xz": xz,
            # the copy in updates/ wins over extra/, as with depmod
            f"/lib/modules/{KVER}/extra/a-mod.ko": module_bytes("a_mod", "1.0.0 SMP"),
        }
    )
    fake.install(build_rules())
    plan = BuildPlan(instance(tmp_path, modules="a-mod b_mod"), KVER, TAG, {}, "build", "test")
    assert execute_build(plan, PodmanRuntime()).startswith(f"built {TAG} (a_mod, b_mod verified")


@pytest.mark.parametrize(
    ("output", "brief", "hint"),
    [
        (
            "Get:1 http://mirror.example bookworm InRelease\nE: Unable to locate package linux-headers-6.1.0-56-amd64\n"
            'Error: building at STEP "RUN apt-get install": exit status 100\n',
            "no kernel headers for 6.1.0-56-amd64 in the build image's package sources "
            "(E: Unable to locate package linux-headers-6.1.0-56-amd64)",
            "another suite",
        ),
        (
            "W: Failed to fetch http://mirror.example/debian/dists/bookworm/InRelease  Temporary failure resolving "
            "'mirror.example'\nE: Unable to locate package linux-headers-6.1.0-56-amd64\n",
            "the build could not reach the network, so the package lists are incomplete (W: Failed to fetch "
            "http://mirror.example/debian/dists/bookworm/InRelease  Temporary failure resolving 'mirror.example')",
            "proxy",
        ),
        (
            "  CC [M]  /build/simple-kmod.c\n/build/simple-kmod.c:12:5: error: implicit declaration of function 'x'\n"
            "make[2]: *** [scripts/Makefile.build:250: /build/simple-kmod.o] Error 1\n",
            "the module source failed to compile: "
            "/build/simple-kmod.c:12:5: error: implicit declaration of function 'x'",
            "kernel's API",
        ),
        (
            'ERROR: modpost: "foo" [/build/simple-kmod.ko] undefined!\n',
            'the module failed to link (modpost): ERROR: modpost: "foo" [/build/simple-kmod.ko] undefined!',
            "exported",
        ),
        (
            "make: *** /lib/modules/6.1.0-56-amd64/build: No such file or directory.  Stop.\n",
            "no kernel headers for 6.1.0-56-amd64 in the build image's package sources "
            "(/lib/modules/6.1.0-56-amd64/build is missing)",
            "another suite",
        ),
        (
            "Error: creating build container: initializing source docker://fedora:30: pinging container registry "
            "registry.example.org: dial tcp: lookup registry.example.org: no such host\n",
            "the build could not reach the network (Error: creating build container: initializing source docker://fedora:30:"
            " pinging container registry registry.example.org: dial tcp: lookup",
            "DNS",
        ),
        ("something odd\n", "the image build failed", "build output"),
    ],
)
def test_build_failures_name_their_cause(tmp_path: Path, fake: FakeRuntime, output: str, brief: str, hint: str) -> None:
    fake.install([(["build"], output, 1)])
    plan = BuildPlan(instance(tmp_path), KVER, TAG, {}, "build", "test")
    with pytest.raises(BuildError) as failed:
        execute_build(plan, PodmanRuntime())
    assert failed.value.brief.startswith(f"{TAG}: {brief}")
    assert failed.value.details == output.rstrip("\n")
    assert hint in failed.value.hint
    assert fake.calls()[-1] == ["rmi", CANDIDATE]


def test_failure_causes_prefer_the_compiler_over_a_stray_warning() -> None:
    output = "W: Failed to fetch http://x Temporary failure resolving 'x'\nx.c:1:1: error: expected ';'\n"
    assert classify_failure(output, KVER)[0] == "the module source failed to compile: x.c:1:1: error: expected ';'"


def test_pulling_a_prebuilt_image_verifies_it(tmp_path: Path, fake: FakeRuntime) -> None:
    good_image(fake)
    pulled_id = "ab" * 32
    fake.install([(["pull"], f"Writing manifest to image destination\n{pulled_id}\n", 0), *build_rules()])
    config = instance(tmp_path, KVC_IMAGE="registry.example.com/org/demo")
    plan = BuildPlan(config, KVER, TAG, {}, "pull", "no image yet", f"registry.example.com/org/demo:{KVER}")
    assert execute_build(plan, PodmanRuntime()) == f"pulled {TAG} (demo_mod verified for {KVER})"
    assert fake.calls()[:4] == [
        ["pull", f"registry.example.com/org/demo:{KVER}"],
        ["image", "inspect", pulled_id],
        ["tag", pulled_id, CANDIDATE],
        ["image", "mount", CANDIDATE],
    ]
    fake.install([fakeprog.Rule(["pull"], "", 125, "Error: reading manifest: manifest unknown\n")])
    with pytest.raises(BuildError) as failed:
        execute_build(plan, PodmanRuntime())
    assert failed.value.brief == f"{TAG}: pulling registry.example.com/org/demo:{KVER} failed"
    assert "registry has no such image" in failed.value.hint


# ---- pruning ------------------------------------------------------------------------------------------------


def image(
    image_id: str, names: list[str], kernel: Optional[str], created: str, name: str = "demo", version: str = "1.0"
) -> ImageInfo:
    labels = {"name": name, "kvc.version": version}
    if kernel is not None:
        labels["kvc.kernel"] = kernel
    return ImageInfo(image_id, tuple(names), labels, created)


def test_prune_keeps_the_newest_kernels_and_the_current_image(tmp_path: Path) -> None:
    config = instance(tmp_path, keep=3)
    images = [
        image(f"k{i}", [f"localhost/demo-1.0:6.1.0-{i}-amd64"], f"6.1.0-{i}-amd64", f"2026-11-{10 + i}T00:00:00Z")
        for i in range(6)
    ]
    images += [
        image(
            "old-version", ["localhost/demo-0.9:6.1.0-5-amd64"], "6.1.0-5-amd64", "2026-11-01T00:00:00Z", version="0.9"
        ),
        image(
            "stale-candidate",
            ["localhost/demo-1.0:6.1.0-5-amd64-kvc-candidate"],
            "6.1.0-5-amd64",
            "2026-11-30T00:00:00Z",
        ),
        # Left alone: untagged (a build stage: the build cache), named by others only, not kvc's.
        image("dangling", [], "6.1.0-5-amd64", "2026-11-30T00:00:00Z"),
        image("foreign-only", ["registry.example.com/me/demo:6.1.0-1-amd64"], "6.1.0-1-amd64", "2026-11-30T00:00:00Z"),
        image("other-kernel-tag", ["localhost/demo-1.0:6.1.0-9-amd64"], "6.1.0-1-amd64", "2026-11-01T00:00:00Z"),
        image("legacy", ["localhost/demo-0.1:5.0.0"], None, "2020-01-01T00:00:00Z"),
        image(
            "other-instance",
            ["localhost/demox-1.0:6.1.0-0-amd64"],
            "6.1.0-0-amd64",
            "2020-01-01T00:00:00Z",
            name="demox",
        ),
    ]
    # An older kernel built just now: it stays and counts as one of the three.
    keep, steps = prune_plan(images, config, keep_tag="demo-1.0:6.1.0-0-amd64")
    assert [i.id for i in keep] == ["k0", "k5", "k4"]
    assert sorted((step.image.id, step.names, step.untag_only) for step in steps) == [
        ("k1", ("localhost/demo-1.0:6.1.0-1-amd64",), False),
        ("k2", ("localhost/demo-1.0:6.1.0-2-amd64",), False),
        ("k3", ("localhost/demo-1.0:6.1.0-3-amd64",), False),
        ("old-version", ("localhost/demo-0.9:6.1.0-5-amd64",), False),
        ("stale-candidate", ("localhost/demo-1.0:6.1.0-5-amd64-kvc-candidate",), False),
    ]
    keep, _ = prune_plan(images, config, keep_tag="demo-1.0:6.1.0-5-amd64")
    assert [i.id for i in keep] == ["k5", "k4", "k3"]
    keep, _ = prune_plan(images, instance(tmp_path, keep=1), keep_tag="localhost/demo-1.0:6.1.0-4-amd64")
    assert [i.id for i in keep] == ["k4"]


def test_kvc_names_are_the_ones_kvc_gives(tmp_path: Path) -> None:
    config = instance(tmp_path, KMOD_SOFTWARE_VERSION="1.2~rc1")
    both = image(
        "x",
        ["localhost/demo-1.2-rc1:6.12.0_rpt-rpi-v8", "demo-1.1_git5:6.12.0_rpt-rpi-v8-kvc-candidate", "reg/demo:1"],
        "6.12.0+rpt-rpi-v8",
        "",
        version="1.1+git5",
    )
    assert kvc_names(both, config) == both.names[:2]
    assert kvc_names(image("y", list(both.names), "6.12.0+rpt-rpi-v8", "", name="other"), config) == ()
    assert kvc_names(image("z", list(both.names), None, ""), config) == ()


def test_prune_untags_images_others_named_and_leaves_untagged_ones(tmp_path: Path, fake: FakeRuntime) -> None:
    labels = {"name": "demo", "kvc.version": "1.0"}
    images = [
        inspect_entry("a" * 64, [f"localhost/demo-1.0:{KVER}"], {**labels, "kvc.kernel": KVER}, "2026-11-24T10:00:00Z"),
        inspect_entry(
            "b" * 64,
            ["localhost/demo-1.0:6.1.0-1-amd64", "registry.example.com/me/keep:1"],
            {**labels, "kvc.kernel": "6.1.0-1-amd64"},
            "2026-11-20T10:00:00Z",
        ),
        inspect_entry(
            "c" * 64,
            ["localhost/demo-1.0:6.1.0-2-amd64"],
            {**labels, "kvc.kernel": "6.1.0-2-amd64"},
            "2026-11-19T10:00:00Z",
        ),
        inspect_entry(
            "d" * 64,
            ["localhost/demo-1.0:6.1.0-3-amd64"],
            {**labels, "kvc.kernel": "6.1.0-3-amd64"},
            "2026-11-18T10:00:00Z",
        ),
        inspect_entry("e" * 64, [], {**labels, "kvc.kernel": "6.1.0-1-amd64"}, "2026-11-30T10:00:00Z"),
    ]
    fake.install(
        [
            (["images"], "".join(f"sha256:{c * 64}\n" for c in "abcde"), 0),
            (["image", "inspect"], json.dumps(images), 0),
            fakeprog.Rule(
                ["rmi", "localhost/demo-1.0:6.1.0-2-amd64"], "", 2, "Error: image is in use by a container\n"
            ),
        ]
    )
    removed = prune_images(PodmanRuntime(), instance(tmp_path, keep=1), keep_tag=TAG)
    assert removed == ["localhost/demo-1.0:6.1.0-1-amd64", "localhost/demo-1.0:6.1.0-3-amd64"]
    assert [c for c in fake.calls() if c[0] in ("rmi", "untag")] == [
        ["untag", "b" * 64, "localhost/demo-1.0:6.1.0-1-amd64"],
        ["rmi", "localhost/demo-1.0:6.1.0-2-amd64"],
        ["rmi", "localhost/demo-1.0:6.1.0-3-amd64"],
    ]


# ---- real podman --------------------------------------------------------------------------------------------

DROPIN = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""


@pytest.fixture(scope="session")
def podman_works() -> None:
    """Rootful podman that can run containers: scripts/setup-podman.sh (which applies the
    runc/ulimits drop-in only where it is needed), or the drop-in itself when the script is absent."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if os.geteuid() != 0:
        pytest.skip("kvc uses rootful podman")
    script = ROOT / "scripts" / "setup-podman.sh"
    if script.exists():
        result = subprocess.run(["bash", str(script), "--no-install"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return
    dropin = Path("/etc/containers/containers.conf.d/50-kvc.conf")
    if not dropin.exists():
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(DROPIN)


@pytest.fixture
def scratch_instance(tmp_path: Path, kernel_tree: DebianKernel, podman_works: None) -> Iterator[InstanceConfig]:
    """An instance whose Containerfile copies two real Debian modules into /lib/modules/$KVER/extra/
    of a FROM-scratch image (no registry, no base image); its images are removed afterwards."""
    wanted = {"udp_tunnel.ko", "ip6_udp_tunnel.ko"}
    modules = [path for path in kernel_tree.modules() if path.name in wanted]
    assert len(modules) == 2
    context = tmp_path / "ctx"
    context.mkdir()
    for module in modules:
        shutil.copyfile(module, context / module.name)
    # Two stages, as real module builds have: podman labels the first stage's image too.
    (context / "Containerfile").write_text(
        "FROM scratch AS modules\nARG KVER\nCOPY *.ko /modules/\n"
        "FROM scratch\nARG KVER\nCOPY --from=modules /modules/ /lib/modules/${KVER}/extra/\n"
    )
    name = f"kvctest-{uuid.uuid4().hex[:8]}"
    config = InstanceConfig.from_values(
        name,
        str(tmp_path / f"{name}.conf"),
        {
            "KMOD_CONTAINER_BUILD_CONTEXT": str(context),
            "KMOD_SOFTWARE_VERSION": "1.0",
            "KMOD_NAMES": "udp-tunnel ip6_udp_tunnel",
        },
    )
    yield config
    ids = subprocess.run(
        ["podman", "images", "-a", "-q", "--filter", f"label=name={name}"], capture_output=True, text=True
    ).stdout.split()
    for tag in (f"{name}-1.0:{kernel_tree.release}", f"{name}-1.0:6.1.0-0-fake"):
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
    if ids:
        subprocess.run(["podman", "rmi", "-f", *sorted(set(ids))], capture_output=True)


@pytest.mark.podman
def test_real_build_verify_extract_and_up_to_date(
    scratch_instance: InstanceConfig, kernel_tree: DebianKernel, tmp_path: Path
) -> None:
    runtime = PodmanRuntime()
    release = kernel_tree.release
    plan = plan_build(scratch_instance, release, runtime)
    assert plan.action == "build"
    started = time.monotonic()
    summary = execute_build(plan, runtime)
    build_seconds = time.monotonic() - started
    # Nothing is removed: the labelled, untagged image of the first stage is the build cache.
    assert summary == f"built {plan.tag} (udp_tunnel, ip6_udp_tunnel verified for {release})"
    info = runtime.inspect(plan.tag)
    assert info is not None and info.labels[LABEL_DIGEST] == plan.digest
    assert runtime.inspect(candidate_tag(scratch_instance, release)) is None

    layout = Layout(HostPaths(str(tmp_path / "host")))
    manifest = extract(layout, scratch_instance, release, runtime, plan.tag)
    assert [(m.name, m.file) for m in manifest.modules] == [
        ("udp_tunnel", "udp_tunnel.ko"),
        ("ip6_udp_tunnel", "ip6_udp_tunnel.ko"),
    ]
    assert all(m.vermagic.split()[0] == release for m in manifest.modules)
    assert manifest.image_id == info.id and manifest.image_digest == plan.digest
    manifest.verify()
    assert read_manifest(layout, scratch_instance.name, release) == manifest

    started = time.monotonic()
    again = plan_build(scratch_instance, release, runtime)
    plan_seconds = time.monotonic() - started
    assert again.action == "up-to-date"
    assert plan_seconds < 1.0, plan_seconds
    print(f"\nreal FROM-scratch build+verify: {build_seconds:.2f} s, up-to-date plan: {plan_seconds:.3f} s")

    # Through a container instead of a mount (what rootless podman does) the result is the same.
    via_container = PodmanRuntime(use_mount=False)
    assert extract(layout, scratch_instance, release, via_container, plan.tag, force=True).modules == manifest.modules


@pytest.mark.podman
def test_real_build_for_the_wrong_kernel_leaves_no_tag(scratch_instance: InstanceConfig) -> None:
    runtime = PodmanRuntime()
    plan = plan_build(scratch_instance, "6.1.0-0-fake", runtime)
    with pytest.raises(BuildError) as failed:
        execute_build(plan, runtime)
    assert "not built for kernel 6.1.0-0-fake" in failed.value.brief
    assert "udp_tunnel" in failed.value.details and "ip6_udp_tunnel" in failed.value.details
    assert runtime.inspect(plan.tag) is None
    assert runtime.inspect(candidate_tag(scratch_instance, "6.1.0-0-fake")) is None


@pytest.mark.podman
def test_real_tags_from_any_version_round_trip(podman_works: None, tmp_path: Path) -> None:
    """podman accepts kvc's names for Debian/DKMS versions and odd kernel releases, finds the image
    by them again, and kvc recognizes them as its own from the image's labels."""
    runtime = PodmanRuntime()
    name = f"kvctest-{uuid.uuid4().hex[:8]}"
    (tmp_path / "f").write_text("x\n")
    (tmp_path / "Containerfile").write_text("FROM scratch\nCOPY f /f\n")
    try:
        for kernel, tag in KERNELS[1:5]:
            labels = {"name": name, "kvc.kernel": kernel}
            runtime.build(str(tmp_path), str(tmp_path / "Containerfile"), f"{name}-base:{tag}", {}, labels)
            for version, _ in VERSIONS:
                config = InstanceConfig(name, "s", "/c", "Containerfile", version, ("m",))
                ref = image_tag(config, kernel)
                runtime.tag(f"{name}-base:{tag}", ref)
                info = runtime.inspect(ref)
                assert info is not None and info.has_name(ref)
                assert f"localhost/{ref}" in kvc_names(info, config)
    finally:
        ids = subprocess.run(
            ["podman", "images", "-q", "--filter", f"label=name={name}"], capture_output=True, text=True
        ).stdout.split()
        if ids:
            subprocess.run(["podman", "rmi", "-f", *sorted(set(ids))], capture_output=True)


@pytest.mark.podman
def test_real_pruning_keeps_the_build_cache_and_foreign_tags(
    scratch_instance: InstanceConfig, kernel_tree: DebianKernel, capfd: pytest.CaptureFixture[str]
) -> None:
    runtime = PodmanRuntime()
    release = kernel_tree.release
    name = scratch_instance.name
    execute_build(plan_build(scratch_instance, release, runtime), runtime)
    tag = image_tag(scratch_instance, release)
    first = runtime.inspect(tag)
    assert first is not None
    stages = [info for info in runtime.list_images(f"name={name}") if info.dangling]
    assert stages, "the first stage's labelled image (the build cache) is gone"

    # A forced rebuild of unchanged sources: every step from the cache, the very same image.
    capfd.readouterr()
    started = time.monotonic()
    summary = execute_build(plan_build(scratch_instance, release, runtime, force=True), runtime, stream=True)
    seconds = time.monotonic() - started
    output = capfd.readouterr().err
    assert summary == f"built {tag} (udp_tunnel, ip6_udp_tunnel verified for {release})"
    copies = re.findall(r"STEP \d+/\d+: COPY .*\n(.*)", output)
    assert len(copies) == 2 and all(line.startswith("--> Using cache") for line in copies), output
    again = runtime.inspect(tag)
    assert again is not None and again.id == first.id
    assert {info.id for info in stages} <= {info.id for info in runtime.list_images(f"name={name}")}

    # Someone else tags the image; a new version makes it an old one, which pruning only untags.
    foreign = f"localhost/{name}-theirs:kept"
    runtime.tag(tag, foreign)
    newer = dataclasses.replace(scratch_instance, software_version="1.1")
    summary = execute_build(plan_build(newer, release, runtime), runtime)
    assert summary.endswith("; removed 1 old image(s)"), summary
    kept = runtime.inspect(foreign)
    assert kept is not None and kept.id == first.id
    assert [same_image_name(n, foreign) for n in kept.names] == [True]
    assert runtime.inspect(tag) is None
    print(f"\nreal forced rebuild of unchanged sources (all cached): {seconds:.2f} s")


# ---- kvc -v -------------------------------------------------------------------------------------------------


def kvc_build(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``kvc [options] build demo --kernel KVER`` as a program, the instance under a KVC_ROOT."""
    config = instance(tmp_path)
    conf = tmp_path / "root" / "etc" / "kvc" / "demo.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        f"KMOD_CONTAINER_BUILD_CONTEXT={config.build_context}\nKMOD_SOFTWARE_VERSION=1.0\nKMOD_NAMES=demo-mod\n"
    )
    env = {**os.environ, "KVC_ROOT": str(tmp_path / "root")}
    return subprocess.run(
        [sys.executable, "-m", "kvc", *options, "build", "demo", "--kernel", KVER],
        capture_output=True,
        text=True,
        env=env,
    )


def logged_commands(stderr: str) -> list[str]:
    return [line[len("kvc: + ") :] for line in stderr.splitlines() if line.startswith("kvc: + ")]


def test_verbose_logs_each_command_once_in_order_and_streams_the_build(tmp_path: Path, fake: FakeRuntime) -> None:
    good_image(fake)
    fake.install([(["build"], "STEP 1/1: FROM scratch\nCOMMIT demo\n", 0), NOT_KNOWN, (["images"], "", 0)])
    result = kvc_build(tmp_path, "-v")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"built {TAG} (demo_mod verified for {KVER})\n"
    commands = [shlex.join(["podman", *argv]) for argv in fake.calls()]
    assert len(commands) == 8 and commands[1].startswith("podman build -t ")
    assert logged_commands(result.stderr) == commands
    # The build's output, live, once.
    assert result.stderr.count("STEP 1/1: FROM scratch\n") == 1
    lines = result.stderr.splitlines()
    assert lines.index("STEP 1/1: FROM scratch") == lines.index(f"kvc: + {commands[1]}") + 1
    quiet = kvc_build(tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize("options", [("-v",), ()])
def test_a_failing_build_shows_its_tail_once(tmp_path: Path, fake: FakeRuntime, options: tuple[str, ...]) -> None:
    output = "".join(f"step {i}\n" for i in range(60)) + f"E: Unable to locate package linux-headers-{KVER}\n"
    fake.install([(["build"], output, 100), NOT_KNOWN])
    result = kvc_build(tmp_path, *options)
    assert result.returncode == 4
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert lines.count(f"E: Unable to locate package linux-headers-{KVER}") == 1
    assert lines.count("step 59") == 1
    assert result.stderr.count("command failed (status 100): podman build ") == 1
    assert f"kvc: error: {TAG}: no kernel headers for {KVER}" in result.stderr
    # Streamed with -v (every line), else the last 40 lines as the error's details.
    assert lines.count("step 0") == (1 if options else 0)


@pytest.mark.parametrize("options", [("-v",), ()])
def test_a_failing_command_shows_its_tail_once(tmp_path: Path, fake: FakeRuntime, options: tuple[str, ...]) -> None:
    fake.install([fakeprog.Rule(["image", "inspect"], "", 125, "Error: reading layer: input/output error\n")])
    result = kvc_build(tmp_path, *options)
    assert result.returncode == 4
    assert result.stderr.count("Error: reading layer: input/output error") == 1
    assert result.stderr.count(f"command failed (status 125): podman image inspect {TAG}") == 1
    assert logged_commands(result.stderr) == ([f"podman image inspect {TAG}"] if options else [])
