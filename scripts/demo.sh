#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 machine (as root): set everything up, then show
# kvc's kmod tools on a real Debian kernel's ~4,000 modules and load a module with its in-tree
# dependencies into a fake kernel, the way kvc loads instance modules on a host.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
bash scripts/setup.sh >/dev/null
exec .venv/bin/python scripts/demo.py
