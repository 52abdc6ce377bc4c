#!/usr/bin/env bash
# test.sh: set everything up (scripts/setup.sh --containers, idempotent), then run every test:
# unit, oracle (against Debian's kmod), podman and VM tests, plus mypy --strict and ruff
# (tests/test_quality.py). Run as root on Debian 12, from anywhere.
#
# Usage: bash scripts/test.sh [PYTEST-ARG...]     (arguments go to pytest, e.g. -x or -k modinfo)
#
# Exit status: pytest's, except that "no tests collected" (pytest's 5) is a failure (1) too.

set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

bash scripts/setup.sh --containers --k8s

echo "test: .venv/bin/python -m pytest -q --all $*"
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --all "$@" || status=$?
case $status in
    0) echo "test: all tests passed" ;;
    5) echo "test: FAILED: pytest collected no tests" >&2; exit 1 ;;
    *) echo "test: FAILED: pytest exited with status $status (see the summary above)" >&2 ;;
esac
exit "$status"
