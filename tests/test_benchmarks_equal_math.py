"""Equal math first (issue 11): our DPO and SimPO losses equal TRL's on the same batch, at
step 0 and after one update (benchmarks/equal_math.py), on the tests' tiny models."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")

from benchmarks import equal_math
from benchmarks.models import load_model
from benchmarks.rows import make_rows


def _spec(tmp_path, **extra) -> dict:
    base = dict(device="cpu", batch_pairs=2, accumulation=1, lr=5e-7, check_lr=0.01)
    return {**base, "max_length": 160, "seed": 0, "workdir": str(tmp_path), **extra}


def _rows(row_set: str) -> list[dict]:
    return make_rows(
        row_set, 2, vocab_size=261, bos_id=1, eos_id=2, max_prompt=48, max_length=160, seed=3
    )


@pytest.mark.parametrize("row_set", ["fixed", "spread"])
def test_losses_equal_trl_fp32(tmp_path, row_set):
    out = equal_math.check(_spec(tmp_path), _rows(row_set), lambda: load_model("tiny"))
    assert out["ok"], out
    assert out["dpo"]["ours"][0] == pytest.approx(math.log(2), abs=1e-6)
    # the update moved the loss by far more than the bound after it
    for kind in ("dpo", "simpo"):
        assert abs(out[kind]["ours"][1] - out[kind]["ours"][0]) > 20 * out[kind]["allowed"][1]


def test_a_one_percent_error_in_beta_fails_after_the_update(tmp_path, monkeypatch):
    """DPO's step-0 loss is ln 2 whatever beta is: only the loss after the update sees a
    wrong beta, and the bound after it (relative to the update's size) must."""
    preset = equal_math.objective_preset

    def off_by_one_percent(name: str) -> dict:
        out = preset(name)
        out["beta"] *= 1.01
        return out

    monkeypatch.setattr(equal_math, "objective_preset", off_by_one_percent)
    out = equal_math.check(_spec(tmp_path), _rows("fixed"), lambda: load_model("tiny"))
    assert out["dpo_ln2"] < 1e-6 and out["dpo"]["diff"][0] < 1e-6
    assert not out["dpo"]["ok"] and out["dpo"]["diff"][1] > out["dpo"]["allowed"][1]


def test_simpo_bf16_difference_is_trl_bf16_log_probs(tmp_path):
    """Under bf16 autocast TRL's CPOTrainer averages bf16 log-probs (the issue's 0.946 vs
    0.920): its raw loss differs from ours, but with its logits cast to float32 it is ours."""
    spec = _spec(tmp_path, precision="bf16")
    out = equal_math.check(spec, _rows("fixed"), lambda: load_model("gemma2_tiny"))
    simpo = out["simpo"]
    assert abs(simpo["trl"][0] - simpo["ours"][0]) > 1e-3  # TRL's bf16 average
    assert simpo["ok"], out  # ours vs TRL with float32 log-probs
    assert out["dpo"]["ok"], out
