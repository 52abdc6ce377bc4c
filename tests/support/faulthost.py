"""Hosts for the fault scripts (scripts/kill9.py, scripts/diskfull.py): a root directory with the
fake kernel, a small copy of Debian's module tree (``kernel/lib`` and ``kernel/crypto``, indexed by
Debian's depmod) and an instance whose image is built FROM the simple-kmod example's image with
firmware, a modprobe.d file and a udev rule, so that a delivery writes every kind of file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from kvc.kmod.kernel.fake import STATE_DIR, FakeKernel
from kvc.kmod.paths import HostPaths
from support.treehost import tree_digest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("simple-kmod", "simple-procfs-kmod")
SUBTREES = ("kernel/lib", "kernel/crypto")
FIRMWARE = {"kvcfault/fw.bin": b"\x00kvc fault firmware\xff" * 64}
OPTIONS = "alias kvc-fault-alias simple_kmod\n"
RULES = 'ACTION=="add", SUBSYSTEM=="misc", KERNEL=="kvc-fault", MODE="0660"\n'
# Directories that are kvc's state and confs, the fake kernel or scratch, not the host's files.
NOT_HOST_FILES = ("var", "run", "proc", "sys", "tmp", STATE_DIR, "etc/kvc")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    for _attempt in range(5):
        done = subprocess.run(["podman", *args], capture_output=True, text=True)
        # A listing fails when an image it reads is removed meanwhile (other tests share the store).
        if done.returncode == 0 or "image not known" not in done.stderr or "images" not in args:
            break
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()}")
    return done


def small_tree(source_moddir: Path, target_root: Path, release: str) -> Path:
    """``target_root/lib/modules/RELEASE``: SUBTREES of the Debian tree at ``source_moddir``, its
    builtin lists and the order of the copied modules, indexed by Debian's depmod."""
    moddir = target_root / "lib" / "modules" / release
    moddir.mkdir(parents=True)
    for subtree in SUBTREES:
        shutil.copytree(source_moddir / subtree, moddir / subtree)
    for name in ("modules.builtin", "modules.builtin.modinfo"):
        shutil.copyfile(source_moddir / name, moddir / name)
    order = [line for line in (source_moddir / "modules.order").read_text().splitlines() if (moddir / line).exists()]
    (moddir / "modules.order").write_text("".join(f"{line}\n" for line in order))
    subprocess.run(["depmod", "-C", "/dev/null", "-b", str(target_root), release], check=True, capture_output=True)
    return moddir


def host_digest(root: Path, skip: Iterable[str] = NOT_HOST_FILES) -> dict[str, str]:
    """Every host file and directory below ``root`` (not kvc's state, the fake kernel or scratch):
    a directory, a link's target, or a file's mode and sha256."""
    return tree_digest(root, skip)


def tree_differences(have: Mapping[str, str], want: Mapping[str, str]) -> list[str]:
    """What differs between two :func:`host_digest` results, one line per path."""
    lines = []
    for path in sorted(set(have) | set(want)):
        if have.get(path) != want.get(path):
            lines.append(f"{path}: {have.get(path, 'missing')} (expected {want.get(path, 'missing')})")
    return lines


@dataclass
class Host:
    """One root: KVC_ROOT with the fake kernel; ``storage`` are podman's global options for a
    storage of its own (empty: the default storage)."""

    root: Path
    name: str
    release: str
    storage: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        return {**os.environ, "KVC_ROOT": str(self.root), "KVC_KERNEL": "fake", "TMPDIR": str(tmp), **self.extra_env}

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kvc", *args]

    def kvc(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, env=self.env(), timeout=timeout)

    def ok(self, *args: str) -> str:
        done = self.kvc(*args)
        if done.returncode != 0:
            raise RuntimeError(f"kvc {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done.stdout

    def podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman(*self.storage, *args, check=check)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "kvc" / f"{self.name}.conf"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def tag(self) -> str:
        return f"localhost/{self.name}-1.0.0:{self.release}"

    def kernel(self) -> FakeKernel:
        return FakeKernel(HostPaths(str(self.root)))

    def loaded(self) -> dict[str, str]:
        """The fake kernel's modules: {name: sha256 of the bytes it was given}."""
        state = json.loads((self.root / STATE_DIR / "state.json").read_text())
        return {module["name"]: module.get("sha256", "") for module in state["modules"]}

    def status(self) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.ok("status", self.name, "--json"))
        return data

    def image_id(self, ref: Optional[str] = None) -> str:
        done = self.podman("image", "inspect", "--format", "{{.Id}}", ref or self.tag, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    def tags(self) -> list[str]:
        """Every name in the storage that holds the instance's name."""
        out = self.podman("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference=*{self.name}*")
        return sorted(set(out.stdout.split()))


def new_host(
    base: Path,
    label: str,
    name: str,
    release: str,
    tree: Path,
    symvers: Path,
    conf: str,
    *,
    settings: str = "",
    storage: Sequence[str] = (),
) -> Host:
    """A root ``base/label`` with a copy of ``tree`` (a small_tree root), the fake kernel, the
    instance's conf and kvc's global settings."""
    root = base / label
    shutil.copytree(tree, root, symlinks=True)
    FakeKernel.create(HostPaths(str(root)), release, symvers=str(symvers))
    host = Host(root, name, release, tuple(storage))
    host.conf.parent.mkdir(parents=True, exist_ok=True)
    host.conf.write_text(conf)
    if settings:
        (host.conf.parent / "kmods-via-containers.conf").write_text(settings)
    return host


def instance_name(stem: str) -> str:
    return f"{stem}{uuid.uuid4().hex[:6]}"


def write_bundle(bundle: Path, base_image: str) -> None:
    """A build context FROM ``base_image`` (the example's image) adding the shipped files."""
    for relative, data in FIRMWARE.items():
        path = bundle / "lib" / "firmware" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (bundle / "etc" / "kvcfault").mkdir(parents=True)
    (bundle / "etc" / "kvcfault" / "kvc-fault-options.conf").write_text(OPTIONS)
    (bundle / "etc" / "kvcfault" / "99-kvc-fault.rules").write_text(RULES)
    (bundle / "Containerfile").write_text(f"FROM {base_image}\nCOPY lib/ /lib/\nCOPY etc/ /etc/\n")


def instance_conf(bundle: Path, *, delivery: str = "direct", extra: str = "") -> str:
    return (
        f"KMOD_CONTAINER_BUILD_CONTEXT={bundle}\n"
        "KMOD_SOFTWARE_VERSION=1.0.0\n"
        f'KMOD_NAMES="{" ".join(MODULES)}"\n'
        'KVC_MODULE_PARAMS_simple_procfs_kmod="number=0"\n'
        f"KVC_DELIVERY={delivery}\n"
        "KVC_FIRMWARE=kvcfault\n"
        "KVC_MODPROBE_CONF=/etc/kvcfault/kvc-fault-options.conf\n"
        "KVC_MODULES_LOAD=yes\n"
        "KVC_UDEV_RULES=/etc/kvcfault/99-kvc-fault.rules\n"
        f"{extra}"
    )


def example_image(release: str) -> str:
    """The simple-kmod example's image for ``release``, built once with kvc if it is missing
    (the base image from scripts/bootstrap-base-image.sh)."""
    image = f"localhost/simple-kmod-1.0.0:{release}"
    if podman("image", "exists", image, check=False).returncode == 0:
        return image
    for script in ("setup-podman.sh", "bootstrap-base-image.sh"):
        subprocess.run(["bash", str(REPO / "scripts" / script)], check=True, capture_output=True)
    from support.example import write_example_conf

    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvc-example-{uuid.uuid4().hex[:6]}"
    try:
        write_example_conf(root)
        env = {**os.environ, "KVC_ROOT": str(root)}
        done = subprocess.run(
            [sys.executable, "-m", "kvc", "build", "simple-kmod", "--kernel", release],
            capture_output=True,
            text=True,
            env=env,
        )
        if done.returncode != 0:
            raise RuntimeError(f"building the example failed: {done.stderr}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return image
