"""``kmods-via-containers`` with KVC instance libraries: the original framework's contract.

The library below is written to the contract of the original simple-kmod library (its conf
sourced from the hard-coded /etc/kvc, the framework's kvc_c_* helpers, modprobe in the image,
rmmod on the host). Most tests run it byte-for-byte unchanged, with KVC_ROOT unset, in a private
mount namespace where the test's directories are bound over /etc/kvc, /usr/lib/kvc and
/usr/local/lib/kvc; fake podman, lsmod and rmmod on PATH record every call. The expected call
sequences are what the original framework and library do.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest

import kvc
from kvc import legacy
from kvc.layout import Layout
from support import fakeprog
from support.fakeprog import Rule

KVER = "5.3.7-301.fc31.x86_64"
NAME = "simple-kmod"
IMAGE = f"{NAME}-dd1a7d4:{KVER}"
CONTEXT = "git://github.com/kmods-via-containers/kvc-simple-kmod.git"
SRC = str(Path(kvc.__file__).resolve().parents[1])

INSTANCE_CONF = f"""KMOD_CONTAINER_BUILD_CONTEXT="{CONTEXT}"
KMOD_CONTAINER_BUILD_FILE=Dockerfile.fedora
KMOD_SOFTWARE_VERSION=dd1a7d4
KMOD_NAMES="simple-kmod simple-procfs-kmod"
"""

LIBRARY = r"""set -eu
# Written for the original framework: the conf path is hard-coded, as in every KVC library.
source "/etc/kvc/${KVC_SOFTWARE_NAME}.conf"

IMAGE="${KVC_SOFTWARE_NAME}-${KMOD_SOFTWARE_VERSION}:${KVC_KVER}"

build_kmod_container() {
    echo "Building ${IMAGE} kernel module container..."
    kvc_c_build -t $IMAGE --file $KMOD_CONTAINER_BUILD_FILE --label="name=${KVC_SOFTWARE_NAME}" \
        --build-arg KVER=$KVC_KVER --build-arg KMODVER=$KMOD_SOFTWARE_VERSION \
        $KMOD_CONTAINER_BUILD_CONTEXT
    # Drop dangling images of this instance, and keep tagged ones for three kernels only.
    dangling=$(kvc_c_images -q -f label="name=${KVC_SOFTWARE_NAME}" -f dangling=true)
    older=$(kvc_c_images -q -f label="name=${KVC_SOFTWARE_NAME}" -f dangling=false | tail -n +4)
    if [ -n "$dangling" ] || [ -n "$older" ]; then
        echo "Removing old kernel module container images"
        kvc_c_rmi -f $dangling $older
    fi
}

is_kmod_loaded() {
    module=${1//-/_}
    lsmod | grep "$module" &>/dev/null
}

build_kmods() {
    if [ -n "$(kvc_c_images $IMAGE --quiet 2>/dev/null)" ]; then
        echo "The ${IMAGE} kernel module container is already built"
    else
        build_kmod_container
    fi
    for module in ${KMOD_NAMES}; do
        module=${module//_/-}
        found=$(kvc_c_run $IMAGE modinfo -F version "/lib/modules/${KVC_KVER}/${module}.ko" | tr -d '\r')
        if [ "$found" != "$KMOD_SOFTWARE_VERSION" ]; then
            echo "Module version mismatch within container. rebuilding ${IMAGE}"
            build_kmod_container
        fi
        found=$(kvc_c_run $IMAGE modinfo -F vermagic "/lib/modules/${KVC_KVER}/${module}.ko" | cut -d ' ' -f 1)
        if [ "$found" != "$KVC_KVER" ]; then
            echo "Module not built against ${KVC_KVER}. rebuilding ${IMAGE}"
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

LSMOD_HEADER = "Module                  Size  Used by\n"
LSMOD_LOADED = LSMOD_HEADER + "simple_procfs_kmod     16384  0\nsimple_kmod            16384  0\n"
GOOD_VERMAGIC = f"{KVER} SMP mod_unload \n"

# Bind the first path of each triple over the second in a private mount namespace. A mount point
# that does not exist is made inside an overlay of its nearest existing parent (upper layer in the
# third path), so the host is never touched.
SANDBOX = r"""set -e
while [ "$1" != "--" ]; do
    src=$1 dst=$2 scratch=$3
    shift 3
    if [ ! -d "$dst" ]; then
        base=$dst
        while [ ! -d "$base" ]; do base=$(dirname "$base"); done
        mkdir -p "$scratch/upper" "$scratch/work"
        mount -t overlay overlay -o "lowerdir=$base,upperdir=$scratch/upper,workdir=$scratch/work" "$base"
        mkdir -p "$dst"
    fi
    mount --bind "$src" "$dst"
done
shift
exec "$@"
"""


def run_cli(
    args: Sequence[str],
    env: dict[str, str],
    *,
    binds: Sequence[tuple[Path, str]] = (),
    scratch: Optional[Path] = None,
    stdin: str = "",
    cwd: Optional[Path] = None,
) -> subprocess.CompletedProcess[str]:
    """``kmods-via-containers ARGS`` (kvc.cli.legacy_main) in a child process, optionally inside a
    private mount namespace with ``binds``."""
    argv = [sys.executable, "-c", "import sys; from kvc.cli import legacy_main; sys.exit(legacy_main())", *args]
    if binds:
        assert scratch is not None
        spec: list[str] = []
        for index, (source, target) in enumerate(binds):
            spec += [str(source), target, str(scratch / f"overlay{index}")]
        argv = [*unshare(), "sh", "-c", SANDBOX, "sh", *spec, "--", *argv]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env, cwd=cwd)


def unshare() -> list[str]:
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]


@functools.cache
def sandbox_problem() -> str:
    """Why private mount namespaces cannot be used here ("" when they can)."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run([*unshare(), "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"no private mount namespace: {probe.stderr.strip()}"


def base_env(bin_dir: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KVC_", "PYTEST_"))}
    env["PATH"] = fakeprog.path_with(bin_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
    return env


class Host:
    """A host where the simple-kmod library and conf are installed at the original's paths, with
    fake podman/lsmod/rmmod that share state (flags "built" and "loaded")."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        flags: Sequence[str] = (),
        version: str = "dd1a7d4\n",
        vermagic: str = GOOD_VERMAGIC,
        dangling: str = "",
        tagged: str = "",
        build_code: int = 0,
        library: str = LIBRARY,
        framework_conf: Optional[str] = "KVC_CONTAINER_RUNTIME=podman\n",
    ) -> None:
        if sandbox_problem():
            pytest.skip(sandbox_problem())
        self.tmp = tmp_path
        self.etc_kvc = tmp_path / "etc-kvc"
        self.usr_lib_kvc = tmp_path / "usr-lib-kvc"
        self.usr_local_lib_kvc = tmp_path / "usr-local-lib-kvc"
        for directory in (self.etc_kvc, self.usr_lib_kvc, self.usr_local_lib_kvc):
            directory.mkdir()
        (self.etc_kvc / f"{NAME}.conf").write_text(INSTANCE_CONF)
        if framework_conf is not None:
            (self.etc_kvc / "kmods-via-containers.conf").write_text(framework_conf)
        self.library = self.usr_lib_kvc / f"{NAME}-lib.sh"
        self.library.write_text(library)
        self.bin = tmp_path / "bin"
        self.log = tmp_path / "calls.jsonl"
        self.binds: list[tuple[Path, str]] = [
            (self.etc_kvc, "/etc/kvc"),
            (self.usr_lib_kvc, "/usr/lib/kvc"),
            (self.usr_local_lib_kvc, "/usr/local/lib/kvc"),
        ]
        label = f"label=name={NAME}"
        fakeprog.install(
            self.bin,
            "podman",
            self.log,
            rules=[
                Rule(["images", IMAGE, "--quiet"], "4f1e2d3c4b5a\n", when=["built"]),
                Rule(["images", IMAGE, "--quiet"], ""),
                Rule(
                    ["build"],
                    "STEP 1/9: FROM registry.example.org/fedora:30\n",
                    code=build_code,
                    stderr="Error: building at STEP 9/9: exit status 2\n" if build_code else "",
                    sets=[] if build_code else ["built"],
                ),
                Rule(["images", "-q", "-f", label, "-f", "dangling=true"], dangling),
                Rule(["images", "-q", "-f", label, "-f", "dangling=false"], tagged),
                Rule(["run", "-i", "--rm", IMAGE, "modinfo", "-F", "version"], version),
                Rule(["run", "-i", "--rm", IMAGE, "modinfo", "-F", "vermagic"], vermagic),
                Rule(["run", "-i", "--rm", "--privileged", IMAGE, "modprobe", "simple_procfs_kmod"], sets=["loaded"]),
                Rule(["run", "-i", "--rm", "--privileged", IMAGE, "spkut", "fail"], "spkut: failed\n", code=3),
            ],
        )
        fakeprog.install(
            self.bin, "lsmod", self.log, rules=[Rule([], LSMOD_LOADED, when=["loaded"]), Rule([], LSMOD_HEADER)]
        )
        fakeprog.install(self.bin, "rmmod", self.log, rules=[Rule(["simple_procfs_kmod"], clears=["loaded"])])
        fakeprog.set_flags(self.log, *flags)

    def run(
        self, *args: str, stdin: str = "", env: Optional[dict[str, str]] = None
    ) -> subprocess.CompletedProcess[str]:
        self.log.unlink(missing_ok=True)
        return run_cli(args, {**base_env(self.bin), **(env or {})}, binds=self.binds, scratch=self.tmp, stdin=stdin)

    def calls(self, prog: Optional[str] = "podman") -> list[list[str]]:
        return fakeprog.calls(self.log, prog)

    def sequence(self) -> list[list[str]]:
        """Every call to every fake, in order, with the program name first."""
        return [[entry["prog"], *entry["argv"]] for entry in fakeprog.entries(self.log)]


def modinfo(field: str, module: str) -> list[str]:
    return ["run", "-i", "--rm", IMAGE, "modinfo", "-F", field, f"/lib/modules/{KVER}/{module}.ko"]


def checks(module: str) -> list[list[str]]:
    return [modinfo("version", module), modinfo("vermagic", module)]


ALL_CHECKS = [*checks("simple-kmod"), *checks("simple-procfs-kmod")]
BUILD = [
    "build",
    "-t",
    IMAGE,
    "--file",
    "Dockerfile.fedora",
    f"--label=name={NAME}",
    "--build-arg",
    f"KVER={KVER}",
    "--build-arg",
    "KMODVER=dd1a7d4",
    CONTEXT,
]
GC = [
    ["images", "-q", "-f", f"label=name={NAME}", "-f", "dangling=true"],
    ["images", "-q", "-f", f"label=name={NAME}", "-f", "dangling=false"],
]
IS_BUILT = ["images", IMAGE, "--quiet"]


def modprobe(module: str) -> list[str]:
    return ["run", "-i", "--rm", "--privileged", IMAGE, "modprobe", module]


def traces(stderr: str) -> list[str]:
    """The commands bash traced (one "+" per level of command substitution, stripped)."""
    return [line.lstrip("+")[1:] for line in stderr.splitlines() if re.match(r"\++ ", line)]


# --- build -------------------------------------------------------------------------------------


def test_build_from_scratch_makes_the_original_calls_and_traces_them(tmp_path: Path) -> None:
    host = Host(tmp_path)
    result = host.run("build", NAME, KVER)
    assert result.returncode == 0, result.stderr
    assert host.calls() == [IS_BUILT, BUILD, *GC, *ALL_CHECKS]
    assert result.stdout.splitlines() == [
        f"KVC: build {NAME} for {KVER}",
        f"Building {IMAGE} kernel module container...",
        "STEP 1/9: FROM registry.example.org/fedora:30",
    ]
    # kvc_c_* trace the runtime's command line with set -x (the library silenced the first one).
    assert traces(result.stderr) == ["podman " + " ".join(call) for call in [BUILD, *GC, *ALL_CHECKS]]


def test_build_when_already_built_only_checks_the_modules(tmp_path: Path) -> None:
    host = Host(tmp_path, flags=["built"], version="dd1a7d4\r\n")  # tr -d '\r' copes with a CR
    result = host.run("build", NAME, KVER)
    assert result.returncode == 0, result.stderr
    assert host.calls() == [IS_BUILT, *ALL_CHECKS]
    assert f"The {IMAGE} kernel module container is already built" in result.stdout.splitlines()


def test_build_removes_dangling_images_and_keeps_three_kernels(tmp_path: Path) -> None:
    host = Host(tmp_path, dangling="d1\n", tagged="t1\nt2\nt3\nt4\nt5\n")
    result = host.run("build", NAME, KVER)
    assert result.returncode == 0, result.stderr
    assert host.calls() == [IS_BUILT, BUILD, *GC, ["rmi", "-f", "d1", "t4", "t5"], *ALL_CHECKS]


@pytest.mark.parametrize(
    ("version", "vermagic", "message"),
    [
        ("0000000\n", GOOD_VERMAGIC, f"Module version mismatch within container. rebuilding {IMAGE}"),
        ("dd1a7d4\n", "5.3.0-1.fc31.x86_64 SMP mod_unload \n", f"Module not built against {KVER}. rebuilding {IMAGE}"),
    ],
)
def test_build_rebuilds_on_a_bad_module_without_checking_again(
    tmp_path: Path, version: str, vermagic: str, message: str
) -> None:
    host = Host(tmp_path, flags=["built"], version=version, vermagic=vermagic)
    result = host.run("build", NAME, KVER)
    assert result.returncode == 0, result.stderr
    rebuild = [BUILD, *GC]
    if version != "dd1a7d4\n":
        expected = [
            modinfo("version", "simple-kmod"),
            *rebuild,
            modinfo("vermagic", "simple-kmod"),
            modinfo("version", "simple-procfs-kmod"),
            *rebuild,
            modinfo("vermagic", "simple-procfs-kmod"),
        ]
    else:
        expected = [*checks("simple-kmod"), *rebuild, *checks("simple-procfs-kmod"), *rebuild]
    assert host.calls() == [IS_BUILT, *expected]
    assert result.stdout.splitlines().count(message) == 2


def test_a_failing_command_aborts_the_action_with_its_status(tmp_path: Path) -> None:
    host = Host(tmp_path, build_code=125)
    result = host.run("build", NAME, KVER)
    assert result.returncode == 125
    assert host.calls() == [IS_BUILT, BUILD]  # set -e: no image cleanup, no module checks
    assert "Error: building at STEP 9/9" in result.stderr


# --- load, unload, reload, wrapper ---------------------------------------------------------------


def test_lifecycle_load_unload_reload(tmp_path: Path) -> None:
    host = Host(tmp_path, flags=["built"])

    load = host.run("load", NAME, KVER)
    assert load.returncode == 0, load.stderr
    assert load.stdout == (
        f"KVC: load {NAME} for {KVER}\nLoading kernel modules using the kernel module container...\n"
    )
    assert host.sequence() == [
        ["lsmod"],
        ["podman", *modprobe("simple_kmod")],
        ["lsmod"],
        ["podman", *modprobe("simple_procfs_kmod")],
    ]

    again = host.run("load", NAME, KVER)
    assert again.returncode == 0, again.stderr
    assert host.calls() == []
    # The library's is_kmod_loaded rewrites the global $module: the original prints underscores.
    assert again.stdout.splitlines()[2:] == [
        "Kernel module simple_kmod already loaded",
        "Kernel module simple_procfs_kmod already loaded",
    ]

    reload = host.run("reload", NAME, KVER)
    assert reload.returncode == 0, reload.stderr
    # build, then unload in load order with the host's rmmod, then load through the image.
    assert host.sequence() == [
        ["podman", *IS_BUILT],
        *(["podman", *call] for call in ALL_CHECKS),
        ["lsmod"],
        ["rmmod", "simple_kmod"],
        ["lsmod"],
        ["rmmod", "simple_procfs_kmod"],
        ["lsmod"],
        ["podman", *modprobe("simple_kmod")],
        ["lsmod"],
        ["podman", *modprobe("simple_procfs_kmod")],
    ]
    assert reload.stdout.splitlines() == [
        f"KVC: reload {NAME} for {KVER}",
        f"The {IMAGE} kernel module container is already built",
        "Unloading kernel modules...",
        "Loading kernel modules using the kernel module container...",
    ]

    unload = host.run("unload", NAME, KVER)
    assert unload.returncode == 0, unload.stderr
    assert host.calls("rmmod") == [["simple_kmod"], ["simple_procfs_kmod"]]
    assert host.calls() == []

    again = host.run("unload", NAME, KVER)
    assert again.returncode == 0, again.stderr
    assert host.calls("rmmod") == []
    assert again.stdout.splitlines()[2:] == [
        "Kernel module simple_kmod already unloaded",
        "Kernel module simple_procfs_kmod already unloaded",
    ]


def test_wrapper_splits_arguments_like_the_original(tmp_path: Path) -> None:
    host = Host(tmp_path, flags=["built", "loaded"])
    result = host.run("wrapper", NAME, KVER, "spkut", "44 45")
    assert result.returncode == 0, result.stderr
    # `wrapper $@` is unquoted in the original: "44 45" arrives as two arguments.
    assert host.calls() == [["run", "-i", "--rm", "--privileged", IMAGE, "spkut", "44", "45"]]
    assert result.stdout.splitlines() == [
        f"KVC: wrapper {NAME} for {KVER}",
        "Running userspace wrapper using the kernel module container...",
    ]


def test_wrapper_status_and_stdin_reach_the_caller(tmp_path: Path) -> None:
    host = Host(tmp_path, flags=["built"])
    failed = host.run("wrapper", NAME, KVER, "spkut", "fail")
    assert failed.returncode == 3
    assert "spkut: failed" in failed.stdout
    fakeprog.install(host.bin, "podman", host.log, record_stdin=True)
    fed = host.run("wrapper", NAME, KVER, "cat", stdin="typed by a user\n")
    assert fed.returncode == 0, fed.stderr
    assert [entry["stdin"] for entry in fakeprog.entries(host.log, "podman")] == ["typed by a user\n"]


# --- errors --------------------------------------------------------------------------------------


def test_unknown_action_prints_the_usage(tmp_path: Path) -> None:
    host = Host(tmp_path)
    result = host.run("frobnicate", NAME, KVER)
    assert result.returncode == 1
    assert result.stdout == (f"KVC: frobnicate {NAME} for {KVER}\nUnknown command. Exiting.\n" + legacy.USAGE)
    assert host.sequence() == []


@pytest.mark.parametrize("action", ["build", "frobnicate"])
def test_missing_library_is_reported_before_the_action_is_checked(tmp_path: Path, action: str) -> None:
    host = Host(tmp_path)
    result = host.run(action, "nosuch", KVER)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"KVC: {action} nosuch for {KVER}",
        "KVC requires an instance library to define significant functionality",
        "No instance library found in one of required locations /usr/local/lib/kvc/nosuch-lib.sh "
        "/usr/lib/kvc/nosuch-lib.sh /etc/kvc/lib/kvc/nosuch-lib.sh",
    ]


@pytest.mark.parametrize("args", [(), ("build",), ("build", NAME)])
def test_missing_arguments_fail_like_the_original(tmp_path: Path, args: tuple[str, ...]) -> None:
    host = Host(tmp_path)
    result = host.run(*args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.rstrip().endswith("$1: unbound variable")
    assert host.sequence() == []


@pytest.mark.parametrize(
    ("action", "stub"),
    [("build", "build_kmods"), ("load", "load_kmods"), ("unload", "unload_kmods"), ("wrapper", "wrapper")],
)
def test_stubs_report_what_the_library_left_out_on_stdout(tmp_path: Path, action: str, stub: str) -> None:
    host = Host(tmp_path, library=LIBRARY.replace(f"\n{stub}() {{", f"\nunused_{stub}() {{"))
    result = host.run(action, NAME, KVER)
    assert result.returncode == 1
    assert result.stdout.splitlines()[-1] == f"{stub} is unimplemented for {NAME}!"
    assert "unimplemented" not in result.stderr


# --- framework conf ------------------------------------------------------------------------------


def test_framework_conf_is_bash_and_overrides_the_environment(tmp_path: Path) -> None:
    host = Host(
        tmp_path, flags=["built"], framework_conf='KVC_CONTAINER_RUNTIME=docker\necho "conf says $(echo hello)"\n'
    )
    fakeprog.install(host.bin, "docker", host.log)
    result = host.run("load", NAME, KVER, env={"KVC_CONTAINER_RUNTIME": "podman"})
    assert result.returncode == 0, result.stderr
    assert "conf says hello" in result.stdout.splitlines()
    assert host.calls("docker") == [modprobe("simple_kmod"), modprobe("simple_procfs_kmod")]
    assert host.calls("podman") == []


def test_without_framework_conf_the_runtime_is_podman(tmp_path: Path) -> None:
    host = Host(tmp_path, flags=["built"], framework_conf=None)
    result = host.run("load", NAME, KVER)
    assert result.returncode == 0, result.stderr
    assert host.calls() == [modprobe("simple_kmod"), modprobe("simple_procfs_kmod")]


# --- library lookup and helpers, under KVC_ROOT ---------------------------------------------------


def probe_library(tag: str) -> str:
    return (
        f'echo "sourced {tag}: $KVC_ACTION $KVC_SOFTWARE_NAME $KVC_KVER $KVC_CONTAINER_RUNTIME"\n'
        f'load_kmods() {{ echo "load_kmods from {tag}"; }}\n'
    )


def rooted(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "root"
    (root / "etc" / "kvc").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    return root, {**base_env(bin_dir), "KVC_ROOT": str(root)}


@pytest.mark.parametrize(
    "present",
    [
        ("usr/local/lib/kvc", "usr/lib/kvc", "etc/kvc/lib/kvc"),
        ("usr/local/lib/kvc", "usr/lib/kvc"),
        ("usr/local/lib/kvc",),
    ],
)
def test_every_library_is_sourced_in_order_and_the_last_wins(tmp_path: Path, present: tuple[str, ...]) -> None:
    root, env = rooted(tmp_path)
    for directory in present:
        (root / directory).mkdir(parents=True)
        (root / directory / "demo-lib.sh").write_text(probe_library(directory))
    result = run_cli(["load", "demo", KVER], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"KVC: load demo for {KVER}",
        *(f"sourced {d}: load demo {KVER} podman" for d in present),
        f"load_kmods from {present[-1]}",
    ]


def test_under_kvc_root_the_framework_reads_the_rooted_conf(tmp_path: Path) -> None:
    root, env = rooted(tmp_path)
    (root / "etc/kvc/kmods-via-containers.conf").write_text("KVC_CONTAINER_RUNTIME=docker\n")
    (root / "usr/lib/kvc").mkdir(parents=True)
    (root / "usr/lib/kvc/demo-lib.sh").write_text(
        probe_library("lib") + 'wrapper() { env | grep "^KVC_LEGACY_" || echo "driver variables not exported"; }\n'
    )
    result = run_cli(["load", "demo", KVER], env)
    assert result.returncode == 0, result.stderr
    assert f"sourced lib: load demo {KVER} docker" in result.stdout.splitlines()
    clean = run_cli(["wrapper", "demo", KVER], env)
    assert clean.stdout.splitlines()[-1] == "driver variables not exported"


def test_psap_helpers(tmp_path: Path) -> None:
    root, env = rooted(tmp_path)
    (root / "usr/lib/kvc").mkdir(parents=True)
    (root / "usr/lib/kvc/demo-lib.sh").write_text(
        'KO_FILES="/lib/modules/k/extra/a.ko /lib/modules/k/extra/b.ko"\n'
        'load_kmods() { echo "env=$(kvc_c_env)"; weak_modules_add; weak_modules_add /x/c.ko; }\n'
    )
    log = tmp_path / "calls.jsonl"
    fakeprog.install(tmp_path / "bin", "weak-modules", log, record_stdin=True)
    result = run_cli(["load", "demo", KVER], env)
    assert result.returncode == 0, result.stderr
    in_pod = "kubepods" in Path("/proc/self/cgroup").read_text()
    assert f"env={'kubernetes' if in_pod else 'podman'}" in result.stdout.splitlines()
    assert [(e["argv"], e["stdin"]) for e in fakeprog.entries(log)] == [
        (["--add-modules", "--no-initramfs"], "/lib/modules/k/extra/a.ko\n/lib/modules/k/extra/b.ko\n"),
        (["--add-modules", "--no-initramfs"], "/x/c.ko\n"),
    ]


READELF = """
Symbol table '.symtab' contains 5 entries:
   Num:    Value          Size Type    Bind   Vis      Ndx Name
     0: 0000000000000000     0 NOTYPE  LOCAL  DEFAULT  UND
     1: 0000000000000000    16 FUNC    GLOBAL DEFAULT    2 init_module
     2: 0000000000000000     0 NOTYPE  GLOBAL DEFAULT  UND _printk
     3: 0000000000000000     0 NOTYPE  GLOBAL DEFAULT  UND proc_create
     4: 0000000000000000     0 NOTYPE  GLOBAL DEFAULT  UND __secret_symbol
"""


def test_kabi_check_module_warns_about_symbols_outside_the_whitelist(tmp_path: Path) -> None:
    host = Host(tmp_path, library='load_kmods() { kabi_check_module simple-kmod.ko; echo "loading anyway"; }\n')
    modules = tmp_path / "lib-modules"
    (modules / KVER / "extra").mkdir(parents=True)
    (modules / KVER / "extra" / "simple-kmod.ko").write_bytes(b"\x7fELF")
    (modules / "kabi-rhel88").mkdir()
    (modules / "kabi-rhel88" / f"kabi_whitelist_{os.uname().machine}").write_text(
        "[rhel8_whitelist]\n\t_printk\n\tproc_create\n"
    )
    host.binds.append((modules, "/lib/modules"))
    fakeprog.install(host.bin, "readelf", host.log, rules=[Rule(["-sW"], READELF)])
    result = host.run("load", NAME, KVER)
    assert result.returncode == 0, result.stderr
    assert host.calls("readelf") == [["-sW", f"/lib/modules/{KVER}/extra/simple-kmod.ko"]]
    whitelist = f"/lib/modules/kabi-rhel88/kabi_whitelist_{os.uname().machine}"
    assert result.stderr.splitlines() == [
        f"kABI check: simple-kmod.ko uses __secret_symbol, which is not in {whitelist}"
    ]
    assert result.stdout.splitlines()[-1] == "loading anyway"


def test_a_driver_killed_by_a_signal_reports_128_plus_the_signal(tmp_path: Path) -> None:
    root, env = rooted(tmp_path)
    (root / "usr/lib/kvc").mkdir(parents=True)
    (root / "usr/lib/kvc/demo-lib.sh").write_text("wrapper() { kill -TERM $$; }\n")
    assert run_cli(["wrapper", "demo", KVER], env).returncode == 128 + 15


# --- native instances ----------------------------------------------------------------------------


@pytest.fixture
def native_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[tuple[object, ...]]]:
    root = tmp_path / "root"
    (root / "etc" / "kvc").mkdir(parents=True)
    (root / "etc" / "kvc" / "demo.conf").write_text("KMOD_SOFTWARE_VERSION=1\n")
    monkeypatch.setenv("KVC_ROOT", str(root))
    served: list[tuple[object, ...]] = []

    def native(action: str, name: str, kver: str, args: Sequence[str]) -> int:
        served.append((action, name, kver, list(args)))
        return 7

    monkeypatch.setattr(legacy, "native_action", native)
    return root, served


def test_an_instance_with_a_conf_and_no_library_is_native(
    native_root: tuple[Path, list[tuple[object, ...]]], capsys: pytest.CaptureFixture[str]
) -> None:
    _, served = native_root
    assert legacy.main(["wrapper", "demo", KVER, "spkut", "44 45"]) == 7
    assert served == [("wrapper", "demo", KVER, ["spkut", "44 45"])]
    assert capsys.readouterr().out == f"KVC: wrapper demo for {KVER}\n"
    assert legacy.main(["frobnicate", "demo", KVER]) == 1
    assert capsys.readouterr().out == f"KVC: frobnicate demo for {KVER}\nUnknown command. Exiting.\n" + legacy.USAGE
    assert len(served) == 1


def test_a_library_takes_precedence_over_native(
    native_root: tuple[Path, list[tuple[object, ...]]], capfd: pytest.CaptureFixture[str]
) -> None:
    root, served = native_root
    (root / "etc/kvc/lib/kvc").mkdir(parents=True)
    (root / "etc/kvc/lib/kvc/demo-lib.sh").write_text(probe_library("etc"))
    assert legacy.find_libraries(Layout.from_env(), "demo") == [str(root / "etc/kvc/lib/kvc/demo-lib.sh")]
    assert legacy.main(["load", "demo", KVER]) == 0
    assert served == []
    assert capfd.readouterr().out.splitlines()[-1] == "load_kmods from etc"


@pytest.mark.parametrize("name", ["../kvc/demo", "nosuch"])
def test_names_that_are_not_native_instances_go_to_the_driver(
    native_root: tuple[Path, list[tuple[object, ...]]], capfd: pytest.CaptureFixture[str], name: str
) -> None:
    _, served = native_root
    assert legacy.main(["load", name, KVER]) == 1
    assert served == []
    assert "No instance library found in one of required locations" in capfd.readouterr().out
