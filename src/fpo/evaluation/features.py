"""The feature report: SAE features whose pooled activation moved most under training.

From a `fpo.evaluation.heldout.FeatureShift` (pooled features of policy and reference on
held-out responses): the ``top_n`` features by ``|mean change|`` (policy - reference), each
with its change, both means and the tokens where it fires most, a few tokens of context
around the token whose residual activates it (marked ``[[token]]``). The contexts come from
the model in which the feature is the stronger on average (the policy for an increase, the
reference for a decrease), so a feature training switched off still shows what it read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fpo.evaluation.heldout import FeatureShift

REPORT_NAME = "feature_report.md"


def _clean(text: str) -> str:
    """One line, safe inside a Markdown table cell."""
    return text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")


def context_text(tokenizer: Any, tokens: list[int], col: int, before: int, after: int) -> str:
    """``left[[token]]right`` around ``tokens[col]`` (``before`` / ``after`` tokens each side)."""
    left = tokenizer.decode(tokens[max(0, col - before) : col])
    token = tokenizer.decode(tokens[col : col + 1])
    right = tokenizer.decode(tokens[col + 1 : col + 1 + after])
    return f"{left}[[{token}]]{right}"


def feature_rows(
    shift: FeatureShift, tokenizer: Any, top_n: int = 10, before: int = 6, after: int = 2
) -> list[dict[str, Any]]:
    """The ``top_n`` features by ``|mean change|``, largest first (module docstring)."""
    change = shift.mean_change()
    count = max(shift.count, 1)
    order = change.abs().argsort(descending=True)[: min(top_n, change.numel())]
    rows = []
    for rank, feature in enumerate(order.tolist(), start=1):
        delta = float(change[feature])
        source = "policy" if delta > 0 else "ref"
        contexts = []
        if source in shift.top:
            values, ids = shift.top[source]
            for slot in range(values.shape[0]):
                value = float(values[slot, feature])
                if value <= 0:
                    continue
                row, col = shift.positions[int(ids[slot, feature])]
                text = context_text(tokenizer, shift.rows[row], col, before, after)
                contexts.append({"activation": value, "text": text})
        rows.append(
            {
                "rank": rank,
                "feature": feature,
                "change": delta,
                "policy_mean": float(shift.policy_sum[feature]) / count,
                "reference_mean": float(shift.ref_sum[feature]) / count,
                "contexts_from": "policy" if source == "policy" else "reference",
                "contexts": contexts,
            }
        )
    return rows


def format_feature_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Markdown: a short header (what, where from) and one table row per feature."""
    lines = [
        "# Features that moved most (policy vs reference)",
        "",
        f"SAE `{meta.get('sae', '?')}` at `{meta.get('hook_name', '?')}`; pooled (mean over "
        f"response positions) activations on {meta.get('responses', '?')} held-out responses "
        f"(chosen and rejected) of `{meta.get('pairs_file', '?')}`. `change` = mean policy "
        "activation - mean reference activation; contexts are the tokens where the feature "
        "fires most (`[[token]]` is the activating token) in the model where it is stronger.",
        "",
        "| rank | feature | change | policy mean | reference mean | top contexts (model) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        contexts = "<br>".join(
            f"{c['activation']:.3g}: `{_clean(c['text'])}`" for c in row["contexts"]
        )
        lines.append(
            f"| {row['rank']} | {row['feature']} | {row['change']:+.4g} | "
            f"{row['policy_mean']:.4g} | {row['reference_mean']:.4g} | "
            f"{contexts or '(never active)'} ({row['contexts_from']}) |"
        )
    if not rows:
        lines.append("| - | - | - | - | - | no features |")
    return "\n".join(lines) + "\n"


def write_feature_report(
    rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: str | os.PathLike
) -> Path:
    """Write ``feature_report.md`` into ``out_dir``; returns its path."""
    path = Path(out_dir).resolve() / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_feature_report(rows, meta), encoding="utf-8")
    return path
