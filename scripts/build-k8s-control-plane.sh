#!/usr/bin/env bash
# build-k8s-control-plane.sh: build a real Kubernetes 1.20.2 control plane (kube-apiserver,
# kube-controller-manager, kube-scheduler) from Debian's own sources, for the tests' `k8s` tier.
# Run as root on Debian 12, from anywhere. Idempotent.
#
# Usage: bash scripts/build-k8s-control-plane.sh [OUTPUT-DIR] [--help]
#
#   OUTPUT-DIR  where the binaries go (default /var/cache/kvc-k8s/1.20.2): the three servers and
#               Debian's etcd. When they are already there (and say v1.20.2), nothing is built.
#
# No Kubernetes server is packaged ready to run in Debian 12, but bookworm's `kubernetes` source
# package (1.20.2, with vendor/) builds with Go 1.15 from bullseye (bookworm's Go 1.19 builds it too,
# but that apiserver crashes in the vendored reflect2 on the first custom-resource request).
#   1. apt-get install (the host's sources): rsync, make, dpkg-dev (dpkg-source), openssl; and
#      Debian's etcd, the etcd binary taken from the etcd-server package (apt-get download, dpkg-deb)
#      rather than installed, so that no etcd service is started on the host.
#   2. With a private apt configuration (its own sources list, lists and caches under the work
#      directory; the host's apt state is not touched), using the Debian mirror the host's apt
#      sources name: the bookworm source package and bullseye's golang-1.15-go/-src debs, unpacked
#      with dpkg-source and dpkg-deb (Go is only a GOROOT in the work directory, never installed).
#   3. make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" (code
#      generators first): 4-9 minutes on 2 cores, ~3-4 GB of disk while it runs. The binaries are
#      copied to OUTPUT-DIR and the work directory is removed.
#
# Exit status: 0 binaries ready; 1 failure; 2 usage error.

set -euo pipefail

PROG=build-k8s-control-plane
say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

K8S_VERSION=1.20.2
SOURCE_PACKAGE=kubernetes
SOURCE_VERSION=1.20.5+really1.20.2-1.1+deb12u1
SOURCE_SUITE=bookworm
GO_SUITE=bullseye
GO_PACKAGES=(golang-1.15-go golang-1.15-src)
GO_ROOT_IN_PACKAGE=usr/lib/go-1.15
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)
HOST_PACKAGES=(rsync make dpkg-dev openssl ca-certificates)
ETCD_PACKAGE=etcd-server

output=
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) printf '%s: error: unknown option %q (see --help)\n' "$PROG" "$1" >&2; exit 2 ;;
        *) [ -z "$output" ] || { printf '%s: error: one OUTPUT-DIR only (see --help)\n' "$PROG" >&2; exit 2; }
           output=$1 ;;
    esac
    shift
done
output=${output:-/var/cache/kvc-k8s/$K8S_VERSION}
case $output in /*) ;; *) output=$PWD/$output ;; esac

started=$(date +%s)
step_started=$started
# timing WHAT: one line with the seconds since the previous step.
timing() {
    local now
    now=$(date +%s)
    say "$1 in $(( now - step_started )) s"
    step_started=$now
}

binaries_ready() {
    local binary
    for binary in "${BINARIES[@]}"; do
        [ -x "$output/$binary" ] || return 1
        "$output/$binary" --version 2>/dev/null | grep -qx "Kubernetes v$K8S_VERSION" || return 1
    done
}

mkdir -p "$(dirname "$output")"
exec 9>"$output.lock"
flock -w 1800 9 || die "another build has held $output.lock for 30 minutes"

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -q -o DPkg::Lock::Timeout=300)
missing=()
for package in "${HOST_PACKAGES[@]}"; do
    case $(dpkg-query -W -f='${db:Status-Abbrev}' "$package" 2>/dev/null || true) in
        ii*) ;;
        *) missing+=("$package") ;;
    esac
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "must run as root to install ${missing[*]}"
    say "installing ${missing[*]}"
    "${APT[@]}" install -y --no-install-recommends "${missing[@]}" </dev/null >/dev/null 9>&- \
        || die "apt-get install ${missing[*]} failed"
    timing "host packages installed"
fi

if [ ! -x "$output/etcd" ]; then
    etcd_work=$(mktemp -d "${TMPDIR:-/tmp}/kvc-etcd.XXXXXX")
    (cd "$etcd_work" && "${APT[@]}" download "$ETCD_PACKAGE") </dev/null >"$etcd_work/log" 2>&1 9>&- \
        || die "apt-get download $ETCD_PACKAGE failed: $(tail -n 1 "$etcd_work/log")"
    dpkg-deb -x "$etcd_work"/"$ETCD_PACKAGE"_*.deb "$etcd_work/root"
    mkdir -p "$output"
    install -m 0755 "$etcd_work/root/usr/bin/etcd" "$output/etcd.new"
    mv -f "$output/etcd.new" "$output/etcd"
    rm -rf "$etcd_work"
    timing "Debian's etcd ($("$output/etcd" --version | head -n 1)) taken from $ETCD_PACKAGE"
fi

if binaries_ready; then
    say "Kubernetes v$K8S_VERSION control plane already built in $output"
    exit 0
fi

# The Debian mirror: the first URI the host's apt sources use for the suite SOURCE_SUITE itself
# (one-line .list files and deb822 .sources files; disabled and cdrom entries skipped).
mirror_uri() {
    local files=() file
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for file in /etc/apt/sources.list.d/*.list; do [ -f "$file" ] && files+=("$file"); done
    for file in "${files[@]}"; do
        awk -v suite="$SOURCE_SUITE" '
            $1 == "deb" || $1 == "deb-src" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite && $i ~ /^(https?|file):/) { print $i; exit }
            }' "$file"
    done
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk -v suite="$SOURCE_SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uri = ""; match_suite = 0; enabled = 1
                for (n = 1; n <= NF; n++) {
                    line = $n
                    if (line ~ /^#/) continue
                    if (line ~ /^URIs:/) { split(substr(line, 6), words, " "); for (w in words) if (uri == "" && words[w] ~ /^(https?|file):/) uri = words[w] }
                    if (line ~ /^Suites:/) { k = split(substr(line, 8), words, " "); for (w = 1; w <= k; w++) if (words[w] == suite) match_suite = 1 }
                    if (line ~ /^Enabled:[ \t]*no/) enabled = 0
                }
                if (enabled && match_suite && uri != "") { print uri; exit }
            }' "$file"
    done
}
mirror=$(mirror_uri | head -n 1)
[ -n "$mirror" ] || die "no apt source for the suite $SOURCE_SUITE in /etc/apt/sources.list or /etc/apt/sources.list.d (add the Debian mirror you use)"
mirror=${mirror%/}
say "Debian mirror from the host's apt sources: $mirror"

work=$output.work
rm -rf "$work"
mkdir -p "$work"/apt/lists/partial "$work"/apt/archives/partial "$work"/apt/cache "$work"/apt/sources.list.d "$work"/downloads
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring is missing (apt-get install debian-archive-keyring)"
cat >"$work/apt/sources.list" <<EOF
deb-src [signed-by=$keyring] $mirror $SOURCE_SUITE main
deb [signed-by=$keyring] $mirror $GO_SUITE main
EOF
PRIVATE_APT=(apt-get -q
    -o Dir::Etc::sourcelist="$work/apt/sources.list"
    -o Dir::Etc::sourceparts="$work/apt/sources.list.d"
    -o Dir::State::Lists="$work/apt/lists"
    -o Dir::Cache="$work/apt/cache"
    -o Dir::Cache::archives="$work/apt/archives"
    -o APT::Get::List-Cleanup=false)
log=$work/apt.log
"${PRIVATE_APT[@]}" update </dev/null >"$log" 2>&1 9>&- \
    || die "apt-get update with $work/apt/sources.list failed: $(tail -n 1 "$log")"
timing "package lists of $SOURCE_SUITE (sources) and $GO_SUITE fetched"
(cd "$work/downloads" \
    && "${PRIVATE_APT[@]}" source --download-only "$SOURCE_PACKAGE=$SOURCE_VERSION" \
    && "${PRIVATE_APT[@]}" download "${GO_PACKAGES[@]}") </dev/null >"$log" 2>&1 9>&- \
    || die "downloading $SOURCE_PACKAGE $SOURCE_VERSION and ${GO_PACKAGES[*]} failed: $(tail -n 1 "$log")"
timing "source package and Go downloaded"

go_dir=$work/go
for deb in "$work"/downloads/*.deb; do
    dpkg-deb -x "$deb" "$go_dir"
done
export GOROOT=$go_dir/$GO_ROOT_IN_PACKAGE
[ -x "$GOROOT/bin/go" ] || die "no go binary in $GOROOT after unpacking ${GO_PACKAGES[*]}"
source_dir=$work/gopath/src/k8s.io/kubernetes
mkdir -p "$(dirname "$source_dir")"
dpkg-source --no-check -x "$work"/downloads/"${SOURCE_PACKAGE}_${SOURCE_VERSION#*:}".dsc "$source_dir" \
    </dev/null >"$log" 2>&1 9>&- || die "dpkg-source -x failed: $(tail -n 1 "$log")"
rm -rf "$work/downloads" "$work/apt"
timing "Go $("$GOROOT/bin/go" version | awk '{print $3}') and the sources unpacked"

export PATH=$GOROOT/bin:$PATH
export GOPATH=$work/gopath
export GOCACHE=$work/gocache
export GOFLAGS=-mod=vendor
export GOTOOLCHAIN=local
# No .git in a source package: the version the binaries report comes from here.
export KUBE_GIT_VERSION=v$K8S_VERSION KUBE_GIT_TREE_STATE=clean
targets=()
for binary in "${BINARIES[@]}"; do targets+=("cmd/$binary"); done
log=$work/make.log
say "building ${BINARIES[*]} (several minutes; log: $log)"
(cd "$source_dir" && make WHAT="${targets[*]}") </dev/null >"$log" 2>&1 9>&- \
    || die "make WHAT=\"${targets[*]}\" failed: $(tail -n 1 "$log") (full log: $log)"
timing "built"

mkdir -p "$output"
for binary in "${BINARIES[@]}"; do
    built=$source_dir/_output/local/go/bin/$binary
    [ -x "$built" ] || built=$source_dir/_output/bin/$binary
    [ -x "$built" ] || die "make finished but $binary is not in $source_dir/_output (log: $log)"
    install -m 0755 "$built" "$output/$binary.new"
    mv -f "$output/$binary.new" "$output/$binary"
done
binaries_ready || die "the binaries in $output do not report Kubernetes v$K8S_VERSION"
chmod -R u+w "$work" 2>/dev/null || true
rm -rf "$work"
say "Kubernetes v$K8S_VERSION control plane in $output ($(du -sh "$output" | cut -f1)) after $(( $(date +%s) - started )) s"
