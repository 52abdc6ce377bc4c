#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, including the oracle, podman and VM tests.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
bash scripts/setup.sh
bash scripts/setup-podman.sh
bash scripts/bootstrap-base-image.sh
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test: no tests were collected" >&2
  exit 1
fi
exit "$status"
