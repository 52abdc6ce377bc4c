"""``kvc dkms import`` and ``kvc dkms status``, and the dkms.conf driver in real builds.

Fast: the DKMS source is found in Debian packages (the tree byte for byte what ``dpkg-deb -x``
unpacks), plain tarballs, DKMS's mktarball layout and zstd tarballs; hostile or wrong archives get
one line and exit 3 before any container runs; dkms.conf's module records get DKMS 3.0's defaults
and refusals.

Podman (``-m podman``): the five Debian packages of tests/support/dkms.py imported (the conf's
KMOD_NAMES, version and KVC_DKMS; src/ the package's tree) and built by kvc for the current Debian
6.1 kernel: each module at DEST_MODULE_LOCATION with vermagic KVER, xtables-addons' unlisted xt_asn
reported as a warning and left out. A synthetic source exercises PATCH/PATCH_MATCH, PRE_BUILD,
POST_BUILD, MAKE_MATCH, BUILT_MODULE_LOCATION, DEST_MODULE_NAME and STRIP; kernels outside
BUILD_EXCLUSIVE_* are skipped (exit 77; with another kernel that builds, exit 0); a dkms.conf full
of shell runs only in containers: nothing on the host, no network, none of kvc's environment.
"""

from __future__ import annotations

import filecmp
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

import pytest
import zstandard

from kvc.config import read_conf
from kvc.dkms.conf import DkmsConf
from kvc.dkms.source import SourceKind, locate
from kvc.errors import ConfigError
from kvc.images import kernel_tag, repository_name
from kvc.kmod.kernel.fake import FakeKernel
from kvc.kmod.paths import HostPaths
from support import fakeprog
from support.debian_kernel import DebianKernel, cache_dir
from support.dkms import PACKAGES, DkmsPackage, download
from support.example import unique_prefix
from support.kvccli import kvc

OTHER_KERNEL = "6.12.118+deb12-amd64"  # bookworm's other kernel ABI, for a kernel outside BUILD_EXCLUSIVE


@pytest.fixture(scope="module")
def debs() -> dict[str, Path]:
    """The five packages, downloaded once into the test cache (scripts/fuzz.py takes seeds from there)."""
    directory = cache_dir() / "dkms"
    return {package.deb: download(package.deb, directory) for package in PACKAGES}


def dpkg_tree(deb: Path, into: Path) -> Path:
    """The package's usr/src/NAME-VERSION as Debian's dpkg-deb unpacks it (the oracle)."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    (tree,) = sorted((into / "usr" / "src").iterdir())
    return tree


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    assert files_a == files_b
    for name in files_a:
        if (a / name).is_file():
            assert filecmp.cmp(a / name, b / name, shallow=False), name
            assert os.access(a / name, os.X_OK) == os.access(b / name, os.X_OK), name


# ---- finding the source ------------------------------------------------------------------------------


def test_a_debian_package_gives_its_usr_src_tree_as_dpkg_deb_unpacks_it(debs: dict[str, Path], tmp_path: Path) -> None:
    for index, deb in enumerate(debs.values()):
        source = locate(str(deb), str(tmp_path / f"scratch{index}"))
        assert source.kind is SourceKind.DEB
        same_tree(Path(source.tree), dpkg_tree(deb, tmp_path / f"dpkg{index}"))


def tar_of(tree: Path, output: Path, arcroot: str, mode: Literal["w:gz", "w:xz"] = "w:gz") -> Path:
    with tarfile.open(output, mode) as tar:
        tar.add(tree, arcname=arcroot)
    return output


def test_tarballs_plain_mktarball_and_zstd(debs: dict[str, Path], tmp_path: Path) -> None:
    tree = dpkg_tree(debs["vpoll-dkms"], tmp_path / "dpkg")
    top = tar_of(tree, tmp_path / "top.tar.gz", "vpoll-0.1")
    flat = tar_of(tree, tmp_path / "flat.tar.xz", ".", "w:xz")
    mk = tmp_path / "mk.tar.gz"
    with tarfile.open(mk, "w:gz") as tar:
        tar.add(tree, arcname="dkms_source_tree")
        info = tarfile.TarInfo("dkms_main_tree/6.1.0-1-amd64/x86_64/module/vpoll.ko")
        tar.addfile(info, io.BytesIO())
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(tree, arcname="vpoll-0.1")
    zst = tmp_path / "src.tar.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    for archive, kind in ((top, SourceKind.TARBALL), (flat, SourceKind.TARBALL), (mk, SourceKind.MKTARBALL)):
        source = locate(str(archive), str(tmp_path / archive.name.replace(".", "_")))
        assert source.kind is kind
        same_tree(Path(source.tree), tree)
    same_tree(Path(locate(str(zst), str(tmp_path / "zst")).tree), tree)
    assert locate(str(tree), str(tmp_path / "unused")).tree == str(tree)


def hostile(tmp_path: Path, name: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def test_wrong_and_hostile_sources_get_one_line_and_exit_3(tmp_path: Path) -> None:
    conf = b'PACKAGE_NAME="x"\nPACKAGE_VERSION="1"\n'
    (tmp_path / "two" / "a").mkdir(parents=True)
    cases = {
        "climbs out": hostile(tmp_path, "up.tar.gz", [(entry("dkms.conf"), conf), (entry("../escape"), b"x")]),
        "absolute": hostile(tmp_path, "abs.tar.gz", [(entry("dkms.conf"), conf), (entry("/tmp/kvc-abs"), b"x")]),
        "link out": hostile(
            tmp_path,
            "link.tar.gz",
            [(entry("dkms.conf"), conf), (entry("l", tarfile.SYMTYPE, "../../etc/passwd"), b"")],
        ),
        "device": hostile(tmp_path, "dev.tar.gz", [(entry("dkms.conf"), conf), (entry("null", tarfile.CHRTYPE), b"")]),
        "binary only": hostile(tmp_path, "bin.tar.gz", [(entry("dkms_main_tree/x/module/x.ko"), b"")]),
        "two sources": hostile(tmp_path, "two.tar.gz", [(entry("a/dkms.conf"), conf), (entry("b/dkms.conf"), conf)]),
        "no conf": hostile(tmp_path, "none.tar.gz", [(entry("README"), b"hi")]),
        "not an archive": tmp_path / "plain.txt",
        "missing": tmp_path / "nothing-here",
        "dir without conf": tmp_path / "two",
    }
    (tmp_path / "plain.txt").write_text("hello\n")
    expected = {
        "climbs out": "points outside the archive",
        "absolute": "points outside the archive",
        "link out": "points outside the source tree",
        "device": "is not a file, directory or link",
        "binary only": "a binary-only DKMS tarball",
        "two sources": "more than one DKMS source in it (a/dkms.conf, b/dkms.conf)",
        "no conf": "no dkms.conf at its top or one directory down",
        "not an archive": "cannot unpack",
        "missing": "no such file or directory",
        "dir without conf": "no dkms.conf in this directory",
    }
    for case, path in cases.items():
        result = kvc(
            ["dkms", "import", str(path), "-k", "6.1.0-1-amd64", "--dry-run"], {"KVC_ROOT": str(tmp_path / "r")}
        )
        assert result.returncode == 3, (case, result.stderr)
        first = result.stderr.splitlines()[0]
        assert first.startswith(f"kvc: error: {path}: ") and expected[case] in first, (case, result.stderr)
        assert "Traceback" not in result.stderr
    assert not Path("/tmp/kvc-abs").exists()


# ---- dkms.conf's module records -----------------------------------------------------------------------


def conf_of(**arrays: dict[int, str]) -> DkmsConf:
    values = {"PACKAGE_NAME": {0: "pkg"}, "PACKAGE_VERSION": {0: "1.0"}, **arrays}
    return DkmsConf("6.1.0-1-amd64", values)


def test_module_records_get_dkms_defaults() -> None:
    (lone,) = conf_of(DEST_MODULE_LOCATION={0: "/extra"}).modules("t")
    assert (lone.built_name, lone.dest_name, lone.built_location, lone.strip) == ("pkg", "pkg", "", True)
    records = conf_of(
        BUILT_MODULE_NAME={0: "a", 2: "c"},
        BUILT_MODULE_LOCATION={1: "sub/"},
        DEST_MODULE_NAME={2: "renamed"},
        DEST_MODULE_LOCATION={0: "/extra", 1: "/updates/x", 2: "/kernel/drivers"},
        STRIP={0: "no", 2: "yes"},
    )
    with pytest.raises(ConfigError, match=r"no BUILT_MODULE_NAME\[1\]"):
        records.modules("t")
    fixed = conf_of(
        BUILT_MODULE_NAME={0: "a", 1: "b", 2: "c"},
        DEST_MODULE_NAME={2: "renamed"},
        DEST_MODULE_LOCATION={0: "/extra", 1: "/updates/x", 2: "/kernel/drivers"},
        STRIP={0: "no", 2: "yes"},
    ).modules("t")
    assert [(r.dest_name, r.strip) for r in fixed] == [("a", False), ("b", False), ("renamed", True)]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"BUILT_MODULE_NAME": {0: "a.ko"}, "DEST_MODULE_LOCATION": {0: "/extra"}}, "ends in .o or .ko"),
        ({"BUILT_MODULE_NAME": {0: "a"}, "DEST_MODULE_LOCATION": {0: "/usr/lib"}}, "does not begin with /kernel"),
        ({"BUILT_MODULE_NAME": {0: "a"}}, "does not begin with /kernel"),
        (
            {
                "BUILT_MODULE_NAME": {0: "a"},
                "BUILT_MODULE_LOCATION": {0: "../x"},
                "DEST_MODULE_LOCATION": {0: "/extra"},
            },
            "outside the build tree",
        ),
        ({"BUILT_MODULE_NAME": {0: "a b"}, "DEST_MODULE_LOCATION": {0: "/extra"}}, "not a kernel module name"),
    ],
)
def test_module_records_dkms_refuses_are_refused(arrays: dict[str, dict[int, str]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        conf_of(**arrays).modules("t")


def test_package_name_and_version_must_be_usable() -> None:
    assert DkmsConf("k", {"PACKAGE_NAME": {0: "r8125"}, "PACKAGE_VERSION": {0: "1:0.0+git2023~rc1"}}).package("t") == (
        "r8125",
        "1:0.0+git2023~rc1",
    )
    with pytest.raises(ConfigError, match="PACKAGE_VERSION='1 0' is not a name"):
        DkmsConf("k", {"PACKAGE_NAME": {0: "x"}, "PACKAGE_VERSION": {0: "1 0"}}).package("t")
    with pytest.raises(ConfigError, match="sets no PACKAGE_NAME"):
        DkmsConf("k", {"PACKAGE_VERSION": {0: "1"}}).package("t")


# ---- real builds ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dkms_env(tmp_path_factory: pytest.TempPathFactory, indexed_kernel_tree: DebianKernel) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dkms")
    with unique_prefix("kvcdkms") as prefix:
        yield {
            "tmp": tmp,
            "env": {"KVC_ROOT": str(tmp / "root")},
            "prefix": prefix,
            "release": indexed_kernel_tree.release,
        }


def image_files(tmp: Path, tag: str) -> Path:
    """The image's /lib/modules and /usr/lib/kvc copied out with podman (for the host's modinfo and readelf)."""
    out = tmp / f"files-{uuid.uuid4().hex[:6]}"
    out.mkdir()
    container = subprocess.run(["podman", "create", tag, "true"], check=True, capture_output=True, text=True).stdout
    try:
        for path in ("/lib/modules", "/usr/lib/kvc"):
            subprocess.run(["podman", "cp", f"{container.strip()}:{path}", str(out)], check=True, capture_output=True)
    finally:
        subprocess.run(["podman", "rm", container.strip()], check=True, capture_output=True)
    return out


def modinfo(path: Path, field: str) -> str:
    return subprocess.run(
        ["modinfo", "-F", field, str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def dkms_conf_value(tree: Path, key: str) -> str:
    """KEY="value" from a dkms.conf's text (the packages' confs set their name and version so)."""
    match = re.search(rf'^{key}="([^"$]+)"', (tree / "dkms.conf").read_text(), re.M)
    assert match, key
    return match.group(1)


@pytest.mark.podman
@pytest.mark.parametrize("package", PACKAGES, ids=[p.deb for p in PACKAGES])
def test_each_debian_package_imports_and_builds_for_the_debian_kernel(
    package: DkmsPackage, debs: dict[str, Path], dkms_env: dict[str, Any]
) -> None:
    tmp, env, release = dkms_env["tmp"], dkms_env["env"], dkms_env["release"]
    name = f"{dkms_env['prefix']}-{package.deb.removesuffix('-dkms')}"
    bundle = tmp / name
    imported = kvc(
        ["dkms", "import", str(debs[package.deb]), "--name", name, "--output", str(bundle), "-k", release], env
    )
    assert imported.returncode == 0, imported.stderr
    tree = dpkg_tree(debs[package.deb], tmp / f"dpkg-{name}")
    same_tree(bundle / "src", tree)
    version = dkms_conf_value(tree, "PACKAGE_VERSION")
    values = read_conf(str(bundle / f"{name}.conf"))
    assert values["KMOD_NAMES"].split() == list(package.modules)
    assert values["KMOD_SOFTWARE_VERSION"] == version
    assert values["KVC_DKMS"] == f"{dkms_conf_value(tree, 'PACKAGE_NAME')}/{version}"
    assert values["KVC_DELIVERY"] == "tree"
    package_name = dkms_conf_value(tree, "PACKAGE_NAME")
    run = f'"build", "/usr/src/{package_name}-{version}", "{package_name}", "{version}"]'
    assert run in (bundle / "Containerfile").read_text()
    installed = kvc(["install", str(bundle)], env)
    assert installed.returncode == 0, installed.stderr
    built = kvc(["build", name, "-k", release], env, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    warnings = [line for line in built.stderr.splitlines() if line.startswith("kvc: warning:")]
    assert len(warnings) == len(package.extra), built.stderr
    for extra, line in zip(package.extra, warnings):
        assert f"the build made {extra}, which dkms.conf does not list" in line
    files = image_files(tmp, f"{repository_name(name, version)}:{kernel_tag(release)}")
    found = sorted(str(p.relative_to(files / "modules" / release)) for p in files.rglob("*.ko"))
    assert found == sorted(f"{package.location.strip('/')}/{module}.ko" for module in package.modules)
    for path in (files / "modules" / release).rglob("*.ko"):
        assert modinfo(path, "vermagic").split()[0] == release
    status = kvc(["dkms", "status", name, "-k", release], env)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines() == [f"{values['KVC_DKMS']}, {release}, x86_64: built (instance {name})"]


SYNTHETIC_C = r"""#include <linux/module.h>
#include "generated.h"
#ifndef PATCHED
#define PATCHED "no"
#endif
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("patched=" PATCHED " generated=" GENERATED " make=" __stringify(MAKE_CHOICE));
static int __init synth_init(void) { return 0; }
static void __exit synth_exit(void) { }
module_init(synth_init);
module_exit(synth_exit);
"""

SYNTHETIC_PATCH = """--- a/sub/synth.c
+++ b/sub/synth.c
@@ -1,2 +1,3 @@
+#define PATCHED "yes"
 #include <linux/module.h>
 #include "generated.h"
"""


def synthetic_source(directory: Path, conf: str) -> Path:
    """A DKMS source of one module, sub/synth.c (built twice: as synth and as twin)."""
    (directory / "sub").mkdir(parents=True)
    (directory / "patches").mkdir()
    (directory / "sub" / "synth.c").write_text(SYNTHETIC_C)
    (directory / "sub" / "twin.c").write_text(SYNTHETIC_C)
    (directory / "sub" / "Kbuild").write_text("obj-m += synth.o twin.o\nccflags-y += -g -DMAKE_CHOICE=$(CHOICE)\n")
    (directory / "patches" / "mark.patch").write_text(SYNTHETIC_PATCH)
    (directory / "patches" / "never.patch").write_text("not a patch\n")
    (directory / "pre.sh").write_text("#!/bin/sh\necho '#define GENERATED \"by-pre-build\"' > sub/generated.h\n")
    (directory / "post.sh").write_text('#!/bin/sh\necho "post-build ran in $(pwd)"\n')
    (directory / "pre.sh").chmod(0o755)
    (directory / "post.sh").chmod(0o755)
    (directory / "dkms.conf").write_text(conf)
    return directory


@pytest.mark.podman
def test_dkms_conf_directives_in_a_real_build(dkms_env: dict[str, Any]) -> None:
    """PATCH with PATCH_MATCH, PRE_BUILD, MAKE picked by MAKE_MATCH, BUILT_MODULE_LOCATION,
    DEST_MODULE_NAME and STRIP, as dkms build applies them."""
    tmp, env, release = dkms_env["tmp"], dkms_env["env"], dkms_env["release"]
    name = f"{dkms_env['prefix']}-synth"
    conf = f"""PACKAGE_NAME="{name}"
PACKAGE_VERSION="2.0~rc1+git5"
MAKE[0]="make -C $kernel_source_dir M=$dkms_tree/$PACKAGE_NAME/$PACKAGE_VERSION/build/sub CHOICE=default modules"
MAKE[1]="make -C $kernel_source_dir M=$dkms_tree/$PACKAGE_NAME/$PACKAGE_VERSION/build/sub CHOICE=matched modules"
MAKE_MATCH[1]="^{re.escape(release)}$"
PATCH[0]="mark.patch"
PATCH_MATCH[0]="^6\\."
PATCH[1]="never.patch"
PATCH_MATCH[1]="^2\\.4\\."
PRE_BUILD="pre.sh"
POST_BUILD="post.sh"
BUILT_MODULE_NAME[0]="synth"
BUILT_MODULE_LOCATION[0]="sub"
DEST_MODULE_LOCATION[0]="/extra/dkms"
STRIP[0]="no"
BUILT_MODULE_NAME[1]="twin"
BUILT_MODULE_LOCATION[1]="sub/"
DEST_MODULE_NAME[1]="twin-renamed"
DEST_MODULE_LOCATION[1]="/updates"
STRIP[1]="yes"
"""
    source = synthetic_source(tmp / "synth-src", conf)
    bundle = tmp / name
    imported = kvc(["dkms", "import", str(source), "--output", str(bundle), "-k", release], env)
    assert imported.returncode == 0, imported.stderr
    assert read_conf(str(bundle / f"{name}.conf"))["KMOD_NAMES"] == "synth twin-renamed"
    assert kvc(["install", str(bundle)], env).returncode == 0
    built = kvc(["-v", "build", name, "-k", release], env, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"post-build ran in /var/lib/dkms/{name}/2.0~rc1+git5/build" in built.stderr
    assert "Applying patch mark.patch" in built.stderr and "never.patch" not in built.stderr
    files = image_files(tmp, f"{repository_name(name, '2.0~rc1+git5')}:{kernel_tag(release)}")
    synth = files / "modules" / release / "extra" / "dkms" / "synth.ko"
    twin = files / "modules" / release / "updates" / "twin-renamed.ko"
    assert modinfo(synth, "description") == "patched=yes generated=by-pre-build make=matched"
    assert modinfo(twin, "description") == "patched=no generated=by-pre-build make=matched"
    sections = subprocess.run(["readelf", "-S", "-W", str(synth)], capture_output=True, text=True, check=True).stdout
    assert ".debug_info" in sections  # STRIP[0]=no
    sections = subprocess.run(["readelf", "-S", "-W", str(twin)], capture_output=True, text=True, check=True).stdout
    assert ".debug_info" not in sections  # STRIP[1]=yes: strip -g
    assert (files / "kvc" / "build-warnings").read_text() == ""
    status = kvc(["dkms", "status", "-k", release], env)
    assert f"{name}/2.0~rc1+git5, {release}, x86_64: built" in status.stdout.splitlines()


def legacy(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``kmods-via-containers ARGS``, as the unit runs it."""
    program = "import sys; from kvc.cli import legacy_main; sys.exit(legacy_main())"
    return subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )


@pytest.mark.podman
def test_kernels_outside_build_exclusive_are_skipped_as_dkms_skips(
    dkms_env: dict[str, Any], indexed_kernel_tree: DebianKernel
) -> None:
    """Each skip is exit 77 with one line and no image; then the skip is remembered: kvc dkms status
    says so, and the unit's build and load (kmods-via-containers, on a host running that kernel)
    succeed with nothing to load, as DKMS's autoinstall skips."""
    tmp, env, release = dkms_env["tmp"], dkms_env["env"], dkms_env["release"]
    base = 'PACKAGE_VERSION="1"\nBUILT_MODULE_NAME[0]="synth"\nBUILT_MODULE_LOCATION[0]="sub"\n'
    base += 'DEST_MODULE_LOCATION[0]="/extra"\nPRE_BUILD="pre.sh"\n'
    base += 'MAKE[0]="make -C $kernel_source_dir M=$dkms_tree/$PACKAGE_NAME/$PACKAGE_VERSION/build/sub CHOICE=1"\n'
    cases = {
        "max": ('BUILD_EXCLUSIVE_KERNEL_MAX="5.0"', f'kernel {release} is newer than BUILD_EXCLUSIVE_KERNEL_MAX="5.0"'),
        "config": (
            'BUILD_EXCLUSIVE_CONFIG="CONFIG_MODULES !CONFIG_X86_64"',
            'CONFIG_X86_64 is set in the kernel\'s config (BUILD_EXCLUSIVE_CONFIG="CONFIG_MODULES !CONFIG_X86_64")',
        ),
        "arch": (
            'BUILD_EXCLUSIVE_ARCH="^aarch64$"',
            'architecture x86_64 does not match BUILD_EXCLUSIVE_ARCH="^aarch64$"',
        ),
    }
    for case, (line, reason) in cases.items():
        name = f"{dkms_env['prefix']}-skip{case}"
        source = synthetic_source(tmp / f"src-{case}", f'PACKAGE_NAME="{name}"\n{base}{line}\n')
        bundle = tmp / name
        assert kvc(["dkms", "import", str(source), "--output", str(bundle), "-k", release], env).returncode == 0
        assert kvc(["install", str(bundle)], env).returncode == 0
        skipped = kvc(["build", name, "-k", release], env, timeout=900)
        assert skipped.returncode == 77, skipped.stdout + skipped.stderr
        errors = [line for line in skipped.stderr.splitlines() if line.startswith("kvc: error:")]
        assert errors == [f"kvc: error: skipped {release}: {name}/1 for {release} (x86_64): {reason}"]
        images = subprocess.run(
            ["podman", "images", "-q", "--filter", f"reference=*{name}*"], capture_output=True, text=True, check=True
        )
        assert images.stdout.strip() == ""
        status = kvc(["dkms", "status", name, "-k", release], env)
        assert status.stdout == f"{name}/1, {release}, x86_64: skipped ({name}/1 for {release} (x86_64): {reason})\n"
    host = {"KVC_ROOT": str(tmp / "skiphost"), "KVC_KERNEL": "fake"}
    FakeKernel.create(HostPaths(host["KVC_ROOT"]), release, symvers=str(indexed_kernel_tree.symvers))
    name = f"{dkms_env['prefix']}-skipmax"
    assert kvc(["install", str(tmp / name)], host).returncode == 0
    unit_build = legacy(["build", name, release], host)
    assert unit_build.returncode == 0, unit_build.stdout + unit_build.stderr
    assert f"KVC: {name}: skipped {release}: {name}/1 for {release}" in unit_build.stdout
    unit_load = legacy(["load", name, release], host)
    assert unit_load.returncode == 0, unit_load.stdout + unit_load.stderr
    assert f"{name}: nothing to load on {release}: its build skipped this kernel" in unit_load.stdout
    # One kernel inside, one outside: the first builds, the second is reported, exit 0.
    name = f"{dkms_env['prefix']}-skipone"
    conf = f'PACKAGE_NAME="{name}"\n{base}BUILD_EXCLUSIVE_KERNEL="^{re.escape(release)}$"\n'
    bundle = tmp / name
    source = synthetic_source(tmp / "src-one", conf)
    assert kvc(["dkms", "import", str(source), "--output", str(bundle), "-k", release], env).returncode == 0
    assert kvc(["install", str(bundle)], env).returncode == 0
    both = kvc(["build", name, "-k", release, "-k", OTHER_KERNEL], env, timeout=900)
    assert both.returncode == 0, both.stdout + both.stderr
    lines = both.stdout.splitlines()
    assert lines[0].startswith(f"built {name}-1:{release} (synth verified for {release})")
    tag = f"{repository_name(name, '1')}:{kernel_tag(OTHER_KERNEL)}"
    assert lines[1] == (
        f"{tag}: skipped {OTHER_KERNEL}: {name}/1 for {OTHER_KERNEL} (x86_64): "
        f'kernel {OTHER_KERNEL} does not match BUILD_EXCLUSIVE_KERNEL="^{re.escape(release)}$"'
    )


@pytest.mark.podman
def test_a_dkms_conf_runs_only_in_containers(dkms_env: dict[str, Any], tmp_path: Path) -> None:
    """Shell in every form a dkms.conf can hold: nothing of it runs on the host (no bash or sh is
    started there at all), the evaluation has no network and none of kvc's environment."""
    tmp, env, release = dkms_env["tmp"], dkms_env["env"], dkms_env["release"]
    mark = f"/tmp/kvc-dkms-mark-{uuid.uuid4().hex[:8]}"
    name = f"{dkms_env['prefix']}-shell"
    conf = f"""touch {mark}-plain
PACKAGE_NAME="{name}$( [ -z "${{KVC_TEST_SECRET:-}}" ] && echo -clean)"
PACKAGE_VERSION="1.0+$(echo 1)"
POST_INSTALL="net-$(ls /sys/class/net | grep -cv '^lo$')"
X=`touch {mark}-backtick`; touch {mark}-semicolon
BUILT_MODULE_NAME[0]="synth"
BUILT_MODULE_LOCATION[0]="sub"
DEST_MODULE_LOCATION[0]="/extra"
PRE_BUILD="pre.sh"
BDIR="$dkms_tree/$PACKAGE_NAME/$PACKAGE_VERSION/build"
MAKE[0]="make -C $kernel_source_dir M=$BDIR/sub CHOICE=1 modules; touch {mark}-make"
"""
    source = synthetic_source(tmp / "src-shell", conf)
    shells = tmp_path / "bin"
    log = tmp_path / "calls.log"
    for program in ("bash", "sh", "dash"):
        fakeprog.install(shells, program, log, default_code=99)
    spied = {**env, "PATH": fakeprog.path_with(shells), "KVC_TEST_SECRET": "from-the-host"}
    bundle = tmp / name
    imported = kvc(["dkms", "import", str(source), "--output", str(bundle), "-k", release], spied)
    assert imported.returncode == 0, imported.stderr
    assert fakeprog.calls(log, "bash") == fakeprog.calls(log, "sh") == fakeprog.calls(log, "dash") == []
    values = read_conf(str(bundle / f"{name}-clean.conf"))
    assert values["KVC_DKMS"] == f"{name}-clean/1.0+1"  # no KVC_TEST_SECRET in the evaluation
    assert "POST_INSTALL='net-0' is not run" in imported.stderr  # no network device but lo
    assert kvc(["install", str(bundle)], env).returncode == 0
    built = kvc(["build", f"{name}-clean", "-k", release], spied, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    assert fakeprog.calls(log, "bash") == fakeprog.calls(log, "sh") == []
    assert not list(Path("/tmp").glob(f"{Path(mark).name}*"))


@pytest.mark.podman
def test_import_never_writes_into_an_existing_directory(dkms_env: dict[str, Any], debs: dict[str, Path]) -> None:
    tmp, env, release = dkms_env["tmp"], dkms_env["env"], dkms_env["release"]
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "mine").write_text("keep")
    result = kvc(["dkms", "import", str(debs["vpoll-dkms"]), "--output", str(taken), "-k", release], env)
    assert result.returncode == 6 and f"kvc: error: {taken} exists" in result.stderr
    assert [p.name for p in taken.iterdir()] == ["mine"]
    assert not [p for p in tmp.iterdir() if ".kvc-import-" in p.name]
    bad = kvc(
        ["dkms", "import", str(debs["vpoll-dkms"]), "--base-image", "localhost/kvc-no-such:1", "-k", release], env
    )
    assert bad.returncode == 6 and "build or pull localhost/kvc-no-such:1 first" in bad.stderr, bad.stderr
    shutil.rmtree(taken)
    planned = kvc(["dkms", "import", str(debs["vpoll-dkms"]), "--output", str(taken), "-k", release, "--dry-run"], env)
    assert planned.returncode == 0, planned.stderr
    assert planned.stdout.splitlines()[0].startswith("import the DKMS source vpoll/0.1 (Debian package ")
    assert f"  write {taken}/: vpoll.conf, Containerfile" in planned.stdout and not taken.exists()


@pytest.mark.podman
def test_dkms_status_follows_an_instance_from_added_to_loaded(
    dkms_env: dict[str, Any], debs: dict[str, Path], indexed_kernel_tree: DebianKernel
) -> None:
    """On a host whose kernel is the fake one (the Debian release, a copy of its indexed tree):
    added, then built, then loaded through the tree delivery; unloaded, built again."""
    tmp, release = dkms_env["tmp"], dkms_env["release"]
    root = tmp / "host"
    moddir = root / "lib" / "modules" / release
    moddir.parent.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(indexed_kernel_tree.moddir), str(moddir)], check=True)
    FakeKernel.create(HostPaths(str(root)), release, symvers=str(indexed_kernel_tree.symvers))
    env = {"KVC_ROOT": str(root), "KVC_KERNEL": "fake"}
    name = f"{dkms_env['prefix']}-status"
    bundle = tmp / name
    assert (
        kvc(["dkms", "import", str(debs["vpoll-dkms"]), "--name", name, "--output", str(bundle)], env).returncode == 0
    )
    assert kvc(["install", str(bundle)], env).returncode == 0
    steps = []
    for command in (None, ["build", name], ["load", name], ["unload", name]):
        if command:
            done = kvc(command, env, timeout=900)
            assert done.returncode == 0, done.stdout + done.stderr
        status = kvc(["dkms", "status"], env)
        assert status.returncode == 0, status.stderr
        steps.append(status.stdout)
    suffix = f" (instance {name})\n"
    assert steps == [
        f"vpoll/0.1: added{suffix}",
        f"vpoll/0.1, {release}, x86_64: built{suffix}",
        f"vpoll/0.1, {release}, x86_64: loaded{suffix}",
        f"vpoll/0.1, {release}, x86_64: built{suffix}",
    ]
    assert (moddir / "extra").exists() is False and (moddir / "updates" / "kvc" / name / "vpoll.ko").is_file()
