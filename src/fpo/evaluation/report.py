"""Writing an evaluation: summary.json, generations.jsonl, the judge-vs-KL plot, console lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SUMMARY_NAME = "summary.json"
GENERATIONS_NAME = "generations.jsonl"
PLOT_NAME = "judge_vs_kl.png"


def _pm(mean: float, stderr: float | None, digits: int = 3) -> str:
    """``mean ± stderr`` (``± n/a`` when the standard error is undefined)."""
    tail = "n/a" if stderr is None else f"{stderr:.{digits}f}"
    return f"{mean:.{digits}f} ± {tail}"


def format_summary(result: dict[str, Any]) -> str:
    """A few console lines: judge means, win rate and KL, with standard errors."""
    settings = result["settings"]
    policy = _pm(result["policy_judge_mean"], result["policy_judge_stderr"])
    reference = _pm(result["reference_judge_mean"], result["reference_judge_stderr"])
    return "\n".join(
        [
            f"evaluation: {result['num_prompts']} prompts x {result['num_samples']} samples, "
            f"judge {settings['judge']}, temperature 1, max_new_tokens "
            f"{settings['max_new_tokens']}, seed {result['seed']}",
            f"  judge score  policy {policy}  reference {reference}",
            f"  win rate     {_pm(result['win_rate'], result['win_rate_stderr'])}"
            "  (policy over reference, ties count half)",
            f"  KL(policy || reference)  {_pm(result['kl'], result['kl_stderr'])} nats per "
            "completion (sampled estimate)",
        ]
    )


def plot_judge_vs_kl(result: dict[str, Any], path: str | os.PathLike, title: str | None = None):
    """Judge score vs KL: the reference at KL 0, the policy at its KL, with stderr bars."""
    figure = Figure(figsize=(5, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.errorbar(
        [0.0],
        [result["reference_judge_mean"]],
        yerr=[result["reference_judge_stderr"] or 0.0],
        fmt="s",
        color="gray",
        capsize=4,
        label="reference",
    )
    axes.errorbar(
        [result["kl"]],
        [result["policy_judge_mean"]],
        xerr=[result["kl_stderr"] or 0.0],
        yerr=[result["policy_judge_stderr"] or 0.0],
        fmt="o",
        color="tab:blue",
        capsize=4,
        label="policy",
    )
    axes.set_xlabel("KL(policy || reference), nats per completion")
    axes.set_ylabel(f"judge score ({result['settings']['judge']})")
    axes.set_title(title or f"judge vs KL, {result['num_prompts']} held-out prompts")
    axes.axvline(0.0, color="lightgray", linewidth=0.8, zorder=0)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_evaluation(
    result: dict[str, Any], out_dir: str | os.PathLike, title: str | None = None
) -> Path:
    """Write ``summary.json``, ``generations.jsonl`` and ``judge_vs_kl.png`` into ``out_dir``.

    ``summary.json`` is ``result`` with ``generations`` replaced by the absolute path of
    ``generations.jsonl`` (one JSON object per prompt and sample, with its KL log-ratio and
    every judge's scores: `fpo.evaluation.sentiment.sample_rows`) and ``plot`` added.
    Returns the path of ``summary.json``.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    generations_path, plot_path = out / GENERATIONS_NAME, out / PLOT_NAME
    with generations_path.open("w", encoding="utf-8") as handle:
        for row in result["generations"]:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot_judge_vs_kl(result, plot_path, title)
    summary = {**result, "generations": str(generations_path), "plot": str(plot_path)}
    summary_path = out / SUMMARY_NAME
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary_path


def read_generations(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a ``generations.jsonl`` (the first ``limit``), as `write_evaluation` wrote
    them. A row ends at ``"\\n"`` only: the writer keeps non-ASCII text as it is, so a
    completion may hold U+2028, U+2029 or U+0085, which ``str.splitlines`` would also break
    at. Raises ``OSError`` or ``ValueError`` (a line that is not JSON)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    return [json.loads(line) for line in lines[:limit]]
