"""A run's evaluation as per-prompt means (for the bootstrap), or its summary means.

The evaluation writes ``generations.jsonl``: one JSON object per (prompt, sample) with
``prompt_index``, ``prompt``, ``kl_log_ratio`` (the sample's log pi(y|x) - log pi_ref(y|x),
nats) and ``policy_scores`` (``{judge name: score}``). A run's KL and judge score are the
mean over prompts of the per-prompt means (the evaluation's own definition in
`fpo.evaluation.stats.grouped_mean_stderr`; the plain mean when every prompt has the same
number of samples). Older files keep one sample per prompt without these fields: such a run
gives only its ``summary.json`` means (``kl``; ``judges.<name>.policy_judge_mean``, or
``policy_judge_mean`` for the summary's own judge) and cannot be bootstrapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fpo.compare.runs import Run, as_number, read_json
from fpo.errors import UserError
from fpo.evaluation.report import read_generations

GENERATIONS = "generations.jsonl"
SUMMARY = "summary.json"
PER_SAMPLE_KEYS = ("prompt_index", "kl_log_ratio", "policy_scores")


@dataclass
class RunScores:
    """One run's KL and judge scores, as point estimates and, when the per-sample file has
    them, per prompt.

    ``prompt_means_kl`` has shape ``(P,)`` (prompts in ``prompt_index`` order) and
    ``prompt_means[judge]`` too; both are ``None`` for a run read from its summary only.
    ``prompts`` identifies the prompt set (``(prompt_index, prompt)`` pairs): runs with the
    same one evaluated the same prompts and share the bootstrap's prompt draws.
    """

    run: Run
    kl: float
    scores: dict[str, float]
    prompts: tuple[tuple[int, str], ...] | None = None
    prompt_means_kl: np.ndarray | None = None
    prompt_means: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def per_sample(self) -> bool:
        return self.prompt_means_kl is not None


def evaluation_folder(run: Run, split: str | None = None) -> Path:
    """``<run>/evaluation`` (the main test set) or ``<run>/evaluation/<split>``."""
    folder = run.path / "evaluation"
    return folder / split if split else folder


def split_summary(run: Run, split: str | None = None) -> dict[str, Any]:
    """The ``summary.json`` of the main test set (``split=None``, read with the run) or of
    ``evaluation/<split>``; ``{}`` when there is none (the problem is noted on the run)."""
    if split is None:
        return run.evaluation
    return read_json(evaluation_folder(run, split) / SUMMARY, run.problems)


def _per_prompt_means(values: list[float], positions: np.ndarray, count: int) -> np.ndarray:
    """Means of ``values`` (``(N,)``) per prompt position (``positions``, ``(N,)``) -> ``(P,)``."""
    sums = np.bincount(positions, weights=np.asarray(values, dtype=np.float64), minlength=count)
    return sums / np.bincount(positions, minlength=count)


def _from_samples(run: Run, path: Path, lines: list[dict[str, Any]]) -> RunScores:
    prompts = sorted({(int(line["prompt_index"]), str(line.get("prompt", ""))) for line in lines})
    indices = [index for index, _ in prompts]
    if len(set(indices)) != len(indices):
        raise UserError(f"{path}: one prompt_index with two different prompts")
    position = {index: i for i, index in enumerate(indices)}
    positions = np.array([position[int(line["prompt_index"])] for line in lines])
    kl = _per_prompt_means([float(line["kl_log_ratio"]) for line in lines], positions, len(prompts))
    judges = [j for j in lines[0]["policy_scores"] if all(j in li["policy_scores"] for li in lines)]
    means = {
        judge: _per_prompt_means(
            [float(line["policy_scores"][judge]) for line in lines], positions, len(prompts)
        )
        for judge in judges  # in the file's order: the evaluation's main judge first
    }
    return RunScores(
        run=run,
        kl=float(kl.mean()),
        scores={judge: float(values.mean()) for judge, values in means.items()},
        prompts=tuple(prompts),
        prompt_means_kl=kl,
        prompt_means=means,
    )


def _summary_scores(summary: dict[str, Any]) -> dict[str, float]:
    """``{judge: policy mean}`` from a summary.json: its ``judges`` blocks, else the top level."""
    scores = {}
    for name, block in (summary.get("judges") or {}).items():
        value = as_number(block.get("policy_judge_mean")) if isinstance(block, dict) else None
        if value is not None:
            scores[str(name)] = value
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    main = summary.get("judge") or settings.get("judge")
    value = as_number(summary.get("policy_judge_mean"))
    if main is not None and value is not None:
        scores.setdefault(str(main), value)
    return scores


def _read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        return read_generations(path)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable ({error}).") from None


def read_run_scores(run: Run, split: str | None = None) -> RunScores | None:
    """The run's scores on the main test set (``split=None``) or on ``split``: per prompt
    from ``generations.jsonl`` when every line has `PER_SAMPLE_KEYS`, else the summary's
    means (`RunScores.per_sample` is then false). ``None`` when the run has neither."""
    folder = evaluation_folder(run, split)
    lines = _read_lines(folder / GENERATIONS) if (folder / GENERATIONS).is_file() else []
    if lines and all(all(key in line for key in PER_SAMPLE_KEYS) for line in lines):
        try:
            return _from_samples(run, folder / GENERATIONS, lines)
        except (TypeError, ValueError, AttributeError) as error:
            raise UserError(f"{folder / GENERATIONS}: a line with a bad value ({error}).") from None
    summary = split_summary(run, split)
    kl = as_number(summary.get("kl"))
    scores = _summary_scores(summary)
    if kl is None or not scores:
        return None
    return RunScores(run=run, kl=kl, scores=scores)
