"""Sentiment task: prompts, judge, sampling helper and the preference builder (tiny model)."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
import torch

from fpo.errors import UserError
from fpo.evaluation.judges import VaderJudge
from fpo.generation import InverseCdfSampler, sample_completion_ids
from fpo.review_data import make_prompt_splits, make_prompts
from fpo.review_data.build import (
    ScoredPrompt,
    build_sentiment_preferences,
    document_end_ids,
    main,
    select_pair,
)
from fpo.review_data.new_templates import main as new_templates_main
from fpo.review_data.new_templates import new_template_rows
from fpo.review_data.prompts import (
    HELDOUT_SLOTS,
    HELDOUT_TEMPLATES,
    SLOTS,
    TEMPLATES,
    num_distinct_prompts,
    template_slots,
)

PROMPTS = ["I watched it and", "The film is", "A"]
ROW_KEYS = {"prompt_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected"}


class ByteSumJudge:
    """A stand-in judge whose scores spread over [-1, 1] for random byte strings."""

    def score_texts(self, texts):
        return [(sum(text.encode()) % 201) / 100 - 1 for text in texts]


# --------------------------------------------------------------------------- prompts


def test_make_prompts_is_deterministic_unique_and_prefix_stable():
    first = make_prompts(300, seed=7)
    assert first == make_prompts(300, seed=7)
    assert len(set(first)) == 300
    assert make_prompts(50, seed=7) == first[:50]
    assert make_prompts(300, seed=8) != first


def test_prompt_splits_are_disjoint_with_requested_sizes():
    train, test = make_prompt_splits(400, 100, seed=0)
    assert (len(train), len(test)) == (400, 100)
    assert not set(train) & set(test)


def test_validation_prompts_come_after_train_and_test_and_leave_them_unchanged():
    train, test = make_prompt_splits(400, 100, seed=0)
    train3, test3, val = make_prompt_splits(400, 100, seed=0, n_val=64)
    assert (train3, test3) == (train, test) and len(val) == 64
    assert not set(val) & (set(train) | set(test))


def test_shipped_train_val_test_prompts_are_disjoint():
    """data/sentiment: the three splits share no prompt (validation is honest), and each
    file's prompts are the builder's draw for its split."""
    root = Path(__file__).resolve().parents[2] / "data" / "sentiment"
    prompts = {
        split: [json.loads(line)["prompt"] for line in (root / f"{split}.jsonl").open()]
        for split in ("train", "val", "test")
    }
    sets = {split: set(values) for split, values in prompts.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    drawn = dict(zip(("train", "test", "val"), make_prompt_splits(400, 100, 0, 64), strict=True))
    for split, values in sets.items():
        assert values <= set(drawn[split]), split


def test_prompts_are_vader_neutral_and_end_without_space():
    prompts = make_prompts(500, seed=1)
    assert VaderJudge().score_texts(prompts) == [0.0] * 500
    assert all(p == p.strip() and "{" not in p for p in prompts)
    # every template is used in a sample this size
    heads = {t.split("{")[0] for t in TEMPLATES if not t.startswith("{")}
    assert all(any(p.startswith(h) for p in prompts) for h in heads)


DATA = Path(__file__).resolve().parents[2] / "data" / "sentiment"


def _template_pattern(template: str) -> re.Pattern:
    """A regex matching exactly the prompts of ``template`` (any slot values)."""
    parts = [re.escape(text) + ("(.+)" if name else "") for text, name, _, _ in
             string.Formatter().parse(template)]  # fmt: skip
    return re.compile("".join(parts) + r"\Z")


def test_new_template_test_set_shares_no_template_or_title_with_train():
    """data/sentiment/test_new_templates.jsonl: remade by its command, every prompt from a
    held-out template, and neither its templates nor its titles occur in train.jsonl."""
    rows = [json.loads(line) for line in (DATA / "test_new_templates.jsonl").open()]
    assert rows == new_template_rows(100, seed=0) and len(rows) >= 60
    new = [row["prompt"] for row in rows]
    train = [json.loads(line)["prompt"] for line in (DATA / "train.jsonl").open()]
    held_out = [_template_pattern(t) for t in HELDOUT_TEMPLATES]
    seen = [_template_pattern(t) for t in TEMPLATES]
    assert all(any(p.match(prompt) for p in held_out) for prompt in new)
    assert all(any(p.match(prompt) for p in seen) for prompt in train)  # the check can match
    assert not any(p.match(prompt) for p in held_out for prompt in train)
    assert not any(p.match(prompt) for p in seen for prompt in new)
    titles = {t for t in HELDOUT_SLOTS["title"] if any(t in prompt for prompt in new)}
    assert len(titles) > 20
    assert not any(title in prompt for title in titles for prompt in train)
    assert not set(HELDOUT_SLOTS["title"]) & set(SLOTS["title"])
    assert VaderJudge().score_texts(new) == [0.0] * len(new)


def test_new_templates_cli_writes_prompt_rows(tmp_path):
    out = tmp_path / "new.jsonl"
    new_templates_main(["--out", str(out), "--prompts", "7", "--seed", "3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == new_template_rows(7, seed=3)
    assert [row["prompt_id"] for row in rows] == [f"new-{i:05d}" for i in range(7)]
    assert make_prompts(7, 3, HELDOUT_TEMPLATES, HELDOUT_SLOTS) == [r["prompt"] for r in rows]


def test_prompt_space_size_is_counted_from_slots():
    # 20 first words x 16 second words, minus "The Harbor Harbor" (in both lists)
    assert len(SLOTS["title"]) == 20 * 16 - 1
    assert template_slots("{title} ({year}) is a {genre} film that") == ["title", "year", "genre"]
    assert num_distinct_prompts() > 100_000
    with pytest.raises(UserError, match="make_prompts"):
        make_prompts(num_distinct_prompts(), seed=0)


# --------------------------------------------------------------------------- judge


def test_judge_matches_vader_formula_and_orders_sentiment():
    judge = VaderJudge()
    # VADER: compound = s / sqrt(s^2 + 15); "good" has valence 1.9, "not" scales it by -0.74
    good, not_good, empty = judge.score_texts(["The movie was good", "not good", ""])
    assert good == pytest.approx(1.9 / (1.9**2 + 15) ** 0.5, abs=1e-4)
    assert not_good == pytest.approx(-1.406 / (1.406**2 + 15) ** 0.5, abs=1e-4)
    assert empty == 0.0
    pos, neg = judge.score_texts(
        ["A wonderful, moving film. I loved it!", "Terrible, boring and awful."]
    )
    assert 0.5 < pos <= 1.0 and -1.0 <= neg < -0.5


# --------------------------------------------------------------------------- sampling


def test_inverse_cdf_sampler_draws_from_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -20.0]]).log_softmax(-1)
    sampler = InverseCdfSampler(torch.Generator().manual_seed(0))
    draws = sampler.sample(None, logits.expand(20_000, 4))
    freq = torch.bincount(draws, minlength=4).float() / 20_000
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -20.0]), -1)  # .090 .245 .665 ~0
    assert torch.allclose(freq, expected, atol=0.012)
    assert freq[3] == 0.0
    one_hot = sampler(None, logits)
    assert one_hot.isfinite().sum() == 1 and one_hot.max() == 0.0


def test_inverse_cdf_sampler_top_k_one_is_argmax_and_temperature_sharpens():
    logits = torch.tensor([[0.5, 3.0, 1.0]]).expand(500, 3)
    top1 = InverseCdfSampler(torch.Generator().manual_seed(0), top_k=1)
    assert top1.sample(None, logits).eq(1).all()
    cold = InverseCdfSampler(torch.Generator().manual_seed(0), temperature=0.05)
    assert cold.sample(None, logits).eq(1).float().mean() > 0.99


def test_sample_completion_ids_is_seeded_and_restores_state(tiny_model, tiny_tokenizer):
    tiny_tokenizer.padding_side = "right"
    rng_before = torch.get_rng_state()
    sample = lambda *args, **kw: sample_completion_ids(tiny_model, tiny_tokenizer, *args, **kw)  # noqa: E731
    first = sample(PROMPTS, 3, 6, batch_size=4, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert tiny_tokenizer.padding_side == "right" and tiny_model.training
    assert [len(row) for row in first] == [3, 3, 3]
    assert first == sample(PROMPTS, 3, 6, 1.0, 0, 1.0, 4, 1)
    assert first != sample(PROMPTS, 3, 6, seed=2)
    assert len({tuple(ids) for row in first for ids in row}) > 1


def test_left_padded_greedy_batch_equals_one_by_one(tiny_model, tiny_tokenizer):
    """Prompts of different lengths in one batch decode exactly as alone (left padding)."""
    batched = sample_completion_ids(tiny_model, tiny_tokenizer, PROMPTS, 1, 8, temperature=0)
    alone = [
        sample_completion_ids(tiny_model, tiny_tokenizer, [p], 1, 8, temperature=0)[0]
        for p in PROMPTS
    ]
    assert batched == alone
    assert all(len(row[0]) == 8 for row in batched)  # no EOS in a random model's argmax here


def test_stop_tokens_and_max_new_tokens_bound_completions(tiny_model, tiny_tokenizer):
    ids = sample_completion_ids(tiny_model, tiny_tokenizer, PROMPTS, 2, 5, seed=0)
    assert all(1 <= len(s) <= 5 for row in ids for s in row)
    every_id = range(len(tiny_tokenizer))
    stopped = sample_completion_ids(
        tiny_model, tiny_tokenizer, PROMPTS, 2, 5, stop_token_ids=every_id
    )
    assert stopped == [[[], []]] * 3


def test_sampling_ignores_distorting_generation_config(tiny_model, tiny_tokenizer):
    plain = sample_completion_ids(tiny_model, tiny_tokenizer, PROMPTS, 2, 6, seed=3)
    tiny_model.generation_config.repetition_penalty = 5.0
    tiny_model.generation_config.suppress_tokens = list(range(5, 261))
    assert sample_completion_ids(tiny_model, tiny_tokenizer, PROMPTS, 2, 6, seed=3) == plain
    assert tiny_model.generation_config.repetition_penalty == 5.0  # restored, not lost


def test_sampling_rejects_bad_arguments(tiny_model, tiny_tokenizer):
    with pytest.raises(UserError, match="num_samples"):
        sample_completion_ids(tiny_model, tiny_tokenizer, PROMPTS, 0, 4)
    with pytest.raises(UserError, match="temperature"):
        sample_completion_ids(tiny_model, tiny_tokenizer, PROMPTS, 1, 4, temperature=-1)


# --------------------------------------------------------------------------- builder


def test_select_pair_picks_extremes_with_gap_and_ties():
    texts, scores = [" a", " b", "  ", " c", " d"], [0.1, 0.9, -1.0, -0.4, 0.9]
    scored = ScoredPrompt("p1", "x", texts, scores, [1] * 5)
    row = select_pair(scored, min_gap=1.3)
    assert row == {
        "prompt_id": "p1", "prompt": "x", "chosen": " b", "rejected": " c",
        "score_chosen": 0.9, "score_rejected": -0.4,
    }  # fmt: skip
    assert select_pair(scored, min_gap=1.31) is None  # gap 1.3; the blank sample never counts
    same = ScoredPrompt("p2", "x", [" a", " a"], [0.5, 0.5], [1, 1])
    assert select_pair(same, min_gap=0.0) is None
    lone = ScoredPrompt("p3", "x", [" a", ""], [0.5, 0.0], [1, 0])
    assert select_pair(lone, min_gap=0.0) is None


def test_builder_end_to_end_on_tiny_model(tiny_model, tiny_tokenizer):
    prompts = make_prompts(6, seed=0)
    kwargs = {"num_samples": 4, "max_new_tokens": 8, "min_gap": 0.4, "seed": 5}
    rows = build_sentiment_preferences(
        tiny_model, tiny_tokenizer, prompts, judge=ByteSumJudge(), **kwargs
    )
    assert 1 <= len(rows) <= 6
    judge = ByteSumJudge()
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["prompt"] == prompts[int(row["prompt_id"][1:])]
        assert row["score_chosen"] >= row["score_rejected"] + 0.4 - 1e-9
        assert judge.score_texts([row["chosen"], row["rejected"]]) == [
            row["score_chosen"],
            row["score_rejected"],
        ]
    again = build_sentiment_preferences(
        tiny_model, tiny_tokenizer, prompts, judge=ByteSumJudge(), **kwargs
    )
    assert again == rows
    with pytest.raises(UserError, match="num-samples"):
        build_sentiment_preferences(tiny_model, tiny_tokenizer, prompts, 1, 8, 0.1, 0)


def test_document_end_ids_finds_turn_marker(tiny_tokenizer):
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert document_end_ids(tiny_tokenizer) == [end_of_turn]


def test_cli_writes_splits_and_card(tmp_path):
    out = tmp_path / "sentiment"
    args = ["--out", str(out), "--train-prompts", "5", "--test-prompts", "3", "--num-samples",
            "3", "--max-new-tokens", "6", "--min-gap", "0", "--model", "tiny"]  # fmt: skip
    main(args)
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) <= 5 and len(test) <= 3 and train
    assert all(set(r) == ROW_KEYS and r["prompt_id"].startswith("train-") for r in train)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    card = (out / "DATA_CARD.md").read_text()
    assert "python -m fpo.review_data.build --out" in card and "--model tiny" in card
    assert f"| train | 5 | {len(train)} | {5 - len(train)} |" in card
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--num-samples", "1"])
    assert exit_info.value.code == 2
