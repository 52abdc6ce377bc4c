"""What the single-file executable (scripts/build-onefile.sh) runs: one binary serves both of
kvc's commands, as a pip install's two console scripts do. Run under the name
``kmods-via-containers`` (a symlink or a copy) it is the legacy interface, otherwise ``kvc``; with
the hidden first argument ``__kvc_guest JOB`` it is kvc verify's guest agent (kvc.verify.guest)."""

from __future__ import annotations

import os
import sys

from kvc.cli import legacy_main, main
from kvc.verify import FROZEN_AGENT_ARGUMENT

LEGACY_NAME = "kmods-via-containers"

if __name__ == "__main__":
    if sys.argv[1:2] == [FROZEN_AGENT_ARGUMENT]:
        from kvc.verify.guest import main as guest_main

        sys.exit(guest_main(sys.argv[2:]))
    command = legacy_main if os.path.basename(sys.argv[0]) == LEGACY_NAME else main
    sys.exit(command())
