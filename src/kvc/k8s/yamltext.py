"""YAML text for the Kubernetes objects kvc writes: block style, keys in the order given, every
string that YAML could read as something else (a number, a boolean, null, a date, or text with
YAML syntax in it) double-quoted with JSON's escapes, which YAML's double-quoted scalars share.
Only what the objects hold is needed: mappings, sequences, strings, integers and booleans."""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

# Strings safe to write plain: they start with a letter, '/' or '_' and hold no YAML syntax; any of
# YAML 1.1's booleans and nulls among them are quoted below.
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./=-]*")
_RESERVED = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "~"}


def scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise TypeError(f"no YAML for {type(value).__name__}")
    if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
        return value
    return json.dumps(value, ensure_ascii=False)


def _lines(value: Any, indent: str) -> list[str]:
    """The lines of a mapping or sequence at ``indent`` (each line complete)."""
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            lines.extend(_entry(f"{indent}{scalar(key)}:", item, indent + "  "))
    else:
        for item in value:
            if isinstance(item, dict) and item:
                first, *rest = _lines(item, indent + "  ")
                lines.append(f"{indent}- {first[len(indent) + 2 :]}")
                lines.extend(rest)
            else:
                lines.extend(_entry(f"{indent}-", item, indent + "  "))
    return lines


def _literal(value: Any) -> bool:
    """A file's text (a ConfigMap's conf) reads best as a literal block: whole lines, none empty
    at the start or with edge spaces, no characters YAML would not keep."""
    if not isinstance(value, str) or not value.endswith("\n") or value.endswith("\n\n"):
        return False
    lines = value[:-1].split("\n")
    return bool(lines[0]) and all(line == line.strip(" ") and line.isprintable() and "\t" not in line for line in lines)


def _entry(head: str, value: Any, indent: str) -> list[str]:
    if _literal(value):
        return [f"{head} |", *(f"{indent}{line}" if line else "" for line in value[:-1].split("\n"))]
    if isinstance(value, dict):
        return [f"{head} {{}}"] if not value else [head, *_lines(value, indent)]
    if isinstance(value, (list, tuple)):
        return [f"{head} []"] if not value else [head, *_lines(value, indent)]
    return [f"{head} {scalar(value)}"]


def dump(document: dict[str, Any]) -> str:
    return "\n".join(_lines(document, "")) + "\n"


def dump_all(documents: Sequence[dict[str, Any]]) -> str:
    """Several objects in one stream, as ``kubectl apply -f`` takes them."""
    return "---\n".join(dump(document) for document in documents)
