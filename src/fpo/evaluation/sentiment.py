"""Controlled-sentiment evaluation: judge score, win rate and KL of a policy vs its reference.

One set of policy samples serves both the judge and the KL estimate: they are drawn at
temperature 1 with no top-k / top-p, the distribution whose log-probs the KL needs. The
reference is sampled the same way under another seed, ``seed + num_batches`` (past any
seed the policy's sampling could use, per call or per batch), so its samples are
independent of the policy's and the win rate estimates ``P(J(y) > J(y_ref)) + P(tie) / 2``
for independent draws (same seeds would couple the two, and a policy equal to its
reference would tie on every prompt). The reference's samples depend on nothing the run
changes: ``cache`` keeps them across runs (`fpo.evaluation.reference_side`).

Several judges can score the same samples (`fpo.evaluation.judges`: VADER, which labelled
the training pairs, and AFINN, which did not). The first is the *main* judge: its numbers
are the summary's top-level keys; every judge has a block under ``judges`` by its name.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from torch import nn

from fpo.data.tokenize import tokenizer_fingerprint
from fpo.errors import UserError
from fpo.evaluation.degeneration import degeneration_metrics
from fpo.evaluation.judges import is_pairwise
from fpo.evaluation.reference_side import ReferenceSideCache
from fpo.evaluation.sampling import Samples, num_batches, sample_for_scoring
from fpo.evaluation.scoring import kl_log_ratios
from fpo.evaluation.stats import grouped_mean_stderr, pairwise_wins
from fpo.generation import eos_token_ids

Judge = Any  # ``judge(texts)``, ``judge.score(prompts, completions)`` or ``judge.compare(...)``


def judge_name(judge: Judge) -> str:
    return str(getattr(judge, "name", type(judge).__name__))


def _judge(judge: Judge, prompts: list[str], texts: list[str]) -> list[float]:
    """Score ``texts`` (completions of ``prompts``), one float per text.

    A judge is pointwise in either form: ``judge.score(prompts, completions)``
    (`fpo.evaluation.judges`) or a callable ``judge(texts)`` (`fpo.review_data.VaderJudge`).
    """
    score = getattr(judge, "score", None)
    if callable(score) and len(inspect.signature(score).parameters) >= 2:
        raw = score(prompts, texts)
    else:
        raw = judge(texts)
    scores = [float(value) for value in raw]
    if len(scores) != len(texts):
        raise ValueError(f"judge returned {len(scores)} scores for {len(texts)} texts")
    return scores


def _as_named(judges: Judge | Sequence[Judge] | Mapping[str, Judge]) -> dict[str, Judge]:
    """``{block name: judge}`` in order; the first is the main judge."""
    if isinstance(judges, Mapping):
        named = dict(judges)
    elif isinstance(judges, list | tuple):
        named = {judge_name(j): j for j in judges}
    else:
        named = {judge_name(judges): judges}
    if not named:
        raise UserError("evaluation.judges: give at least one judge")
    main_name, main = next(iter(named.items()))
    if is_pairwise(main):
        raise UserError(
            f"evaluation.judges: the first (main) judge {main_name!r} is pairwise; put a "
            "pointwise judge (a score per completion) first, pairwise ones after it."
        )
    return named


def judge_block(
    judge: Judge, prompts: list[str], ours: list[str], theirs: list[str], groups: list[int]
) -> tuple[dict[str, Any], list[float] | None, list[float] | None]:
    """One judge's numbers over paired samples: score means (pointwise judges), win rate
    (ties half; a pairwise judge's failed items are left out), with stderrs over prompts."""
    block: dict[str, Any] = {"judge": judge_name(judge)}
    if is_pairwise(judge):
        outcomes = list(judge.compare(prompts, ours, theirs))
        kept = [(v, g) for v, g in zip(outcomes, groups, strict=True) if v is not None]
        if not kept:
            raise UserError(f"judge {block['judge']!r} failed on every item: no win rate.")
        block["win_rate"], block["win_rate_stderr"] = grouped_mean_stderr(*zip(*kept, strict=True))
        block["failed"] = len(outcomes) - len(kept)
        return block, None, None
    policy_scores, reference_scores = _judge(judge, prompts, ours), _judge(judge, prompts, theirs)
    for key, values in (
        ("policy_judge_mean", policy_scores),
        ("reference_judge_mean", reference_scores),
        ("win_rate", pairwise_wins(policy_scores, reference_scores)),
    ):
        block[key], block[f"{key.removesuffix('_mean')}_stderr"] = grouped_mean_stderr(
            values, groups
        )
    return block, policy_scores, reference_scores


def _unique_name(name: str, key: str, taken: Mapping[str, Any]) -> str:
    """``name``, refused when another pointwise judge already has it (its per-sample scores
    in ``generations.jsonl`` are keyed by judge name)."""
    if name in taken:
        raise UserError(
            f"evaluation.judges.{key}: another judge is also named {name!r}; per-sample "
            "scores are keyed by judge name, so give each judge its own name."
        )
    return name


def sample_rows(
    prompts: list[str],
    groups: list[int],
    ours: list[str],
    theirs: list[str],
    ratios: list[float],
    scores: Mapping[str, tuple[list[float], list[float]]],
) -> list[dict[str, Any]]:
    """One row per (prompt, sample), prompt-major, every list being ``[N]`` aligned.

    A row: ``prompt_index``, ``prompt``, ``sample`` (0-based within its prompt),
    ``policy`` and ``reference`` (the two completions paired for the win rate),
    ``kl_log_ratio`` (``log pi(y|x) - log pi_ref(y|x)`` of the policy's completion; their
    mean over all rows is ``kl``), and ``policy_scores`` / ``reference_scores``: ``{judge
    name: score}`` for every pointwise judge. The summary's means, win rates and KL are
    functions of these rows alone.
    """
    rows, seen = [], dict[int, int]()
    for i, group in enumerate(groups):
        seen[group] = seen.get(group, -1) + 1
        rows.append(
            {
                "prompt_index": group,
                "prompt": prompts[i],
                "sample": seen[group],
                "policy": ours[i],
                "reference": theirs[i],
                "kl_log_ratio": ratios[i],
                "policy_scores": {name: pair[0][i] for name, pair in scores.items()},
                "reference_scores": {name: pair[1][i] for name, pair in scores.items()},
            }
        )
    return rows


def reference_samples(
    reference: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    seed: int,
    sample: dict[str, int],
    cache: ReferenceSideCache | None = None,
) -> Samples:
    """`sample_for_scoring` of the reference under ``seed`` with the ``sample`` settings
    (``num_samples``, ``max_new_tokens``, ``batch_size``), read from ``cache`` when it holds
    them (keyed by the prompts as token ids, the tokenizer, the stop and pad ids, the seed
    and the settings, besides the reference itself) and stored there otherwise."""

    def compute() -> dict[str, Any]:
        return asdict(sample_for_scoring(reference, tokenizer, prompts, seed=seed, **sample))

    if cache is None:
        return Samples(**compute())
    components = {
        "prompts": list(prompts),
        "prompt_ids": [tokenizer(prompt)["input_ids"] for prompt in prompts],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "stop_ids": sorted(eos_token_ids(reference, tokenizer)),
        "pad_id": tokenizer.pad_token_id,
        "seed": seed,
        "sampler": "inverse-cdf, temperature 1, top_k 0, top_p 1",
        **sample,
    }
    return Samples(**cache.fetch("samples", components, compute))


def evaluate_sentiment(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    judge: Judge | Sequence[Judge] | Mapping[str, Judge],
    num_samples: int = 1,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    seed: int = 0,
    logits_chunk_size: int | None = 256,
    cache: ReferenceSideCache | None = None,
) -> dict[str, Any]:
    """Sample, judge and compare the policy and the reference on held-out ``prompts``.

    Args:
        judge: one judge, a list, or ``{name: judge}`` (module docstring): pointwise
            (``judge(texts)`` or ``judge.score(prompts, completions)``, higher is better;
            called on the policy's completions first, then on the reference's) or pairwise
            (``judge.compare``; not first).
        num_samples: completions per prompt and model (``N = P * num_samples`` each).
        logits_chunk_size: response positions per LM-head chunk when scoring log-probs.
        cache: where the reference's samples are kept across runs (`reference_samples`).

    Returns:
        A JSON-ready dict: ``policy_judge_mean``, ``reference_judge_mean``, ``win_rate``
        (policy sample ``s`` vs reference sample ``s`` of the same prompt, ties count half)
        and ``kl`` (the mean of `fpo.evaluation.scoring.kl_log_ratios`, nats per
        completion), each with a ``*_stderr`` over prompts; mean completion lengths and EOS
        fractions; counts, ``seed`` and ``settings``; ``degeneration``: the policy's and
        the reference's completions' `fpo.evaluation.degeneration.degeneration_metrics`;
        and ``generations``: every sample (`sample_rows`). ``judges``: per judge, its block
        (`judge_block`) under its configured key; the top-level judge keys are the first
        judge's.
    """
    judges = _as_named(judge)
    if not prompts:
        raise UserError("evaluation: no held-out prompts to evaluate on")
    sample = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ours = sample_for_scoring(policy, tokenizer, prompts, seed=seed, **sample)
    ref_seed = seed + num_batches(len(prompts) * num_samples, batch_size)
    theirs = reference_samples(reference, tokenizer, prompts, ref_seed, sample, cache)

    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    ratios = kl_log_ratios(policy, reference, ours, pad_id, logits_chunk_size, batch_size).tolist()
    groups = ours.prompt_index
    sample_prompts = [prompts[p] for p in groups]
    blocks, per_sample = {}, {}
    for key, each in judges.items():
        blocks[key], ours_scores, theirs_scores = judge_block(
            each, sample_prompts, ours.texts, theirs.texts, groups
        )
        if ours_scores is not None:
            per_sample[_unique_name(blocks[key]["judge"], key, per_sample)] = (
                ours_scores,
                theirs_scores,
            )
    main = next(iter(judges))

    result: dict[str, Any] = {
        key: value for key, value in blocks[main].items() if key not in ("judge", "failed")
    }
    for key, values in (
        ("kl", ratios),
        ("policy_tokens_mean", [len(ids) for ids in ours.completion_ids]),
        ("reference_tokens_mean", [len(ids) for ids in theirs.completion_ids]),
        ("policy_eos_fraction", [float(s) for s in ours.stopped]),
        ("reference_eos_fraction", [float(s) for s in theirs.stopped]),
    ):  # "x_mean" -> "x_stderr", "kl" -> "kl_stderr"
        result[key], result[f"{key.removesuffix('_mean')}_stderr"] = grouped_mean_stderr(
            values, groups
        )

    result.update(
        num_prompts=len(prompts),
        num_samples=num_samples,
        num_completions=len(ours.texts),
        seed=seed,
        settings={
            "judge": blocks[main]["judge"],
            "judges": [block["judge"] for block in blocks.values()],
            "max_new_tokens": max_new_tokens,
            "temperature": 1.0,
            "top_k": None,
            "top_p": 1.0,
            "batch_size": batch_size,
            "policy_seed": seed,
            "reference_seed": ref_seed,
            "kl": "mean over policy samples of log pi(y|x) - log pi_ref(y|x), nats",
        },
        degeneration={
            "policy": degeneration_metrics(sample_prompts, ours.texts),
            "reference": degeneration_metrics(sample_prompts, theirs.texts),
        },
        generations=sample_rows(
            sample_prompts, groups, ours.texts, theirs.texts, ratios, per_sample
        ),
        judges=blocks,
    )
    return result
