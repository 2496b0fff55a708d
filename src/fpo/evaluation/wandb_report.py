"""The evaluation in W&B: summary, per-judge, generations and feature-report tables, the
run's judge-vs-KL plot (its point on the frontier) as an image. A no-op without a
``WandbLogger`` among the loggers (W&B stays optional)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fpo.evaluation.report import read_generations

SCALAR_TYPES = (int, float, str, bool)


def _wandb_runs(loggers: list) -> list:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    return [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]


def log_evaluation_to_wandb(
    loggers: list,
    summary: dict[str, Any],
    feature_rows: list[dict[str, Any]] | None,
    plot_path: str | Path | None,
    generations_path: str | Path | None,
    max_generations: int = 200,
) -> bool:
    """Log the tables and image to every W&B run of ``loggers``; True if there was one."""
    runs = _wandb_runs(loggers)
    if not runs:
        return False
    import wandb

    items = [
        [key, value if isinstance(value, SCALAR_TYPES) else json.dumps(value)]
        for key, value in summary.items()
        if key not in ("judges", "generations", "plot", "feature_report")
    ]
    payload: dict[str, Any] = {
        "eval/summary": wandb.Table(columns=["key", "value"], data=[[k, str(v)] for k, v in items])
    }
    judges = summary.get("judges") or {}
    if judges:
        keys = sorted({key for block in judges.values() for key in block})
        payload["eval/judges"] = wandb.Table(
            columns=["name", *keys],
            data=[[name, *(block.get(key) for key in keys)] for name, block in judges.items()],
        )
    if feature_rows is not None:
        payload["eval/feature_report"] = wandb.Table(
            columns=["rank", "feature", "change", "policy_mean", "reference_mean", "contexts"],
            data=[
                [
                    row["rank"],
                    row["feature"],
                    row["change"],
                    row["policy_mean"],
                    row["reference_mean"],
                    " | ".join(f"{c['activation']:.3g}: {c['text']}" for c in row["contexts"]),
                ]
                for row in feature_rows
            ],
        )
    if generations_path and Path(generations_path).is_file():
        rows = read_generations(generations_path, max_generations)
        judge = summary.get("settings", {}).get("judge")
        columns = ["prompt", "sample", "policy", "reference", "kl_log_ratio"]
        payload["eval/generations"] = wandb.Table(
            columns=[*columns, "policy_score", "reference_score"],
            data=[
                [row.get(c) for c in columns]
                + [row["policy_scores"].get(judge), row["reference_scores"].get(judge)]
                for row in rows
            ],
        )
    if plot_path and Path(plot_path).is_file():
        payload["eval/frontier"] = wandb.Image(str(plot_path))
    for run in runs:
        run.log(payload)
    return True
