"""Unit tests for fpo.evaluation: sequence log-probs, sampled KL, win rate, reports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fpo.errors import UserError
from fpo.evaluation import (
    Samples,
    evaluate_sentiment,
    format_summary,
    grouped_mean_stderr,
    kl_log_ratios,
    pairwise_wins,
    read_generations,
    sample_for_scoring,
    scoring_batch,
    sequence_logprob,
    write_evaluation,
)
from fpo.evaluation.degeneration import degeneration_metrics

EOS, PAD = 2, 0
PROMPTS = ["I watched The Glass Road and", "The film is", "Overall, it"]
REQUIRED_KEYS = {"policy_judge_mean", "reference_judge_mean", "win_rate", "kl", "generations"}
GENERATION_KEYS = {
    "prompt_index", "prompt", "sample", "policy", "reference", "kl_log_ratio",
    "policy_scores", "reference_scores",
}  # fmt: skip


class FixedJudge:
    """Returns preset scores call by call (the policy's texts are judged first)."""

    name = "fixed"

    def __init__(self, *calls: list[float]) -> None:
        self.calls = list(calls)
        self.texts: list[list[str]] = []

    def __call__(self, texts):
        self.texts.append(list(texts))
        return self.calls[len(self.texts) - 1]


def _perturbed(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` whose (tied) embedding / LM head is shifted by Gaussian noise."""
    other = copy.deepcopy(model)
    weight = other.get_output_embeddings().weight
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        weight.add_(scale * noise)
    return other


def _boost_eos(model: torch.nn.Module, bias: float) -> None:
    """Add ``bias`` to the EOS logit (a hook on the LM head, seen by generate and scoring)."""
    boost = torch.zeros(model.config.vocab_size)
    boost[EOS] = bias
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + boost)


def _dense_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """Hand computation: full logits of the unpadded sequence, log_softmax, sum the picks."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        log_probs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(log_probs[len(prompt) + i - 1, token].item() for i, token in enumerate(completion))


# --------------------------------------------------------------------------- stats


def test_pairwise_wins_count_ties_half():
    assert pairwise_wins([0.5, 0.1, 0.3, -1.0], [0.2, 0.1, 0.9, -1.0]) == [1.0, 0.5, 0.0, 0.5]


def test_grouped_mean_stderr_averages_within_prompt_first():
    # group means: 1.0 (from 0 and 2) and 4.0 -> mean 2.5, std(ddof=1) = 2.1213, / sqrt(2)
    mean, stderr = grouped_mean_stderr([0.0, 2.0, 4.0, 4.0], [0, 0, 1, 1])
    assert mean == pytest.approx(2.5)
    assert stderr == pytest.approx(1.5)
    assert grouped_mean_stderr([3.0, 5.0], [0, 0]) == (4.0, None)


# --------------------------------------------------------------------------- log-probs


def test_scoring_batch_layout():
    batch = scoring_batch([[1, 5], [1]], [[7, EOS], [8, 9, 10]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 5, 7, EOS], [1, 8, 9, 10]]
    assert batch["labels"].tolist() == [[-100, -100, 7, EOS], [-100, 8, 9, 10]]
    batch = scoring_batch([[1, 5, 6], [1]], [[7], [8]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7], [-100, 8, -100, -100]]


def test_sequence_logprob_matches_dense_log_softmax(tiny_model):
    prompts = [[1, 40, 41, 42], [1, 50], [1, 60, 61]]
    completions = [[70, 71, EOS], [80, 81, 82, 83, 84], []]  # stopped at EOS, cut, empty
    expected = [_dense_logprob(tiny_model, p, c) for p, c in zip(prompts, completions, strict=True)]
    for chunk, batch_size in ((None, None), (2, 2)):
        got = sequence_logprob(tiny_model, PAD, prompts, completions, chunk, batch_size)
        assert got.shape == (3,)
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert expected[2] == 0.0
    assert tiny_model.training  # the model's mode is restored


def test_sampled_ids_are_scored_like_generate_saw_them(tiny_model, tiny_tokenizer):
    """Left-padded sampling and right-padded scoring describe the same distribution."""
    _boost_eos(tiny_model, 3.0)  # some rows stop at EOS, at different steps
    tiny_model.eval()
    tiny_tokenizer.padding_side = "left"
    enc = tiny_tokenizer(PROMPTS * 2, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = tiny_model.generate(
        **enc, do_sample=True, top_k=0, max_new_tokens=6, output_logits=True,
        return_dict_in_generate=True, pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    new = out.sequences[:, enc["input_ids"].shape[1] :]
    step_logps = torch.stack([F.log_softmax(x.float(), -1) for x in out.logits], 1)
    picked = step_logps.gather(2, new.unsqueeze(2)).squeeze(2)
    prompt_ids = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS * 2]
    completions, expected = [], []
    for row, row_logps in zip(new.tolist(), picked, strict=True):
        n = row.index(EOS) + 1 if EOS in row else len(row)
        completions.append(row[:n])
        expected.append(row_logps[:n].sum().item())
    assert any(c[-1] == EOS for c in completions) and any(EOS not in c for c in completions)
    got = sequence_logprob(tiny_model, PAD, prompt_ids, completions)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- sampling


def test_sample_for_scoring_keeps_eos_of_stopped_completions(tiny_model, tiny_tokenizer):
    _boost_eos(tiny_model, 5.0)  # p(EOS) ~ 0.4 per step: some rows stop, some are cut
    samples = sample_for_scoring(tiny_model, tiny_tokenizer, PROMPTS, 4, 5, batch_size=5)
    assert samples.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert samples.prompt_ids[4] == tiny_tokenizer(PROMPTS[1])["input_ids"]
    assert 0 < sum(samples.stopped) < 12
    columns = (samples.completion_ids, samples.stopped, samples.texts)
    for ids, stopped, text in zip(*columns, strict=True):
        if stopped:
            assert ids[-1] == EOS and EOS not in ids[:-1] and len(ids) <= 5
        else:
            assert len(ids) == 5 and EOS not in ids
        assert text == tiny_tokenizer.decode(ids, skip_special_tokens=True)


def test_sample_for_scoring_refuses_distorting_generation_config(tiny_model, tiny_tokenizer):
    tiny_model.generation_config.repetition_penalty = 1.3
    with pytest.raises(UserError, match="repetition_penalty"):
        sample_for_scoring(tiny_model, tiny_tokenizer, PROMPTS, 1, 3)
    tiny_model.generation_config.repetition_penalty = None
    tiny_model.generation_config.eos_token_id = [EOS, 4]
    with pytest.raises(UserError, match="EOS ids"):
        sample_for_scoring(tiny_model, tiny_tokenizer, PROMPTS, 1, 3)


# --------------------------------------------------------------------------- KL


def test_kl_is_zero_for_identical_weights(tiny_model, tiny_tokenizer):
    samples = sample_for_scoring(tiny_model, tiny_tokenizer, PROMPTS, 3, 8)
    ratios = kl_log_ratios(tiny_model, copy.deepcopy(tiny_model), samples, PAD)
    mean, stderr = grouped_mean_stderr(ratios.tolist(), samples.prompt_index)
    assert abs(mean) < 1e-5 and stderr is not None and stderr < 1e-5


def test_kl_estimate_matches_exact_first_token_kl(tiny_model, tiny_tokenizer):
    """With one new token the sequence KL is the next-token KL, computable exactly."""
    policy = _perturbed(tiny_model)
    samples = sample_for_scoring(policy, tiny_tokenizer, PROMPTS, 200, 1, batch_size=200)
    ratios = kl_log_ratios(policy, tiny_model, samples, PAD)
    exact = []
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            log_p = F.log_softmax(policy(input_ids=ids).logits[0, -1], -1)
            log_q = F.log_softmax(tiny_model(input_ids=ids).logits[0, -1], -1)
        exact.append((log_p.exp() * (log_p - log_q)).sum().item())
    exact_kl = sum(exact) / len(exact)
    stderr = ratios.std().item() / len(ratios) ** 0.5
    assert exact_kl > 0.05
    assert abs(ratios.mean().item() - exact_kl) < 4 * stderr


def test_kl_positive_for_perturbed_policy(tiny_model, tiny_tokenizer):
    policy = _perturbed(tiny_model)
    samples = sample_for_scoring(policy, tiny_tokenizer, PROMPTS * 4, 4, 6, batch_size=48)
    ratios = kl_log_ratios(policy, tiny_model, samples, PAD, logits_chunk_size=16, batch_size=20)
    mean, stderr = grouped_mean_stderr(ratios.tolist(), samples.prompt_index)
    assert mean > 3 * stderr > 0


# --------------------------------------------------------------------------- evaluate


def test_evaluate_sentiment_win_rate_with_stub_judge(tiny_model, tiny_tokenizer):
    judge = FixedJudge([0.5, 0.1, 0.3, 0.0, 0.7, -0.2], [0.2, 0.1, 0.9, 0.0, 0.7, -0.8])
    result = evaluate_sentiment(
        tiny_model, tiny_model, tiny_tokenizer, PROMPTS, judge, num_samples=2,
        max_new_tokens=4, batch_size=4,
    )  # fmt: skip
    # wins per sample: 1, .5 | 0, .5 | .5, 1 -> per prompt .75, .25, .75 -> mean 7/12
    assert result["win_rate"] == pytest.approx(7 / 12)
    assert result["win_rate_stderr"] == pytest.approx((1 / 12) ** 0.5 / 3**0.5)
    assert result["policy_judge_mean"] == pytest.approx(1.4 / 6)
    assert result["reference_judge_mean"] == pytest.approx(1.1 / 6)
    assert abs(result["kl"]) < 1e-6  # same model on both sides
    assert result["num_completions"] == 6 and result["settings"]["judge"] == "fixed"
    rows = result["generations"]  # every sample, prompt-major
    assert [g["policy_scores"] for g in rows] == [{"fixed": v} for v in judge.calls[0]]
    assert [g["reference_scores"] for g in rows] == [{"fixed": v} for v in judge.calls[1]]
    assert [g["prompt"] for g in rows] == [p for p in PROMPTS for _ in range(2)]
    assert [(g["prompt_index"], g["sample"]) for g in rows] == [
        (p, s) for p in range(3) for s in range(2)
    ]
    policy_texts, reference_texts = judge.texts
    assert [g["policy"] for g in rows] == policy_texts
    assert [g["reference"] for g in rows] == reference_texts
    # the reference is sampled with other seeds than the policy, even for the same model
    assert policy_texts != reference_texts


def test_evaluate_sentiment_is_deterministic(tiny_model, tiny_tokenizer):
    from fpo.evaluation.judges import VaderJudge

    policy, judge = _perturbed(tiny_model), VaderJudge()
    run = lambda seed: evaluate_sentiment(  # noqa: E731
        policy, tiny_model, tiny_tokenizer, PROMPTS, judge, max_new_tokens=6, seed=seed
    )
    first, second = run(3), run(3)
    assert first == second
    assert run(4)["generations"] != first["generations"]


def test_write_evaluation_files(tiny_model, tiny_tokenizer, tmp_path):
    judge = FixedJudge([0.4, -0.1, 0.2], [0.0, -0.1, 0.3])
    result = evaluate_sentiment(
        _perturbed(tiny_model), tiny_model, tiny_tokenizer, PROMPTS, judge, max_new_tokens=5
    )
    summary_path = write_evaluation(result, tmp_path / "eval")
    assert summary_path == (tmp_path / "eval" / "summary.json").resolve()
    summary = json.loads(summary_path.read_text())
    assert set(summary) >= REQUIRED_KEYS
    assert summary["win_rate"] == pytest.approx(0.5)
    assert {"seed", "num_prompts", "num_samples", "settings", "kl_stderr"} <= set(summary)
    rows = read_generations(summary["generations"])
    assert len(rows) == len(PROMPTS)
    assert all(set(row) == GENERATION_KEYS for row in rows)
    assert [row["prompt"] for row in rows] == PROMPTS
    png = (tmp_path / "eval" / "judge_vs_kl.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert summary["plot"] == str(tmp_path.resolve() / "eval" / "judge_vs_kl.png")
    text = format_summary(result)
    assert "win rate     0.500" in text and f"{result['kl']:.3f}" in text


def test_a_completion_with_unicode_line_separators_reads_back_as_one_row(
    tiny_model, tiny_tokenizer, tmp_path
):
    """The writer keeps U+2028, U+2029 and U+0085 raw (``ensure_ascii=False``); the readers
    (fpo-compare, the W&B tables) split rows at "\\n" only, as ``str.splitlines`` would not."""
    judge = FixedJudge([0.4, -0.1, 0.2], [0.0, -0.1, 0.3])
    result = evaluate_sentiment(
        tiny_model, tiny_model, tiny_tokenizer, PROMPTS, judge, max_new_tokens=3
    )
    texts = [" one\u2028two", " three\u2029four", " five\x85six"]
    for row, text in zip(result["generations"], texts, strict=True):
        row["policy"] = text
    summary = json.loads(write_evaluation(result, tmp_path).read_text())
    assert "\u2028" in Path(summary["generations"]).read_text(encoding="utf-8")  # kept raw
    rows = read_generations(summary["generations"])
    assert [row["policy"] for row in rows] == texts
    assert read_generations(summary["generations"], limit=2) == rows[:2]


def _recomputed(rows: list[dict]) -> dict:
    """summary.json's numbers from generations.jsonl alone (rows as read back)."""
    groups = [row["prompt_index"] for row in rows]
    prompts = [row["prompt"] for row in rows]
    recomputed = {
        "kl": grouped_mean_stderr([row["kl_log_ratio"] for row in rows], groups),
        "degeneration": {
            side: degeneration_metrics(prompts, [row[side] for row in rows])
            for side in ("policy", "reference")
        },
    }
    for name in rows[0]["policy_scores"]:
        ours = [row["policy_scores"][name] for row in rows]
        theirs = [row["reference_scores"][name] for row in rows]
        recomputed[name] = {
            "policy_judge_mean": grouped_mean_stderr(ours, groups),
            "reference_judge_mean": grouped_mean_stderr(theirs, groups),
            "win_rate": grouped_mean_stderr(pairwise_wins(ours, theirs), groups),
        }
    return recomputed


def test_summary_is_recomputed_exactly_from_generations(tiny_model, tiny_tokenizer, tmp_path):
    from fpo.evaluation.judges import AfinnJudge, VaderJudge

    fixed = FixedJudge([0.1, 0.3, 0.0, 0.2, 0.5, 0.5], [0.2, 0.3, 0.1, 0.0, 0.5, 0.4])
    judges = {"vader": VaderJudge(), "afinn": AfinnJudge(), "fixed": fixed}
    result = evaluate_sentiment(
        _perturbed(tiny_model), tiny_model, tiny_tokenizer, PROMPTS, judges, num_samples=2,
        max_new_tokens=6,
    )  # fmt: skip
    summary = json.loads(write_evaluation(result, tmp_path).read_text())
    with open(summary["generations"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert len(rows) == len(PROMPTS) * 2 and all(set(row) == GENERATION_KEYS for row in rows)
    again = _recomputed(rows)
    assert (summary["kl"], summary["kl_stderr"]) == again["kl"] and summary["kl"] != 0.0
    assert summary["degeneration"] == again["degeneration"]
    for block in summary["judges"].values():
        for key, pair in again[block["judge"]].items():
            assert (block[key], block[key.removesuffix("_mean") + "_stderr"]) == pair


def test_judges_with_one_name_are_refused(tiny_model, tiny_tokenizer):
    judges = {"a": FixedJudge([0.0] * 3, [0.0] * 3), "b": FixedJudge([0.0] * 3, [0.0] * 3)}
    with pytest.raises(UserError, match=r"judges\.b: another judge is also named 'fixed'"):
        evaluate_sentiment(tiny_model, tiny_model, tiny_tokenizer, PROMPTS, judges, 1, 1)


def test_evaluate_sentiment_rejects_no_prompts(tiny_model, tiny_tokenizer):
    with pytest.raises(UserError, match="no held-out prompts"):
        evaluate_sentiment(tiny_model, tiny_model, tiny_tokenizer, [], FixedJudge())


def test_samples_type_is_exported():
    assert Samples.__dataclass_fields__.keys() == {
        "prompt_index", "prompt_ids", "completion_ids", "stopped", "texts"
    }  # fmt: skip


def test_scalars_flatten_judges_and_degeneration():
    from fpo.evaluation.after_fit import scalars_of

    result = {
        "kl": 1.5,
        "settings": {"max_new_tokens": 8},
        "judges": {"afinn": {"judge": "afinn-165", "win_rate": 0.5}},
        "degeneration": {"policy": {"distinct_1": 0.25}, "reference": {"distinct_1": 0.5}},
    }
    assert scalars_of(result, "eval/ood_test") == {
        "eval/ood_test/kl": 1.5,
        "eval/ood_test/judges/afinn/win_rate": 0.5,
        "eval/ood_test/degeneration/policy/distinct_1": 0.25,
        "eval/ood_test/degeneration/reference/distinct_1": 0.5,
    }


def test_degeneration_and_second_test_set_reach_the_comparison_table(tmp_path):
    """fpo-compare's ``eval:*`` columns: the summary's degeneration and ood_test blocks,
    named like their ``eval/*`` logger keys."""
    import yaml

    from fpo.compare.runs import load_runs
    from fpo.compare.table import run_rows

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "objective": {}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["seed=0"]))
    summary = {
        "kl": 1.0,
        "degeneration": {"policy": {"distinct_1": 0.25}, "reference": {"distinct_1": 0.5}},
        "ood_test": {"kl": 2.0, "degeneration/policy/distinct_1": 0.125},
    }
    path = run / "evaluation" / "summary.json"
    path.parent.mkdir()
    path.write_text(json.dumps(summary))
    (row,) = run_rows(load_runs([run]))
    assert row["eval:degeneration/policy/distinct_1"] == 0.25
    assert row["eval:degeneration/reference/distinct_1"] == 0.5
    assert row["eval:ood_test/kl"] == 2.0
    assert row["eval:ood_test/degeneration/policy/distinct_1"] == 0.125
