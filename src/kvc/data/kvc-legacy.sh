#!/bin/bash
# kvc's driver for instance libraries written for the original kmods-via-containers framework.
#
#   bash kvc-legacy.sh ACTION NAME KVER [ARG...]
#
# It gives a library (NAME-lib.sh) the environment the original framework script gave it, and
# behaves as that script did: `set -eu`; the kvc_c_* helpers, which trace the container runtime's
# command line to stderr; the stubs, which (like the original's) print to stdout; the shell
# variables KVC_ACTION, KVC_SOFTWARE_NAME, KVC_KVER and KVC_CONTAINER_RUNTIME; the framework conf
# sourced as bash; every NAME-lib.sh found sourced, later ones winning; the same dispatch,
# messages and exit statuses. kvc.legacy runs it; it also runs on its own.
#
# Where it looks (kvc.legacy passes the paths of its Layout, so KVC_ROOT applies to them; the
# defaults are the original's host paths):
#   KVC_LEGACY_CONF          the framework conf (default /etc/kvc/kmods-via-containers.conf)
#   KVC_LEGACY_LIBRARY_DIRS  newline-separated directories searched for NAME-lib.sh, in sourcing
#                            order (default /usr/local/lib/kvc, /usr/lib/kvc, /etc/kvc/lib/kvc)
# Paths a library hard-codes itself, such as its own /etc/kvc/NAME.conf, are the library's.
#
# Differences from the original, all where it would have failed: a missing framework conf is
# skipped rather than fatal, and KVC_CONTAINER_RUNTIME defaults to podman when nothing sets it.

set -eu

_kvc_conf=${KVC_LEGACY_CONF:-/etc/kvc/kmods-via-containers.conf}
_kvc_library_dirs=${KVC_LEGACY_LIBRARY_DIRS:-$'/usr/local/lib/kvc\n/usr/lib/kvc\n/etc/kvc/lib/kvc'}
unset KVC_LEGACY_CONF KVC_LEGACY_LIBRARY_DIRS

# Container runtime helpers. Each runs in a subshell with `set -x`, so the runtime's command line
# is traced to stderr (and the `set -x` stays in the subshell). Arguments are expanded unquoted,
# as the original did: libraries rely on word splitting (e.g. `kvc_c_rmi -f $ids`).
# shellcheck disable=SC2068
kvc_c_run()    { (set -x; $KVC_CONTAINER_RUNTIME run -i --rm $@); }
# shellcheck disable=SC2068
kvc_c_build()  { (set -x; $KVC_CONTAINER_RUNTIME build $@); }
# shellcheck disable=SC2068
kvc_c_images() { (set -x; $KVC_CONTAINER_RUNTIME images $@); }
# shellcheck disable=SC2068
kvc_c_rmi()    { (set -x; $KVC_CONTAINER_RUNTIME rmi $@); }

# Helpers of the openshift-psap fork, for libraries written against it.
# kvc_c_env: "kubernetes" inside a Kubernetes pod, else the container runtime.
kvc_c_env() {
    if grep -qs kubepods /proc/self/cgroup; then
        echo kubernetes
    else
        echo "${KVC_CONTAINER_RUNTIME}"
    fi
}

# weak_modules_add [KO...]: register modules (default: the words of $KO_FILES) for the other
# installed kernels with kABI-compatible symbols, without rebuilding the initramfs.
weak_modules_add() {
    local -a kos=("$@")
    if [ $# -eq 0 ]; then read -r -d '' -a kos <<< "${KO_FILES-}" || true; fi
    if [ "${#kos[@]}" -eq 0 ]; then return 0; fi
    (set -x; printf '%s\n' "${kos[@]}" | weak-modules --add-modules --no-initramfs)
}

# kabi_check_module MODULE.ko: report the module's undefined symbols that are missing from the
# kABI whitelist (/lib/modules/kabi-rhel*/kabi_whitelist_ARCH). A relative name is looked up in
# /lib/modules/$KVC_KVER. It only warns: a module outside the whitelist still loads on the
# kernel it was built for.
kabi_check_module() {
    local module=$1 path='' whitelist='' candidate symbol outside=0
    case $module in
        /*) path=$module ;;
        *) path=$(find "/lib/modules/${KVC_KVER}" -name "$module" -type f -print -quit 2>/dev/null || true) ;;
    esac
    if [ -z "$path" ] || [ ! -f "$path" ]; then
        echo "kABI check: ${module} not found under /lib/modules/${KVC_KVER}; skipped" >&2
        return 0
    fi
    for candidate in /lib/modules/kabi-rhel*/"kabi_whitelist_$(uname -m)"; do
        if [ -f "$candidate" ]; then whitelist=$candidate; fi
    done
    if [ -z "$whitelist" ]; then
        echo "kABI check: no kABI whitelist in /lib/modules/kabi-rhel*; ${module} not checked" >&2
        return 0
    fi
    while read -r symbol; do
        if ! grep -qxF -e "$symbol" -e $'\t'"$symbol" "$whitelist"; then
            echo "kABI check: ${module} uses ${symbol}, which is not in ${whitelist}" >&2
            outside=$((outside + 1))
        fi
    done < <(readelf -sW "$path" | awk '$7 == "UND" && $8 != "" { print $8 }')
    if [ "$outside" -eq 0 ]; then
        echo "kABI check: ${module} uses only whitelisted symbols"
    fi
    return 0
}

# A library defines these. The stubs report what it left out and fail. Their "2>&1" redirects
# nothing, so the message goes to stdout: that is the original's behaviour, kept.
build_kmods()  { echo "build_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" 2>&1; return 1; }
load_kmods()   { echo "load_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" 2>&1; return 1; }
unload_kmods() { echo "unload_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" 2>&1; return 1; }
wrapper()      { echo "wrapper is unimplemented for ${KVC_SOFTWARE_NAME}!" 2>&1; return 1; }

# A missing argument stops here under `set -u` ("$1: unbound variable", status 1).
KVC_ACTION=$1; shift
KVC_SOFTWARE_NAME=$1; shift
KVC_KVER=$1; shift
echo "KVC: ${KVC_ACTION} ${KVC_SOFTWARE_NAME} for ${KVC_KVER}"

# The framework conf is bash and may run code; it overrides the environment.
if [ -e "$_kvc_conf" ]; then
    # shellcheck disable=SC1090
    source "$_kvc_conf"
fi
KVC_CONTAINER_RUNTIME=${KVC_CONTAINER_RUNTIME:-podman}

# Collect first, source afterwards: a library runs with the framework's stdin (a wrapper may be
# interactive), never with the loop's.
_kvc_libraries=()
_kvc_searched=()
while IFS= read -r _kvc_dir; do
    if [ -z "$_kvc_dir" ]; then continue; fi
    _kvc_searched+=("${_kvc_dir}/${KVC_SOFTWARE_NAME}-lib.sh")
    if [ -f "${_kvc_dir}/${KVC_SOFTWARE_NAME}-lib.sh" ]; then
        _kvc_libraries+=("${_kvc_dir}/${KVC_SOFTWARE_NAME}-lib.sh")
    fi
done <<< "$_kvc_library_dirs"
if [ "${#_kvc_libraries[@]}" -eq 0 ]; then
    echo "KVC requires an instance library to define significant functionality"
    echo "No instance library found in one of required locations ${_kvc_searched[*]}"
    exit 1
fi
for _kvc_library in "${_kvc_libraries[@]}"; do
    # shellcheck disable=SC1090
    source "$_kvc_library"
done

case "$KVC_ACTION" in
    build) build_kmods ;;
    load) load_kmods ;;
    unload) unload_kmods ;;
    reload)
        build_kmods
        unload_kmods
        load_kmods
        ;;
    wrapper)
        # Unquoted, as the original: "a b" reaches the wrapper as two arguments.
        # shellcheck disable=SC2068
        wrapper $@
        ;;
    *)
        echo "Unknown command. Exiting."
        echo "Usage:"
        echo ""
        echo "build       Build kernel module(s) via container"
        echo "load        Load kernel module(s)"
        echo "unload      Unload kernel module(s)"
        echo "reload      Build and reload kernel module(s)"
        echo "wrapper     Run userspace tools from within the container"
        exit 1
        ;;
esac
