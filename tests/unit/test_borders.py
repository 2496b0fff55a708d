"""The borders between ``src/``, ``scripts/``, ``benchmarks/`` and ``tests/``: what the tests
and benchmarks use is ``fpo``'s public API, every command-line tool is an installed entry
point, and nothing edits ``sys.path`` (AST scans of the repository)."""

from __future__ import annotations

import ast
import importlib
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from fpo.testing import ROOT

#: Top-level folders of data and run outputs, not code.
NOT_CODE = {ROOT / "logs", ROOT / "data", ROOT / "assets"}


def files(*suffixes: str, under: Path = ROOT) -> Iterator[Path]:
    """The repository's files ending in ``suffixes`` (no hidden folders such as ``.venv``,
    no caches, data or run outputs)."""
    for folder, dirs, names in os.walk(under):
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".") and d != "__pycache__" and Path(folder, d) not in NOT_CODE
        )  # fmt: skip
        yield from (Path(folder) / n for n in sorted(names) if n.endswith(suffixes))


def python_sources(path: Path) -> list[str]:
    """A ``.py`` file's text, or the code cells of a notebook."""
    if path.suffix == ".ipynb":
        import json

        cells = json.loads(path.read_text())["cells"]
        return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return [path.read_text()]


def trees(path: Path) -> Iterator[ast.AST]:
    for source in python_sources(path):
        lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        yield ast.parse("\n".join(lines), filename=str(path))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------- private names
def private_fpo_imports(tree: ast.AST) -> Iterator[str]:
    """``from fpo.x import _y``, ``import fpo._x`` and ``fpo.x._y`` in one module's code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fpo":
            parts = node.module.split(".") + [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            parts = [
                p for a in node.names if a.name.split(".")[0] == "fpo" for p in a.name.split(".")
            ]
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("fpo."):
            parts = ast.unparse(node).split(".")
        else:
            continue
        if any(p.startswith("_") and not p.startswith("__") for p in parts):
            yield f"line {node.lineno}: {ast.unparse(node)}"


def test_tests_and_benchmarks_import_no_private_fpo_name():
    found = [
        f"{rel(path)} {hit}"
        for folder in ("tests", "benchmarks", "notebooks")
        for path in files(".py", ".ipynb", under=ROOT / folder)
        for tree in trees(path)
        for hit in private_fpo_imports(tree)
    ]
    assert not found, found


# ------------------------------------------------------------------- sys.path
def sys_path_edits(tree: ast.AST) -> Iterator[str]:
    """Calls of ``sys.path``'s methods, assignments to it, ``from sys import path``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            edits = ast.unparse(node.func.value) == "sys.path"
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            edits = any(ast.unparse(t).startswith("sys.path") for t in targets)
        elif isinstance(node, ast.ImportFrom):
            edits = node.module == "sys" and any(a.name == "path" for a in node.names)
        else:
            continue
        if edits:
            yield f"line {node.lineno}: {ast.unparse(node)}"


def test_no_file_in_the_repository_edits_sys_path():
    found = [
        f"{rel(path)} {hit}"
        for path in files(".py", ".ipynb")
        for tree in trees(path)
        for hit in sys_path_edits(tree)
    ]
    # Python embedded in shell scripts (heredocs, python -c) is text: a plain search.
    found += [rel(p) for p in files(".sh") if re.search(r"\bsys\.path\b", p.read_text())]
    assert not found, found


# ------------------------------------------------------------------- entry points
def entry_points() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(entry_points()))
def test_every_entry_point_imports_from_this_checkout(name):
    module_name, _, function = entry_points()[name].partition(":")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, function)), entry_points()[name]
    assert Path(module.__file__).resolve().is_relative_to(ROOT / "src"), module.__file__


def only_calls_entry_points(tree: ast.Module, targets: set[str]) -> bool:
    """A module that imports entry-point functions and calls them, nothing else."""
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if not all(f"{node.module}:{a.name}" in targets for a in node.names):
                return False
            imported |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            continue
        elif isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            calls = [s.value for s in node.body if isinstance(s, ast.Expr)]
            if len(calls) != len(node.body) or not all(
                isinstance(c, ast.Call) and ast.unparse(c.func) in imported for c in calls
            ):
                return False
        else:
            return False
    return True


def test_scripts_only_call_entry_points():
    targets = set(entry_points().values())
    scripts = ROOT / "scripts"
    found = [rel(p) for p in files(".py", under=scripts) if not only_calls_entry_points(
        ast.parse(p.read_text()), targets)]  # fmt: skip
    # a shell script there runs installed commands, never a Python file
    found += [rel(p) for p in files(".sh", under=scripts) if re.search(r"\.py\b", p.read_text())]
    assert not found, f"move these tools into src/ as entry points: {found}"


def test_a_scripts_file_with_logic_is_refused():
    """The check above is not vacuous: a script with its own code fails it, a thin one passes."""
    targets = {"fpo.commands.train:main"}
    thin = 'from fpo.commands.train import main\n\nif __name__ == "__main__":\n    main()\n'
    thick = "import sys\nsys.exit(0)\n"
    assert only_calls_entry_points(ast.parse(thin), targets)
    assert not only_calls_entry_points(ast.parse(thick), targets)


# ------------------------------------------------------------------- tests/
def test_tests_hold_no_helper_modules_and_import_none():
    """What tests share lives in `fpo.testing`: tests/ holds test modules and conftest.py
    only, and no test imports a module by a bare name that lives in tests/."""
    tests = ROOT / "tests"
    helpers = [
        rel(p) for p in files(".py", under=tests)
        if not p.name.startswith("test_") and p.name not in {"conftest.py", "__init__.py"}
    ]  # fmt: skip
    assert not helpers, f"move these into src/fpo/testing: {helpers}"
    local = {p.stem for p in files(".py", under=tests)} - {"conftest"}
    imports = []
    for path in files(".py", under=tests):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )  # fmt: skip
            imports += [
                f"{rel(path)} line {node.lineno}: {name}"
                for name in names
                if name.split(".")[0] in local | {"helpers"}
                and not name.split(".")[0].startswith("test_")
            ]
    assert not imports, imports


# ------------------------------------------------------------------- benchmarks/
def fpo_names(tree: ast.AST) -> set[str]:
    """Names a module binds to ``fpo`` modules and objects (``import fpo.x`` binds ``fpo``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {
                a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("fpo")
            }
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fpo":
            names |= {a.asname or a.name for a in node.names}
    return names


def root(expr: ast.expr) -> str | None:
    while isinstance(expr, ast.Attribute | ast.Subscript):
        expr = expr.value
    return expr.id if isinstance(expr, ast.Name) else None


def monkeypatches(tree: ast.AST) -> Iterator[str]:
    """Assignments to attributes of ``fpo`` modules or classes, and ``setattr`` or
    ``mock.patch`` on them, directly or through a function of the same file that setattrs."""
    bound = fpo_names(tree)
    setters = {"setattr", "delattr"} | {
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        and any(
            isinstance(c, ast.Call) and ast.unparse(c.func) in ("setattr", "delattr")
            for c in ast.walk(f)
        )
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            hit = any(isinstance(t, ast.Attribute) and root(t) in bound for t in targets)
        elif isinstance(node, ast.Call) and node.args:
            func, first = ast.unparse(node.func), node.args[0]
            patched = root(first) in bound or (
                isinstance(first, ast.Constant) and str(first.value).startswith("fpo.")
            )
            hit = patched and (func in setters or func.split(".")[-1] in ("patch", "object"))
        else:
            continue
        if hit:
            yield f"line {node.lineno}: {ast.unparse(node)[:120]}"


def test_benchmarks_do_not_monkeypatch_fpo():
    found = [
        f"{rel(path)} {hit}"
        for path in files(".py", under=ROOT / "benchmarks")
        for hit in monkeypatches(ast.parse(path.read_text()))
    ]
    assert not found, found


def test_the_monkeypatch_scan_sees_the_forms_it_refuses():
    code = """
import fpo.module
from fpo.reference.base import OnlineReference
from unittest import mock

def wrap(owner, name):
    setattr(owner, name, None)

fpo.module.response_token_stats = print
wrap(OnlineReference, "stats")
mock.patch.object(OnlineReference, "stats")
mock.patch("fpo.module.sequence_logps")
module = build_module()
module.sae_report_batches = 0
"""
    hits = list(monkeypatches(ast.parse(code)))
    # the first four; an object's own attribute (the last line) is configuration, not a patch
    assert [h.split(":")[0] for h in hits] == ["line 9", "line 10", "line 11", "line 12"], hits
