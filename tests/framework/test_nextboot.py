"""Kernel updates: which kernel boots next (each source with fake bootc and rpm-ostree printing
their documented JSON, and fake /boot trees), the version order against systemd's own, the reboot
gate's answers and exit codes, kernel-added, and the hooks run for real (by sh, run-parts and
kernel-install) with a recording fake kvc or the real one."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from kvc import hooks
from kvc.build import context_digest
from kvc.config import InstanceConfig
from kvc.errors import ExitCode, KernelMissingError
from kvc.images import image_labels, image_tag
from kvc.kmod.paths import HostPaths
from kvc.layout import Layout
from kvc.nextboot import (
    Source,
    compare_versions,
    enabled_instances,
    find_next_kernel,
    named_kernel,
    newest,
)
from kvc.skiprecord import record_skip
from support import fakeprog
from support.debian_kernel import DebianKernel, current_release
from support.example import unique_prefix, write_example_conf
from support.fakeruntime import inspect_entry

RELEASE = "6.1.0-57-amd64"
ROOT = Path(__file__).resolve().parents[2]
SHARED_CACHE = Path(os.environ.get("KVC_TEST_CACHE") or Path.home() / ".cache" / "kvc-test") / "kvc"
DATA = Path(hooks.__file__).resolve().parent / "data"
PLUGIN = DATA / "90-kvc.install"
DEBIAN_HOOK = DATA / "kvc"
CHECKSUM_A = "a" * 64
CHECKSUM_B = "b" * 64
CHECKSUM_C = "c" * 64


@dataclass
class Host:
    """A KVC_ROOT with recording fakes on PATH (this machine has no bootc or rpm-ostree)."""

    tmp: Path
    root: Path
    bin: Path
    log: Path

    @property
    def layout(self) -> Layout:
        return Layout(HostPaths(str(self.root)))

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "KVC_ROOT": str(self.root), "PATH": fakeprog.path_with(self.bin), **extra}
        env.pop("KVC_KERNEL", None)
        return env

    def kvc(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kvc", *args], capture_output=True, text=True, env=self.env(**extra)
        )

    def file(self, path: str, text: str = "") -> Path:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target

    def enable(self, name: str, template: str = "kmods-via-containers", target: str = "default.target") -> None:
        wants = self.root / "etc" / "systemd" / "system" / f"{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / f"{template}@{name}.service").symlink_to(f"/etc/systemd/system/{template}@.service")

    def conf(self, name: str, extra: str = "") -> InstanceConfig:
        context = self.tmp / f"{name}-context"
        context.mkdir(exist_ok=True)
        (context / "Containerfile").write_text("FROM scratch\n")
        self.file(
            f"/etc/kvc/{name}.conf",
            f"KMOD_CONTAINER_BUILD_CONTEXT={context}\nKMOD_SOFTWARE_VERSION=1.0\nKMOD_NAMES=demo_mod\n{extra}",
        )
        return InstanceConfig.load(str(self.root / "etc" / "kvc"), name)

    def calls(self, program: str) -> list[list[str]]:
        return fakeprog.calls(self.log, program)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    for program in ("bootc", "rpm-ostree"):
        if shutil.which(program):
            pytest.skip(f"this machine has {program}; the tests need it absent unless faked")
    made = Host(tmp_path, tmp_path / "root", tmp_path / "bin", tmp_path / "calls.jsonl")
    made.root.mkdir()
    made.bin.mkdir()
    monkeypatch.setenv("PATH", fakeprog.path_with(made.bin))
    return made


# ---- the version order ----------------------------------------------------------------------------------

KERNELS = [
    "6.1.0-9-amd64",
    "6.1.0-10-amd64",
    "6.1.0-57-amd64",
    "6.1.0-57-rt-amd64",
    "6.12.1+deb13-amd64",
    "6.12.10+deb13-amd64",
    "6.12.1-amd64",
    "5.14.0-427.13.1.el9_4.x86_64",
    "5.14.0-427.2.1.el9_4.x86_64",
    "5.14.0-503.11.1.el9_5.x86_64",
    "6.8.5-301.fc40.x86_64",
    "6.9.4-200.fc40.x86_64",
    "6.10.0-0.rc1.20240602git.1.fc41.x86_64",
    "6.10.0-1.fc41.x86_64",
    "6.8.0-45-generic",
    "6.8.0-100-generic",
    "6.6.31+rpt-rpi-v8",
    "6.6.62+rpt-rpi-v8",
    "6.6.51+rpt-rpi-v8",
]


def systemd_order(a: str, b: str) -> int:
    done = subprocess.run(["systemd-analyze", "compare-versions", "--", a, b], capture_output=True, text=True)
    assert done.returncode in (0, 11, 12), done.stderr
    return {0: 0, 11: 1, 12: -1}[done.returncode]


@pytest.fixture(scope="module")
def compare_versions_oracle() -> None:
    if shutil.which("systemd-analyze") is None or systemd_order("1", "2") != -1:
        pytest.skip("needs systemd-analyze compare-versions (systemd 252 or newer)")


def test_version_order_is_systemds(compare_versions_oracle: None) -> None:
    pairs = [(a, b) for a in KERNELS for b in KERNELS[::3]]
    rnd = random.Random(11)
    alphabet = "0019aAbz.-~^_+"
    for _ in range(150):
        pairs.append(tuple("".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 7))) for _ in "ab"))  # type: ignore[arg-type]
    wrong = [(a, b, compare_versions(a, b), systemd_order(a, b)) for a, b in pairs]
    assert [w for w in wrong if w[2] != w[3]] == []


def test_newest_kernel_is_the_last_by_sort_V() -> None:
    for family in ("amd64", "generic", "el9", "fc4", "rpi"):
        releases = [k for k in KERNELS if family in k]
        by_sort = subprocess.run(["sort", "-V"], input="\n".join(releases) + "\n", capture_output=True, text=True)
        assert newest(releases) == by_sort.stdout.split()[-1], family
    assert newest(["6.1.0-9-amd64", "6.1.0-10-amd64"]) == "6.1.0-10-amd64"  # not the string order


# ---- /boot -----------------------------------------------------------------------------------------------


def boot_images(host: Host, *releases: str) -> None:
    for release in releases:
        host.file(f"/boot/vmlinuz-{release}", "kernel")
        host.file(f"/boot/initrd.img-{release}", "initrd")
        host.file(f"/boot/config-{release}", "config")
        host.file(f"/boot/System.map-{release}", "map")


def test_newest_vmlinuz_in_boot_is_next_as_grub_on_debian_boots_it(host: Host) -> None:
    boot_images(host, "6.1.0-9-amd64", "6.1.0-57-amd64", "6.1.0-10-amd64")
    host.file("/boot/vmlinuz-0-rescue-0123456789abcdef0123456789abcdef", "rescue")
    (host.root / "boot" / "vmlinuz-9.9.9-dir").mkdir()  # not a file
    found = find_next_kernel(host.layout)
    assert (found.release, found.source) == ("6.1.0-57-amd64", Source.BOOT_IMAGES)
    assert found.why == "/boot/vmlinuz-6.1.0-57-amd64 is the newest of 3 kernels in /boot"
    assert [(s.source, s.why) for s in found.skipped] == [
        (Source.BOOTC, "bootc is not installed (not on PATH)"),
        (Source.RPM_OSTREE, "rpm-ostree is not installed (not on PATH)"),
        (Source.BOOT_ENTRIES, "no boot entries in /boot/loader/entries, /efi/loader/entries, /boot/efi/loader/entries"),
    ]


def bls(host: Host, boot: str, name: str, **fields: str) -> None:
    lines = [f"title {fields.pop('title', 'Linux')}"] + [
        f"{key.replace('_', '-')} {value}" for key, value in fields.items()
    ]
    host.file(f"{boot}/loader/entries/{name}.conf", "# written by a test\n" + "\n".join(lines) + "\n")


MACHINE = "0123456789abcdef0123456789abcdef"


def test_bls_entries_come_before_vmlinuz_files_and_the_newest_version_wins(host: Host) -> None:
    boot_images(host, "6.9.9-999.fc40.x86_64")  # a file without an entry: not what the boot loader shows
    for release in ("6.8.5-301.fc40.x86_64", "6.9.4-200.fc40.x86_64", "6.9.4-50.fc40.x86_64"):
        bls(
            host,
            "/boot",
            f"{MACHINE}-{release}",
            version=release,
            linux=f"/vmlinuz-{release}",
            initrd=f"/initramfs-{release}.img",
        )
    bls(host, "/boot", f"{MACHINE}-0-rescue", version=f"0-rescue-{MACHINE}", linux=f"/vmlinuz-0-rescue-{MACHINE}")
    found = find_next_kernel(host.layout)
    assert (found.release, found.source) == ("6.9.4-200.fc40.x86_64", Source.BOOT_ENTRIES)
    entry = f"/boot/loader/entries/{MACHINE}-6.9.4-200.fc40.x86_64.conf"
    assert found.why == f"{entry} has the newest version (6.9.4-200.fc40.x86_64) of 3 entries"


def test_kernel_install_entries_under_efi_name_the_release_in_their_linux_path(host: Host) -> None:
    for release in ("6.1.0-10-amd64", "6.1.0-9-amd64"):
        bls(host, "/efi", f"{MACHINE}-{release}", version=release, linux=f"/{MACHINE}/{release}/linux", options="quiet")
    assert find_next_kernel(host.layout).release == "6.1.0-10-amd64"


def test_ostree_entries_order_by_their_deployment_version(host: Host) -> None:
    # ostree numbers its entries: the highest version is the default deployment.
    bls(
        host,
        "/boot",
        "ostree-1-fedora-coreos",
        version="1",
        linux="/ostree/fedora-coreos-1a/vmlinuz-6.9.4-200.fc40.x86_64",
    )
    bls(
        host,
        "/boot",
        "ostree-2-fedora-coreos",
        version="2",
        linux="/ostree/fedora-coreos-2b/vmlinuz-6.8.5-301.fc40.x86_64",
    )
    found = find_next_kernel(host.layout)
    assert found.release == "6.8.5-301.fc40.x86_64"
    assert "ostree-2-fedora-coreos.conf has the newest version (2)" in found.why


def test_entries_without_a_kernel_fall_back_to_vmlinuz_files(host: Host) -> None:
    bls(host, "/boot", "uki", version="6.1.0-57-amd64", uki="/EFI/Linux/debian.efi")
    bls(host, "/boot", "rescue", version=f"0-rescue-{MACHINE}", linux=f"/vmlinuz-0-rescue-{MACHINE}")
    boot_images(host, "6.1.0-56-amd64")
    found = find_next_kernel(host.layout)
    # The UKI entry has no linux line but its version is a release: it boots that kernel.
    assert (found.release, found.source) == ("6.1.0-57-amd64", Source.BOOT_ENTRIES)
    (host.root / "boot" / "loader" / "entries" / "uki.conf").unlink()
    found = find_next_kernel(host.layout)
    assert (found.release, found.source) == ("6.1.0-56-amd64", Source.BOOT_IMAGES)
    assert found.skipped[-1].why == "none of the 1 boot entries boots a kernel release"


def test_nothing_to_go_by_is_kernel_missing_with_every_reason(host: Host) -> None:
    (host.root / "boot").mkdir()
    with pytest.raises(KernelMissingError) as caught:
        find_next_kernel(host.layout)
    assert caught.value.brief == "cannot tell which kernel this host boots next"
    assert caught.value.details.splitlines() == [
        "bootc: bootc is not installed (not on PATH)",
        "rpm-ostree: rpm-ostree is not installed (not on PATH)",
        "boot-entries: no boot entries in /boot/loader/entries, /efi/loader/entries, /boot/efi/loader/entries",
        "boot-images: no /boot/vmlinuz-KVER files",
    ]
    result = host.kvc("check", "--next-boot")
    assert result.returncode == ExitCode.KERNEL_MISSING, result.stderr
    assert result.stderr.splitlines()[0] == "kvc: error: cannot tell which kernel this host boots next"
    assert result.stderr.splitlines()[-1] == "kvc: hint: name it: --kernel KVER"


# ---- bootc and rpm-ostree ---------------------------------------------------------------------------------


def deployment(host: Host, stateroot: str, checksum: str, serial: int, release: str) -> None:
    host.file(f"/ostree/deploy/{stateroot}/deploy/{checksum}.{serial}/usr/lib/modules/{release}/vmlinuz", "kernel")
    host.file(f"/ostree/deploy/{stateroot}/deploy/{checksum}.{serial}/usr/lib/modules/{release}/modules.dep", "")


def bootc_entry(image: str, version: str, checksum: str, serial: int) -> dict[str, Any]:
    """A BootEntry of bootc's host-v1 schema (docs/src/host-v1.schema.json)."""
    return {
        "image": {
            "image": {"image": image, "transport": "registry", "signature": None},
            "version": version,
            "timestamp": "2026-11-30T08:00:00Z",
            "imageDigest": "sha256:" + checksum[::-1],
            "architecture": "amd64",
        },
        "cachedUpdate": None,
        "incompatible": False,
        "pinned": False,
        "softRebootCapable": False,
        "downloadOnly": False,
        "store": "ostreeContainer",
        "composefs": None,
        "ostree": {"checksum": checksum, "deploySerial": serial, "stateroot": "default"},
    }


def bootc_status(
    booted: Optional[dict[str, Any]],
    staged: Optional[dict[str, Any]] = None,
    rollback: Optional[dict[str, Any]] = None,
    *,
    rollback_queued: bool = False,
) -> str:
    image = {"image": "registry.example/os:stable", "transport": "registry"} if booted else None
    return json.dumps(
        {
            "apiVersion": "org.containers.bootc/v1",
            "kind": "BootcHost",
            "metadata": {"name": "host"},
            "spec": {"image": image, "bootOrder": "rollback" if rollback_queued else "default"},
            "status": {
                "staged": staged,
                "booted": booted,
                "rollback": rollback,
                "otherDeployments": [],
                "rollbackQueued": rollback_queued,
                "type": "bootcHost" if booted else None,
            },
        }
    )


def fake(host: Host, program: str, stdout: str, code: int = 0, stderr: str = "") -> None:
    fakeprog.install(host.bin, program, host.log, rules=[fakeprog.Rule(["status", "--json"], stdout, code, stderr)])


def test_bootc_staged_deployment_boots_next_its_kernel_from_its_tree(host: Host) -> None:
    deployment(host, "default", CHECKSUM_A, 0, "6.9.4-200.fc40.x86_64")
    deployment(host, "default", CHECKSUM_B, 0, "6.10.3-200.fc40.x86_64")
    booted = bootc_entry("registry.example/os:stable", "40.20261101.0", CHECKSUM_A, 0)
    staged = bootc_entry("registry.example/os:stable", "40.20261201.0", CHECKSUM_B, 0)
    fake(host, "bootc", bootc_status(booted, staged))
    fake(host, "rpm-ostree", "{}")
    boot_images(host, "1.0.0-1-old")
    found = find_next_kernel(host.layout)
    assert (found.release, found.source) == ("6.10.3-200.fc40.x86_64", Source.BOOTC)
    assert found.why == (
        "the staged deployment of registry.example/os:stable boots "
        f"/ostree/deploy/default/deploy/{CHECKSUM_B}.0/usr/lib/modules/6.10.3-200.fc40.x86_64/vmlinuz"
    )
    assert host.calls("bootc") == [["status", "--json"]]
    assert host.calls("rpm-ostree") == []  # the first source that answers wins


def test_bootc_without_staged_is_the_booted_and_a_queued_rollback_wins(host: Host) -> None:
    deployment(host, "default", CHECKSUM_A, 0, "6.9.4-200.fc40.x86_64")
    deployment(host, "default", CHECKSUM_C, 1, "6.8.5-301.fc40.x86_64")
    booted = bootc_entry("registry.example/os:stable", "40.20261101.0", CHECKSUM_A, 0)
    rollback = bootc_entry("registry.example/os:stable", "40.20261001.0", CHECKSUM_C, 1)
    fake(host, "bootc", bootc_status(booted, None, rollback))
    found = find_next_kernel(host.layout)
    assert found.release == "6.9.4-200.fc40.x86_64" and found.why.startswith("the booted deployment (nothing staged)")
    fake(host, "bootc", bootc_status(booted, None, rollback, rollback_queued=True))
    found = find_next_kernel(host.layout)
    assert found.release == "6.8.5-301.fc40.x86_64"
    assert found.why.startswith("the rollback deployment (queued for the next boot) of registry.example/os:stable")


def test_bootc_that_cannot_answer_is_skipped_with_its_reason(host: Host) -> None:
    boot_images(host, RELEASE)
    fake(host, "bootc", "", 1, "error: Status: This command requires root privileges\n")
    assert find_next_kernel(host.layout).skipped[0].why == (
        "'bootc status --json' exited with status 1: error: Status: This command requires root privileges"
    )
    fake(host, "bootc", bootc_status(None))  # what bootc prints on a host it did not deploy
    assert find_next_kernel(host.layout).skipped[0].why == "not a bootc host (bootc status has no booted deployment)"
    staged = bootc_entry("registry.example/os:stable", "40.1", CHECKSUM_B, 0)
    fake(host, "bootc", bootc_status(bootc_entry("registry.example/os:stable", "40.0", CHECKSUM_A, 0), staged))
    found = find_next_kernel(host.layout)
    assert found.skipped[0].why == (
        "the staged deployment of registry.example/os:stable: "
        f"no /ostree/deploy/default/deploy/{CHECKSUM_B}.0/usr/lib/modules/*/vmlinuz"
    )
    assert found.source is Source.BOOT_IMAGES
    fake(host, "bootc", "not json")
    assert find_next_kernel(host.layout).skipped[0].why == "'bootc status --json' did not print a JSON document"


def rpm_ostree_deployment(checksum: str, serial: int, *, booted: bool, staged: bool, linux: str) -> dict[str, Any]:
    """One deployment of ``rpm-ostree status --json``, as Fedora CoreOS prints it."""
    return {
        "id": f"fedora-coreos-{checksum}.{serial}",
        "osname": "fedora-coreos",
        "serial": serial,
        "checksum": checksum,
        "version": "40.20261201.3.0",
        "timestamp": 1764576000,
        "origin": "fedora:fedora/x86_64/coreos/stable",
        "container-image-reference": "ostree-remote-image:fedora:docker://registry.example/fedora/fedora-coreos:stable",
        "booted": booted,
        "staged": staged,
        "pinned": False,
        "unlocked": "none",
        "regenerate-initramfs": False,
        "requested-packages": [],
        "requested-local-packages": [],
        "requested-base-removals": [],
        "requested-base-local-replacements": [],
        "packages": [],
        "base-removals": [],
        "base-local-replacements": [],
        "base-remote-replacements": {},
        "base-commit-meta": {
            "ostree.bootable": True,
            "ostree.linux": linux,
            "rpmostree.inputhash": "d272136f0a700a049da30520591205fec5474125474a58a4c9a63ecc8243f227",
            "version": "40.20261201.3.0",
        },
    }


def rpm_ostree_status(*deployments: dict[str, Any]) -> str:
    return json.dumps(
        {"deployments": list(deployments), "transaction": None, "cached-update": None, "update-driver": None}
    )


def test_rpm_ostree_first_deployment_boots_next(host: Host) -> None:
    staged = rpm_ostree_deployment(CHECKSUM_B, 0, booted=False, staged=True, linux="6.10.3-200.fc40.x86_64")
    booted = rpm_ostree_deployment(CHECKSUM_A, 0, booted=True, staged=False, linux="6.9.4-200.fc40.x86_64")
    fake(host, "rpm-ostree", rpm_ostree_status(staged, booted))
    deployment(host, "fedora-coreos", CHECKSUM_A, 0, "6.9.4-200.fc40.x86_64")
    deployment(host, "fedora-coreos", CHECKSUM_B, 0, "6.10.3-200.fc40.x86_64")
    found = find_next_kernel(host.layout)
    assert (found.release, found.source) == ("6.10.3-200.fc40.x86_64", Source.RPM_OSTREE)
    assert found.why == (
        f"the staged deployment fedora-coreos {CHECKSUM_B[:12]}.0 boots "
        f"/ostree/deploy/fedora-coreos/deploy/{CHECKSUM_B}.0/usr/lib/modules/6.10.3-200.fc40.x86_64/vmlinuz"
    )
    assert found.skipped[0].why == "bootc is not installed (not on PATH)"
    assert host.calls("rpm-ostree") == [["status", "--json"]]
    # Without its tree (not readable here), the commit metadata names the kernel.
    shutil.rmtree(host.root / "ostree" / "deploy" / "fedora-coreos" / "deploy" / f"{CHECKSUM_B}.0")
    found = find_next_kernel(host.layout)
    assert found.release == "6.10.3-200.fc40.x86_64"
    assert "its base-commit-meta says ostree.linux=6.10.3-200.fc40.x86_64" in found.why
    # Nothing staged: the booted deployment is first.
    fake(host, "rpm-ostree", rpm_ostree_status(booted))
    found = find_next_kernel(host.layout)
    assert found.release == "6.9.4-200.fc40.x86_64"
    assert found.why.startswith("the booted deployment (nothing staged or pending)")


def test_rpm_ostree_on_a_host_it_did_not_boot_is_skipped(host: Host) -> None:
    fake(host, "rpm-ostree", "", 1, "error: This system was not booted via libostree\n")
    boot_images(host, RELEASE)
    found = find_next_kernel(host.layout)
    assert (
        found.skipped[1].why
        == "'rpm-ostree status --json' exited with status 1: error: This system was not booted via libostree"
    )


def test_the_caller_names_the_kernel_through_its_environment() -> None:
    kernel_install = {"KERNEL_INSTALL_MACHINE_ID": MACHINE, "KERNEL_INSTALL_LAYOUT": "bls"}
    assert named_kernel(RELEASE, kernel_install).source is Source.KERNEL_INSTALL
    debian = named_kernel(RELEASE, {"DEB_MAINT_PARAMS": "'configure' ''"})
    assert (debian.source, debian.why) == (Source.DEBIAN_HOOK, "the kernel package's postinst.d hook ('configure' '')")
    assert named_kernel(RELEASE, {}).source is Source.COMMAND_LINE


def test_enabled_instances_are_the_wanted_units_under_etc(host: Host) -> None:
    host.enable("one")
    host.enable("one", target="multi-user.target")
    host.enable("two", template="kvc-container")
    host.file("/etc/systemd/system/default.target.wants/sshd.service")
    host.file("/etc/systemd/system/kmods-via-containers@three.service")  # not enabled: not in a .wants
    run_wants = host.root / "run" / "systemd" / "system" / "default.target.wants"
    run_wants.mkdir(parents=True)
    (run_wants / "kmods-via-containers@four.service").symlink_to("/dev/null")  # runtime: gone at reboot
    found = enabled_instances(host.layout)
    assert [(e.name, e.units) for e in found] == [
        ("one", ("kmods-via-containers@one.service",)),
        ("two", ("kvc-container@two.service",)),
    ]


# ---- the gate --------------------------------------------------------------------------------------------


def podman_images(host: Host, images: dict[str, tuple[str, dict[str, str]]]) -> None:
    """A fake podman whose `image inspect` knows ``images`` (tag -> id, labels) and nothing else."""
    rules: list[fakeprog.RuleSpec] = [
        (["image", "inspect", tag], json.dumps([inspect_entry(image_id, [f"localhost/{tag}"], labels)]), 0)
        for tag, (image_id, labels) in images.items()
    ]
    rules.append(fakeprog.Rule(["image", "inspect"], "", 125, "Error: image not known\n"))
    fakeprog.install(host.bin, "podman", host.log, rules=rules)


def built(
    instance: InstanceConfig, image_id: str, *, digest: Optional[str] = None
) -> tuple[str, tuple[str, dict[str, str]]]:
    labels = image_labels(instance, RELEASE, context_digest(instance, RELEASE) if digest is None else digest)
    return image_tag(instance, RELEASE), (image_id, labels)


def verified(host: Host, name: str, image_id: str, status: str = "verified") -> None:
    record = {"schema": 1, "status": status, "image_id": image_id, "at": time.time(), "timings": {}, "artifacts": None}
    host.file(f"/var/lib/kvc/{name}/verify/{RELEASE}.json", json.dumps(record))


def gate(host: Host) -> tuple[int, dict[str, Any], str]:
    result = host.kvc("check", "--next-boot", "--json")
    return result.returncode, json.loads(result.stdout), result.stderr


def test_gate_ready_when_every_enabled_instance_has_its_current_image(host: Host) -> None:
    boot_images(host, "6.1.0-9-amd64", RELEASE)
    one, two = host.conf("one"), host.conf("two")
    host.conf("disabled")
    host.enable("one")
    host.enable("two", template="kvc-container")
    podman_images(host, dict([built(one, "1" * 64), built(two, "2" * 64)]))
    code, report, stderr = gate(host)
    assert code == 0, stderr
    assert report["schema"] == 1 and report["ready"] is True
    assert report["next_kernel"]["release"] == RELEASE and report["next_kernel"]["source"] == "boot-images"
    assert [(i["name"], i["ready"], i["image"]["up_to_date"], i["problems"]) for i in report["instances"]] == [
        ("one", True, True, []),
        ("two", True, True, []),
    ]
    human = host.kvc("check", "--next-boot")
    assert human.returncode == 0 and human.stderr == ""
    assert human.stdout.splitlines() == [
        f"next boot: kernel {RELEASE} (from boot-images: /boot/vmlinuz-{RELEASE} is the newest of 2 kernels in /boot)",
        f"  one: ready (image one-1.0:{RELEASE} {'1' * 12} up to date)",
        f"  two: ready (image two-1.0:{RELEASE} {'2' * 12} up to date)",
    ]
    assert sorted({call[2] for call in host.calls("podman")}) == [f"one-1.0:{RELEASE}", f"two-1.0:{RELEASE}"]


def test_gate_refuses_an_instance_not_built_or_outdated(host: Host) -> None:
    host.conf("one")
    two = host.conf("two")
    host.enable("one")
    host.enable("two")
    podman_images(host, dict([built(two, "2" * 64, digest="0" * 64)]))
    result = host.kvc("check", "--next-boot", "--kernel", RELEASE)
    assert result.returncode == ExitCode.STATE
    assert result.stdout.splitlines() == [
        f"next boot: kernel {RELEASE} (from command-line: named on the command line)",
        "  one: NOT READY",
        f"    image one-1.0:{RELEASE} does not exist: one is not built for {RELEASE}",
        f"      hint: kvc build one --kernel {RELEASE}",
        "  two: NOT READY",
        f"    image two-1.0:{RELEASE} is outdated: its build inputs changed",
        f"      hint: kvc build two --kernel {RELEASE}",
    ]
    assert result.stderr.splitlines() == [
        f"kvc: error: not ready for kernel {RELEASE}: 2 of 2 enabled instance(s) (one, two)",
        "kvc: hint: run the hints above, then 'kvc check --next-boot' again",
    ]


def test_gate_passes_a_kernel_a_dkms_source_skipped_with_its_current_inputs(host: Host) -> None:
    """A DKMS instance whose build declined the kernel (BUILD_EXCLUSIVE_*) has nothing to load on it:
    ready, as DKMS's autoinstall skips, while its build inputs are those the skip was recorded for."""
    one = host.conf("one", "KVC_DKMS=one/1.0\n")
    host.enable("one")
    podman_images(host, {})
    record_skip(host.layout, one, RELEASE, f"one/1.0 for {RELEASE} (x86_64): kernel {RELEASE} is newer than X")
    result = host.kvc("check", "--next-boot", "--kernel", RELEASE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[1] == (
        f"  one: ready, nothing to load (its build skipped this kernel: one/1.0 for {RELEASE} (x86_64): "
        f"kernel {RELEASE} is newer than X)"
    )
    host.conf("one", "KVC_DKMS=one/1.0\nKVC_BUILD_ARGS=X=1\n")  # new build inputs: the skip no longer holds
    result = host.kvc("check", "--next-boot", "--kernel", RELEASE)
    assert result.returncode == ExitCode.STATE
    assert f"image one-1.0:{RELEASE} does not exist: one is not built for {RELEASE}" in result.stdout


def test_gate_wants_a_passed_verification_of_the_current_image_when_required(host: Host) -> None:
    boot_images(host, RELEASE)
    instance = host.conf("one", "KVC_VERIFY_REQUIRED=yes\n")
    host.enable("one")
    image_id = "1" * 64
    podman_images(host, dict([built(instance, image_id)]))
    code, report, stderr = gate(host)
    assert code == ExitCode.STATE
    assert report["instances"][0]["problems"] == [
        {"what": f"not verified on {RELEASE} (KVC_VERIFY_REQUIRED=yes)", "hint": f"kvc verify one --kernel {RELEASE}"}
    ]
    verified(host, "one", "9" * 64)  # a passed verification of an earlier build
    code, report, stderr = gate(host)
    assert code == ExitCode.STATE
    assert report["instances"][0]["problems"][0]["what"] == (
        f"the last verification on {RELEASE} (verified) was of another image (999999999999) (KVC_VERIFY_REQUIRED=yes)"
    )
    verified(host, "one", image_id, "smoke-failed")
    code, report, stderr = gate(host)
    assert code == ExitCode.STATE
    assert report["instances"][0]["problems"][0]["what"] == (
        f"the last verification on {RELEASE} ended smoke-failed (KVC_VERIFY_REQUIRED=yes)"
    )
    verified(host, "one", image_id)
    code, report, stderr = gate(host)
    assert code == 0, stderr
    item = report["instances"][0]
    assert item["ready"] and item["verify_required"] and item["verification"]["status"] == "verified"
    assert item["verification"]["current"] is True


def test_gate_with_no_enabled_instance_passes_and_a_broken_conf_does_not(host: Host) -> None:
    boot_images(host, RELEASE)
    host.conf("idle")
    result = host.kvc("check", "--next-boot")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "  no enabled instances: nothing to prepare"
    host.enable("gone")  # enabled, but its conf was removed
    code, report, _ = gate(host)
    assert code == ExitCode.STATE
    (problem,) = report["instances"][0]["problems"]
    assert problem["what"].startswith(f"its configuration cannot be used: {host.root}/etc/kvc/gone.conf: no such file")
    assert host.calls("podman") == []


# ---- kernel-added ------------------------------------------------------------------------------------------


def test_kernel_added_continues_past_a_failing_instance_and_ends_with_the_gate(host: Host) -> None:
    good = host.conf("good")
    host.file("/etc/kvc/bad.conf", "KMOD_CONTAINER_BUILD_CONTEXT=/src\nKMOD_SOFTWARE_VERSION=1\n")
    host.enable("bad")
    host.enable("good")
    podman_images(host, dict([built(good, "1" * 64)]))
    dry = host.kvc("kernel-added", RELEASE, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        f"prepare the enabled instances for kernel {RELEASE} (from command-line: named on the command line):",
        f"  bad: cannot prepare it for {RELEASE}: {host.root}/etc/kvc/bad.conf: KMOD_NAMES is not set",
        "  good:",
        f"    good-1.0:{RELEASE}: up to date (image matches the build context)",
        f"then check the reboot gate for {RELEASE} (as 'kvc check --next-boot --kernel {RELEASE}')",
    ]
    result = host.kvc("kernel-added", RELEASE)
    assert result.returncode == ExitCode.CONFIG  # the first failure's code
    lines = result.stdout.splitlines()
    assert f"bad: FAILED: {host.root}/etc/kvc/bad.conf: KMOD_NAMES is not set" in lines
    assert f"good: good-1.0:{RELEASE} is up to date" in lines
    assert lines[-5:] == [
        f"next boot: kernel {RELEASE} (from command-line: named on the command line)",
        "  bad: NOT READY",
        f"    its configuration cannot be used: {host.root}/etc/kvc/bad.conf: KMOD_NAMES is not set",
        f"      hint: add KMOD_NAMES=... to {host.root}/etc/kvc/bad.conf",
        f"  good: ready (image good-1.0:{RELEASE} {'1' * 12} up to date)",
    ]
    assert (
        result.stderr.splitlines()[0]
        == f"kvc: error: 1 enabled instance(s) could not be prepared for kernel {RELEASE}: bad"
    )
    # Only image inspections: nothing was built, pulled or run.
    assert {call[0] for call in host.calls("podman")} == {"image"}


def test_kernel_added_skips_a_verification_this_image_already_passed(host: Host) -> None:
    instance = host.conf("one", "KVC_VERIFY_REQUIRED=yes\n")
    host.enable("one")
    podman_images(host, dict([built(instance, "1" * 64)]))
    verified(host, "one", "1" * 64)
    result = host.kvc("kernel-added", RELEASE, KERNEL_INSTALL_MACHINE_ID=MACHINE)
    assert result.returncode == 0, result.stderr
    assert f"one: verified on {RELEASE} " in result.stdout and "(this image); not repeated" in result.stdout
    assert (
        f"next boot: kernel {RELEASE} (from kernel-install: kernel-install add {RELEASE} ran kvc's plugin)"
        in result.stdout
    )


def test_kernel_added_leaves_tree_delivery_to_the_boot_when_the_kernel_has_no_tree_here(host: Host) -> None:
    # As on an ostree host before the staged deployment boots: no /lib/modules/KVER yet.
    instance = host.conf("one", "KVC_DELIVERY=tree\n")
    host.enable("one")
    podman_images(host, dict([built(instance, "1" * 64)]))
    note = (
        f"no /lib/modules/{RELEASE} on this host yet (a staged ostree deployment's tree shows at its boot): "
        "the unit's 'kvc load' delivers into the module tree at boot"
    )
    dry = host.kvc("kernel-added", RELEASE, "--dry-run")
    assert f"    {note}" in dry.stdout.splitlines(), dry.stdout
    result = host.kvc("kernel-added", RELEASE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"one: {note}" in result.stdout.splitlines()
    assert not (host.root / "lib" / "modules").exists()


# ---- the hooks ---------------------------------------------------------------------------------------------


def fake_kvc(host: Host, code: int = 0) -> None:
    fakeprog.install(host.bin, "kvc", host.log, rules=[(["**"], "prepared\n", code)])


def run_hook(hook: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(hook), *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL
    )


def hook_env(path: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KERNEL_INSTALL_", "DEB_"))}
    return {**env, "PATH": path, **extra}


def no_kvc_anywhere() -> None:
    dirs = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if shutil.which("kvc", path=dirs):
        pytest.skip("kvc is installed in a system directory here; the hooks would find it")


def test_kernel_install_plugin_calls_kvc_on_add_only_and_never_fails_the_install(host: Host) -> None:
    fake_kvc(host)
    path = fakeprog.path_with(host.bin)
    entry = f"/boot/{MACHINE}/{RELEASE}"
    added = run_hook(PLUGIN, "add", RELEASE, entry, f"/boot/vmlinuz-{RELEASE}", "/boot/initrd", env=hook_env(path))
    assert added.returncode == 0 and added.stdout == "prepared\n", added.stderr
    run_hook(PLUGIN, "remove", RELEASE, entry, env=hook_env(path))
    run_hook(PLUGIN, "add", RELEASE, entry, env=hook_env(path, KERNEL_INSTALL_VERBOSE="1"))
    assert host.calls("kvc") == [["kernel-added", RELEASE], ["-v", "kernel-added", RELEASE]]
    fake_kvc(host, code=4)
    failed = run_hook(PLUGIN, "add", RELEASE, entry, env=hook_env(path))
    assert failed.returncode == 0
    assert f"'kvc kernel-added {RELEASE}' exited with status 4" in failed.stderr
    assert f"run 'kvc check --next-boot --kernel {RELEASE}' before rebooting" in failed.stderr
    empty = run_hook(PLUGIN, "add", env=hook_env(path))
    assert empty.returncode == 0 and "called without a kernel version" in empty.stderr


def test_hooks_without_kvc_say_so_and_succeed(tmp_path: Path) -> None:
    no_kvc_anywhere()
    env = hook_env("/nonexistent")
    for hook, args in ((PLUGIN, ("add", RELEASE, "/boot/x", "/boot/vmlinuz")), (DEBIAN_HOOK, (RELEASE,))):
        result = run_hook(hook, *args, env=env)
        assert result.returncode == 0
        assert "kvc is not installed (not on PATH)" in result.stderr
        assert f"once kvc is back, run 'kvc kernel-added {RELEASE}'" in result.stderr


def test_debian_hook_through_run_parts_as_the_kernel_postinst_runs_it(host: Host) -> None:
    fake_kvc(host, code=6)
    hooks_dir = host.tmp / "postinst.d"
    hooks_dir.mkdir()
    shutil.copy2(DEBIAN_HOOK, hooks_dir / "kvc")
    listed = subprocess.run(["run-parts", "--test", str(hooks_dir)], capture_output=True, text=True)
    assert listed.stdout.split() == [str(hooks_dir / "kvc")]  # a name run-parts accepts
    env = hook_env(fakeprog.path_with(host.bin), DEB_MAINT_PARAMS="'configure' ''")
    done = subprocess.run(
        [
            "run-parts",
            "--report",
            "--exit-on-error",
            f"--arg={RELEASE}",
            f"--arg=/boot/vmlinuz-{RELEASE}",
            str(hooks_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert host.calls("kvc") == [["kernel-added", RELEASE]]
    assert done.stdout == ""  # debconf may own stdout: everything went to stderr
    assert "prepared" in done.stderr and "exited with status 6" in done.stderr


def needs_kernel_install() -> str:
    program = shutil.which("kernel-install")
    if program is None:
        pytest.skip("kernel-install (systemd) is not installed")
    return program


def kernel_install(
    host: Host, plugin: Path, path: str, release: str = RELEASE, **extra: str
) -> subprocess.CompletedProcess[str]:
    """The real kernel-install add, kept off the host: only kvc's plugin (KERNEL_INSTALL_PLUGINS),
    a private $BOOT, machine id, configuration directory and temporary directory."""
    image = host.root / "boot" / f"vmlinuz-{release}"
    if not image.exists():
        host.file(f"/boot/vmlinuz-{release}", "kernel")
    (host.tmp / "boot-root").mkdir(exist_ok=True)
    (host.tmp / "conf-root").mkdir(exist_ok=True)
    env = hook_env(
        path,
        KERNEL_INSTALL_PLUGINS=str(plugin),
        BOOT_ROOT=str(host.tmp / "boot-root"),
        MACHINE_ID=MACHINE,
        KERNEL_INSTALL_CONF_ROOT=str(host.tmp / "conf-root"),
        TMPDIR=str(host.tmp),
        KVC_ROOT=str(host.root),
        **extra,
    )
    return subprocess.run([needs_kernel_install(), "add", release, str(image)], capture_output=True, text=True, env=env)


def test_kernel_install_runs_the_plugin_which_runs_kvc(host: Host) -> None:
    needs_kernel_install()
    fake_kvc(host)
    done = kernel_install(host, PLUGIN, fakeprog.path_with(host.bin))
    assert done.returncode == 0, done.stderr
    assert host.calls("kvc") == [["kernel-added", RELEASE]]
    assert sorted(os.listdir(host.tmp / "boot-root")) == []  # layout "other": nothing written to $BOOT


def real_kvc(host: Host) -> None:
    wrapper = host.bin / "kvc"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m kvc "$@"\n')
    wrapper.chmod(0o755)


def test_kernel_install_reaches_the_real_kvc_and_its_gate(host: Host) -> None:
    needs_kernel_install()
    real_kvc(host)
    done = kernel_install(host, PLUGIN, fakeprog.path_with(host.bin))
    assert done.returncode == 0, done.stderr
    said = done.stdout.splitlines()
    named = f"kernel {RELEASE} (from kernel-install: kernel-install add {RELEASE} ran kvc's plugin)"
    assert said[0] == f"prepare the enabled instances for {named}:"
    assert said[-1] == "  no enabled instances: nothing to prepare"


# ---- kvc install writes the hooks ----------------------------------------------------------------------


def test_install_writes_the_hooks_and_uninstall_leaves_them(host: Host) -> None:
    for program in ("podman", "systemctl"):
        fakeprog.install(host.bin, program, host.log)
    bundle = host.tmp / "bundle"
    bundle.mkdir()
    (bundle / "demo.conf").write_text("KMOD_CONTAINER_BUILD_CONTEXT=.\nKMOD_SOFTWARE_VERSION=1\nKMOD_NAMES=demo_mod\n")
    (bundle / "Containerfile").write_text("FROM scratch\n")
    plugin = host.root / "etc" / "kernel" / "install.d" / "90-kvc.install"
    debian = host.root / "etc" / "kernel" / "postinst.d" / "kvc"
    dry = host.kvc("install", str(bundle), "--dry-run")
    assert f"  write the kernel hook {plugin}" in dry.stdout.splitlines() and not plugin.exists()
    assert host.kvc("install", str(bundle)).returncode == 0
    for path, data in ((plugin, PLUGIN), (debian, DEBIAN_HOOK)):
        assert path.read_text() == data.read_text() and (path.stat().st_mode & 0o777) == 0o755
    again = host.kvc("install", str(bundle), "--dry-run")
    assert f"  {plugin}: up to date" in again.stdout.splitlines()
    # An earlier kvc's hook (it carries the marker) is replaced; someone else's is refused.
    debian.write_text("#!/bin/sh\n# kvc kernel hook: an older one\nexit 0\n")
    assert f"  replace kvc's earlier kernel hook {debian}" in host.kvc("install", str(bundle), "--dry-run").stdout
    assert host.kvc("install", str(bundle)).returncode == 0 and debian.read_text() == DEBIAN_HOOK.read_text()
    assert host.kvc("uninstall", "demo").returncode == 0
    assert plugin.exists() and debian.exists()


# ---- for real: podman builds, qemu verifies ------------------------------------------------------------------


def podman_ready() -> None:
    for script in ("setup-podman.sh", "bootstrap-base-image.sh"):
        subprocess.run(["bash", str(ROOT / "scripts" / script)], check=True, capture_output=True)


@pytest.mark.podman
def test_installing_a_kernel_builds_its_image_and_opens_the_gate(host: Host) -> None:
    """kernel-install add of a kernel the example has no image for: the plugin runs kvc
    kernel-added, which builds it with podman; the gate refused before and passes after."""
    needs_kernel_install()
    podman_ready()
    release = current_release()  # the Debian ABI whose headers the example builds against
    host.file(f"/boot/vmlinuz-{release}", "kernel")
    real_kvc(host)
    with unique_prefix("kvcnext") as name:
        write_example_conf(host.root, name)
        host.enable(name)
        before = host.kvc("check", "--next-boot")
        assert before.returncode == ExitCode.STATE, before.stderr
        assert f"image {name}-1.0.0:{release} does not exist" in before.stdout
        done = kernel_install(host, PLUGIN, fakeprog.path_with(host.bin), release)
        assert done.returncode == 0, done.stderr
        assert f"{name}: built {name}-1.0.0:{release} (simple_kmod, simple_procfs_kmod verified for {release})" in (
            done.stdout
        ), done.stdout + done.stderr
        assert f"  {name}: ready (image {name}-1.0.0:{release} " in done.stdout
        after = host.kvc("check", "--next-boot", "--json")
        assert after.returncode == 0, after.stdout + after.stderr
        report = json.loads(after.stdout)
        assert report["ready"] and report["next_kernel"] == {
            "release": release,
            "source": "boot-images",
            "why": f"/boot/vmlinuz-{release} is the newest of 1 kernels in /boot",
            "skipped": report["next_kernel"]["skipped"],
        }


@pytest.mark.podman
def test_installing_a_kernel_delivers_a_tree_mode_instance_into_its_module_tree(host: Host) -> None:
    """KVC_DELIVERY=tree: kernel-added delivers the new kernel's modules into its tree, indexed
    (modules.dep names them), and the gate passes."""
    needs_kernel_install()
    podman_ready()
    release = current_release()
    host.file(f"/boot/vmlinuz-{release}", "kernel")
    moddir = host.root / "lib" / "modules" / release
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        host.file(f"/lib/modules/{release}/{name}")
    (moddir / "kernel").mkdir()
    real_kvc(host)
    with unique_prefix("kvcnexttree") as name:
        write_example_conf(host.root, name, "\nKVC_DELIVERY=tree\n")
        host.enable(name)
        done = kernel_install(host, PLUGIN, fakeprog.path_with(host.bin), release)
        assert done.returncode == 0, done.stderr
        assert f"  {name}: ready (image {name}-1.0.0:{release} " in done.stdout, done.stdout + done.stderr
        delivered = sorted(p.name for p in (moddir / "updates" / "kvc" / name).iterdir())
        assert delivered == ["simple-kmod.ko", "simple-procfs-kmod.ko"]
        dep = (moddir / "modules.dep").read_text()
        assert f"updates/kvc/{name}/simple-kmod.ko:" in dep


@pytest.mark.vm
def test_installing_a_kernel_verifies_it_in_a_vm_when_the_instance_requires_it(
    host: Host, indexed_kernel_tree: DebianKernel
) -> None:
    """KVC_VERIFY_REQUIRED=yes: kernel-added builds, then boots the new kernel (Debian's real
    one) in a VM and proves the modules there; the gate passes only with that verification."""
    needs_kernel_install()
    podman_ready()
    release = indexed_kernel_tree.release
    (host.root / "boot").mkdir()
    (host.root / "boot" / f"vmlinuz-{release}").symlink_to(indexed_kernel_tree.vmlinuz)
    (host.root / "lib" / "modules").mkdir(parents=True)
    (host.root / "lib" / "modules" / release).symlink_to(indexed_kernel_tree.moddir)
    real_kvc(host)
    with unique_prefix("kvcnextvm") as name:
        write_example_conf(host.root, name, "\nKVC_VERIFY_REQUIRED=yes\n")
        host.enable(name)
        done = kernel_install(host, PLUGIN, fakeprog.path_with(host.bin), release, KVC_CACHE_DIR=str(SHARED_CACHE))
        assert done.returncode == 0, done.stderr
        assert "VERIFIED" in done.stdout, done.stdout + done.stderr
        after = host.kvc("check", "--next-boot", "--json", KVC_CACHE_DIR=str(SHARED_CACHE))
        assert after.returncode == 0, after.stdout + after.stderr
        (item,) = json.loads(after.stdout)["instances"]
        assert item["verify_required"] and item["verification"]["status"] == "verified"
        assert item["verification"]["current"]
        again = host.kvc("kernel-added", release, KVC_CACHE_DIR=str(SHARED_CACHE))
        assert again.returncode == 0 and "(this image); not repeated" in again.stdout
