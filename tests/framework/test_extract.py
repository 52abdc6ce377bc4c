"""Extraction of an instance's modules from its image into /var/lib/kvc/NAME/KVER, against a
recording fake podman: the manifest, re-use while the image id is unchanged, atomic replacement
(a failure at any step leaves the previous extraction intact), recovery after a crash, and the
check of files against their digests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

import kvc.extract
from kvc.config import InstanceConfig
from kvc.errors import CommandError, StateError
from kvc.extract import (
    MANIFEST,
    extract,
    extract_image,
    is_current,
    read_manifest,
    recorded_extraction,
    replace_dir,
    verify_extraction,
)
from kvc.imagerecord import images_locked, record_path, recorded_image, remember_image
from kvc.kmod.paths import HostPaths
from kvc.layout import Layout
from kvc.runtime import PodmanRuntime
from support import fakeprog
from support.fakeruntime import KVER, FakeRuntime, fake, inspect_entry, module_bytes

__all__ = ["fake"]  # the fixture, imported for these tests

IMAGE = f"demo-1.0:{KVER}"
VERMAGIC = f"{KVER} SMP preempt mod_unload modversions"


def instance(tmp_path: Path, modules: str = "demo-core demo_user") -> InstanceConfig:
    return InstanceConfig.from_values(
        "demo",
        str(tmp_path / "demo.conf"),
        {"KMOD_CONTAINER_BUILD_CONTEXT": str(tmp_path), "KMOD_SOFTWARE_VERSION": "1.0", "KMOD_NAMES": modules},
    )


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(HostPaths(str(tmp_path / "host")))


def serve(fake: FakeRuntime, image_id: str, *, user_vermagic: str = VERMAGIC) -> None:
    """The fake image: two modules (demo_user depends on demo_core), with id ``image_id``."""
    fake.files(
        {
            f"/lib/modules/{KVER}/extra/demo-core.ko": module_bytes("demo-core", VERMAGIC),
            f"/lib/modules/{KVER}/extra/demo_user.ko": module_bytes("demo_user", user_vermagic, "demo_core"),
        }
    )
    entry = inspect_entry(image_id, [f"localhost/{IMAGE}"], {"name": "demo", "kvc.digest": "d" * 64})
    fake.install([(["image", "inspect", IMAGE], json.dumps([entry]), 0)])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(layout: Layout) -> list[str]:
    return sorted(name for name in os.listdir(layout.instance_state("demo")) if name.startswith("."))


def test_extraction_writes_files_and_a_manifest(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    serve(fake, "a" * 64)
    manifest = extract(layout, instance(tmp_path), KVER, PodmanRuntime(), IMAGE)
    target = Path(layout.kernel_state("demo", KVER))
    assert manifest.directory == str(target)
    assert sorted(os.listdir(target)) == ["demo-core.ko", "demo_user.ko", MANIFEST]
    data = json.loads((target / MANIFEST).read_text())
    assert data["schema"] == 1 and data["image"] == IMAGE and data["image_id"] == "a" * 64
    assert data["image_digest"] == "d" * 64 and data["kernel"] == KVER
    assert data["modules"] == [
        {
            "name": "demo_core",
            "file": "demo-core.ko",
            "sha256": sha256(target / "demo-core.ko"),
            "vermagic": VERMAGIC,
            "depends": [],
            "image_path": f"/lib/modules/{KVER}/extra/demo-core.ko",
        },
        {
            "name": "demo_user",
            "file": "demo_user.ko",
            "sha256": sha256(target / "demo_user.ko"),
            "vermagic": VERMAGIC,
            "depends": ["demo_core"],
            "image_path": f"/lib/modules/{KVER}/extra/demo_user.ko",
        },
    ]
    assert oct(target.stat().st_mode & 0o777) == "0o755"
    assert oct((target / "demo-core.ko").stat().st_mode & 0o777) == "0o644"
    assert read_manifest(layout, "demo", KVER) == manifest
    assert manifest.path_of("demo-core") == str(target / "demo-core.ko")
    assert verify_extraction(layout, "demo", KVER) == manifest
    assert leftovers(layout) == []


def test_the_same_image_is_not_extracted_again(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    serve(fake, "a" * 64)
    config = instance(tmp_path)
    first = extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    fake.clear()
    assert extract(layout, config, KVER, PodmanRuntime(), IMAGE) == first
    assert fake.calls() == [["image", "inspect", IMAGE]]
    # --force extracts anyway; a new image id does too.
    assert extract(layout, config, KVER, PodmanRuntime(), IMAGE, force=True).extracted_at > first.extracted_at
    serve(fake, "b" * 64)
    fake.clear()
    assert extract(layout, config, KVER, PodmanRuntime(), IMAGE).image_id == "b" * 64
    assert ["image", "mount", IMAGE] in fake.calls()


def test_changed_files_fail_verification_and_are_extracted_again(
    tmp_path: Path, fake: FakeRuntime, layout: Layout
) -> None:
    serve(fake, "a" * 64)
    config = instance(tmp_path)
    manifest = extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    module = Path(manifest.path_of("demo_user"))
    original = module.read_bytes()
    module.write_bytes(original + b"\0")
    with pytest.raises(StateError) as changed:
        manifest.verify()
    assert f"{module}: sha256" in changed.value.details and "--force" in changed.value.hint
    assert not is_current(manifest, config, "a" * 64)
    module.unlink()
    with pytest.raises(StateError, match="changed since extraction"):
        verify_extraction(layout, "demo", KVER)
    assert extract(layout, config, KVER, PodmanRuntime(), IMAGE).problems() == []
    assert module.read_bytes() == original


def test_a_changed_module_list_is_extracted_again(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    serve(fake, "a" * 64)
    extract(layout, instance(tmp_path), KVER, PodmanRuntime(), IMAGE)
    again = extract(layout, instance(tmp_path, "demo_core"), KVER, PodmanRuntime(), IMAGE)
    assert [m.name for m in again.modules] == ["demo_core"]
    assert sorted(os.listdir(again.directory)) == ["demo-core.ko", MANIFEST]


def test_state_beside_the_modules_is_carried_over(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    serve(fake, "a" * 64)
    first = extract(layout, instance(tmp_path), KVER, PodmanRuntime(), IMAGE)
    Path(first.directory, "loaded.json").write_text('{"in_tree": ["udp_tunnel"]}\n')
    serve(fake, "b" * 64)
    second = extract(layout, instance(tmp_path), KVER, PodmanRuntime(), IMAGE)
    assert Path(second.directory, "loaded.json").read_text() == '{"in_tree": ["udp_tunnel"]}\n'


def extracted_state(layout: Layout) -> dict[str, bytes]:
    target = Path(layout.kernel_state("demo", KVER))
    return {name: (target / name).read_bytes() for name in sorted(os.listdir(target))}


def test_a_failed_copy_leaves_the_previous_extraction(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    serve(fake, "a" * 64)
    config = instance(tmp_path)
    extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    before = extracted_state(layout)
    entry = inspect_entry("b" * 64, [IMAGE], {})
    fake.install(
        [
            (["image", "inspect"], json.dumps([entry]), 0),
            (["run"], f"/lib/modules/{KVER}/extra/demo-core.ko\n/lib/modules/{KVER}/extra/demo_user.ko\n", 0),
            (["create"], "c0ffee\n", 0),
            fakeprog.Rule(["cp"], "", 125, "Error: copying: input/output error\n"),
        ],
        mount=False,
    )
    with pytest.raises(CommandError, match="status 125"):
        extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    assert extracted_state(layout) == before
    assert leftovers(layout) == []
    assert ["rm", "-f", "c0ffee"] in fake.calls()


def test_an_unreadable_module_leaves_the_previous_extraction(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    serve(fake, "a" * 64)
    config = instance(tmp_path)
    extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    before = extracted_state(layout)
    serve(fake, "b" * 64)
    (fake.root / "lib" / "modules" / KVER / "extra" / "demo_user.ko").write_bytes(b"not an ELF file")
    with pytest.raises(StateError, match="not a readable module"):
        extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    assert extracted_state(layout) == before
    assert leftovers(layout) == []


def test_a_module_missing_from_the_image(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    serve(fake, "a" * 64)
    with pytest.raises(StateError) as failed:
        extract(layout, instance(tmp_path, "demo_core nothere"), KVER, PodmanRuntime(), IMAGE)
    assert failed.value.brief == f"image {IMAGE} has no module(s) nothere below /lib/modules/{KVER}"
    assert "--force" in failed.value.hint
    assert not os.path.exists(layout.kernel_state("demo", KVER))


def test_a_missing_image(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    fake.install([fakeprog.Rule(["image", "inspect"], "", 125, "Error: image not known\n")])
    with pytest.raises(StateError, match=f"image {IMAGE} does not exist"):
        extract(layout, instance(tmp_path), KVER, PodmanRuntime(), IMAGE)
    with pytest.raises(StateError, match="no extracted modules"):
        verify_extraction(layout, "demo", KVER)


@pytest.mark.parametrize("exchange", [True, False])
def test_a_failure_while_swapping_keeps_the_old_directory(
    tmp_path: Path, fake: FakeRuntime, layout: Layout, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    serve(fake, "a" * 64)
    config = instance(tmp_path)
    extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    before = extracted_state(layout)
    serve(fake, "b" * 64)
    real_rename = os.rename
    renames: list[tuple[str, str]] = []

    def failing_exchange(a: str, b: str) -> bool:
        raise OSError(5, "Input/output error")

    def failing_second_rename(a: Any, b: Any) -> None:
        renames.append((str(a), str(b)))
        if len(renames) == 2:
            raise OSError(5, "Input/output error")
        real_rename(a, b)

    if exchange:
        monkeypatch.setattr(kvc.extract, "_exchange", failing_exchange)
    else:
        monkeypatch.setattr(kvc.extract, "_exchange", lambda a, b: False)
        monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="Input/output error"):
        extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    monkeypatch.undo()
    assert extracted_state(layout) == before
    assert leftovers(layout) == []
    if not exchange:
        # old away, new in (failed), old back
        target = layout.kernel_state("demo", KVER)
        assert renames[0][0] == target and renames[1][1] == target and renames[2] == (renames[0][1], target)


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_swaps_whole_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(kvc.extract, "_exchange", lambda a, b: False)
    target = tmp_path / "target"
    target.mkdir()
    (target / "old").write_text("old")
    staging = tmp_path / ".target.new-1"
    staging.mkdir()
    (staging / "new").write_text("new")
    replace_dir(str(staging), str(target))
    assert os.listdir(target) == ["new"]
    assert sorted(os.listdir(tmp_path)) == ["target"]


def test_an_interrupted_swap_is_recovered(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    serve(fake, "a" * 64)
    config = instance(tmp_path)
    extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    before = extracted_state(layout)
    target = layout.kernel_state("demo", KVER)
    # A crash after "rename the old one away", and a staging directory of a crashed extraction.
    os.rename(target, os.path.join(layout.instance_state("demo"), f".{KVER}.old-x1"))
    os.mkdir(os.path.join(layout.instance_state("demo"), f".{KVER}.new-x2"))
    assert read_manifest(layout, "demo", KVER) is None
    fake.clear()
    manifest = extract(layout, config, KVER, PodmanRuntime(), IMAGE)
    assert manifest.image_id == "a" * 64 and extracted_state(layout) == before
    assert fake.calls() == [["image", "inspect", IMAGE]]  # recovered, not extracted again
    assert leftovers(layout) == []


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"schema": 2}',
        '{"schema": 1, "image": "x"}',
        '{"schema": 1, "image": "i", "image_id": "a", "kernel": "k", "modules": [{"name": "m", "file": "../../etc/x", '
        '"sha256": "", "vermagic": "", "depends": []}]}',
    ],
)
def test_unreadable_manifests_mean_not_extracted(layout: Layout, text: str) -> None:
    target = Path(layout.kernel_state("demo", KVER))
    target.mkdir(parents=True)
    (target / MANIFEST).write_text(text)
    assert read_manifest(layout, "demo", KVER) is None


LABELS = {"name": "demo", "kvc.digest": "d" * 64}
NAMES = (f"localhost/{IMAGE}",)


def test_the_record_of_the_tag_lets_a_load_skip_the_runtime(tmp_path: Path, fake: FakeRuntime, layout: Layout) -> None:
    """A load records what the runtime said of the tag it extracted from; while the record stands
    and the files are intact, the extraction is current without asking the runtime. A command that
    may change the images drops the record (images_locked), and a tag moved by hand is seen only
    by an extraction."""
    serve(fake, "a" * 64)
    config = instance(tmp_path)
    first, info = extract_image(layout, config, KVER, PodmanRuntime(), IMAGE)
    assert (info.id, info.names, info.labels) == ("a" * 64, NAMES, LABELS)
    assert recorded_extraction(layout, config, KVER, IMAGE) is None  # nothing recorded yet
    remember_image(layout, "demo", KVER, info)
    assert recorded_image(layout, "demo", KVER) == info
    fake.clear()
    # What a killed extraction left goes, as an extraction would remove it.
    leftover = Path(layout.instance_state("demo"), f".{KVER}.new-killed")
    leftover.mkdir()
    assert recorded_extraction(layout, config, KVER, IMAGE) == first
    assert not leftover.exists()
    assert recorded_extraction(layout, config, KVER, "demo-2.0:" + KVER) is None
    assert recorded_extraction(layout, instance(tmp_path, "demo-core"), KVER, IMAGE) is None
    assert fake.calls() == []
    # A tag moved by hand: the record still names the old image until kvc asks again.
    serve(fake, "b" * 64)
    assert recorded_extraction(layout, config, KVER, IMAGE) == first
    second, info = extract_image(layout, config, KVER, PodmanRuntime(), IMAGE)
    assert second.image_id == "b" * 64
    assert recorded_extraction(layout, config, KVER, IMAGE) is None  # the record names "a": not trusted
    remember_image(layout, "demo", KVER, info)
    current = recorded_extraction(layout, config, KVER, IMAGE)
    assert current is not None and current.image_id == "b" * 64
    with images_locked(layout, "demo"):
        assert recorded_image(layout, "demo", KVER) is None
        assert recorded_extraction(layout, config, KVER, IMAGE) is None
    remember_image(layout, "demo", KVER, info)
    Path(layout.kernel_state("demo", KVER), "demo-core.ko").write_bytes(b"changed")
    assert recorded_extraction(layout, config, KVER, IMAGE) is None


@pytest.mark.parametrize(
    "text", ["", "{", '{"schema": 2, "images": {}}', '{"schema": 1, "images": {"' + KVER + '": 1}}']
)
def test_unreadable_image_records_mean_none(layout: Layout, text: str) -> None:
    os.makedirs(layout.instance_state("demo"))
    Path(record_path(layout, "demo")).write_text(text)
    assert recorded_image(layout, "demo", KVER) is None
