"""Run kvc's modprobe once per line of stdin, in one process, and print one JSON record per run.

``python -m support.modprobe_driver ARG...``: each run is ``modprobe ARG... -- LINE``; records
are ``[returncode, stdout hex, stderr hex]``. Spawning the interpreter once per module name
would take minutes for the whole Debian tree; this keeps the comparison with kmod to seconds.
"""

from __future__ import annotations

import io
import json
import sys

from kvc.kmod.tools import modprobe


def run_once(argv: list[str]) -> tuple[int, bytes, bytes]:
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.TextIOWrapper(out), io.TextIOWrapper(err)
    try:
        status = modprobe.main(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        return status, out.getvalue(), err.getvalue()
    finally:
        sys.stdout, sys.stderr = saved


def main() -> int:
    prefix = sys.argv[1:]
    for line in sys.stdin.read().splitlines():
        status, out, err = run_once([*prefix, "--", line])
        sys.stdout.write(json.dumps([status, out.hex(), err.hex()]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
