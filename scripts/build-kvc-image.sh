#!/bin/bash
# build-kvc-image.sh: build the kvc image, kvc for hosts without Python, from this repository.
#
# Usage: build-kvc-image.sh [options]
#
#   --tag NAME      the image's name without a tag (default: localhost/kvc); it is tagged
#                   NAME:VERSION (kvc's version) and NAME:latest
#   --base IMAGE    the Debian image it starts from (default: localhost/debian:bookworm, made by
#                   scripts/bootstrap-base-image.sh from the host's own mirror; no registry needed)
#   --force         build again even when an image of the same sources exists
#   -h, --help      show this help
#
# Stages a small build context (src/kvc, images/kvc/kvc-launcher and containers.conf) and builds
# images/kvc/Containerfile with podman ($KVC_CONTAINER_RUNTIME, default podman). The image carries
# the label kvc.source-digest, a sha256 of what it is built from (the context and the Containerfile),
# so running this again with unchanged sources only checks (a second).
# How to run the image on a host: src/kvc/data/kvc-container@.service and README.md ("Hosts
# without Python").
#
# Prints the image's name. Exit status: 0 built (or up to date); 1 failure; 2 usage error.

set -euo pipefail

PROG=build-kvc-image
say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: error: %s (see --help)\n' "$PROG" "$*" >&2; exit 2; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0" >&2; }

TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=localhost/kvc
BASE=localhost/debian:bookworm
FORCE=0
RUNTIME=${KVC_CONTAINER_RUNTIME:-podman}

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case $1 in
        --tag) need_value "$@"; NAME=$2; shift ;;
        --tag=*) NAME=${1#*=} ;;
        --base) need_value "$@"; BASE=$2; shift ;;
        --base=*) BASE=${1#*=} ;;
        --force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument $1" ;;
    esac
    shift
done
case $NAME in *:*) usage_error "--tag takes a name without a tag (the script tags VERSION and latest)" ;; esac
command -v "$RUNTIME" >/dev/null || die "$RUNTIME not found: install it, or set KVC_CONTAINER_RUNTIME"
"$RUNTIME" image exists "$BASE" 2>/dev/null || "$RUNTIME" image inspect "$BASE" >/dev/null 2>&1 \
    || die "no base image $BASE: run scripts/bootstrap-base-image.sh (or give --base)"

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$TOP/src/kvc/__init__.py")
[ -n "$VERSION" ] || die "cannot read kvc's version from src/kvc/__init__.py"
REVISION=$(git -C "$TOP" rev-parse HEAD 2>/dev/null || echo unknown)

CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/kvc-image.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
# The package without caches: what the image holds is what the tree holds.
(cd "$TOP/src" && find kvc -name __pycache__ -prune -o -type f -print | LC_ALL=C sort | while read -r file; do
    mkdir -p "$CONTEXT/$(dirname "$file")"
    cp -p "$file" "$CONTEXT/$file"
done)
cp -p "$TOP/images/kvc/kvc-launcher" "$TOP/images/kvc/containers.conf" "$CONTEXT/"
DIGEST=$( { (cd "$CONTEXT" && find . -type f | LC_ALL=C sort | xargs sha256sum); \
            sha256sum <"$TOP/images/kvc/Containerfile"; echo "$BASE"; } | sha256sum | cut -d' ' -f1)

if [ "$FORCE" -eq 0 ] && [ "$("$RUNTIME" image inspect --format '{{index .Labels "kvc.source-digest"}}' \
        "$NAME:$VERSION" 2>/dev/null || true)" = "$DIGEST" ]; then
    "$RUNTIME" tag "$NAME:$VERSION" "$NAME:latest"
    say "$NAME:$VERSION is up to date"
    echo "$NAME:$VERSION"
    exit 0
fi

say "building $NAME:$VERSION from $BASE"
log=$CONTEXT/build.log
if ! "$RUNTIME" build --pull=never --file "$TOP/images/kvc/Containerfile" --build-arg "BASE_IMAGE=$BASE" \
        --build-arg "KVC_VERSION=$VERSION" --build-arg "KVC_REVISION=$REVISION" \
        --label "kvc.source-digest=$DIGEST" -t "$NAME:$VERSION" -t "$NAME:latest" "$CONTEXT" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "the image build failed (the last lines of its output are above)"
fi
size=$("$RUNTIME" image inspect --format '{{.Size}}' "$NAME:$VERSION")
say "built $NAME:$VERSION ($((size / 1000000)) MB)"
echo "$NAME:$VERSION"
