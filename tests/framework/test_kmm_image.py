"""Images kvc publishes carry the layout KMM's worker reads, checked against a real registry and
Debian's kmod as the oracle.

simple-kmod is built for Debian's 6.1 kernel and pushed to the local registry (Debian's
docker-registry); the pushed image is pulled into a storage of its own and KMM's init container
command (``/bin/sh -c 'mkdir -p DST; cp -R SRC DST'``) runs in it, copying ``/opt`` out as KMM
does. Debian's ``modprobe -d COPY`` resolves the instance's modules from that copy, and the
depmod outputs kvc wrote equal, byte for byte, what Debian's ``depmod -b COPY KVER`` writes for the
same files. A second instance FROM that image adds firmware and a chain of Debian's own modules
that depend on each other: the firmware lands below /opt/lib/firmware and modprobe orders the
chain. Pushing the same image to another repository gives the same digest; an image without a
shell (nor mkdir, rm, cp) is refused with one line and a hint, before anything is pushed.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from kvc.kmmimage import missing_programs
from kvc.runtime import DirectoryFiles, PodmanRuntime
from support.debian_kernel import DebianKernel, dependency_chain
from support.example import unique_prefix, write_example_conf
from support.registry import LocalRegistry

ROOT = Path(__file__).resolve().parents[2]
MODPROBE = "/usr/sbin/modprobe"
DEPMOD = "/usr/sbin/depmod"
KMM_SHELL = ("/bin/sh", "-c")  # what KMM's init container runs its copy command with
FIRMWARE = {"kvc-kmm/fw-main.bin": b"\x00kvc kmm firmware\xff", "kvc-kmm/sub/fw-extra.bin": b"extra\n"}
# A chain of Debian's own modules (libcurve25519-generic and others under wireguard): their
# order is what Debian's modules.dep says it is.
CHAIN_TOP = "wireguard"
DEPMOD_OUTPUTS = (
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.softdep",
    "modules.symbols",
    "modules.symbols.bin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.devname",
)


@dataclass
class Host:
    root: Path
    registry: LocalRegistry

    def kvc(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KVC_ROOT": str(self.root), "KVC_KERNEL": "fake"}
        return subprocess.run(
            [sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=env, timeout=1800
        )

    def ok(self, *args: str) -> str:
        result = self.kvc(*args)
        assert result.returncode == 0 and "Traceback" not in result.stderr, f"kvc {args}: {result.stderr}"
        return result.stdout

    def repo(self, name: str) -> str:
        return f"{self.registry.host}/kvc/{name}"


@dataclass
class Published:
    host: Host
    release: str
    name: str  # simple-kmod as an instance
    firmware_name: str  # FROM it: firmware and a chain of Debian modules
    needs: dict[str, set[str]]  # the chain's module files (relative to /lib/modules/KVER): what each needs


def transport(registry: LocalRegistry) -> list[str]:
    return ["--authfile", registry.auth_file, "--cert-dir", os.path.join(registry.certs_dir, registry.host)]


@pytest.fixture(scope="module")
def published(
    local_registry: LocalRegistry, indexed_kernel_tree: DebianKernel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Published]:
    for script in ("setup-podman.sh", "bootstrap-base-image.sh"):
        subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True, capture_output=True)
    release = indexed_kernel_tree.release
    root = tmp_path_factory.mktemp("kmm-host")
    host = Host(root, local_registry)
    settings = root / "etc" / "kvc" / "kmods-via-containers.conf"
    with unique_prefix("kvckmm") as name:
        write_example_conf(root, name, f"\nKVC_REGISTRY={host.repo(name)}\n")
        settings.write_text(
            f"KVC_REGISTRY_AUTH_FILE={local_registry.auth_file}\nKVC_REGISTRY_CERTS_DIR={local_registry.certs_dir}\n"
        )
        pushed = host.ok("build", name, "--kernel", release, "--push")
        assert "pushed " in pushed, pushed

        bundle = tmp_path_factory.mktemp("kmm-bundle")
        for relative, data in FIRMWARE.items():
            firmware = bundle / "lib" / "firmware" / relative
            firmware.parent.mkdir(parents=True, exist_ok=True)
            firmware.write_bytes(data)

        def below_moddir(path: str) -> str:
            return str(Path(path).relative_to(indexed_kernel_tree.moddir))

        chain = [below_moddir(path) for path in dependency_chain(indexed_kernel_tree, CHAIN_TOP)]
        names = []
        for path in chain:
            target = bundle / "lib" / "modules" / release / path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(indexed_kernel_tree.moddir / path, target)
            names.append(os.path.basename(path).split(".ko")[0])
        needs = {
            path: {below_moddir(dep) for dep in dependency_chain(indexed_kernel_tree, os.path.basename(path)[:-3])[:-1]}
            for path in chain
        }
        (bundle / "Containerfile").write_text(f"FROM localhost/{name}-1.0.0:{release}\nCOPY lib/ /lib/\n")
        firmware_name = f"{name}fw"
        (root / "etc" / "kvc" / f"{firmware_name}.conf").write_text(
            f"KMOD_CONTAINER_BUILD_CONTEXT={bundle}\n"
            "KMOD_SOFTWARE_VERSION=1.0.0\n"
            f'KMOD_NAMES="simple-kmod simple-procfs-kmod {" ".join(names)}"\n'
            "KVC_FIRMWARE=kvc-kmm\n"
            f"KVC_REGISTRY={host.repo(firmware_name)}\n"
        )
        host.ok("build", firmware_name, "--kernel", release, "--push")
        yield Published(host, release, name, firmware_name, needs)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[list[str]]:
    """podman options for a storage of the test's own (what a cluster node pulls into)."""
    runroot = tempfile.mkdtemp(prefix="kvckmm-", dir="/tmp")
    yield ["--root", str(tmp_path / "storage"), "--runroot", runroot]
    subprocess.run(["podman", "--root", str(tmp_path / "storage"), "--runroot", runroot, "rmi", "-a", "-f"])
    shutil.rmtree(runroot, ignore_errors=True)


def kmm_copy(published: Published, storage: list[str], name: str, destination: Path) -> dict[str, str]:
    """Pull the pushed image as a node would and run KMM's init container copy in it (the image's
    own /bin/sh, mkdir and cp): ``destination/opt/lib/modules/KVER`` and ``destination/opt/lib/firmware``.
    Returns the image's labels."""
    host, release = published.host, published.release
    ref = f"{host.repo(name)}:1.0.0-{release}"
    subprocess.run(["podman", *storage, "pull", "-q", *transport(host.registry), ref], check=True, capture_output=True)
    destination.mkdir()
    script = (
        f"mkdir -p /kvc-copy/opt/lib/modules; cp -R /opt/lib/modules/{release} /kvc-copy/opt/lib/modules; "
        "if [ -d /opt/lib/firmware ]; then mkdir -p /kvc-copy/opt/lib/firmware; "
        "cp -R /opt/lib/firmware/* /kvc-copy/opt/lib/firmware; fi"
    )
    subprocess.run(
        [
            "podman",
            *storage,
            "run",
            "--rm",
            "--network=none",
            "-v",
            f"{destination}:/kvc-copy",
            ref,
            *KMM_SHELL,
            script,
        ],
        check=True,
        capture_output=True,
    )
    inspected = subprocess.run(
        ["podman", *storage, "image", "inspect", ref], check=True, capture_output=True, text=True
    ).stdout
    labels: dict[str, str] = json.loads(inspected)[0]["Labels"]
    return labels


def modprobe(*args: str) -> list[str]:
    done = subprocess.run([MODPROBE, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.registry
@pytest.mark.podman
def test_modprobe_resolves_the_instance_from_a_copy_of_the_pushed_image(
    published: Published, storage: list[str], tmp_path: Path
) -> None:
    labels = kmm_copy(published, storage, published.name, tmp_path / "copy")
    assert labels["kvc.kmm.dir-name"] == "/opt" and "kvc.kmm.firmware-path" not in labels
    opt = tmp_path / "copy" / "opt"
    moddir = opt / "lib" / "modules" / published.release
    for name, file in (("simple_kmod", "simple-kmod.ko"), ("simple_procfs_kmod", "simple-procfs-kmod.ko")):
        # As KMM's worker runs it: modprobe -vd DIR MODULE (here -n: nothing is loaded).
        shown = modprobe("-d", str(opt), "-S", published.release, "--show-depends", name)
        assert shown == [f"insmod {moddir}/extra/{file} "], shown
        dry = modprobe("-n", "-v", "-d", str(opt), "-S", published.release, name)
        assert dry == [f"insmod {moddir}/extra/{file} "], dry
    module_files = sorted(str(p.relative_to(moddir)) for p in moddir.rglob("*.ko*"))
    assert module_files == ["extra/simple-kmod.ko", "extra/simple-procfs-kmod.ko"]
    assert not (opt / "lib" / "firmware").exists()


@pytest.mark.registry
@pytest.mark.podman
def test_kvcs_depmod_outputs_are_what_debians_depmod_writes(
    published: Published, storage: list[str], tmp_path: Path
) -> None:
    for name in (published.name, published.firmware_name):
        copy = tmp_path / name
        kmm_copy(published, storage, name, copy)
        ours = copy / "opt" / "lib" / "modules" / published.release
        theirs_root = tmp_path / f"{name}-debian"
        theirs = theirs_root / "lib" / "modules" / published.release
        shutil.copytree(ours, theirs, symlinks=True)
        for output in theirs.glob("modules.*"):
            output.unlink()
        subprocess.run([DEPMOD, "-b", str(theirs_root), published.release], check=True, capture_output=True)
        written = sorted(p.name for p in theirs.glob("modules.*"))
        assert written == sorted(p.name for p in ours.glob("modules.*")) == sorted(DEPMOD_OUTPUTS)
        same, differ, errors = filecmp.cmpfiles(ours, theirs, written, shallow=False)
        assert same == written, f"{name}: differ from Debian's depmod: {differ + errors}"


@pytest.mark.registry
@pytest.mark.podman
def test_firmware_lands_below_the_firmware_path_and_a_chain_loads_in_order(
    published: Published, storage: list[str], tmp_path: Path
) -> None:
    labels = kmm_copy(published, storage, published.firmware_name, tmp_path / "copy")
    assert labels["kvc.kmm.dir-name"] == "/opt"
    assert labels["kvc.kmm.firmware-path"] == "/opt/lib/firmware"
    opt = tmp_path / "copy" / "opt"
    for relative, data in FIRMWARE.items():
        assert (opt / "lib" / "firmware" / relative).read_bytes() == data
    moddir = opt / "lib" / "modules" / published.release
    shown = modprobe("-d", str(opt), "-S", published.release, "--show-depends", CHAIN_TOP)
    order = [line.removeprefix(f"insmod {moddir}/").rstrip() for line in shown]
    assert all(line.startswith(f"insmod {moddir}/") for line in shown), shown
    assert sorted(order) == sorted(published.needs) and order[-1].endswith(f"/{CHAIN_TOP}.ko"), shown
    for position, path in enumerate(order):
        assert published.needs[path] <= set(order[:position]), f"{path} comes before what it needs: {shown}"


@pytest.mark.registry
@pytest.mark.podman
def test_publishing_the_same_image_again_gives_the_same_digest(published: Published) -> None:
    host, release = published.host, published.release
    first = json.loads(host.ok("inspect", f"{host.repo(published.name)}:1.0.0-{release}", "--json"))
    again = f"{host.repo(published.name)}-again"
    host.ok("push", published.name, again, "--kernel", release)
    second = json.loads(host.ok("inspect", f"{again}:1.0.0-{release}", "--json"))
    assert second["digest"] == first["digest"]
    assert second["labels"]["kvc.kmm.dir-name"] == "/opt"


@pytest.mark.registry
@pytest.mark.podman
@pytest.mark.parametrize(
    ("suffix", "containerfile", "missing"),
    [
        ("bare", "FROM scratch\nCOPY --from={image} /lib/modules/ /lib/modules/\n", "/bin/sh, mkdir, rm, cp"),
        # Merged /usr: /bin -> usr/bin and /bin/sh -> dash are followed inside the image; only cp is gone.
        ("nocp", "FROM {image}\nRUN rm /usr/bin/cp\n", "cp"),
    ],
)
def test_an_image_without_what_the_copy_runs_is_refused_before_anything_is_pushed(
    published: Published, tmp_path: Path, suffix: str, containerfile: str, missing: str
) -> None:
    host, release = published.host, published.release
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "Containerfile").write_text(containerfile.format(image=f"localhost/{published.name}-1.0.0:{release}"))
    name = f"{published.name}{suffix}"
    (host.root / "etc" / "kvc" / f"{name}.conf").write_text(
        f"KMOD_CONTAINER_BUILD_CONTEXT={bundle}\n"
        "KMOD_SOFTWARE_VERSION=1.0.0\n"
        'KMOD_NAMES="simple-kmod simple-procfs-kmod"\n'
        f"KVC_REGISTRY={host.repo(name)}\n"
    )
    host.ok("build", name, "--kernel", release)
    before = host.registry.requests()
    for args in (("push", name, "--kernel", release), ("export", name, "--kernel", release, "-o", str(tmp_path / "x"))):
        refused = host.kvc(*args)
        assert refused.returncode == 6, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("kvc: error:") and lines[1].startswith("kvc: hint:"), lines
        assert f"for {release} has no {missing}: KMM" in lines[0], lines
    assert not [r for r in host.registry.requests()[len(before) :] if r[0] in ("PUT", "POST", "PATCH")]
    assert not (tmp_path / "x").exists()


def tree(root: Path, files: dict[str, str]) -> DirectoryFiles:
    """A root file system: PATH -> "file", or "-> TARGET" for a symlink."""
    for path, what in files.items():
        host = root / path.lstrip("/")
        host.parent.mkdir(parents=True, exist_ok=True)
        if what.startswith("-> "):
            host.symlink_to(what[3:])
        else:
            host.write_text(what)
    return DirectoryFiles(str(root))


@pytest.mark.parametrize(
    ("files", "missing"),
    [
        # merged /usr: the directory link and sh -> dash are followed inside the image
        (
            {
                "/bin": "-> usr/bin",
                "/usr/bin/dash": "f",
                "/usr/bin/sh": "-> dash",
                "/usr/bin/cp": "f",
                "/usr/bin/rm": "f",
                "/usr/bin/mkdir": "f",
            },
            [],
        ),
        # busybox: every program an absolute link to one binary
        (
            {
                "/bin/busybox": "f",
                "/bin/sh": "-> /bin/busybox",
                "/bin/cp": "-> /bin/busybox",
                "/usr/sbin/rm": "-> ../../bin/busybox",
                "/bin/mkdir": "-> busybox",
            },
            [],
        ),
        # a dangling shell and no cp
        ({"/bin/sh": "-> /nowhere/dash", "/usr/local/bin/rm": "f", "/sbin/mkdir": "f"}, ["/bin/sh", "cp"]),
        # a link that leaves the image is resolved inside it (the host's dash is not the image's)
        ({"/bin/sh": "-> ../../../../usr/bin/dash", "/bin/cp": "f", "/bin/rm": "f", "/bin/mkdir": "f"}, ["/bin/sh"]),
        # a link loop
        ({"/bin/sh": "-> sh", "/bin/cp": "f", "/bin/rm": "f", "/bin/mkdir": "f"}, ["/bin/sh"]),
        ({}, ["/bin/sh", "mkdir", "rm", "cp"]),
    ],
)
def test_the_programs_are_found_through_links_inside_the_image(
    tmp_path: Path, files: dict[str, str], missing: list[str]
) -> None:
    assert missing_programs(tree(tmp_path / "root", files)) == missing


@pytest.mark.podman
def test_the_programs_are_found_in_a_container_when_the_image_cannot_be_mounted() -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "bootstrap-base-image.sh")], check=True, capture_output=True)
    with PodmanRuntime(use_mount=False).open_image("localhost/debian:bookworm") as files:
        assert files.via == "container"
        assert missing_programs(files) == []
