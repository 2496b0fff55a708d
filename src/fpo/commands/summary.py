"""The few lines ``fpo-train`` prints at the end of a run: the final validation metrics, the
evaluation's headline when there is one, and where the outputs are."""

from __future__ import annotations

import shlex
from pathlib import Path

from fpo.sweep import SUMMARY_METRICS

#: The evaluation's headline: (label, key in the metrics); each with ``<key>_stderr``.
EVAL_HEADLINE = (
    ("win rate", "eval/win_rate"),
    ("judge", "eval/policy_judge_mean"),
    ("reference", "eval/reference_judge_mean"),
    ("KL", "eval/kl"),
)


def _value(metrics: dict[str, float], key: str) -> str:
    stderr = metrics.get(f"{key}_stderr")
    tail = f" ± {stderr:.3f}" if stderr is not None else ""
    return f"{metrics[key]:.3f}{tail}"


def run_summary(
    metrics: dict[str, float],
    run_dir: Path,
    optimized_metric: str | None = None,
    resume: str | None = None,
    has_evaluation: bool = True,
) -> str:
    """The end-of-run summary.

    Args:
        metrics: the run's final metrics (``metrics.json``): ``val/*`` and ``eval/*``.
        run_dir: the run folder; the lines name the files in it that exist.
        optimized_metric: listed first among the validation metrics.
        resume: the command that continues this run from its ``last.ckpt`` (none in a sweep,
            whose own command resumes it).
        has_evaluation: whether the run's config has an evaluation block; without one the
            ``fpo-eval`` command shown adds ``evaluation=smoke``.
    """
    # Here, not at the top: both import torch, which fpo-train --help needs not.
    from fpo.evaluation.report import SUMMARY_NAME
    from fpo.policy_io import POLICY_DIR

    names = [optimized_metric, *SUMMARY_METRICS] if optimized_metric else SUMMARY_METRICS
    shown = [n for n in dict.fromkeys(names) if n and n.startswith("val/") and n in metrics]
    validation = ", ".join(f"{n} {metrics[n]:.3f}" for n in shown) or "none logged"
    lines = [f"run finished: {run_dir}", f"  validation  {validation}"]
    headline = [f"{label} {_value(metrics, key)}" for label, key in EVAL_HEADLINE if key in metrics]
    if headline:
        evaluation = run_dir / "evaluation" / SUMMARY_NAME
        lines.append(f"  evaluation  {', '.join(headline)} ({evaluation})")
    lines.append(f"  metrics     {run_dir / 'metrics.json'}")
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    if checkpoints:
        lines.append(f"  checkpoint  {', '.join(str(p) for p in checkpoints)}")
    policy = run_dir / POLICY_DIR
    if policy.is_dir():
        command = f"fpo-eval {shlex.quote(f'run_dir={run_dir}')}"
        command += "" if has_evaluation else " evaluation=smoke"
        lines.append(f"  policy      {policy}  ({command})")
    if resume and (run_dir / "checkpoints" / "last.ckpt").is_file():
        lines.append(f"  continue    {resume}  (with a larger trainer.max_epochs)")
    return "\n".join(lines)
