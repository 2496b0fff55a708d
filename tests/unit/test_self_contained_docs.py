"""Docs and docstrings are self-contained: they cite files inside the repository only.

A user has the repository, not the design notes it was built from, so nothing in the code,
configs or docs may point outside it; and every repository path the docs name exists (a
renamed module leaves no stale pointer behind).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fpo.testing import ROOT

#: What the docs and code may not cite: design notes that live outside the repository.
OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared/")
#: A repository path as the docs write it (``src/fpo/losses.py``, ``docs/data.md``, ...).
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:src|docs|configs|tests|benchmarks|data|assets|notebooks)/[\w./-]+)"
)
#: Folders the docs name as outputs that a command creates (not committed before it runs).
OUTPUTS = ("docs/results/",)


def texts() -> list[Path]:
    """README, docs, configs and every source file under src/, tests/, benchmarks/."""
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder, pattern in (("src", "*.py"), ("configs", "*.yaml"), ("benchmarks", "*.py")):
        found += sorted((ROOT / folder).rglob(pattern))
    return found


@pytest.mark.parametrize("path", texts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_cites_a_file_outside_the_repository(path):
    hits = [
        f"line {n}: {line.strip()}"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, f"{path.relative_to(ROOT)} cites a file outside the repository: {hits}"


@pytest.mark.parametrize(
    "path",
    [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_repository_path_the_docs_name_exists(path):
    named = {m.group(1).rstrip(".,:;)") for m in REPO_PATH.finditer(path.read_text())}
    missing = sorted(
        p
        for p in named
        if "*" not in p and "<" not in p and not p.startswith(OUTPUTS) and not (ROOT / p).exists()
    )
    assert not missing, f"{path.relative_to(ROOT)} names paths that do not exist: {missing}"
