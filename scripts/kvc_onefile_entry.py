"""What the single-file executable (scripts/build-onefile.sh) runs: one binary serves both of
kvc's commands, as a pip install's two console scripts do. Run under the name
``kmods-via-containers`` (a symlink or a copy) it is the legacy interface, otherwise ``kvc``."""

from __future__ import annotations

import os
import sys

from kvc.cli import legacy_main, main

LEGACY_NAME = "kmods-via-containers"

if __name__ == "__main__":
    command = legacy_main if os.path.basename(sys.argv[0]) == LEGACY_NAME else main
    sys.exit(command())
