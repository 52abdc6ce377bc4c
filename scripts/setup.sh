#!/usr/bin/env bash
# setup.sh: prepare a Debian 12 machine for kvc, idempotently. Run as root, from anywhere.
#
# Usage: bash scripts/setup.sh [--containers] [--k8s] [--help]
#
#   1. System packages (apt-get): Python with venv and headers, gcc and make, Debian's kmod
#      (the reference the kmod tools are compared with), the kernel headers of the current
#      Debian 6.1 ABI (linux-headers-amd64), pahole (dwarves: newer headers such as bookworm's 6.12
#      run it for BTF while building any module), util-linux, ca-certificates, xz-utils, zstd and
#      systemd (for systemd-analyze), qemu-system-x86 and busybox-static (kvc verify's VM), ovmf
#      (kvc verify --secure-boot's UEFI firmware), qemu-system-arm (kvc verify's arm64 VM:
#      qemu-system-aarch64) and gcc-aarch64-linux-gnu (the tests cross-compile modules for it),
#      debootstrap and binutils (the single-file kvc, built in a Debian 11 root; objdump),
#      docker-registry and apache2-utils (the tests start their own registry on a free port of
#      127.0.0.1, with TLS from a test CA and htpasswd auth).
#      apt-get update runs first, every time (about a second when nothing changed).
#   2. A virtualenv .venv in the repository made by Debian's /usr/bin/python3, with kvc
#      installed editable plus its test tools (pip install -e '.[test]'); reinstalled only
#      when pyproject.toml changes.
#   3. The Debian kernel package that linux-image-amd64 names, unpacked into the test cache
#      (~/.cache/kvc-test, or $KVC_TEST_CACHE) with Debian's depmod output written into it.
#   --containers  also make rootful podman work (scripts/setup-podman.sh) and build the local
#                 Debian base image (scripts/bootstrap-base-image.sh): what builds need.
#   --k8s         also build the k8s test tier's Kubernetes control plane from Debian's sources
#                 (scripts/build-k8s-control-plane.sh: 4-9 minutes once, then cached).
#
# Running it again only checks: a few seconds. Exit status: 0 ready; 1 failure; 2 usage error.

set -euo pipefail

PROG=setup
say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

CONTAINERS=0
K8S=0
while [ $# -gt 0 ]; do
    case $1 in
        --containers) CONTAINERS=1 ;;
        --k8s) K8S=1 ;;
        -h|--help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) printf '%s: error: unknown argument %q (see --help)\n' "$PROG" "$1" >&2; exit 2 ;;
    esac
    shift
done

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
[ -f pyproject.toml ] && [ -d src/kvc ] || die "$top does not look like a kvc checkout"
[ "$(id -u)" -eq 0 ] || die "must run as root (it installs system packages with apt-get)"
command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1 \
    || die "apt-get and dpkg not found: this script sets up Debian 12"
if [ -r /etc/os-release ] && ! grep -qx 'VERSION_ID="12"' /etc/os-release; then
    say "warning: this is not Debian 12 ($(. /etc/os-release && echo "${PRETTY_NAME:-unknown}")); continuing"
fi

started=$(date +%s)
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/kvc-setup.XXXXXX")
trap 'rm -rf "$LOGDIR"' EXIT
# run_logged WHAT CMD...: run CMD with its output in a log; on failure, one line and exit 1.
run_logged() {
    local what=$1 log
    shift
    log=$LOGDIR/$(printf '%s' "$what" | tr -c 'A-Za-z0-9' '_').log
    if ! "$@" </dev/null >"$log" 2>&1 9>&-; then
        local keep=${TMPDIR:-/tmp}/kvc-setup-failed.log
        cp "$log" "$keep" 2>/dev/null || keep=$log
        die "$what failed: $(grep -v '^[[:space:]]*$' "$log" | tail -n 1 || true) (full output: $keep)"
    fi
}

# One setup at a time (two would race on apt, the venv and the kernel cache). Commands that may
# leave daemons behind (apt, podman) run with the lock's descriptor closed so that none keeps it.
lock=${TMPDIR:-/tmp}/kvc-setup.lock
exec 9>"$lock"
flock -w 1200 9 || die "another setup has held $lock for 20 minutes"

# ---- 1. system packages -------------------------------------------------------------------
# Groups of Debian packages; later parts of kvc add their own group here.
BASE_PACKAGES=(python3 python3-venv python3-dev gcc make kmod util-linux ca-certificates xz-utils zstd strace)
# kmod's modinfo reads signatures with libssl3's libcrypto: brought to the mirror's current version,
# the one kvc's signature reader and its tests follow (they name it).
ORACLE_PACKAGES=(libssl3 openssl)
KERNEL_PACKAGES=(linux-headers-amd64 dwarves)  # the current 6.1 ABI's headers (Module.symvers, kbuild);
# their linux-kbuild-6.1 ships scripts/sign-file, the oracle of kvc's module signing tests
# pahole (dwarves): newer headers (bookworm's 6.12) run it while building any module (BTF flags)
SYSTEMD_PACKAGES=(systemd)              # systemd-analyze verifies kvc's unit (no need to boot with it)
# kvc verify boots the target kernel under qemu; ovmf is the UEFI firmware --secure-boot boots through
VM_PACKAGES=(qemu-system-x86 busybox-static ovmf)
# kvc verify of arm64 kernels boots them under qemu-system-aarch64 (its busybox and Python come as arm64
# packages into kvc's cache); the arm64 verify tests cross-compile their modules
ARM64_PACKAGES=(qemu-system-arm gcc-aarch64-linux-gnu)
DIST_PACKAGES=(debootstrap binutils)  # the single-file kvc: built in a Debian 11 root, its glibc floor read with objdump
REGISTRY_PACKAGES=(docker-registry apache2-utils openssl)  # the tests' local registry: TLS (test CA) and htpasswd -B
PACKAGES=("${BASE_PACKAGES[@]}" "${ORACLE_PACKAGES[@]}" "${KERNEL_PACKAGES[@]}" "${SYSTEMD_PACKAGES[@]}" "${VM_PACKAGES[@]}" "${ARM64_PACKAGES[@]}" "${DIST_PACKAGES[@]}" "${REGISTRY_PACKAGES[@]}")

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -q -o DPkg::Lock::Timeout=300)
missing=()
for package in "${PACKAGES[@]}"; do
    case $(dpkg-query -W -f='${db:Status-Abbrev}' "$package" 2>/dev/null || true) in
        ii*) ;;
        *) missing+=("$package") ;;
    esac
done
# Fresh lists also tell debian_kernel() which kernel linux-image-amd64 names now.
run_logged "apt-get update" "${APT[@]}" update
[ ${#missing[@]} -eq 0 ] || say "installing ${missing[*]}"
# Also brings linux-headers-amd64 up to the ABI the package lists name (a no-op when it is).
run_logged "apt-get install" "${APT[@]}" install -y --no-install-recommends "${PACKAGES[@]}"
kver=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | grep -o 'linux-headers-[0-9][^ ,]*-amd64' | head -n 1 || true)
kver=${kver#linux-headers-}
[ -n "$kver" ] && [ -f "/usr/src/linux-headers-$kver/Module.symvers" ] \
    || die "kernel headers incomplete: /usr/src/linux-headers-${kver:-?}/Module.symvers is missing"

# ---- 2. the virtualenv ----------------------------------------------------------------------
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || die "$PYTHON is missing after installing python3"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "$PYTHON is older than 3.9"
if [ -e .venv ] && ! grep -qx 'home = /usr/bin' .venv/pyvenv.cfg 2>/dev/null; then
    say "replacing .venv: it was not made by $PYTHON"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
    run_logged "creating .venv" "$PYTHON" -m venv .venv
fi
stamp=$( { sha256sum pyproject.toml; .venv/bin/python -VV; } | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.kvc-setup 2>/dev/null || true)" != "$stamp" ] || [ ! -x .venv/bin/kvc ]; then
    say "pip install -e '.[test]' into .venv"
    rm -f .venv/.kvc-setup
    run_logged "pip install -e '.[test]'" .venv/bin/python -m pip install --disable-pip-version-check \
        --no-input -e '.[test]'
    echo "$stamp" >.venv/.kvc-setup
fi
.venv/bin/python -c 'import kvc.kmod' 2>/dev/null || die "kvc does not import in .venv (rm -rf .venv and run again)"

# ---- 3. the real Debian kernel the demo and the tests read -------------------------------
.venv/bin/python - <<'PY' || exit 1
import subprocess
import sys

sys.path.insert(0, "tests")
from support.debian_kernel import indexed_debian_kernel

try:
    kernel = indexed_debian_kernel()
except subprocess.CalledProcessError as exc:
    output = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
    sys.exit(f"setup: error: {' '.join(map(str, exc.cmd))} failed: {output[-1] if output else exc}")
except (OSError, RuntimeError, ValueError) as exc:
    sys.exit(f"setup: error: cannot fetch the Debian kernel package: {exc}")
print(f"setup: Debian kernel {kernel.release}: {len(kernel.modules())} modules in {kernel.moddir}")
PY

# ---- 4. optional parts ----------------------------------------------------------------------
if [ "$CONTAINERS" -eq 1 ]; then
    bash scripts/setup-podman.sh 9>&- || die "podman is not usable (scripts/setup-podman.sh failed)"
    bash scripts/bootstrap-base-image.sh 9>&- || die "no local Debian base image (scripts/bootstrap-base-image.sh failed)"
fi
if [ "$K8S" -eq 1 ]; then
    bash scripts/build-k8s-control-plane.sh 9>&- || die "no Kubernetes control plane (scripts/build-k8s-control-plane.sh failed)"
fi

say "ready in $(( $(date +%s) - started )) s"
