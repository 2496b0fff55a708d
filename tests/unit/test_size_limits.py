"""The size limits the project keeps: no module in ``src/`` over 400 lines (small modules with
one job each) and the reference package under 900 lines in all."""

from __future__ import annotations

from fpo.testing import ROOT

SRC = ROOT / "src" / "fpo"
MAX_MODULE_LINES = 400
MAX_REFERENCE_LINES = 900


def lines(path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_module_is_over_400_lines():
    long_ = {str(p.relative_to(ROOT)): lines(p) for p in SRC.rglob("*.py")}
    over = {p: n for p, n in long_.items() if n > MAX_MODULE_LINES}
    assert not over, f"split these modules (over {MAX_MODULE_LINES} lines): {over}"


def test_the_reference_package_stays_under_900_lines():
    total = sum(lines(p) for p in (SRC / "reference").glob("*.py"))
    assert total <= MAX_REFERENCE_LINES, total
