#!/bin/bash
# build-onefile.sh: build kvc as one executable file that runs on hosts with no Python at all
# (Fedora CoreOS, Flatcar, bootc, RHEL CoreOS), with PyInstaller, in a Debian root of SUITE.
#
# Usage: build-onefile.sh [options]
#
#   --output DIR    where to write the executable (default: dist/ in the repository)
#   --suite NAME    Debian suite whose Python and glibc it is built with (default: bullseye, with
#                   Python 3.9 and glibc 2.31; what it bundles needs glibc 2.29 or newer). A newer
#                   suite raises that floor: bookworm's Python needs 2.35-2.36, above RHEL 9's 2.34.
#   --onedir        also write DIR/kvc-onedir/: the same bundle unpacked (kvc beside _internal/),
#                   which starts faster than the one file, which unpacks itself at every start
#   --force         rebuild the executable even when one of the same sources is cached
#   -h, --help      show this help
#
# Writes DIR/kvc and DIR/kmods-via-containers, a symlink to it: run under that name, the
# executable is the legacy interface (scripts/kvc_onefile_entry.py).
#
# Steps: debootstrap --variant=minbase SUITE from the host's own Debian mirror (its apt sources,
# scripts/lib/apt-sources.sh); in it, apt-get install python3 python3-venv python3-dev binutils
# (libpython for the bundle, objdump and ldd for PyInstaller's analysis) with SUITE-updates and
# SUITE-security, a venv with the pinned PyInstaller and zstandard from PyPI (trusting the host's
# CA bundle); then copy src/ and pyproject.toml in, pip install them, and run PyInstaller on kvc's
# CLI with all of kvc's submodules (kvc kmod imports its tools by name) and its package data.
#
# Cache: ${KVC_BUILD_CACHE:-/var/cache/kvc-build}. roots/SUITE-KEY/ is the build root, made once
# for a suite, package list and pins; builds/HASH/ holds the executables of one source tree (the
# last few trees are kept), so running it again with unchanged sources only copies them.
# Commands in the root run in a private mount namespace: the /proc, /sys and /dev mounted there
# (by debootstrap too) go away with it, even when the script is killed.
#
# Exit status: 0 built (or taken from the cache); 1 failure; 2 usage error.

set -euo pipefail

PROG=build-onefile
say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: error: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2; }

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$TOP/scripts/lib/apt-sources.sh"

OUTPUT=$TOP/dist
SUITE=bullseye
ONEDIR=0
FORCE=0

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case $1 in
        --output) need_value "$@"; OUTPUT=$2; shift ;;
        --output=*) OUTPUT=${1#*=} ;;
        --suite) need_value "$@"; SUITE=$2; shift ;;
        --suite=*) SUITE=${1#*=} ;;
        --onedir) ONEDIR=1 ;;
        --force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument $1" ;;
    esac
    shift
done
[[ $SUITE =~ ^[a-z][a-z0-9]*$ ]] || usage_error "--suite '$SUITE' is not a Debian suite name"
[ -n "$OUTPUT" ] || usage_error "--output needs a value"

# What the build root holds; changing any of it makes a new root.
APT_PACKAGES=(python3 python3-venv python3-dev binutils ca-certificates)
PIP_PIN=pip==25.2  # a current pip, not the suite's own (bullseye's 20.3.4), pinned like the rest
PIP_PINS=(setuptools==80.9.0 pyinstaller==6.22.3 zstandard==0.25.0)
ROOT_RECIPE="$SUITE ${APT_PACKAGES[*]} $PIP_PIN ${PIP_PINS[*]}"
VENV=/opt/kvc-build/venv
KEEP_BUILDS=3

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot)"
for tool in unshare chroot flock sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed"
done
if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is not installed"
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null 2>&1 \
        || die "debootstrap is not installed and 'apt-get install debootstrap' failed"
fi

CACHE=${KVC_BUILD_CACHE:-/var/cache/kvc-build}
mkdir -p "$CACHE/roots" "$CACHE/builds" || die "cannot create the build cache $CACHE"
# One build at a time per cache: two would race on the root and the builds.
exec 9>"$CACHE/.lock"
flock -w 1800 9 || die "another build has held $CACHE/.lock for 30 minutes"

WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
LOG=$WORK/step.log
cleanup() { rm -rf --one-file-system "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }
# step WHAT CMD...: run CMD with its output in the log; on failure, its last line and exit 1.
step() {
    local what=$1 start
    shift
    start=$(seconds)
    if ! "$@" </dev/null >"$LOG" 2>&1 9>&-; then
        local keep=${TMPDIR:-/var/tmp}/kvc-build-onefile-failed.log
        cp "$LOG" "$keep" 2>/dev/null || keep=$LOG
        die "$what failed: $(grep -v '^[[:space:]]*$' "$LOG" | tail -n 1 || true) (full output: $keep)"
    fi
    say "$what took $(elapsed "$start") s"
}
# in_root ROOT CMD...: CMD chrooted into ROOT with a clean environment, /proc, /sys and /dev
# mounted in a mount namespace of its own, so that no mount outlives it.
in_root() {
    local root=$1
    shift
    unshare --mount --propagation private -- /bin/sh -c '
        root=$1; shift
        mount -t proc proc "$root/proc" && mount --rbind /sys "$root/sys" && mount --rbind /dev "$root/dev" \
            && exec chroot "$root" "$@"' sh "$root" \
        /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive PIP_CERT=/etc/kvc-build/ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        ${PIP_INDEX_URL:+PIP_INDEX_URL="$PIP_INDEX_URL"} ${https_proxy:+https_proxy="$https_proxy"} \
        ${http_proxy:+http_proxy="$http_proxy"} ${no_proxy:+no_proxy="$no_proxy"} "$@"
}
# The host's name resolution and trusted CAs (pip reaches PyPI through whatever the host trusts).
host_network_into() {
    local ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
    [ -r "$ca" ] || die "no CA bundle at $ca (set PIP_CERT)"
    mkdir -p "$1/etc/kvc-build"
    cp -L "$ca" "$1/etc/kvc-build/ca.crt"
    rm -f "$1/etc/resolv.conf"
    cp -L /etc/resolv.conf "$1/etc/resolv.conf"
}

# ---- the build root ---------------------------------------------------------------------------
ROOT=$CACHE/roots/$SUITE-$(printf '%s' "$ROOT_RECIPE" | sha256sum | cut -c1-12)
if [ -f "$ROOT/.kvc-ready" ]; then
    say "build root $ROOT (cached)"
else
    MIRROR=$(apt_mirror_for "$SUITE")
    SECURITY_MIRROR=$(apt_mirror_for "$SUITE-security")
    [ -n "$MIRROR" ] || die "no Debian mirror in the host's apt sources (${APT_ETC:-/etc/apt}/sources.list{,.d})"
    MIRROR=${MIRROR%/}
    NEW=$WORK/root
    say "debootstrap --variant=minbase $SUITE from $MIRROR"
    step "debootstrap" unshare --mount --propagation private -- debootstrap --variant=minbase "$SUITE" "$NEW" "$MIRROR"
    {
        echo "deb $MIRROR $SUITE main"
        echo "deb $MIRROR $SUITE-updates main"
        [ -z "$SECURITY_MIRROR" ] || echo "deb ${SECURITY_MIRROR%/} $SUITE-security main"
    } >"$NEW/etc/apt/sources.list"
    host_network_into "$NEW"
    say "installing ${APT_PACKAGES[*]} in the root"
    step "apt-get install" in_root "$NEW" sh -c 'apt-get update -q && apt-get upgrade -y -q \
        && apt-get install -y -q --no-install-recommends "$@" && apt-get clean' sh "${APT_PACKAGES[@]}"
    say "installing $PIP_PIN ${PIP_PINS[*]} into $VENV"
    step "pip install" in_root "$NEW" sh -c 'venv=$1; shift; python3 -m venv "$venv" \
        && "$venv/bin/pip" install -q "$0" && "$venv/bin/pip" install -q "$@"' "$PIP_PIN" "$VENV" "${PIP_PINS[@]}"
    touch "$NEW/.kvc-ready"
    rm -rf --one-file-system "$ROOT"
    mv "$NEW" "$ROOT"
    # Roots of other recipes for this suite are stale now.
    find "$CACHE/roots" -mindepth 1 -maxdepth 1 -name "$SUITE-*" ! -path "$ROOT" -exec rm -rf --one-file-system {} +
fi

# ---- the executables --------------------------------------------------------------------------
# Everything the bundle is made from: kvc's sources, the entry script, this recipe.
SOURCE_HASH=$(
    cd "$TOP"
    {
        find src -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 | sort -z \
            | xargs -0 sha256sum
        sha256sum pyproject.toml README.md scripts/kvc_onefile_entry.py scripts/build-onefile.sh
        echo "$ROOT_RECIPE"
    } | sha256sum | cut -c1-16
)
BUILD=$CACHE/builds/$SOURCE_HASH
[ "$FORCE" -eq 0 ] || rm -rf --one-file-system "$BUILD"
want=(kvc)
[ "$ONEDIR" -eq 0 ] || want+=(kvc-onedir)
missing=()
for item in "${want[@]}"; do
    [ -e "$BUILD/$item" ] || missing+=("$item")
done

if [ ${#missing[@]} -eq 0 ]; then
    say "$SOURCE_HASH: built before (use --force to rebuild)"
else
    host_network_into "$ROOT"
    rm -rf --one-file-system "$ROOT/build"
    mkdir -p "$ROOT/build/kvc"
    cp -a "$TOP/src" "$TOP/pyproject.toml" "$TOP/README.md" "$ROOT/build/kvc/"
    find "$ROOT/build/kvc" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    cp "$TOP/scripts/kvc_onefile_entry.py" "$ROOT/build/"
    step "pip install kvc" in_root "$ROOT" "$VENV/bin/pip" install -q --no-deps --no-build-isolation \
        --force-reinstall /build/kvc
    mkdir -p "$WORK/build"
    for item in "${missing[@]}"; do
        if [ "$item" = kvc ]; then mode=--onefile; else mode=--onedir; fi
        # Less to unpack at every start of the one file: zstandard's cffi backend is only its
        # fallback (the C one always imports) and needs cffi, which is not installed (12 MB);
        # without _hashlib (and so libcrypto, 3 MB) hashlib.sha256, all kvc uses, is the built-in
        # one; --strip drops the debug info the zstandard wheel ships (its C backend: 11.6 -> 1 MB).
        step "pyinstaller $mode" in_root "$ROOT" "$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
            "$mode" --name kvc --collect-submodules kvc --collect-data kvc --strip \
            --exclude-module zstandard._cffi --exclude-module _hashlib \
            --distpath "/build/dist$mode" --workpath "/build/work$mode" --specpath "/build/spec$mode" \
            /build/kvc_onefile_entry.py
        mv "$ROOT/build/dist$mode/kvc" "$WORK/build/$item"
    done
    rm -rf --one-file-system "$ROOT/build"
    mkdir -p "$BUILD"
    for item in "${missing[@]}"; do
        mv "$WORK/build/$item" "$BUILD/$item"
    done
    # Only the last few source trees: each build is tens of MB.
    find "$CACHE/builds" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | tail -n +$((KEEP_BUILDS + 1)) \
        | cut -d' ' -f2- | xargs -r rm -rf --one-file-system
fi
touch "$BUILD"

# ---- the output -------------------------------------------------------------------------------
mkdir -p "$OUTPUT" || die "cannot create $OUTPUT"
cp "$BUILD/kvc" "$OUTPUT/.kvc.tmp" && mv -f "$OUTPUT/.kvc.tmp" "$OUTPUT/kvc" || die "cannot write $OUTPUT/kvc"
ln -sfn kvc "$OUTPUT/kmods-via-containers"
if [ "$ONEDIR" -eq 1 ]; then
    rm -rf --one-file-system "$OUTPUT/kvc-onedir"
    cp -a "$BUILD/kvc-onedir" "$OUTPUT/kvc-onedir" || die "cannot write $OUTPUT/kvc-onedir"
fi
say "wrote $OUTPUT/kvc ($(du -k "$OUTPUT/kvc" | cut -f1) KiB)"
[ "$ONEDIR" -eq 0 ] || say "wrote $OUTPUT/kvc-onedir/ ($(du -sk "$OUTPUT/kvc-onedir" | cut -f1) KiB)"
