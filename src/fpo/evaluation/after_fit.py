"""Evaluate the policy a run just trained against its reference (the initial weights).

Called by ``fpo-train`` when the config has an ``evaluation`` block (the embedded default
has one): held-out prompts from a JSONL file, fresh samples from both models, the judge,
the KL estimate; files written into the run folder and copied to ``logs/latest/``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from fpo.errors import UserError
from fpo.evaluation.report import format_summary, write_evaluation
from fpo.evaluation.sentiment import evaluate_sentiment
from fpo.sentiment.judge import SentimentJudge

log = logging.getLogger("fpo.evaluation")


def read_prompts(path: str | Path, limit: int | None) -> list[str]:
    """The ``prompt`` field of the first ``limit`` rows of a JSONL file, deduplicated."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"evaluation.prompts_file: {path} does not exist.")
    prompts: list[str] = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserError(f"{path} line {number}: no readable 'prompt' ({error}).") from None
            if prompt not in prompts:
                prompts.append(prompt)
            if limit is not None and len(prompts) == limit:
                break
    return prompts


def evaluate_after_fit(
    policy: nn.Module,
    tokenizer: Any,
    load_reference: Callable[[], nn.Module],
    output_dir: str | Path,
    prompts_file: str,
    num_prompts: int | None = 100,
    num_samples: int = 1,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    seed: int = 0,
    latest_dir: str | Path | None = None,
    logits_chunk_size: int | None = 256,
) -> dict[str, Any]:
    """Run the sentiment evaluation and write ``summary.json``, generations and the plot.

    Args:
        load_reference: builds the reference model (a fresh load of the initial weights).
        output_dir: the run folder; files go to ``output_dir/evaluation``.
        latest_dir: if set, the files are also copied there (``logs/latest``).
        logits_chunk_size: response positions per LM-head chunk when scoring log-probs.
    """
    prompts = read_prompts(prompts_file, num_prompts)
    reference = load_reference()
    result = evaluate_sentiment(
        policy,
        reference,
        tokenizer,
        prompts,
        SentimentJudge(),
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        logits_chunk_size=logits_chunk_size,
    )
    summary = write_evaluation(result, Path(output_dir) / "evaluation")
    print(format_summary(result), flush=True)
    if latest_dir is not None:
        latest = Path(latest_dir)
        shutil.rmtree(latest, ignore_errors=True)
        shutil.copytree(summary.parent, latest)
        # summary.json names its files by absolute path: point the copy at the copies.
        copied = json.loads((latest / "summary.json").read_text())
        for key in ("generations", "plot"):
            if copied.get(key):
                copied[key] = str((latest / Path(copied[key]).name).resolve())
        (latest / "summary.json").write_text(json.dumps(copied, indent=2))
        log.info("evaluation copied to %s", latest)
    return result
