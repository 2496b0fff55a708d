"""Plain names (docs/architecture.md, "Names"): no two classes in ``src/fpo`` share a name, no
two modules' names differ by a letter or only by a plural, and no library module is named
after a command (``fpo-X`` lives in ``fpo/commands/X.py``)."""

from __future__ import annotations

import ast
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from fpo.testing import ROOT

SRC = ROOT / "src" / "fpo"


def modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py")


def near(a: str, b: str) -> bool:
    """``a`` and ``b`` differ by one inserted, deleted or changed character."""
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) == 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def test_no_two_classes_share_a_name():
    where = defaultdict(list)
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where[node.name].append(str(path.relative_to(SRC)))
    shared = {name: files for name, files in where.items() if len(files) > 1}
    assert not shared, f"one name, several classes: {shared}"


def test_no_two_module_names_differ_by_a_letter():
    names = {p.stem for p in modules()} | {p.name for p in SRC.iterdir() if p.is_dir()}
    names -= {"__pycache__"}
    close = [(a, b) for a, b in combinations(sorted(names), 2) if near(a, b)]
    assert not close, f"module names that differ by a letter: {close}"


def test_library_modules_are_not_named_after_commands():
    commands = {p.stem for p in (SRC / "commands").glob("*.py")} - {"__init__", "common"}
    top_level = {p.stem for p in SRC.glob("*.py")}
    assert not commands & top_level, commands & top_level
