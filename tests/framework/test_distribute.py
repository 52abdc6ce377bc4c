"""Registry tags, registry settings in confs, and the OCI archive's checks (no registry, no podman)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvc.archive import _unpack, read_layout
from kvc.config import GlobalConfig, InstanceConfig, parse_assignments
from kvc.distribute import RemoteChoice, _registry_plan, plan_obtain, remote_problems
from kvc.errors import ConfigError, StateError
from kvc.images import candidate_tag, decode_tag, encode_tag, image_tag, registry_tags
from kvc.registry import Reference, RegistryClient, RegistryOptions, RemoteImage
from kvc.runtime import ImageInfo, PodmanRuntime
from support import fakeprog
from support.fakeruntime import KVER, FakeRuntime, fake

__all__ = ["fake"]

OCI_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
RELEASE_CHARS = st.text(alphabet="0123456789abcdefxyzABC._+~-", min_size=1, max_size=60)


@pytest.mark.parametrize(
    ("release", "tag"),
    [
        ("6.1.0-57-amd64", "6.1.0-57-amd64"),
        ("6.12.118+deb12-amd64", "6.12.118__deb12-amd64"),
        ("5.14.0-427.13.1.el9_4.x86_64", "5.14.0-427.13.1.el9_4.x86_64"),
        ("6.1.0+rpt-rpi-v8", "6.1.0__rpt-rpi-v8"),
        ("6.6.0++x", "6.6.0____x"),
        ("1.2~rc1", "_1.2_7erc1"),
        ("a__b", "_a_5f_5fb"),
        ("6.1_+x", "_6.1_5f_2bx"),
    ],
)
def test_kernel_releases_map_to_tags_and_back(release: str, tag: str) -> None:
    assert encode_tag(release) == tag
    assert OCI_TAG.fullmatch(tag)
    assert decode_tag(tag) == release


@given(RELEASE_CHARS)
def test_every_release_round_trips_through_a_valid_tag(release: str) -> None:
    tag = encode_tag(release)
    assert OCI_TAG.fullmatch(tag[:128]), tag
    assert decode_tag(tag) == release


@pytest.mark.parametrize("tag", ["a___b", "_zz_", "__zz", "_ff", "-x"])
def test_tags_kvc_does_not_make_are_not_decoded(tag: str) -> None:
    with pytest.raises(ValueError, match="is not a tag kvc encodes"):
        decode_tag(tag)


def instance(extra: str = "", *, context: bool = True, tmp_path: Path) -> InstanceConfig:
    text = 'KMOD_SOFTWARE_VERSION=1.0+git5\nKMOD_NAMES="a-mod b_mod"\n' + extra
    if context:
        text = f"KMOD_CONTAINER_BUILD_CONTEXT={tmp_path}\n" + text
    path = tmp_path / "x.conf"
    return InstanceConfig.from_values("x", str(path), parse_assignments(text, str(path)))


def test_registry_tags_fixed_and_moving(tmp_path: Path) -> None:
    conf = instance(tmp_path=tmp_path)
    assert registry_tags(conf, "6.12.118+deb12-amd64") == ("1.0__git5-6.12.118__deb12-amd64", "6.12.118__deb12-amd64")
    long = instance("KMOD_SOFTWARE_VERSION=" + "9" * 120 + "\n", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="would have 135 characters"):
        registry_tags(long, "6.1.0-57-amd64")


def test_registry_keys_of_an_instance(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    conf = instance(
        f"KVC_REGISTRY=127.0.0.1:5000/kvc/x\nKVC_REGISTRY_DIGESTS='6.1.0-57-amd64={digest}'\n", tmp_path=tmp_path
    )
    assert conf.registry == "127.0.0.1:5000/kvc/x"
    assert conf.registry_fallback == "build"
    assert conf.registry_digests == {"6.1.0-57-amd64": digest}
    pure = instance("KVC_REGISTRY=reg.example/x\n", context=False, tmp_path=tmp_path)
    assert pure.registry_fallback == "fail" and not pure.build_context


@pytest.mark.parametrize(
    ("extra", "context", "message"),
    [
        ("KVC_REGISTRY=reg.example/x\nKVC_IMAGE=reg.example/y\n", True, "KVC_IMAGE and KVC_REGISTRY are both set"),
        ("KVC_REGISTRY=reg.example/x\nKVC_REGISTRY_FALLBACK=maybe\n", True, "is not one of build, fail"),
        ("KVC_REGISTRY=reg.example/x\nKVC_REGISTRY_FALLBACK=build\n", False, "needs KMOD_CONTAINER_BUILD_CONTEXT"),
        ("KVC_REGISTRY=reg.example/x\nKVC_REGISTRY_DIGESTS=6.1.0-57-amd64=sha256:12\n", True, "is not KVER=sha256"),
        ("KVC_REGISTRY_DIGESTS=6.1.0-57-amd64=sha256:" + "0" * 64 + "\n", True, "without KVC_REGISTRY"),
        ("KVC_REGISTRY='-x'\n", True, "KVC_REGISTRY '-x' is not allowed"),
    ],
)
def test_bad_registry_keys_get_one_clear_line(tmp_path: Path, extra: str, context: bool, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        instance(extra, context=context, tmp_path=tmp_path)


def test_global_registry_settings(tmp_path: Path) -> None:
    conf = tmp_path / "kmods-via-containers.conf"
    conf.write_text("KVC_REGISTRY_AUTH_FILE=/etc/kvc/auth.json\nKVC_REGISTRY_CERTS_DIR=/etc/kvc/certs.d\n")
    settings = GlobalConfig.load(str(tmp_path))
    assert (settings.registry_auth_file, settings.registry_certs_dir, settings.registry_tls_verify) == (
        "/etc/kvc/auth.json",
        "/etc/kvc/certs.d",
        True,
    )
    conf.write_text("KVC_REGISTRY_TLS_VERIFY=no\n")
    assert GlobalConfig.load(str(tmp_path)).registry_tls_verify is False
    conf.write_text("KVC_REGISTRY_AUTH_FILE=auth.json\n")
    with pytest.raises(ConfigError, match="must be an absolute path"):
        GlobalConfig.load(str(tmp_path))
    conf.write_text("KVC_REGISTRY_TLS_VERIFY=perhaps\n")
    with pytest.raises(ConfigError, match="is not a yes/no value"):
        GlobalConfig.load(str(tmp_path))


# ---- the archive's checks -------------------------------------------------------------------------------------


def blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def small_layout(layout: Path) -> dict[str, object]:
    config = blob(layout, json.dumps({"config": {"Labels": {"name": "x", "kvc.kernel": "6.1.0-57-amd64"}}}).encode())
    layer = blob(layout, b"layer bytes")
    manifest = blob(layout, json.dumps({"schemaVersion": 2, "config": config, "layers": [layer]}).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"manifests": [{**manifest, "annotations": {"org.opencontainers.image.ref.name": "x/1.0-6.1.0-57-amd64"}}]}
    (layout / "index.json").write_text(json.dumps(index))
    return {"config": config, "layer": layer, "manifest": manifest}


def test_a_layout_is_read_with_its_digests(tmp_path: Path) -> None:
    parts = small_layout(tmp_path)
    (image,) = read_layout(str(tmp_path), "a.tar")
    assert image.ref_name == "x/1.0-6.1.0-57-amd64"
    assert image.manifest_digest == parts["manifest"]["digest"]  # type: ignore[index]
    assert "sha256:" + image.image_id == parts["config"]["digest"]  # type: ignore[index]
    assert image.labels["kvc.kernel"] == "6.1.0-57-amd64"


def test_a_damaged_or_incomplete_layout_is_refused(tmp_path: Path) -> None:
    parts = small_layout(tmp_path)
    layer = tmp_path / "blobs" / "sha256" / str(parts["layer"]["digest"]).split(":")[1]  # type: ignore[index]
    layer.write_bytes(b"layer bytez")
    with pytest.raises(StateError, match="damaged"):
        read_layout(str(tmp_path), "a.tar")
    layer.unlink()
    with pytest.raises(StateError, match="is missing or truncated"):
        read_layout(str(tmp_path), "a.tar")


def tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> None:
    with tarfile.open(path, "w") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("../escape", tarfile.REGTYPE),
        ("/etc/passwd", tarfile.REGTYPE),
        ("blobs/sha256/" + "0" * 64, tarfile.SYMTYPE),
        ("index.json", tarfile.LNKTYPE),
        ("blobs/sha256/notadigest", tarfile.REGTYPE),
        ("dev", tarfile.CHRTYPE),
    ],
)
def test_an_archive_with_anything_but_layout_files_is_refused(tmp_path: Path, name: str, kind: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = "/etc/shadow" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    member.size = 3 if kind == tarfile.REGTYPE else 0
    archive = tmp_path / "bad.tar"
    tar_with(archive, member, b"abc")
    with pytest.raises(StateError, match="unexpected member"):
        _unpack(str(archive), str(tmp_path / "out"))
    assert not (tmp_path / "escape").exists()


def test_a_file_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "not.tar"
    archive.write_bytes(b"\x00" * 10 + b"hello")
    with pytest.raises(StateError, match="not a readable tar"):
        _unpack(str(archive), str(tmp_path / "out"))


# ---- what a host does when its registry has nothing (fake podman, a registry that is not there) ---------------


def unreachable(tmp_path: Path, fallback: str) -> InstanceConfig:
    extra = f"KVC_REGISTRY=127.0.0.1:1/kvc/x\nKVC_REGISTRY_FALLBACK={fallback}\n"
    return instance(extra, tmp_path=tmp_path)


def test_an_unreachable_registry_means_build_or_a_clear_refusal(tmp_path: Path, fake: FakeRuntime) -> None:
    fake.install([fakeprog.Rule(["image", "inspect"], "", 125, "Error: image not known\n")])
    client = RegistryClient(RegistryOptions(timeout=2))
    plan = plan_obtain(unreachable(tmp_path, "build"), KVER, PodmanRuntime(), client, RegistryOptions())
    assert plan.action == "build"
    assert plan.reason.startswith(f"127.0.0.1:1/kvc/x:1.0__git5-{KVER}: the registry 127.0.0.1:1 cannot be reached (")
    assert plan.reason.endswith("; building (no image yet)")
    with pytest.raises(
        StateError,
        match=f"no image of x 1.0\\+git5 for kernel {KVER}: 127.0.0.1:1/kvc/x:1.0__git5-{KVER}: the registry",
    ):
        plan_obtain(unreachable(tmp_path, "fail"), KVER, PodmanRuntime(), client, RegistryOptions())
    assert [call[0] for call in fake.calls()] == ["image"] * len(fake.calls())  # nothing but inspections


def remote(labels: dict[str, str]) -> RemoteImage:
    return RemoteImage(Reference.parse("reg.example/x:1"), "sha256:" + "1" * 64, "", "sha256:" + "2" * 64, labels)


def test_a_registry_image_must_be_the_instances_for_exactly_this_kernel(tmp_path: Path) -> None:
    conf = instance("KVC_REGISTRY=reg.example/x\n", context=False, tmp_path=tmp_path)
    good = {"name": "x", "kvc.kernel": KVER, "kvc.version": "1.0+git5"}
    assert remote_problems(conf, KVER, remote(good)) == []
    assert remote_problems(conf, KVER, remote({**good, "kvc.kernel": KVER + "+1"})) == [
        f"its kvc.kernel label is '{KVER}+1', not '{KVER}'"
    ]
    assert remote_problems(conf, KVER, remote({})) == [
        "it is 'not a kvc image''s image, not x's",
        f"its kvc.kernel label is '', not '{KVER}'",
        "its kvc.version label is '', not '1.0+git5'",
    ]
    built_here = instance("KVC_REGISTRY=reg.example/x\n", tmp_path=tmp_path)
    assert remote_problems(built_here, KVER, remote({**good, "kvc.digest": "other"})) == [
        "it was built from other inputs than this host's build context (kvc.digest differs)"
    ]


def test_a_candidate_left_by_a_killed_pull_comes_off_when_the_image_is_up_to_date(tmp_path: Path) -> None:
    """A pull killed after its tag move but before the candidate's removal leaves both names on the
    image; the next (up-to-date) plan takes the candidate off, as a build's does."""
    conf = instance("KVC_REGISTRY=reg.example/x\n", context=False, tmp_path=tmp_path)
    tag, candidate = image_tag(conf, KVER), candidate_tag(conf, KVER)
    image = remote({"name": "x", "kvc.kernel": KVER, "kvc.version": "1.0+git5"})
    choice = RemoteChoice(Reference.parse("reg.example/x:1"), image)
    both = ImageInfo("2" * 64, (f"localhost/{tag}", f"localhost/{candidate}"))
    plan = _registry_plan(conf, KVER, choice, both, RegistryOptions(), False)
    assert plan is not None and plan.action == "up-to-date" and plan.stale_candidate == candidate
    alone = ImageInfo("2" * 64, (f"localhost/{tag}",))
    plan = _registry_plan(conf, KVER, choice, alone, RegistryOptions(), False)
    assert plan is not None and plan.stale_candidate == ""
