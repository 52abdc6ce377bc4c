#!/usr/bin/env bash
# fuzz.sh: the nightly fuzz run (not in CI; CI runs tests/reliability/test_fuzz.py, 10,000 cases).
# Mutated and truncated modules, indexes, modprobe.d/depmod.d confs, kvc confs, dkms.conf records
# and DKMS source archives through kvc's readers (scripts/fuzz.py says which and how); prints the
# counts per kind of input and exits 1 when any case raised an undocumented exception or hung.
#
# Usage: bash scripts/fuzz.sh [CASES] [SEED]      (default 100000 cases, seed 20261205)
#
# Failing inputs are kept in fuzz-failures/<date>-<seed>/ (each with its traceback and the command
# that replays it); KVC_FUZZ_ARGS adds arguments to scripts/fuzz.py (e.g. "--jobs 8 --timeout 30").
# Needs Debian's kernel package in the test cache (scripts/setup.sh and one test run fetch it).

set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

cases=${1:-100000}
seed=${2:-20261205}
python=.venv/bin/python
[ -x "$python" ] || python=python3
failures="fuzz-failures/$(date -u +%Y%m%dT%H%M%SZ)-$seed"

# shellcheck disable=SC2086  # KVC_FUZZ_ARGS is a list of arguments
exec "$python" scripts/fuzz.py --cases "$cases" --seed "$seed" --failures "$failures" ${KVC_FUZZ_ARGS:-}
