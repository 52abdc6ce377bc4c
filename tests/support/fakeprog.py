"""Fake external programs for tests.

``install(bin_dir, "podman", log, rules=[...])`` writes an executable ``bin_dir/podman`` (a small
Python script) that appends one JSON line per call to ``log`` -- ``{"prog": "podman", "argv":
[...]}``, plus ``"stdin"`` when asked to record it -- and then answers from a rules table. Put
``bin_dir`` first on PATH (``path_with``) and read the calls back with ``calls(log, "podman")``.

Rules are tried in order; the first match writes its stdout/stderr and exits with its code. A rule
is a ``(pattern, stdout, code)`` tuple or a :class:`Rule`. A pattern matches a *prefix* of the
argv; in a pattern ``"*"`` matches any one argument and ``"**"`` any run of arguments (possibly
none), so ``["run", "**", "modinfo"]`` matches every ``run`` call that has ``modinfo`` somewhere
after it. Unmatched calls exec ``real`` when given (a recording pass-through), else exit with
``default_code``.

Rules can also keep a little state shared by every fake program logging to the same file: a rule
applies only when its ``when`` flags hold (``"flag"`` set, ``"!flag"`` unset), and sets or clears
flags when it fires (``set_flags``/``flags`` read and seed the state). A fake ``podman build`` can
so make a later ``podman images`` answer differently, or a fake ``rmmod`` empty the fake ``lsmod``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

TEMPLATE = """#!{python} -IS
import json, os, sys

LOG = {log!r}
STATE = LOG + ".state"
RULES = json.loads({rules!r})


def matches(pattern, argv):
    if not pattern:
        return True
    head = pattern[0]
    if head == "**":
        return any(matches(pattern[1:], argv[i:]) for i in range(len(argv) + 1))
    return bool(argv) and head in ("*", argv[0]) and matches(pattern[1:], argv[1:])


def load_flags():
    try:
        with open(STATE) as handle:
            return set(json.load(handle))
    except FileNotFoundError:
        return set()


argv = sys.argv[1:]
entry = {{"prog": {name!r}, "argv": argv}}
if {record_stdin!r}:
    entry["stdin"] = sys.stdin.read()
with open(LOG, "a") as log:
    log.write(json.dumps(entry) + "\\n")
flags = load_flags()
for rule in RULES:
    if not matches(rule["match"], argv):
        continue
    if not all((f[1:] not in flags) if f.startswith("!") else (f in flags) for f in rule["when"]):
        continue
    if rule["sets"] or rule["clears"]:
        flags = (flags | set(rule["sets"])) - set(rule["clears"])
        with open(STATE + ".tmp", "w") as handle:
            json.dump(sorted(flags), handle)
        os.replace(STATE + ".tmp", STATE)
    sys.stdout.write(rule["stdout"])
    sys.stdout.flush()  # stdout before stderr also when both go to one pipe
    sys.stderr.write(rule["stderr"])
    sys.exit(rule["code"])
real = {real!r}
if real:
    os.execv(real, [real, *argv])
sys.exit({default_code!r})
"""


@dataclass(frozen=True)
class Rule:
    match: Sequence[str]
    stdout: str = ""
    code: int = 0
    stderr: str = ""
    when: Sequence[str] = ()
    sets: Sequence[str] = ()
    clears: Sequence[str] = ()


RuleSpec = Union[Rule, Tuple[Sequence[str], str, int]]


def _rule(spec: RuleSpec) -> dict[str, object]:
    rule = spec if isinstance(spec, Rule) else Rule(list(spec[0]), spec[1], spec[2])
    return {
        "match": list(rule.match),
        "stdout": rule.stdout,
        "code": rule.code,
        "stderr": rule.stderr,
        "when": list(rule.when),
        "sets": list(rule.sets),
        "clears": list(rule.clears),
    }


def install(
    bin_dir: Path,
    name: str,
    log: Path,
    *,
    rules: Sequence[RuleSpec] = (),
    real: Optional[str] = None,
    default_code: int = 0,
    record_stdin: bool = False,
) -> Path:
    """Write the executable ``bin_dir/name`` (replacing an earlier fake of the same name)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    text = TEMPLATE.format(
        python=sys.executable,
        log=str(log),
        name=name,
        rules=json.dumps([_rule(rule) for rule in rules]),
        real=real,
        default_code=default_code,
        record_stdin=record_stdin,
    )
    tmp = bin_dir / f".{name}.tmp"
    tmp.write_text(text)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, path)
    return path


def entries(log: Path, prog: Optional[str] = None) -> list[dict[str, Any]]:
    """The logged calls as dicts (``prog``, ``argv``, maybe ``stdin``), oldest first."""
    if not log.exists():
        return []
    found = [json.loads(line) for line in log.read_text().splitlines() if line]
    return [entry for entry in found if prog is None or entry["prog"] == prog]


def calls(log: Path, prog: Optional[str] = None) -> list[list[str]]:
    """The argv (without the program name) of each logged call, oldest first."""
    return [list(entry["argv"]) for entry in entries(log, prog)]


def set_flags(log: Path, *flags: str) -> None:
    """Replace the shared state of the fakes logging to ``log``."""
    Path(f"{log}.state").write_text(json.dumps(sorted(set(flags))))


def flags(log: Path) -> set[str]:
    state = Path(f"{log}.state")
    return set(json.loads(state.read_text())) if state.exists() else set()


def path_with(bin_dir: Path) -> str:
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
