#!/bin/bash
# setup-podman.sh: make rootful podman able to run containers on this host.
#
# Usage: setup-podman.sh [--check] [--no-install] [--help]
#
#   1. Installs podman and its helpers with apt-get if any is missing (Debian/Ubuntu).
#   2. Probes podman with a container that needs no registry and no image: a throw-away
#      root directory holding only /bin/true and its libraries, run with
#      `podman run --rm --rootfs DIR /bin/true`.
#   3. Only if that fails with a known, fixable error does it write the drop-in
#      /etc/containers/containers.conf.d/50-kvc.conf:
#        - "cgroups in hybrid mode not supported" (crun on a host with cgroup v1
#          controllers plus a cgroup2 mount)           -> engine.runtime = "runc"
#        - "setrlimit RLIMIT_NOFILE/NPROC ... not permitted" (no CAP_SYS_RESOURCE, so
#          the runtime cannot raise limits above the caller's hard limits)
#                                                      -> pinned containers.default_ulimits
#      Each fix is verified with the equivalent command-line flags before the file is
#      written (atomically), and verified again without flags afterwards.
#   Hosts where podman already works get no drop-in. Running it again is cheap.
#
#   --check       probe and report only; change nothing (exit 1 if podman does not work)
#   --no-install  do not install missing packages
#
# Exit status: 0 podman works (now); 1 it does not and could not be fixed; 2 usage error.

set -euo pipefail

PROG=setup-podman
DROPIN_DIR=/etc/containers/containers.conf.d
DROPIN=$DROPIN_DIR/50-kvc.conf
PACKAGES=(podman buildah skopeo runc crun fuse-overlayfs slirp4netns netavark aardvark-dns
          containernetworking-plugins uidmap iptables conmon catatonit)

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
# A previous drop-in set aside while probing podman's own defaults; put back on failure.
BACKUP=""
restore_previous() {
    if [ -n "$BACKUP" ] && [ -f "$BACKUP" ]; then
        cp -p "$BACKUP" "$DROPIN"
        BACKUP=""
    fi
}
die() { restore_previous; printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2
}

CHECK_ONLY=0
INSTALL=1
while [ $# -gt 0 ]; do
    case $1 in
        --check) CHECK_ONLY=1 ;;
        --no-install) INSTALL=0 ;;
        -h|--help) usage; exit 0 ;;
        *) printf '%s: error: unknown argument %q (see --help)\n' "$PROG" "$1" >&2; exit 2 ;;
    esac
    shift
done

[ "$(id -u)" -eq 0 ] || die "must run as root (kvc uses rootful podman)"

# ---- 1. packages -------------------------------------------------------------------
install_packages() {
    local missing=() pkg
    if command -v dpkg-query >/dev/null 2>&1; then
        for pkg in "${PACKAGES[@]}"; do
            if ! dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null | grep -q '^ii'; then
                missing+=("$pkg")
            fi
        done
    elif ! command -v podman >/dev/null 2>&1; then
        die "podman is not installed and this is not a Debian-like system: install podman with the system's package manager"
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$INSTALL" -eq 0 ] || [ "$CHECK_ONLY" -eq 1 ]; then
        if command -v podman >/dev/null 2>&1; then
            say "not installed (left alone): ${missing[*]}"
            return 0
        fi
        die "podman is not installed (missing: ${missing[*]})"
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing packages (${missing[*]}) and no apt-get to install them"
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1 || die "apt-get update failed (is a Debian mirror reachable?)"
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get install failed for: ${missing[*]}"
    fi
}
install_packages
command -v podman >/dev/null 2>&1 || die "podman is not on PATH"

# ---- 2. probe ------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/kvc-podman-probe.XXXXXX)
trap 'rm -rf --one-file-system "$WORK"' EXIT

info_err=$WORK/info.err
if ! podman info >/dev/null 2>"$info_err"; then
    die "'podman info' fails: $(grep -m1 -v '^$' "$info_err" || echo 'no message')"
fi

# A root directory with nothing but /bin/true and the libraries it links against.
ROOTFS=$WORK/rootfs
make_rootfs() {
    local true_bin lib
    true_bin=$(type -P true) || die "no 'true' binary on PATH to build the probe container from"
    mkdir -p "$ROOTFS/bin"
    cp -L "$true_bin" "$ROOTFS/bin/true"
    if command -v ldd >/dev/null 2>&1; then
        # Lines look like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        # "/lib64/ld-linux-x86-64.so.2 (0x...)"; "statically linked" yields nothing.
        while read -r lib; do
            [ -e "$lib" ] || continue
            mkdir -p "$ROOTFS$(dirname "$lib")"
            cp -L "$lib" "$ROOTFS$lib"
        done < <(ldd "$true_bin" 2>/dev/null | grep -o '/[^ )]*' || true)
    fi
}
make_rootfs

PROBE_ERR=$WORK/probe.err
# probe [extra podman run flags...]: 0 if a container starts and exits 0.
probe() {
    rm -rf "${ROOTFS:?}/etc" "${ROOTFS:?}/run" "${ROOTFS:?}/proc" "${ROOTFS:?}/sys" "${ROOTFS:?}/dev"
    podman run --rm "$@" --rootfs "$ROOTFS" /bin/true >/dev/null 2>"$PROBE_ERR"
}
probe_message() { grep -m1 -v '^$' "$PROBE_ERR" 2>/dev/null || echo "no error message"; }

# Hard limits that the runtime is allowed to set (it cannot go above the caller's hard
# limits without CAP_SYS_RESOURCE). podman itself runs conmon with nproc capped at 32768.
hard_limit() {
    local value
    value=$(ulimit -H "$1")
    if [ "$value" = unlimited ] || [ "$value" -gt "$2" ]; then value=$2; fi
    echo "$value"
}
NOFILE=$(hard_limit -n 1048576)
NPROC=$(hard_limit -u 32768)

if probe; then
    if [ -f "$DROPIN" ]; then
        say "podman works (with $DROPIN)"
    else
        say "podman works; nothing to change"
    fi
    exit 0
fi
errors=("$(probe_message)")
say "probe failed: ${errors[0]}"

# A drop-in of ours that no longer suffices: set it aside and work from podman's defaults,
# so the new file carries every fix that is needed (it is put back if nothing works).
if [ -f "$DROPIN" ] && [ "$CHECK_ONLY" -eq 0 ]; then
    BACKUP=$WORK/previous.conf
    cp -p "$DROPIN" "$BACKUP"
    rm -f "$DROPIN"
    say "set aside the existing $DROPIN to re-check podman's defaults"
    if probe; then
        BACKUP=""
        say "podman works without it; $DROPIN removed"
        exit 0
    fi
    errors=("$(probe_message)")
    say "probe failed: ${errors[0]}"
fi

# ---- 3. find the fixes, verified with command-line flags -------------------------------
fix_runtime=0
fix_ulimits=0
flags=()
fixed=0
for _round in 1 2 3; do
    if grep -q 'cgroups in hybrid mode not supported' "$PROBE_ERR"; then
        [ "$fix_runtime" -eq 0 ] || die "still failing with runtime runc: $(probe_message)"
        command -v runc >/dev/null 2>&1 || die "crun does not support this host's hybrid cgroups and runc is not installed (apt-get install runc)"
        fix_runtime=1
        flags+=(--runtime runc)
    elif grep -Eqi 'setrlimit|RLIMIT_|error setting rlimit' "$PROBE_ERR"; then
        [ "$fix_ulimits" -eq 0 ] || die "still failing with pinned ulimits (nofile=$NOFILE nproc=$NPROC): $(probe_message)"
        fix_ulimits=1
        flags+=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")
    else
        die "podman cannot run a container and the cause is not one this script can fix: $(probe_message)"
    fi
    if probe "${flags[@]}"; then
        fixed=1
        break
    fi
    errors+=("$(probe_message)")
    say "with ${flags[*]}: ${errors[-1]}"
done
[ "$fixed" -eq 1 ] || die "podman still fails with ${flags[*]}: $(probe_message)"

changes=()
[ "$fix_runtime" -eq 1 ] && changes+=("runtime=runc")
[ "$fix_ulimits" -eq 1 ] && changes+=("ulimits nofile=$NOFILE nproc=$NPROC")
if [ "$CHECK_ONLY" -eq 1 ]; then
    say "podman works with: ${changes[*]} (--check: $DROPIN not written)"
    exit 1
fi

# ---- 4. write the drop-in atomically, then verify it ---------------------------------
mkdir -p "$DROPIN_DIR"
tmp=$(mktemp "$DROPIN_DIR/.50-kvc.conf.XXXXXX")
{
    echo "# Written by kvc's scripts/setup-podman.sh because podman's defaults failed here:"
    printf '#   %s\n' "${errors[@]}"
    echo "# Delete this file and run the script again to re-check."
    if [ "$fix_ulimits" -eq 1 ]; then
        echo "[containers]"
        echo "default_ulimits = [\"nofile=$NOFILE:$NOFILE\", \"nproc=$NPROC:$NPROC\"]"
    fi
    if [ "$fix_runtime" -eq 1 ]; then
        echo "[engine]"
        echo "runtime = \"runc\""
    fi
} >"$tmp"
chmod 0644 "$tmp"
mv -f "$tmp" "$DROPIN"

if ! probe; then
    msg=$(probe_message)
    rm -f "$DROPIN"
    die "wrote $DROPIN but podman still fails without flags (another containers.conf may override it): $msg"
fi
BACKUP=""
say "wrote $DROPIN (${changes[*]}); podman works"
