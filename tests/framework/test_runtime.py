"""Runtime adapters against a recording fake podman/docker/buildah on PATH: command lines (build
flags, labels, build args, pull policy, global runtime args; run with a TTY only on a terminal,
privileged, host network, mounts), image metadata parsing, errors with hints, and reading files out
of an image through ``podman image mount`` or a created container."""

from __future__ import annotations

import json
import logging
import os
import pty
import sys
import time
from pathlib import Path

import pytest

from kvc import proc
from kvc.config import GlobalConfig
from kvc.errors import BuildError, CommandError, CommandTimeout
from kvc.runtime import (
    BuildahRuntime,
    BuildCommandError,
    DockerRuntime,
    ImageInfo,
    Mount,
    PodmanRuntime,
    hint_for,
    normalize_ref,
    parse_created,
    resolve_in_root,
    runtime_for,
    same_image_name,
)
from support import fakeprog
from support.fakeruntime import KVER, FakeRuntime, fake, inspect_entry

__all__ = ["fake"]  # the fixture, imported for these tests

# ---- names and metadata ---------------------------------------------------------------------------------


def test_image_names_compare_with_and_without_localhost() -> None:
    assert same_image_name("localhost/simple-kmod-1.0:6.1.0-56-amd64", "simple-kmod-1.0:6.1.0-56-amd64")
    assert same_image_name("docker.io/library/debian", "debian:latest")
    assert same_image_name("docker.io/me/x:1", "me/x:1")
    assert not same_image_name("registry.example.com/a/x:1", "a/x:1")
    assert not same_image_name("x:1", "x:2")
    assert normalize_ref("reg:5000/x") == "reg:5000/x:latest"
    assert normalize_ref("x@sha256:" + "0" * 64) == "x@sha256:" + "0" * 64


def test_creation_times_from_podman_and_docker() -> None:
    base = parse_created("2026-11-24T10:30:01Z")
    assert parse_created("2026-11-24T10:30:01.15571709Z") == pytest.approx(base + 0.15571709)
    assert parse_created("2026-11-24T10:30:01.5Z") > parse_created("2026-11-24T10:30:01.15Z")
    assert parse_created("2026-11-24T11:30:01+01:00") == base
    assert parse_created("2026-11-24 10:30:01.000000000 +0000 UTC") == base
    assert parse_created("1795516201") == 1795516201.0
    assert parse_created("yesterday") == 0.0


def test_inspect_parses_podman_and_docker_json(fake: FakeRuntime) -> None:
    podman_json = [inspect_entry("ab" * 32, ["localhost/demo-1.0:" + KVER], {"name": "demo"})]
    docker_json = [
        {
            "Id": "sha256:" + "cd" * 32,
            "RepoTags": ["demo-1.0:" + KVER],
            "Created": "2026-01-01T00:00:00Z",
            "Config": {"Labels": {"name": "demo", "kvc.kernel": KVER}},
        }
    ]
    fake.install([(["image", "inspect"], json.dumps(podman_json), 0)])
    info = PodmanRuntime().inspect("demo-1.0:" + KVER)
    assert info == ImageInfo(
        "ab" * 32, ("localhost/demo-1.0:" + KVER,), {"name": "demo"}, "2026-11-24T10:00:00.123456789Z"
    )
    assert info.has_name("demo-1.0:" + KVER) and not info.dangling
    fake.install([(["image", "inspect"], json.dumps(docker_json), 0)], program="docker")
    info = DockerRuntime().inspect("demo-1.0:" + KVER)
    assert info is not None and info.id == "cd" * 32 and info.labels["kvc.kernel"] == KVER
    assert fake.calls("docker") == [["image", "inspect", "demo-1.0:" + KVER]]


def test_a_missing_image_is_none_but_other_failures_raise_with_a_hint(fake: FakeRuntime) -> None:
    fake.install(
        [
            fakeprog.Rule(
                ["image", "inspect", "nope:1"], "[]\n", 125, "Error: inspecting object: nope:1: image not known\n"
            ),
            fakeprog.Rule(
                ["image", "inspect"], "", 125, "Error: unable to connect to Podman socket: Cannot connect to Podman\n"
            ),
        ]
    )
    runtime = PodmanRuntime()
    assert runtime.inspect("nope:1") is None
    assert not runtime.image_exists("nope:1")
    with pytest.raises(CommandError) as failed:
        runtime.inspect("other:1")
    assert failed.value.argv == ["podman", "image", "inspect", "other:1"]
    assert "Cannot connect to Podman" in failed.value.output_tail
    assert "cannot reach its service" in failed.value.hint


def test_hints_from_runtime_output() -> None:
    assert "build it first" in hint_for("podman", "Error: x: image not known")
    assert "build it first" in hint_for("docker", "Error response from daemon: No such image: x:1")
    assert "cannot reach" in hint_for(
        "docker", "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
    )
    assert "runc" in hint_for("podman", "Error: crun: cgroups in hybrid mode not supported")
    assert "runc" in hint_for("podman", "setrlimit `RLIMIT_NOFILE`: Operation not permitted")
    assert "as root" in hint_for("podman", "Error: mkdir /var/lib/containers: permission denied")
    assert "disk" in hint_for("podman", "write /var/tmp/x: no space left on device")
    assert "registry" in hint_for(
        "podman",
        "Error: initializing source docker://x: pinging container registry "
        "registry.example.com: dial tcp: lookup registry.example.com: no such host",
    )
    damaged = (
        'Error: locating item named "manifest" for image with ID "' + "c" * 64 + '" (consider removing the image '
        "to resolve the issue): file does not exist"
    )
    assert hint_for("podman", damaged) == (
        "podman's storage holds a damaged image cccccccccccc (a write of it was killed half-way): "
        f"remove it with 'podman rmi -f {'c' * 64}', then run the command again"
    )
    assert hint_for("podman", "something else") == ""


# ---- build ------------------------------------------------------------------------------------------------

LABELS = {"name": "demo", "kvc.kernel": KVER}


def test_podman_build_argv_with_labels_args_policy_and_global_args(fake: FakeRuntime) -> None:
    fake.install()
    runtime = runtime_for(GlobalConfig("podman", ("--log-level=error", "--root=/var/lib/x")))
    assert isinstance(runtime, PodmanRuntime)
    runtime.build(
        "/ctx",
        "/ctx/Containerfile",
        "demo-1.0:K",
        {"KVER": KVER, "KMODVER": "1.0"},
        LABELS,
        pull="never",
        no_cache=True,
    )
    assert fake.calls() == [
        [
            "--log-level=error",
            "--root=/var/lib/x",
            "build",
            "-t",
            "demo-1.0:K",
            "--file",
            "/ctx/Containerfile",
            "--label=name=demo",
            f"--label=kvc.kernel={KVER}",
            "--build-arg",
            f"KVER={KVER}",
            "--build-arg",
            "KMODVER=1.0",
            "--pull=never",
            "--no-cache",
            "/ctx",
        ]
    ]
    with pytest.raises(ValueError, match="pull policy"):
        runtime.build("/ctx", "Containerfile", "t", {}, {}, pull="sometimes")


def test_docker_and_buildah_build_argv(fake: FakeRuntime) -> None:
    for program in ("docker", "buildah", "podman"):
        fake.install(program=program)
    build_args = [("KVER", "K"), ("EXTRA", "a b")]
    DockerRuntime().build("/ctx", "/ctx/Containerfile", "demo-1:K", build_args, {"name": "demo"}, pull="always")
    DockerRuntime().build("/ctx", "/ctx/Containerfile", "demo-1:K", build_args, {"name": "demo"}, pull="missing")
    buildah = runtime_for(GlobalConfig("buildah", ("--root=/r",)))
    assert isinstance(buildah, BuildahRuntime)
    buildah.build("git://example.org/x.git", "Dockerfile", "demo-1:K", build_args, {"name": "demo"}, pull="newer")
    buildah.tag("demo-1:K", "demo-1:K2")
    assert fake.calls("docker") == [
        [
            "build",
            "-t",
            "demo-1:K",
            "--file",
            "/ctx/Containerfile",
            "--label=name=demo",
            "--build-arg",
            "KVER=K",
            "--build-arg",
            "EXTRA=a b",
            "--pull",
            "/ctx",
        ],
        [
            "build",
            "-t",
            "demo-1:K",
            "--file",
            "/ctx/Containerfile",
            "--label=name=demo",
            "--build-arg",
            "KVER=K",
            "--build-arg",
            "EXTRA=a b",
            "/ctx",
        ],
    ]
    assert fake.calls("buildah") == [
        [
            "--root=/r",
            "bud",
            "--layers",
            "-t",
            "demo-1:K",
            "--file",
            "Dockerfile",
            "--label=name=demo",
            "--build-arg",
            "KVER=K",
            "--build-arg",
            "EXTRA=a b",
            "--pull=newer",
            "git://example.org/x.git",
        ]
    ]
    # Everything but the build goes to podman, which shares buildah's storage.
    assert fake.calls("podman") == [["--root=/r", "tag", "demo-1:K", "demo-1:K2"]]


def test_buildah_argv_without_options() -> None:
    argv = BuildahRuntime().build_argv("/c", "/c/F", "t:1", {}, {})
    assert argv == ["buildah", "bud", "--layers", "-t", "t:1", "--file", "/c/F", "/c"]


def test_a_failed_build_carries_its_whole_output_and_a_tail(fake: FakeRuntime) -> None:
    output = "".join(f"step {i}\n" for i in range(100)) + "E: Unable to locate package linux-headers-9.9\n"
    fake.install([(["build"], output, 1)])
    with pytest.raises(BuildCommandError) as failed:
        PodmanRuntime().build("/ctx", "/ctx/Containerfile", "t:1", {}, {})
    assert failed.value.output == output
    assert failed.value.output_tail.splitlines()[-1] == "E: Unable to locate package linux-headers-9.9"
    assert len(failed.value.output_tail.splitlines()) == 40
    assert failed.value.returncode == 1 and failed.value.argv[:2] == ["podman", "build"]


def test_a_streamed_build_shows_its_output_on_stderr_and_keeps_it(
    fake: FakeRuntime, capfd: pytest.CaptureFixture[str]
) -> None:
    fake.install([fakeprog.Rule(["build"], "STEP 1/2: FROM scratch\n", 1, "Error: boom\n")])
    with pytest.raises(BuildCommandError) as failed:
        PodmanRuntime().build("/ctx", "/ctx/Containerfile", "t:1", {}, {}, stream=True)
    assert capfd.readouterr() == ("", "STEP 1/2: FROM scratch\nError: boom\n")
    # Kept for the cause; not repeated in the error's details (it is on the screen already).
    assert failed.value.output == "STEP 1/2: FROM scratch\nError: boom\n"
    assert failed.value.output_tail == ""


def test_a_build_streams_when_kvc_runs_verbose(
    fake: FakeRuntime, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    fake.install([(["build"], "STEP 1/2: FROM scratch\n", 0)])
    PodmanRuntime().build("/ctx", "/ctx/Containerfile", "t:1", {}, {})
    assert capfd.readouterr().err == ""
    caplog.set_level(logging.INFO, logger="kvc.proc")
    PodmanRuntime().build("/ctx", "/ctx/Containerfile", "t:1", {}, {})
    assert capfd.readouterr().err == "STEP 1/2: FROM scratch\n"


def test_each_command_is_logged_once_as_it_starts(fake: FakeRuntime, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kvc.proc")
    fake.install([fakeprog.Rule(["rmi", "gone:1"], "", 2, "Error: image is in use by a container\n")])
    runtime = PodmanRuntime()
    runtime.tag("x:1", "y:1")
    runtime.build("/my ctx", "/my ctx/Containerfile", "t:1", {}, {"k": "a b"}, stream=False)
    with pytest.raises(CommandError):
        runtime.remove("gone:1")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("kvc.proc", "INFO", "+ podman tag x:1 y:1"),
        ("kvc.proc", "INFO", "+ podman build -t t:1 --file '/my ctx/Containerfile' '--label=k=a b' '/my ctx'"),
        ("kvc.proc", "INFO", "+ podman rmi gone:1"),
        ("kvc.proc", "ERROR", "command failed (status 2): podman rmi gone:1"),
    ]


def test_an_echoed_command_that_times_out_is_killed(capfd: pytest.CaptureFixture[str]) -> None:
    script = "import time; print('started', flush=True); time.sleep(30)"
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as timed_out:
        proc.run([sys.executable, "-c", script], echo=True, timeout=1.0)
    assert time.monotonic() - started < 10
    assert capfd.readouterr().err == "started\n"
    assert timed_out.value.output_tail == ""


def test_echo_merges_the_streams_in_order(capfd: pytest.CaptureFixture[str]) -> None:
    script = "import sys\nfor i in range(3):\n print(i, flush=True); print('e', i, file=sys.stderr, flush=True)"
    result = proc.run([sys.executable, "-c", script], echo=True)
    assert result.stdout == "0\ne 0\n1\ne 1\n2\ne 2\n" and result.stderr == ""
    assert capfd.readouterr().err == result.stdout


# ---- images ----------------------------------------------------------------------------------------------


def test_list_images_inspects_each_image_once(fake: FakeRuntime) -> None:
    images = [
        inspect_entry("a" * 64, ["localhost/demo-1:k1", "localhost/demo-1:k1b"], {"name": "demo"}),
        inspect_entry("b" * 64, [], {"name": "demo"}),
    ]
    fake.install(
        [
            (["images"], f"sha256:{'a' * 64}\nsha256:{'a' * 64}\nsha256:{'b' * 64}\n", 0),
            (["image", "inspect"], json.dumps(images), 0),
        ]
    )
    found = PodmanRuntime().list_images("name=demo")
    assert [info.id for info in found] == ["a" * 64, "b" * 64]
    assert found[1].dangling
    assert fake.calls() == [
        ["images", "-q", "--no-trunc", "--filter", "label=name=demo"],
        ["image", "inspect", f"sha256:{'a' * 64}", f"sha256:{'b' * 64}"],
    ]


def test_list_images_survives_an_image_removed_meanwhile(fake: FakeRuntime) -> None:
    one = inspect_entry("a" * 64, ["localhost/demo-1:k1"], {"name": "demo"})
    fake.install(
        [
            (["images"], "sha256:aaa\nsha256:bbb\n", 0),
            (["image", "inspect", "sha256:aaa", "sha256:bbb"], "", 125),
            (["image", "inspect", "sha256:aaa"], json.dumps([one]), 0),
            fakeprog.Rule(["image", "inspect", "sha256:bbb"], "", 125, "Error: bbb: image not known\n"),
        ]
    )
    assert [info.id for info in PodmanRuntime().list_images("name=demo")] == ["a" * 64]


def test_remove_tag_pull(fake: FakeRuntime) -> None:
    fake.install(
        [
            fakeprog.Rule(["rmi", "gone:1"], "", 1, "Error: gone:1: image not known\n"),
            fakeprog.Rule(["rmi", "busy:1"], "", 2, "Error: image used by 1234: image is in use by a container\n"),
            fakeprog.Rule(
                ["pull"],
                "",
                125,
                "Error: initializing source docker://reg/x:1: pinging container "
                "registry reg: dial tcp: lookup reg: no such host\n",
            ),
        ]
    )
    runtime = PodmanRuntime()
    runtime.remove("gone:1", missing_ok=True)
    with pytest.raises(CommandError, match="exited with status 1"):
        runtime.remove("gone:1")
    with pytest.raises(CommandError) as busy:
        runtime.remove("busy:1", force=False)
    assert "in use" in busy.value.output_tail
    runtime.remove("x:1", force=True)
    runtime.tag("x:1", "y:1")
    with pytest.raises(CommandError) as pulled:
        runtime.pull("reg/x:1")
    assert "registry could not be reached" in pulled.value.hint
    assert fake.calls() == [
        ["rmi", "gone:1"],
        ["rmi", "gone:1"],
        ["rmi", "busy:1"],
        ["rmi", "-f", "x:1"],
        ["tag", "x:1", "y:1"],
        ["pull", "reg/x:1"],
    ]


def test_a_missing_program_says_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CommandError) as failed:
        DockerRuntime().inspect("x:1")
    assert failed.value.returncode == 127 and "install docker" in failed.value.hint


# ---- run -----------------------------------------------------------------------------------------------------


def test_run_without_a_terminal_has_no_tty(fake: FakeRuntime) -> None:
    fake.install(default_code=7)
    runtime = runtime_for(GlobalConfig("podman", ("--log-level=error",)))
    status = runtime.run(
        "img:1",
        ["spkut", "44"],
        privileged=True,
        host_network=True,
        mounts=[("/dev", "/dev"), Mount("/etc/x", "/etc/x", read_only=True)],
    )
    assert status == 7
    assert fake.calls() == [
        [
            "--log-level=error",
            "run",
            "--rm",
            "-i",
            "--pull=never",
            "--privileged",
            "--network=host",
            "-v",
            "/dev:/dev",
            "-v",
            "/etc/x:/etc/x:ro",
            "img:1",
            "spkut",
            "44",
        ]
    ]


def test_run_on_a_terminal_gets_a_tty(fake: FakeRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.install()
    main, secondary = pty.openpty()
    with os.fdopen(secondary, "w", closefd=True) as terminal, open(os.devnull, "w") as devnull:
        monkeypatch.setattr(sys, "stdin", terminal)
        monkeypatch.setattr(sys, "stdout", terminal)
        runtime = PodmanRuntime()
        assert runtime.run_argv("img:1", ["sh"])[:5] == ["podman", "run", "--rm", "-i", "-t"]
        assert "-t" not in runtime.run_argv("img:1", ["sh"], interactive=False)
        assert "-i" not in runtime.run_argv("img:1", ["sh"], interactive=False)
        assert "-t" not in runtime.run_argv("img:1", ["sh"], tty=False)
        assert runtime.run("img:1", ["true"], remove=False, entrypoint="") == 0
        # Output into a file or pipe (stdout no terminal) gets no tty, so no "\r\n" in it.
        monkeypatch.setattr(sys, "stdout", devnull)
        assert "-t" not in runtime.run_argv("img:1", ["sh"])
    os.close(main)
    assert fake.calls() == [["run", "-i", "-t", "--pull=never", "--entrypoint", "", "img:1", "true"]]


def test_run_shares_our_stdio(fake: FakeRuntime, capfd: pytest.CaptureFixture[str]) -> None:
    fake.install([(["run"], "simple-procfs-kmod number = 44\n", 3)])
    assert PodmanRuntime().run("img:1", ["spkut", "44"]) == 3
    assert capfd.readouterr().out == "simple-procfs-kmod number = 44\n"


def test_run_refuses_mount_paths_with_colons() -> None:
    with pytest.raises(ValueError, match="':'"):
        PodmanRuntime().run_argv("img:1", ["x"], mounts=[("/a:b", "/c")])


# ---- files in images ---------------------------------------------------------------------------------------


def test_resolve_in_root_keeps_symlinks_inside_the_image(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr" / "lib" / "modules").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "usr" / "lib" / "modules" / "escape").symlink_to("/etc")
    (root / "usr" / "lib" / "modules" / "up").symlink_to("../../../../../..")
    (root / "loop").symlink_to("loop")
    assert resolve_in_root(str(root), "/lib/modules/x.ko") == str(root / "usr" / "lib" / "modules" / "x.ko")
    assert resolve_in_root(str(root), "/lib/modules/escape/passwd") == str(root / "etc" / "passwd")
    assert resolve_in_root(str(root), "/lib/modules/up/etc") == str(root / "etc")
    with pytest.raises(OSError, match="symbolic links"):
        resolve_in_root(str(root), "/loop/x")


def image_files(fake: FakeRuntime) -> None:
    fake.files(
        {
            f"/usr/lib/modules/{KVER}/extra/a.ko": b"A",
            f"/usr/lib/modules/{KVER}/kernel/b.ko.xz": b"B",
            f"/usr/lib/modules/{KVER}/modules.dep": b"",
        }
    )
    (fake.root / "lib").symlink_to("usr/lib")
    (fake.root / "usr" / "lib" / "modules" / KVER / "build").symlink_to("/usr/src/linux-headers")
    (fake.root / "usr" / "lib" / "modules" / KVER / "extra" / "evil.ko").symlink_to("/etc/hostname")


def test_files_through_podman_image_mount(fake: FakeRuntime, tmp_path: Path) -> None:
    image_files(fake)
    fake.install()
    runtime = PodmanRuntime()
    assert runtime.list_files("img:1", f"/lib/modules/{KVER}") == [
        f"/lib/modules/{KVER}/extra/a.ko",
        f"/lib/modules/{KVER}/kernel/b.ko.xz",
        f"/lib/modules/{KVER}/modules.dep",
    ]
    assert runtime.list_files("img:1", "/lib/modules/other") == []
    out = tmp_path / "out"
    out.mkdir()
    copied = runtime.copy_out(
        "img:1", [f"/lib/modules/{KVER}/extra/a.ko", f"/lib/modules/{KVER}/kernel/b.ko.xz"], str(out)
    )
    assert copied == {
        f"/lib/modules/{KVER}/extra/a.ko": str(out / "a.ko"),
        f"/lib/modules/{KVER}/kernel/b.ko.xz": str(out / "b.ko.xz"),
    }
    assert (out / "a.ko").read_bytes() == b"A"
    # A link in the image to /etc/hostname means the image's /etc/hostname, never the host's.
    with pytest.raises(BuildError, match=f"/lib/modules/{KVER}/extra/evil.ko in image img:1 does not exist"):
        runtime.copy_out("img:1", [f"/lib/modules/{KVER}/extra/evil.ko"], str(out))
    with pytest.raises(ValueError, match="two files named"):
        runtime.copy_out("img:1", ["/a/x.ko", "/b/x.ko"], str(out))
    calls = fake.calls()
    assert calls.count(["image", "mount", "img:1"]) == calls.count(["image", "unmount", "img:1"]) == 5
    assert not [c for c in calls if c[0] in ("run", "create", "cp")]


def test_one_mount_serves_a_with_block(fake: FakeRuntime, tmp_path: Path) -> None:
    image_files(fake)
    fake.install()
    with PodmanRuntime().open_image("img:1") as files:
        assert files.via == "mount"
        listed = files.list(f"/lib/modules/{KVER}")
        files.copy(listed[:1], str(tmp_path))
    assert fake.calls() == [["image", "mount", "img:1"], ["image", "unmount", "img:1"]]


def test_files_through_a_container_when_mounting_is_refused(fake: FakeRuntime, tmp_path: Path) -> None:
    image_files(fake)
    fake.install(
        [
            (
                ["run", "--rm", "--pull=never", "--network=none", "--entrypoint", "find"],
                f"/lib/modules/{KVER}/extra/a.ko\n/lib/modules/{KVER}/kernel/b.ko.xz\n",
                0,
            )
        ],
        mount=False,
    )
    runtime = PodmanRuntime()
    with runtime.open_image("img:1") as files:
        assert files.via == "container"
        listed = files.list(f"/lib/modules/{KVER}")
        copied = files.copy(listed, str(tmp_path))
    assert listed == [f"/lib/modules/{KVER}/extra/a.ko", f"/lib/modules/{KVER}/kernel/b.ko.xz"]
    assert Path(copied[listed[1]]).read_bytes() == b"B"
    assert fake.calls() == [
        ["image", "mount", "img:1"],
        [
            "run",
            "--rm",
            "--pull=never",
            "--network=none",
            "--entrypoint",
            "find",
            "img:1",
            f"/lib/modules/{KVER}/",
            "-type",
            "f",
        ],
        ["create", "--pull=never", "img:1", "/kvc-copy-out"],
        ["cp", f"c0ffee:/lib/modules/{KVER}/extra/a.ko", str(tmp_path / "a.ko")],
        ["cp", f"c0ffee:/lib/modules/{KVER}/kernel/b.ko.xz", str(tmp_path / "b.ko.xz")],
        ["rm", "-f", "c0ffee"],
    ]


def test_listing_an_image_without_find_copies_the_directory_out(fake: FakeRuntime) -> None:
    image_files(fake)
    fake.install(
        [fakeprog.Rule(["run"], "", 127, 'Error: runc: exec: "find": executable file not found in $PATH\n')],
        program="docker",
    )
    found = DockerRuntime().list_files("scratch-img:1", f"/usr/lib/modules/{KVER}")
    assert found == [
        f"/usr/lib/modules/{KVER}/extra/a.ko",
        f"/usr/lib/modules/{KVER}/kernel/b.ko.xz",
        f"/usr/lib/modules/{KVER}/modules.dep",
    ]
    assert DockerRuntime().list_files("scratch-img:1", "/lib/nothing") == []
    calls = fake.calls("docker")
    assert calls[1][:2] == ["create", "--pull=never"] and calls[2][:2] == ["cp", f"c0ffee:/usr/lib/modules/{KVER}"]
    assert ["rm", "-f", "c0ffee"] in calls


def test_listing_a_missing_directory_with_find(fake: FakeRuntime) -> None:
    fake.install([fakeprog.Rule(["run"], "", 1, "find: '/lib/modules/x/': No such file or directory\n")], mount=False)
    assert PodmanRuntime().list_files("img:1", "/lib/modules/x") == []


def test_mounting_a_missing_image_is_an_error(fake: FakeRuntime) -> None:
    fake.install([fakeprog.Rule(["image", "mount"], "", 125, "Error: nope:1: image not known\n")])
    with pytest.raises(CommandError) as failed:
        PodmanRuntime().list_files("nope:1", "/lib")
    assert "build it first" in failed.value.hint
    assert [c for c in fake.calls() if c[0] in ("run", "create")] == []
