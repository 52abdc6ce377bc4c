"""Debian's DKMS packages, imported, built and verified on the real Debian 6.1 kernel in qemu
(``-m vm``): each package's modules load into the guest's module tree (KVC_DELIVERY=tree, as DKMS
installs them), in-tree dependencies from the guest kernel's own tree, the package's smoke test
(tests/support/dkms.py) exercises it a little, everything unloads, and ``kvc dkms status`` then says
``verified``.

xtables-addons as imported lists xt_DNETMAP, which cannot load on Debian's kernel: its source tests
``#ifdef CONFIG_NF_NAT`` and Debian builds NF_NAT as a module, so its init says so and fails. kvc
verify reports exactly that (exit 5, the kernel's line, a clean rollback); without xt_DNETMAP in
KMOD_NAMES the other 22 verify, xt_CHAOS getting xt_TARPIT and xt_DELUDE through the kernel's
request_module() from the tree delivery.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from kvc.verify.initramfs import find_busybox
from support.debian_kernel import DebianKernel
from support.dkms import PACKAGES, DkmsPackage, download
from support.example import unique_prefix
from support.kvccli import kvc

SHARED_CACHE = Path(os.environ.get("KVC_TEST_CACHE") or Path.home() / ".cache" / "kvc-test") / "kvc"


@pytest.fixture(scope="module")
def dkms_vm(tmp_path_factory: pytest.TempPathFactory, indexed_kernel_tree: DebianKernel) -> Iterator[dict[str, Any]]:
    for program in ("qemu-system-x86_64", "podman"):
        assert shutil.which(program), f"{program} is missing: run scripts/setup.sh --containers"
    find_busybox()
    tmp = tmp_path_factory.mktemp("dkmsvm")
    with unique_prefix("kvcdkmsvm") as prefix:
        yield {
            "tmp": tmp,
            "env": {"KVC_ROOT": str(tmp / "root"), "KVC_CACHE_DIR": str(SHARED_CACHE)},
            "prefix": prefix,
            "release": indexed_kernel_tree.release,
            "kernel_dir": str(indexed_kernel_tree.root),
        }


def import_and_build(dkms_vm: dict[str, Any], package: DkmsPackage) -> tuple[str, Path]:
    """The package imported with its smoke test added to the conf, installed and built: (name, installed conf)."""
    tmp, env, release = dkms_vm["tmp"], dkms_vm["env"], dkms_vm["release"]
    name = f"{dkms_vm['prefix']}-{package.deb.removesuffix('-dkms')}"
    bundle = tmp / name
    deb = download(package.deb, tmp / "debs")
    imported = kvc(["dkms", "import", str(deb), "--name", name, "--output", str(bundle), "-k", release], env)
    assert imported.returncode == 0, imported.stderr
    with open(bundle / f"{name}.conf", "a", encoding="utf-8") as conf:
        conf.write(f"KVC_SMOKE_TEST={json.dumps(package.smoke_test)}\n")
    assert kvc(["install", str(bundle)], env).returncode == 0
    built = kvc(["build", name, "-k", release], env, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    return name, Path(env["KVC_ROOT"]) / "etc" / "kvc" / f"{name}.conf"


def verify(dkms_vm: dict[str, Any], name: str) -> tuple[int, dict[str, Any]]:
    result = kvc(
        ["verify", name, "-k", dkms_vm["release"], "--kernel-dir", dkms_vm["kernel_dir"], "--accel", "tcg", "--json"],
        dkms_vm["env"],
        timeout=400,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def assert_verified(report: dict[str, Any], package: DkmsPackage, modules: tuple[str, ...]) -> None:
    assert report["status"] == "verified", json.dumps(report, indent=2)[-6000:]
    assert report["delivery"] == "tree"
    loaded = {m["name"]: m for m in report["modules"] if m["origin"] == "instance"}
    assert sorted(loaded) == sorted(modules)
    assert all(m["loaded"] and "O" in (m["taint"] or "") for m in loaded.values())
    assert report["smoke"]["exit_code"] == 0 and report["smoke"]["in_image"], report["smoke"]
    assert report["unload"] and all(u["removed"] for u in report["unload"])
    assert {u["name"] for u in report["unload"]} >= set(modules)


@pytest.mark.vm
@pytest.mark.podman
@pytest.mark.parametrize("package", [p for p in PACKAGES if p.deb != "xtables-addons-dkms"], ids=lambda p: str(p.deb))
def test_each_package_verifies_on_the_real_kernel(dkms_vm: dict[str, Any], package: DkmsPackage) -> None:
    name, _ = import_and_build(dkms_vm, package)
    code, report = verify(dkms_vm, name)
    assert code == 0, json.dumps(report, indent=2)[-6000:]
    assert_verified(report, package, package.modules)
    if package.deb == "jool-dkms":
        order = [m["name"] for m in report["modules"] if m["origin"] == "instance"]
        assert order[0] == "jool_common"  # jool and jool_siit use its symbols
    status = kvc(["dkms", "status", name, "-k", dkms_vm["release"]], dkms_vm["env"])
    assert status.stdout.splitlines()[0].endswith(f", {dkms_vm['release']}, x86_64: verified (instance {name})")


@pytest.mark.vm
@pytest.mark.podman
def test_xtables_addons_verifies_once_the_module_debians_kernel_cannot_load_is_dropped(
    dkms_vm: dict[str, Any],
) -> None:
    (package,) = [p for p in PACKAGES if p.deb == "xtables-addons-dkms"]
    name, conf = import_and_build(dkms_vm, package)
    code, report = verify(dkms_vm, name)
    assert code == 5 and report["status"] == "load-refused", json.dumps(report, indent=2)[-6000:]
    (refused,) = [m for m in report["modules"] if not m["loaded"]]
    assert refused["name"] == "xt_DNETMAP" and refused["errno"] == "EINVAL"
    assert any("CONFIG_NF_NAT is not available in your kernel" in line for line in refused["log"])
    assert report["rollback"] and all(u["removed"] for u in report["unload"])
    without = tuple(m for m in package.modules if m != "xt_DNETMAP")
    text = conf.read_text()
    conf.write_text(re.sub(r"^KMOD_NAMES=.*$", f"KMOD_NAMES='{' '.join(without)}'", text, flags=re.M))
    rebuilt = kvc(["build", name, "-k", dkms_vm["release"]], dkms_vm["env"], timeout=900)
    assert rebuilt.returncode == 0, rebuilt.stderr
    code, report = verify(dkms_vm, name)
    assert code == 0, json.dumps(report, indent=2)[-6000:]
    assert_verified(report, package, without)
    requested = {m["name"]: m.get("by", "") for m in report["modules"] if m["origin"] == "instance"}
    assert requested["xt_TARPIT"] == requested["xt_DELUDE"] == "the kernel's request_module()"
