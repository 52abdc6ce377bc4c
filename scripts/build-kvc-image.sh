#!/bin/bash
# build-kvc-image.sh: build the kvc image, kvc for hosts without Python, from this repository.
#
# Usage: build-kvc-image.sh [options]
#
#   --tag TAG       also tag the image TAG (a full name, for example to push it to a registry);
#                   it is always tagged localhost/kvc:VERSION (kvc's version) and localhost/kvc:latest
#   --base IMAGE    the Debian image it starts from (default: localhost/debian:bookworm, made by
#                   scripts/bootstrap-base-image.sh from the host's own mirror; no registry needed)
#   --force         build again even when an image of the same sources exists
#   -h, --help      show this help
#
# Stages a small build context (src/kvc without caches, images/kvc/kvc-launcher) and builds
# images/kvc/Containerfile with podman ($KVC_CONTAINER_RUNTIME, default podman), squashing what it
# adds to the base into one layer. The image carries the label kvc.source-digest, a sha256 of what
# it is built from (the context, the Containerfile and the base's id), so running this again with
# unchanged sources only checks and tags (a second). Labels org.opencontainers.image.version and
# .revision are kvc's version and the repository's git commit.
# How to run the image on a host: src/kvc/data/kvc-container@.service and README.md ("Hosts
# without Python").
#
# Prints the image's size on stderr and its name (localhost/kvc:VERSION) on stdout.
# Exit status: 0 built (or up to date); 1 failure; 2 usage error.

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
EXTRA_TAGS=()
RUNTIME=${KVC_CONTAINER_RUNTIME:-podman}

need_value() { if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case $1 in
        --tag) need_value "$@"; EXTRA_TAGS+=("$2"); shift ;;
        --tag=*) EXTRA_TAGS+=("${1#*=}") ;;
        --base) need_value "$@"; BASE=$2; shift ;;
        --base=*) BASE=${1#*=} ;;
        --force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument $1" ;;
    esac
    shift
done
command -v "$RUNTIME" >/dev/null || die "$RUNTIME not found: install it, or set KVC_CONTAINER_RUNTIME"
BASE_ID=$("$RUNTIME" image inspect --format '{{.Id}}' "$BASE" 2>/dev/null) \
    || die "no base image $BASE: run scripts/bootstrap-base-image.sh (or give --base)"

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$TOP/src/kvc/__init__.py")
[ -n "$VERSION" ] || die "cannot read kvc's version from src/kvc/__init__.py"
REVISION=$(git -C "$TOP" rev-parse HEAD 2>/dev/null || echo unknown)
TAGS=("$NAME:$VERSION" "$NAME:latest" ${EXTRA_TAGS[@]+"${EXTRA_TAGS[@]}"})

CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/kvc-image.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
# The package without caches: what the image holds is what the tree holds.
(cd "$TOP/src" && find kvc -name __pycache__ -prune -o -type f -print | LC_ALL=C sort | while read -r file; do
    mkdir -p "$CONTEXT/$(dirname "$file")"
    cp -p "$file" "$CONTEXT/$file"
done)
cp -p "$TOP/images/kvc/kvc-launcher" "$CONTEXT/"
# The revision is not in it: a new commit that changes none of the image's sources needs no rebuild.
DIGEST=$( { (cd "$CONTEXT" && find . -type f | LC_ALL=C sort | xargs sha256sum); \
            sha256sum <"$TOP/images/kvc/Containerfile"; echo "$BASE_ID"; } | sha256sum | cut -d' ' -f1)

tag_all() { for tag in "${TAGS[@]:1}"; do "$RUNTIME" tag "${TAGS[0]}" "$tag" || die "cannot tag $tag"; done; }
report() {
    local size
    size=$("$RUNTIME" image inspect --format '{{.Size}}' "${TAGS[0]}") || die "cannot inspect ${TAGS[0]}"
    say "$1 ${TAGS[0]} ($((size / 1000000)) MB; tags: ${TAGS[*]})"
    echo "${TAGS[0]}"
}

if [ "$FORCE" -eq 0 ] && [ "$("$RUNTIME" image inspect --format '{{index .Labels "kvc.source-digest"}}' \
        "${TAGS[0]}" 2>/dev/null || true)" = "$DIGEST" ]; then
    tag_all
    report "up to date:"
    exit 0
fi

OLD_ID=$("$RUNTIME" image inspect --format '{{.Id}}' "${TAGS[0]}" 2>/dev/null || true)
say "building ${TAGS[0]} from $BASE"
log=$CONTEXT/build.log
if ! "$RUNTIME" build --pull=never --squash --file "$TOP/images/kvc/Containerfile" \
        --build-arg "BASE_IMAGE=$BASE" --build-arg "KVC_VERSION=$VERSION" --build-arg "KVC_REVISION=$REVISION" \
        --label "kvc.source-digest=$DIGEST" --tag "${TAGS[0]}" "$CONTEXT" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "the image build failed (the last lines of its output are above)"
fi
tag_all
# Without this every rebuild would leave the previous image behind, untagged (100 MB each). One
# still in use (a container, another tag) stays: rmi without --force refuses it.
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$("$RUNTIME" image inspect --format '{{.Id}}' "${TAGS[0]}")" ] \
        && [ -z "$("$RUNTIME" image inspect --format '{{join .RepoTags ""}}' "$OLD_ID" 2>/dev/null)" ]; then
    "$RUNTIME" rmi "$OLD_ID" >/dev/null 2>&1 || say "kept the previous image $OLD_ID (in use)"
fi
report "built"
