"""The benchmark's row sets (benchmarks/rows.py): caps respected, BOS/EOS, same rows for both
frameworks' formats, and the spread set really spreads (padding is most of its work)."""

from __future__ import annotations

import pytest
from benchmarks.common import batch_work, padded_tokens
from benchmarks.rows import cpo_item, dpo_item, make_rows, our_item

CAPS = dict(vocab_size=261, bos_id=1, eos_id=2, max_prompt=64, max_length=192)


@pytest.mark.parametrize("row_set", ["fixed", "spread"])
def test_rows_respect_caps_and_markers(row_set):
    rows = make_rows(row_set, 64, **CAPS)
    for row in rows:
        assert row["prompt_ids"][0] == 1 and len(row["prompt_ids"]) <= 64
        for side in ("chosen", "rejected"):
            response = row[f"{side}_ids"]
            assert response and response[-1] == 2
            assert len(row["prompt_ids"]) + len(response) <= 192
            assert all(5 <= t < 261 for t in response[:-1] + row["prompt_ids"][1:])


def test_fixed_rows_have_no_padding_and_spread_rows_do():
    fixed = make_rows("fixed", 8, **CAPS)
    assert padded_tokens(fixed) == batch_work(fixed)["tokens"]
    spread = make_rows("spread", 64, **CAPS)
    pad = 1 - batch_work(spread)["tokens"] / padded_tokens(spread)
    assert pad > 0.3
    lengths = {len(r["chosen_ids"]) for r in spread}
    assert len(lengths) > 20


def test_the_three_formats_hold_the_same_tokens():
    row = make_rows("spread", 1, **CAPS, seed=5)[0]
    ours, cpo, dpo = our_item(row), cpo_item(row), dpo_item(row)
    for side in ("chosen", "rejected"):
        assert ours[f"{side}_input_ids"] == cpo[f"{side}_input_ids"]
        assert ours[f"{side}_labels"] == cpo[f"{side}_labels"]
        assert ours[f"{side}_input_ids"] == dpo["prompt_ids"] + dpo[f"{side}_ids"]
