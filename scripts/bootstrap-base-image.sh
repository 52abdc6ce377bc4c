#!/bin/bash
# bootstrap-base-image.sh: build a Debian base image locally, from a Debian mirror, with
# no container registry involved.
#
# Usage: bootstrap-base-image.sh [options] [IMAGE]
#
#   IMAGE                   image to create (default: localhost/debian:SUITE)
#   --suite NAME            Debian suite (default: bookworm)
#   --mirror URL            Debian mirror for debootstrap and the image's sources.list
#                           (default: the host's own apt source for SUITE, from
#                           /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources}).
#                           For air-gapped hosts, point this at a local mirror or apt proxy.
#   --security-mirror URL   mirror of debian-security (default: the host's apt source for
#                           SUITE-security when the mirror came from the host too; with --mirror,
#                           SUITE-security is left out unless this is given)
#   --keyring FILE          keyring debootstrap checks the mirror's Release file with
#   --no-upgrade            do not apply SUITE-updates and SUITE-security to the image
#   --force                 rebuild even if IMAGE already exists
#   -h, --help              show this help
#
# Steps: debootstrap --variant=minbase SUITE into a temporary directory; write sources.list
# with SUITE, SUITE-updates and SUITE-security and upgrade from them (debootstrap only uses
# SUITE itself); remove apt caches and lists and host-specific files; then `tar --numeric-owner -C DIR -c . | RUNTIME import - IMAGE`.
# RUNTIME is $KVC_CONTAINER_RUNTIME (default podman; docker works the same way).
# Without --force, an existing IMAGE is left alone, so running it again is cheap.
#
# Exit status: 0 the image exists (built now or before); 1 failure; 2 usage error.

set -euo pipefail

PROG=bootstrap-base-image
say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: error: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2; }

SUITE=bookworm
APT_ETC=${APT_ETC:-/etc/apt}  # tests point this at a sources tree of their own
MIRROR=""
SECURITY_MIRROR=""
KEYRING=""
FORCE=0
UPGRADE=1
IMAGE=""

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case $1 in
        --suite) need_value "$@"; SUITE=$2; shift ;;
        --suite=*) SUITE=${1#*=} ;;
        --mirror) need_value "$@"; MIRROR=$2; shift ;;
        --mirror=*) MIRROR=${1#*=} ;;
        --security-mirror) need_value "$@"; SECURITY_MIRROR=$2; shift ;;
        --security-mirror=*) SECURITY_MIRROR=${1#*=} ;;
        --keyring) need_value "$@"; KEYRING=$2; shift ;;
        --keyring=*) KEYRING=${1#*=} ;;
        --force) FORCE=1 ;;
        --no-upgrade) UPGRADE=0 ;;
        -h|--help) usage; exit 0 ;;
        -*) usage_error "unknown option $1" ;;
        *) [ -z "$IMAGE" ] || usage_error "only one IMAGE may be given"; IMAGE=$1 ;;
    esac
    shift
done

[[ $SUITE =~ ^[a-z][a-z0-9-]*$ ]] || usage_error "--suite '$SUITE' is not a Debian suite name"
# apt_source_for SUITE: the host's own apt source for SUITE (scripts/lib/apt-sources.sh).
. "$(dirname "${BASH_SOURCE[0]}")/lib/apt-sources.sh"

if [ -z "$MIRROR" ]; then
    MIRROR=$(apt_source_for "$SUITE")
    [ -n "$MIRROR" ] || usage_error "no apt source for '$SUITE' (main) in $APT_ETC/sources.list{,.d}: give --mirror URL"
    SECURITY_MIRROR=${SECURITY_MIRROR:-$(apt_source_for "$SUITE-security")}
fi
for url in "$MIRROR" ${SECURITY_MIRROR:+"$SECURITY_MIRROR"}; do
    [[ $url =~ ^(https?|file|ftp)://[^[:space:]]+$ ]] || usage_error "'$url' is not a mirror URL (http://, https://, ftp:// or file://)"
done
MIRROR=${MIRROR%/}
SECURITY_MIRROR=${SECURITY_MIRROR%/}
IMAGE=${IMAGE:-localhost/debian:$SUITE}
[[ $IMAGE =~ ^[a-z0-9][A-Za-z0-9._/:-]*$ ]] || usage_error "'$IMAGE' is not an image name"
if [ -n "$KEYRING" ] && [ ! -r "$KEYRING" ]; then
    die "cannot read keyring $KEYRING"
fi

RUNTIME=${KVC_CONTAINER_RUNTIME:-podman}
command -v "$RUNTIME" >/dev/null 2>&1 || die "container runtime '$RUNTIME' not found (set KVC_CONTAINER_RUNTIME or install it)"

if [ "$FORCE" -eq 0 ] && "$RUNTIME" image inspect "$IMAGE" >/dev/null 2>&1; then
    say "$IMAGE already exists (use --force to rebuild)"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap creates device nodes and root-owned files)"
if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is not installed"
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null 2>&1 \
        || die "debootstrap is not installed and 'apt-get install debootstrap' failed"
fi

# Large enough for a 130 MB tree; /var/tmp is disk-backed where /tmp may be tmpfs.
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/kvc-base-image.XXXXXX")
ROOT=$WORK/root
LOG=$WORK/debootstrap.log
KEEP_LOG=""

cleanup() {
    # debootstrap mounts /proc, /sys (and in containers binds /dev) into the target; an
    # interrupted run can leave them mounted, so unmount before removing anything.
    local mnt
    if [ -d "$ROOT" ]; then
        while read -r mnt; do
            umount -l "$mnt" 2>/dev/null || true
        done < <(awk -v root="$ROOT" 'index($2, root "/") == 1 {print $2}' /proc/self/mounts | sort -r)
    fi
    if [ -n "$KEEP_LOG" ] && [ -f "$LOG" ]; then
        cp "$LOG" "$KEEP_LOG" 2>/dev/null || true
    fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }

say "debootstrap --variant=minbase $SUITE from $MIRROR"
args=(--variant=minbase)
[ -n "$KEYRING" ] && args+=("--keyring=$KEYRING")
start=$(seconds)
if ! debootstrap "${args[@]}" "$SUITE" "$ROOT" "$MIRROR" >"$LOG" 2>&1; then
    KEEP_LOG=${TMPDIR:-/var/tmp}/kvc-debootstrap-$SUITE.log
    die "debootstrap failed: $(grep -E '^(E|W): ' "$LOG" | tail -n1 || true) (log: $KEEP_LOG)"
fi
say "debootstrap took $(elapsed "$start") s"

# Package sources for builds on top of this image.
{
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    if [ -n "$SECURITY_MIRROR" ]; then
        echo "deb $SECURITY_MIRROR $SUITE-security main"
    fi
} >"$ROOT/etc/apt/sources.list"
[ -n "$SECURITY_MIRROR" ] || say "no --security-mirror given: $SUITE-security left out of sources.list"

if [ "$UPGRADE" -eq 1 ]; then
    say "applying $SUITE-updates and $SUITE-security"
    start=$(seconds)
    if ! chroot "$ROOT" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
            sh -c 'apt-get update -q && apt-get upgrade -y -q --no-install-recommends' >"$LOG" 2>&1; then
        KEEP_LOG=${TMPDIR:-/var/tmp}/kvc-base-upgrade-$SUITE.log
        die "upgrading the image failed: $(grep -E '^(E|W): ' "$LOG" | tail -n1 || true) (log: $KEEP_LOG)"
    fi
    say "upgraded $(grep -c '^Setting up ' "$LOG" || true) packages in $(elapsed "$start") s"
fi

# Smaller and host-independent: no package caches or lists, and no files that describe the
# machine the image was made on (the runtime provides resolv.conf, hostname and hosts).
rm -rf "${ROOT:?}"/var/cache/apt/archives/*.deb "${ROOT:?}"/var/cache/apt/*.bin \
       "${ROOT:?}"/var/lib/apt/lists/* "${ROOT:?}"/var/log/apt/* "${ROOT:?}"/var/log/dpkg.log \
       "${ROOT:?}"/var/log/bootstrap.log "${ROOT:?}"/etc/hostname
mkdir -p "$ROOT/var/lib/apt/lists/partial"
: >"$ROOT/etc/resolv.conf"

old_id=$("$RUNTIME" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
say "importing $IMAGE with $RUNTIME"
start=$(seconds)
if ! tar --numeric-owner -C "$ROOT" -c . | "$RUNTIME" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null 2>"$WORK/import.err"; then
    die "$RUNTIME import failed: $(grep -m1 -v '^$' "$WORK/import.err" || echo 'no message')"
fi
say "import took $(elapsed "$start") s"
if [ -n "$old_id" ]; then
    # The replaced image, unless images built on it still need it.
    "$RUNTIME" rmi "$old_id" >/dev/null 2>&1 || true
fi
say "built $IMAGE ($(du -sm "$ROOT" | cut -f1) MB unpacked)"
