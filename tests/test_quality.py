"""The project's own rules, checked as tests: mypy --strict, ruff, Python 3.9 compatibility of the
package, kvc.kmod's independence from the rest of kvc, and the scripts the README points to."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
SOURCES = sorted(SRC.rglob("*.py"))
KMOD_SOURCES = sorted((SRC / "kvc" / "kmod").rglob("*.py"))


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True)


def test_mypy_strict() -> None:
    # Files, strictness and paths come from [tool.mypy] in pyproject.toml.
    proc = _run(sys.executable, "-m", "mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff() -> None:
    proc = _run(sys.executable, "-m", "ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format() -> None:
    proc = _run(sys.executable, "-m", "ruff", "format", "--check", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- Python 3.9 -----------------------------------------------------------------------------


def test_sources_parse_as_python_3_9() -> None:
    assert SOURCES
    errors = []
    for path in SOURCES:
        try:
            ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))
        except SyntaxError as exc:
            errors.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert errors == []


# Library features newer than 3.9 that parse fine but fail at run time on 3.9 (mypy can no longer
# check for a 3.9 target). Names imported from typing under `if TYPE_CHECKING:` are allowed.
_NEW_TYPING = {
    "TypeAlias",
    "ParamSpec",
    "Concatenate",
    "TypeGuard",
    "Self",
    "Never",
    "LiteralString",
    "Required",
    "NotRequired",
    "Unpack",
    "TypeVarTuple",
    "assert_never",
    "assert_type",
    "reveal_type",
    "dataclass_transform",
    "override",
    "TypeIs",
    "ReadOnly",
    "is_typeddict",
}
_NEW_MODULES = {"tomllib", "zoneinfo.backports"}
_NEW_ATTRIBUTES = {
    ("itertools", "pairwise"),
    ("itertools", "batched"),
    ("contextlib", "chdir"),
    ("datetime", "UTC"),
    ("enum", "StrEnum"),
    ("asyncio", "TaskGroup"),
    ("asyncio", "timeout"),
    ("dataclasses", "KW_ONLY"),
    ("operator", "call"),
    ("hashlib", "file_digest"),
}
_NEW_KEYWORDS = {"zip": {"strict"}, "dataclass": {"slots", "kw_only", "match_args"}}
_NEW_BUILTINS = {"aiter", "anext", "ExceptionGroup", "BaseExceptionGroup", "EncodingWarning"}


def _has_postponed_annotations(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(alias.name == "annotations" for alias in node.names)
        for node in tree.body
    )


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                guarded.update(id(sub) for sub in ast.walk(child))
    return guarded


def _annotations(tree: ast.Module) -> Iterator[ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _python_3_10_features(source: str, where: str) -> list[str]:
    tree = ast.parse(source)
    found = []
    if not _has_postponed_annotations(tree):
        for annotation in _annotations(tree):
            if any(isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr) for sub in ast.walk(annotation)):
                found.append(
                    f"{where}:{annotation.lineno}: 'X | Y' annotation without 'from __future__ import annotations'"
                )
    guarded = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and node.level == 0 and id(node) not in guarded:
            if node.module == "typing":
                found += [
                    f"{where}:{line}: typing.{a.name} is newer than 3.9" for a in node.names if a.name in _NEW_TYPING
                ]
            found += [
                f"{where}:{line}: {node.module}.{a.name} is newer than 3.9"
                for a in node.names
                if (node.module, a.name) in _NEW_ATTRIBUTES
            ]
            if node.module in _NEW_MODULES:
                found.append(f"{where}:{line}: module {node.module} is newer than 3.9")
        elif isinstance(node, ast.Import):
            found += [
                f"{where}:{line}: module {a.name} is newer than 3.9" for a in node.names if a.name in _NEW_MODULES
            ]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and id(node) not in guarded:
            if (node.value.id, node.attr) in _NEW_ATTRIBUTES or (
                node.value.id == "typing" and node.attr in _NEW_TYPING
            ):
                found.append(f"{where}:{line}: {node.value.id}.{node.attr} is newer than 3.9")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            new = _NEW_KEYWORDS.get(name, set()) & {kw.arg for kw in node.keywords if kw.arg}
            found += [f"{where}:{line}: {name}({kw}=...) is newer than 3.9" for kw in sorted(new)]
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in _NEW_BUILTINS:
            found.append(f"{where}:{line}: builtin {node.id} is newer than 3.9")
    return found


def test_sources_use_no_library_features_newer_than_python_3_9() -> None:
    found = [
        problem
        for path in SOURCES
        for problem in _python_3_10_features(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    ]
    assert found == []


def test_the_3_9_check_finds_what_it_looks_for() -> None:
    text = (
        "import itertools\nfrom typing import TYPE_CHECKING, TypeAlias\nif TYPE_CHECKING:\n"
        "    from typing import Self\ndef f(x: int | None) -> None:\n    zip([], [], strict=True)\n"
        "    itertools.pairwise([])\n"
    )

    def messages(source: str) -> list[str]:
        return sorted(problem.split(": ", 1)[1] for problem in _python_3_10_features(source, "sample.py"))

    new_apis = [
        "itertools.pairwise is newer than 3.9",
        "typing.TypeAlias is newer than 3.9",
        "zip(strict=...) is newer than 3.9",
    ]
    assert messages(text) == sorted([*new_apis, "'X | Y' annotation without 'from __future__ import annotations'"])
    assert messages("from __future__ import annotations\n" + text) == new_apis


# ---- kvc.kmod is a library of its own --------------------------------------------------------


def _package_of(path: Path) -> list[str]:
    """The package a module under src/ belongs to, as relative imports resolve it."""
    return list(path.relative_to(SRC).parts[:-1])


def _framework_import(name: str) -> bool:
    """True for a kvc module outside kvc.kmod (kvc itself included)."""
    parts = name.split(".")
    return parts[0] == "kvc" and parts[1:2] != ["kmod"]


def _dynamic_prefix(node: ast.expr) -> Optional[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def _framework_imports(source: str, package: list[str], where: str) -> list[str]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: import {a.name}" for a in node.names if _framework_import(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 >= len(package):
                    found.append(f"{where}:{node.lineno}: relative import above the kvc package")
                    continue
                base = package[: len(package) - (node.level - 1)]
            else:
                base = []
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:
                full = ".".join([*target, alias.name]) if target == ["kvc"] else ".".join(target)
                if _framework_import(full) or (target == ["kvc"] and alias.name == "*"):
                    found.append(
                        f"{where}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                    )
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            prefix = _dynamic_prefix(node.args[0]) if name in ("import_module", "__import__") else None
            if prefix is not None and _framework_import(prefix.rstrip(".") or prefix):
                found.append(f"{where}:{node.lineno}: {name}({prefix!r}...)")
    return found


def test_kmod_library_imports_nothing_from_the_framework() -> None:
    assert KMOD_SOURCES
    found = [
        problem
        for path in KMOD_SOURCES
        for problem in _framework_imports(
            path.read_text(encoding="utf-8"), _package_of(path), str(path.relative_to(ROOT))
        )
    ]
    assert found == []
    assert {"kernel", "tools"} <= {path.parent.name for path in KMOD_SOURCES}
    # kvc.kmod's __getattr__ imports its public names by module name, out of the scan's sight: import
    # every kvc.kmod module and public name, and see that no framework module came with them.
    code = (
        "import importlib, pkgutil, sys, kvc, kvc.kmod\n"
        "before = set(sys.modules)\n"
        "modules = [info.name for info in pkgutil.walk_packages(kvc.kmod.__path__, 'kvc.kmod.')]\n"
        "for name in modules:\n"
        "    importlib.import_module(name)\n"
        "for name in kvc.kmod.__all__:\n"
        "    getattr(kvc.kmod, name)\n"
        "print(len(modules))\n"
        "print(*sorted(m for m in set(sys.modules) - before if m.split('.')[:2] != ['kvc', 'kmod']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, loaded = proc.stdout.splitlines()
    assert int(count) == len(KMOD_SOURCES) - 1 and not [m for m in loaded.split() if m.startswith("kvc.")]


def test_the_layering_check_finds_what_it_looks_for() -> None:
    text = (
        "import kvc.cli\nfrom kvc import errors\nfrom kvc import kmod\nfrom ... import config\n"
        "from ..kernel import KernelError\nimport importlib\nimportlib.import_module('kvc.layout')\n"
        "importlib.import_module(f'kvc.kmod.tools.{x}')\n"
    )
    found = _framework_imports(text, ["kvc", "kmod", "tools"], "sample.py")
    assert [problem.split(": ", 1)[1] for problem in found] == [
        "import kvc.cli",
        "from kvc import errors",
        "from ... import config",
        "import_module('kvc.layout'...)",
    ]


def test_no_shell_in_the_framework() -> None:
    hits = [str(path) for path in SOURCES if "shell=True" in path.read_text(encoding="utf-8")]
    assert hits == []


# ---- the scripts -----------------------------------------------------------------------------

SHELL_SCRIPTS = sorted([*(ROOT / "scripts").glob("*.sh"), ROOT / ".ci" / "run"])


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_shell_script_syntax(script: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    proc = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _quick_start() -> list[str]:
    """The commands of the README's first code block, without comments."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^```[a-z]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert match, "README.md has no code block"
    lines = [line.split("#", 1)[0].strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line]


def test_readme_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    commands = _quick_start()
    assert len(commands) == 2, commands
    for command in commands:
        script = command.split()[-1]
        assert (ROOT / script).is_file(), f"README names {script}, which does not exist"
    ci_lines = [line.split("#", 1)[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert any(line == commands[1] or line.startswith(commands[1] + " ||") for line in ci_lines), (
        f".ci/run does not run the README's test command {commands[1]!r}"
    )
