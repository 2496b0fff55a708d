"""benchmarks/packing_flops.py: packing saves trunk FLOPs on spread rows and none on fixed."""

from __future__ import annotations

import pytest
from benchmarks.packing_flops import measure


def by_layout(row_set: str) -> dict[str, dict]:
    return {e["layout"]: e for e in measure(row_set, pairs=32, batch_pairs=4)}


def test_fixed_rows_pack_to_the_padded_cost():
    rows = by_layout("fixed")
    assert rows["packed (L = T)"]["slots"] == rows["padded"]["slots"]
    assert rows["packed (L = T)"]["gemma-3-270m"] == pytest.approx(1.0)


def test_spread_rows_save_slots_and_flops():
    rows = by_layout("spread")
    real = rows["padded"]["real_tokens"]
    assert rows["packed (1 x S)"]["slots"] == real  # no pad at all
    assert real < rows["packed (L = T)"]["slots"] < rows["padded"]["slots"]
    for model in ("gemma-3-270m", "gemma-2-2b"):
        assert rows["packed (L = T)"][model] < 0.9
        # one sequence: all (query, key) pairs of S tokens, more attention than padded
        share = f"{model} attention share"
        assert rows["packed (1 x S)"][share] > rows["padded"][share]
