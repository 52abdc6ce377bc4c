"""The project's own rules, checked as tests: mypy --strict, ruff, Python 3.9 syntax, layering."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "src").rglob("*.py"))


def test_mypy_strict() -> None:
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks", "scripts"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sources_parse_as_python_3_9() -> None:
    assert SOURCES
    for path in SOURCES:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_kmod_library_imports_nothing_from_the_framework() -> None:
    offenders = []
    for path in sorted((ROOT / "src" / "kvc" / "kmod").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {name}" for name in names
                          if name.startswith("kvc") and not name.startswith("kvc.kmod")]
    assert offenders == []


def test_no_shell_in_the_framework() -> None:
    hits = [str(path) for path in SOURCES if "shell=True" in path.read_text(encoding="utf-8")]
    assert hits == []
