"""Controlled-sentiment evaluation: judge score, win rate and KL of a policy vs its reference.

One set of policy samples serves both the judge and the KL estimate: they are drawn at
temperature 1 with no top-k / top-p, the distribution whose log-probs the KL needs. The
reference is sampled the same way under another seed, ``seed + num_batches`` (past any
seed the policy's sampling could use, per call or per batch), so its samples are
independent of the policy's and the win rate estimates ``P(J(y) > J(y_ref)) + P(tie) / 2``
for independent draws (same seeds would couple the two, and a policy equal to its
reference would tie on every prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fpo.errors import UserError
from fpo.evaluation.sampling import num_batches, sample_for_scoring
from fpo.evaluation.scoring import kl_log_ratios
from fpo.evaluation.stats import grouped_mean_stderr, pairwise_wins

Judge = Callable[[Sequence[str]], Sequence[float]]


def _judge(judge: Judge, texts: list[str]) -> list[float]:
    """Score ``texts`` and check the judge returned one float per text."""
    scores = [float(score) for score in judge(texts)]
    if len(scores) != len(texts):
        raise ValueError(f"judge returned {len(scores)} scores for {len(texts)} texts")
    return scores


def evaluate_sentiment(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    judge: Judge,
    num_samples: int = 1,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    seed: int = 0,
    logits_chunk_size: int | None = 256,
) -> dict[str, Any]:
    """Sample, judge and compare the policy and the reference on held-out ``prompts``.

    Args:
        judge: ``judge(texts) -> scores`` (e.g. `fpo.sentiment.SentimentJudge`), higher is
            better; called on the policy's completions first, then on the reference's.
        num_samples: completions per prompt and model (``N = P * num_samples`` each).
        logits_chunk_size: response positions per LM-head chunk when scoring log-probs.

    Returns:
        A JSON-ready dict: ``policy_judge_mean``, ``reference_judge_mean``, ``win_rate``
        (policy sample ``s`` vs reference sample ``s`` of the same prompt, ties count half)
        and ``kl`` (the mean of `fpo.evaluation.scoring.kl_log_ratios`, nats per
        completion), each with a ``*_stderr`` over prompts; mean completion lengths and EOS
        fractions; counts, ``seed`` and ``settings``; and ``generations``: per prompt, the
        first sample of each model with its score (``{"prompt", "policy", "reference", ...}``).
    """
    if not prompts:
        raise UserError("evaluation: no held-out prompts to evaluate on")
    sample = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ours = sample_for_scoring(policy, tokenizer, prompts, seed=seed, **sample)
    ref_seed = seed + num_batches(len(prompts) * num_samples, batch_size)
    theirs = sample_for_scoring(reference, tokenizer, prompts, seed=ref_seed, **sample)

    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    ratios = kl_log_ratios(policy, reference, ours, pad_id, logits_chunk_size, batch_size).tolist()
    policy_scores = _judge(judge, ours.texts)
    reference_scores = _judge(judge, theirs.texts)
    wins = pairwise_wins(policy_scores, reference_scores)

    groups = ours.prompt_index
    result: dict[str, Any] = {}
    for key, values in (
        ("policy_judge_mean", policy_scores),
        ("reference_judge_mean", reference_scores),
        ("win_rate", wins),
        ("kl", ratios),
        ("policy_tokens_mean", [len(ids) for ids in ours.completion_ids]),
        ("reference_tokens_mean", [len(ids) for ids in theirs.completion_ids]),
        ("policy_eos_fraction", [float(s) for s in ours.stopped]),
        ("reference_eos_fraction", [float(s) for s in theirs.stopped]),
    ):  # "x_mean" -> "x_stderr", "kl" -> "kl_stderr"
        result[key], result[f"{key.removesuffix('_mean')}_stderr"] = grouped_mean_stderr(
            values, groups
        )

    first = range(0, len(ours.texts), num_samples)  # prompt-major: sample 0 of each prompt
    result.update(
        num_prompts=len(prompts),
        num_samples=num_samples,
        num_completions=len(ours.texts),
        seed=seed,
        settings={
            "judge": getattr(judge, "name", type(judge).__name__),
            "max_new_tokens": max_new_tokens,
            "temperature": 1.0,
            "top_k": None,
            "top_p": 1.0,
            "batch_size": batch_size,
            "policy_seed": seed,
            "reference_seed": ref_seed,
            "kl": "mean over policy samples of log pi(y|x) - log pi_ref(y|x), nats",
        },
        generations=[
            {
                "prompt": prompts[p],
                "policy": ours.texts[i],
                "reference": theirs.texts[i],
                "policy_score": policy_scores[i],
                "reference_score": reference_scores[i],
                "log_ratio": ratios[i],
            }
            for p, i in enumerate(first)
        ],
    )
    return result
