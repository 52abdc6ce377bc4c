#!/bin/bash
# Runs KVC instance libraries under the contract of the original kmods-via-containers framework:
# the same variables, helpers, stubs, sourcing order, dispatch, messages and exit codes.
# kvc passes the global conf and the libraries to source (in order) in the environment.
set -eu

kvc_c_run() { (set -x; $KVC_CONTAINER_RUNTIME run -i --rm $@ ); }
kvc_c_build() { (set -x; $KVC_CONTAINER_RUNTIME build $@ ); }
kvc_c_images() { (set -x; $KVC_CONTAINER_RUNTIME images $@ ); }
kvc_c_rmi() { (set -x; $KVC_CONTAINER_RUNTIME rmi $@ ); }

# The original's stubs print to stdout (their "2>&1" redirects nothing); kept as they were.
build_kmods() { echo "build_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" 2>&1; return 1; }
load_kmods() { echo "load_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" 2>&1; return 1; }
unload_kmods() { echo "unload_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" 2>&1; return 1; }
wrapper() { echo "wrapper is unimplemented for ${KVC_SOFTWARE_NAME}!" 2>&1; return 1; }

KVC_ACTION=$1; shift
KVC_SOFTWARE_NAME=$1; shift
KVC_KVER=$1; shift
echo "KVC: ${KVC_ACTION} ${KVC_SOFTWARE_NAME} for ${KVC_KVER}"

KVC_CONTAINER_RUNTIME=podman
if [ -f "$KVC_LEGACY_GLOBAL_CONF" ]; then
    source "$KVC_LEGACY_GLOBAL_CONF"
fi

while IFS= read -r kvc_library; do
    [ -n "$kvc_library" ] && source "$kvc_library"
done <<< "$KVC_LEGACY_LIBRARIES"
unset kvc_library

case "$KVC_ACTION" in
    build) build_kmods ;;
    load) load_kmods ;;
    unload) unload_kmods ;;
    reload) build_kmods; unload_kmods; load_kmods ;;
    wrapper) wrapper $@ ;;
    *)
        echo "Unknown command. Exiting."
        echo "Usage: kmods-via-containers <command> <name> <kver> [args]"
        echo "  build:   build the kernel module container image"
        echo "  load:    load the kernel modules"
        echo "  unload:  unload the kernel modules"
        echo "  reload:  build, unload and load the kernel modules"
        echo "  wrapper: run a userspace tool from the kernel module container"
        exit 1
        ;;
esac
