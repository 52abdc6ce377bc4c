#!/usr/bin/env bash
# demo.sh: the main job end to end on a fresh Debian 12 machine (as root, from anywhere): set
# everything up (scripts/setup.sh, idempotent), then run kvc's kmod tools on a real Debian
# kernel's module tree: the kernel release and module count, `kvc kmod modinfo` of a signed
# module, its dependency chain from Debian's own depmod output, and those modules loaded with
# `KVC_KERNEL=fake kvc kmod insmod` into a fake kernel that `kvc kmod lsmod` then lists.
#
# Usage: bash scripts/demo.sh
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
[ $# -eq 0 ] || { echo "demo: error: no arguments expected (got: $*)" >&2; exit 2; }
bash scripts/setup.sh
echo
exec .venv/bin/python scripts/demo.py
