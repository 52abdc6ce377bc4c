"""Fake external programs for tests: an executable on PATH that records its argv (one JSON line
per call) and answers by rules, or passes through to the real program."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Optional, Sequence

TEMPLATE = '''#!{python}
import json, os, sys
argv = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps({{"prog": {name!r}, "argv": argv}}) + "\\n")
for prefix, out, code in {rules!r}:
    if argv[:len(prefix)] == prefix or (prefix and prefix[0] == "*" and prefix[1] in argv):
        sys.stdout.write(out)
        sys.exit(code)
real = {real!r}
if real:
    os.execv(real, [real, *argv])
sys.exit({default_code})
'''


def install(bin_dir: Path, name: str, log: Path, *, rules: Sequence[tuple[list[str], str, int]] = (),
            real: Optional[str] = None, default_code: int = 0) -> Path:
    """Write ``bin_dir/name``. Rules match an argv prefix (or ``["*", word]``: any argv holding
    ``word``); unmatched calls exec ``real`` if given, else exit ``default_code``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text(TEMPLATE.format(python=sys.executable, log=str(log), name=name,
                                    rules=[(list(p), o, c) for p, o, c in rules], real=real,
                                    default_code=default_code))
    path.chmod(path.stat().st_mode | stat.S_IEXEC | stat.S_IXGRP | stat.S_IXOTH)
    return path


def calls(log: Path, prog: Optional[str] = None) -> list[list[str]]:
    if not log.exists():
        return []
    entries = [json.loads(line) for line in log.read_text().splitlines() if line]
    return [entry["argv"] for entry in entries if prog is None or entry["prog"] == prog]


def path_with(bin_dir: Path) -> str:
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
