"""kmods-via-containers with a KVC-style instance library: the five actions run unchanged, and
the container runtime sees exactly the calls the original framework's helpers make."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import fakeprog

KVER = "6.1.0-99-amd64"
IMAGE = f"simple-kmod-dd1a7d4:{KVER}"
CONF = """KMOD_CONTAINER_BUILD_CONTEXT="git://example.invalid/kvc-simple-kmod.git"
KMOD_CONTAINER_BUILD_FILE=Dockerfile.fedora
KMOD_SOFTWARE_VERSION=dd1a7d4
KMOD_NAMES="simple-kmod simple-procfs-kmod"
"""
# A library written to the original contract: sources its own conf from /etc/kvc, uses the
# framework's kvc_c_* helpers, loads with modprobe in the image, unloads with the host's rmmod.
LIBRARY = r"""set -eu
source "/etc/kvc/${KVC_SOFTWARE_NAME}.conf"
IMAGE="${KVC_SOFTWARE_NAME}-${KMOD_SOFTWARE_VERSION}:${KVC_KVER}"

build_kmod_container() {
    echo "Building ${IMAGE} kernel module container..."
    kvc_c_build -t $IMAGE --file $KMOD_CONTAINER_BUILD_FILE --label="name=$KVC_SOFTWARE_NAME" \
        --build-arg KVER=$KVC_KVER --build-arg KMODVER=$KMOD_SOFTWARE_VERSION $KMOD_CONTAINER_BUILD_CONTEXT
    images=$(kvc_c_images -q -f label="name=$KVC_SOFTWARE_NAME" -f dangling=true)
    if [ ! -z "$images" ]; then kvc_c_rmi -f $images; fi
}

is_kmod_loaded() {
    module=${1//-/_}
    if lsmod | grep "$module" &>/dev/null; then return 0; else return 1; fi
}

build_kmods() {
    if [ -z "$(kvc_c_images $IMAGE --quiet 2>/dev/null)" ]; then
        build_kmod_container
    else
        echo "The ${IMAGE} kernel module container is already built"
    fi
    for module in ${KMOD_NAMES}; do
        module=${module//_/-}
        version=$(kvc_c_run $IMAGE modinfo -F version "/lib/modules/${KVC_KVER}/${module}.ko" | tr -d '\r')
        if [ "${version}" != "${KMOD_SOFTWARE_VERSION}" ]; then
            echo "Module version mismatch within container. rebuilding ${IMAGE}"
            build_kmod_container
        fi
    done
}

load_kmods() {
    echo "Loading kernel modules using the kernel module container..."
    for module in ${KMOD_NAMES}; do
        if is_kmod_loaded ${module}; then
            echo "Kernel module ${module} already loaded"
        else
            module=${module//-/_}
            kvc_c_run --privileged $IMAGE modprobe ${module}
        fi
    done
}

unload_kmods() {
    echo "Unloading kernel modules..."
    for module in ${KMOD_NAMES}; do
        if is_kmod_loaded ${module}; then
            module=${module//-/_}
            rmmod "${module}"
        else
            echo "Kernel module ${module} already unloaded"
        fi
    done
}

wrapper() {
    echo "Running userspace wrapper using the kernel module container..."
    kvc_c_run --privileged $IMAGE $@
}
"""


class Host:
    def __init__(self, tmp_path: Path, *, lsmod_output: str = "", image_built: bool = False) -> None:
        self.root = tmp_path / "root"
        self.etc = self.root / "etc" / "kvc"
        self.etc.mkdir(parents=True)
        (self.etc / "simple-kmod.conf").write_text(CONF)
        (self.etc / "kmods-via-containers.conf").write_text("KVC_CONTAINER_RUNTIME=podman\n")
        lib = self.root / "usr" / "lib" / "kvc"
        lib.mkdir(parents=True)
        (lib / "simple-kmod-lib.sh").write_text(LIBRARY)
        self.bin = tmp_path / "bin"
        self.log = tmp_path / "calls.jsonl"
        rules = [(["images", IMAGE, "--quiet"], "0123abcd\n" if image_built else "", 0),
                 (["*", "version"], "dd1a7d4\n", 0)]
        fakeprog.install(self.bin, "podman", self.log, rules=rules)
        fakeprog.install(self.bin, "lsmod", self.log, rules=[([], lsmod_output, 0)])
        fakeprog.install(self.bin, "rmmod", self.log)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """kmods-via-containers with the test's /etc/kvc bound over the real one, so the library
        can source /etc/kvc/NAME.conf unchanged."""
        os.makedirs("/etc/kvc", exist_ok=True)
        env = {**os.environ, "KVC_ROOT": str(self.root), "PATH": fakeprog.path_with(self.bin)}
        env.pop("KVC_KERNEL", None)
        script = 'mount --bind "$1" /etc/kvc && shift && exec "$@"'
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(self.etc), sys.executable, "-c",
                               "import sys; from kvc.cli import legacy_main; sys.exit(legacy_main())", *args],
                              capture_output=True, text=True, env=env)

    def podman_calls(self) -> list[list[str]]:
        return fakeprog.calls(self.log, "podman")


def version_checks() -> list[list[str]]:
    return [["run", "-i", "--rm", IMAGE, "modinfo", "-F", "version", f"/lib/modules/{KVER}/{m}.ko"]
            for m in ("simple-kmod", "simple-procfs-kmod")]


def test_build_makes_the_original_runtime_calls(tmp_path: Path) -> None:
    host = Host(tmp_path)
    result = host.run("build", "simple-kmod", KVER)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [f"KVC: build simple-kmod for {KVER}",
                                              f"Building {IMAGE} kernel module container..."]
    assert host.podman_calls() == [
        ["images", IMAGE, "--quiet"],
        ["build", "-t", IMAGE, "--file", "Dockerfile.fedora", "--label=name=simple-kmod", "--build-arg",
         f"KVER={KVER}", "--build-arg", "KMODVER=dd1a7d4", "git://example.invalid/kvc-simple-kmod.git"],
        ["images", "-q", "-f", "label=name=simple-kmod", "-f", "dangling=true"],
        *version_checks(),
    ]
    assert f"+ podman build -t {IMAGE}" in result.stderr  # the helpers trace with set -x


def test_build_when_already_built(tmp_path: Path) -> None:
    host = Host(tmp_path, image_built=True)
    result = host.run("build", "simple-kmod", KVER)
    assert result.returncode == 0, result.stderr
    assert f"The {IMAGE} kernel module container is already built" in result.stdout
    assert host.podman_calls() == [["images", IMAGE, "--quiet"], *version_checks()]


def test_load_unload_reload_wrapper(tmp_path: Path) -> None:
    host = Host(tmp_path, image_built=True)
    load = host.run("load", "simple-kmod", KVER)
    assert load.returncode == 0, load.stderr
    modprobes = [["run", "-i", "--rm", "--privileged", IMAGE, "modprobe", m]
                 for m in ("simple_kmod", "simple_procfs_kmod")]
    assert host.podman_calls() == modprobes
    host.log.unlink()
    unload = host.run("unload", "simple-kmod", KVER)
    assert unload.returncode == 0
    assert "Kernel module simple_kmod already unloaded" in unload.stdout  # the original's message quirk
    assert fakeprog.calls(host.log, "rmmod") == []
    host.log.unlink()
    reload = host.run("reload", "simple-kmod", KVER)
    assert reload.returncode == 0, reload.stderr
    assert host.podman_calls() == [["images", IMAGE, "--quiet"], *version_checks(), *modprobes]
    host.log.unlink()
    wrapper = host.run("wrapper", "simple-kmod", KVER, "spkut", "44 45")
    assert wrapper.returncode == 0
    # The original passes wrapper arguments unquoted: "44 45" becomes two words.
    assert host.podman_calls() == [["run", "-i", "--rm", "--privileged", IMAGE, "spkut", "44", "45"]]


def test_unload_of_loaded_modules_uses_host_rmmod(tmp_path: Path) -> None:
    host = Host(tmp_path, lsmod_output="simple_procfs_kmod 16384 0\nsimple_kmod 16384 0\n")
    result = host.run("unload", "simple-kmod", KVER)
    assert result.returncode == 0, result.stderr
    assert fakeprog.calls(host.log, "rmmod") == [["simple_kmod"], ["simple_procfs_kmod"]]


def test_errors_keep_the_original_messages_and_status(tmp_path: Path) -> None:
    host = Host(tmp_path)
    unknown = host.run("frobnicate", "simple-kmod", KVER)
    assert unknown.returncode == 1
    assert "Unknown command. Exiting." in unknown.stdout
    missing = host.run("build", "nosuch", KVER)
    assert missing.returncode == 1
    assert "No instance library found" in missing.stdout
    too_few = host.run("build", "simple-kmod")
    assert too_few.returncode == 1
    # set -e: a failing library command aborts the action with its status.
    fakeprog.install(host.bin, "podman", host.log, default_code=3)
    failing = host.run("build", "simple-kmod", KVER)
    assert failing.returncode == 3
    assert "modinfo" not in str(host.podman_calls()[-1:])


@pytest.mark.parametrize("stub", ["load_kmods", "wrapper"])
def test_stubs_report_unimplemented_functions(tmp_path: Path, stub: str) -> None:
    host = Host(tmp_path)
    lib = host.root / "usr" / "lib" / "kvc" / "simple-kmod-lib.sh"
    lib.write_text(LIBRARY.replace(f"\n{stub}() {{", f"\nremoved_{stub}() {{"))
    result = host.run("load" if stub == "load_kmods" else "wrapper", "simple-kmod", KVER)
    assert result.returncode == 1
    assert f"{stub} is unimplemented for simple-kmod!" in result.stdout
