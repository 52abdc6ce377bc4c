#!/usr/bin/env bash
# demo.sh: the main job end to end on a fresh Debian 12 machine (as root, from anywhere): set
# everything up (scripts/setup.sh --containers: packages, podman, the local base image; idempotent),
# build the simple-kmod example with podman for Debian's current 6.1 kernel ABI, and verify it on
# that real kernel in a VM (`kvc verify`: the kernel package fetched into /var/cache/kvc, booted
# under qemu; the modules loaded by kvc, the smoke test run, everything unloaded); the same for the
# edu-kmod example, a PCI driver delivered into the module tree and loaded in the VM by the modalias
# of QEMU's edu card, whose smoke test reads a factorial the card computed. Then kvc's kmod
# tools on that kernel's real module tree: `kvc kmod modinfo` over every module against kmod's,
# a signed module, its dependency chain, and those modules loaded into a fake kernel.
#
# Usage: bash scripts/demo.sh
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
[ $# -eq 0 ] || { echo "demo: error: no arguments expected (got: $*)" >&2; exit 2; }
bash scripts/setup.sh --containers
echo
exec .venv/bin/python scripts/demo.py
