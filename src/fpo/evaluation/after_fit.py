"""Evaluate a run's policy against its reference (the initial weights): the one code path.

``fpo-train`` (after fit, when the config has an ``evaluation`` block) and ``fpo-eval``
(a finished run, or the initial model by itself) both call `evaluate_run` with the
policy, a fresh load of the initial weights and the run's :class:`EvaluationInputs`, all
three from ``fpo.builder`` (``RunParts.load_reference_model``, ``RunParts.evaluation_inputs``):

1. fresh samples from policy and reference on the held-out *test* prompts
   (``evaluation.prompts_file``), scored by every judge of ``evaluation.judges`` (win rate,
   scores) and the sampled KL (`fpo.evaluation.sentiment`);
2. on the held-out test *pairs* (``evaluation.pairs_file``, the data's format and template):
   predictive entropy, preference accuracy (method-agnostic and the objective's own
   implicit reward) and SAE feature drift with the run's SAE (`fpo.evaluation.heldout`);
3. ``<out>/summary.json``, ``generations.jsonl``, ``judge_vs_kl.png``, ``feature_report.md``
   (`fpo.evaluation.features`), copied to ``latest_dir``; scalars to the loggers as
   ``eval/*``, tables and the plot to W&B (`fpo.evaluation.wandb_report`);
4. optionally (``evaluation.validation.prompts_file``), step 1 again on the *validation*
   prompts, for model selection: ``<out>/validation/`` and the scalars as ``val/sampled/*``
   (e.g. ``optimized_metric=val/sampled/policy_judge_mean``). The test numbers above are
   never used to choose anything;
5. optionally (``evaluation.ood_test.prompts_file``), step 1 again on a second test set
   (prompts from templates and titles train never used): ``<out>/ood_test/`` and the
   scalars as ``eval/ood_test/*``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

from fpo.data.datamodule import SplitSpec, build_split
from fpo.errors import UserError
from fpo.evaluation.features import feature_rows, write_feature_report
from fpo.evaluation.heldout import DEFAULT_DRIFT_K, heldout_pair_metrics
from fpo.evaluation.reference_side import ReferenceSideCache, reference_side_cache
from fpo.evaluation.report import format_summary, write_evaluation
from fpo.evaluation.sentiment import evaluate_sentiment
from fpo.evaluation.wandb_report import log_evaluation_to_wandb
from fpo.objective import Objective
from fpo.packing import Packing

log = logging.getLogger("fpo.evaluation")


@dataclass(frozen=True)
class EvaluationInputs:
    """What the evaluation of a run needs besides the two models (built by ``fpo.builder``).

    settings: the run's ``evaluation`` block as a plain dict.
    out_dir: where the files go.
    tokenizer, datamodule: the run's (held-out pairs are tokenized like its data).
    objective: the run's objective (its implicit reward, its feature term's ``k``).
    sae, hook_name: the run's frozen SAE and hook for feature drift (``None``: no SAE).
    sae_label: the SAE's path, id or target, for the feature report.
    packing: the run's packed trunk forward (`fpo.packing`), or ``None``.
    """

    settings: dict[str, Any]
    out_dir: Path
    tokenizer: Any
    datamodule: Any
    objective: Objective
    sae: nn.Module | None = None
    hook_name: str | None = None
    sae_label: str | None = None
    packing: Packing | None = None


def heldout_pairs_file(settings: dict[str, Any]) -> str | None:
    """The held-out pairs of ``evaluation`` settings (default: the prompts file)."""
    return settings.get("pairs_file", settings["prompts_file"])


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


DEFAULT_JUDGES = {"vader": {"_target_": "fpo.evaluation.judges.VaderJudge"}}


def build_judges(specs: dict | None) -> dict[str, Any]:
    """``{name: judge}`` from ``evaluation.judges`` (Hydra ``_target_`` entries; a null entry
    is dropped); VADER alone when none is configured. The first is the main judge."""
    specs = DEFAULT_JUDGES if specs is None else specs
    judges = {name: instantiate(spec) for name, spec in specs.items() if spec}
    if not judges:
        raise UserError("evaluation.judges: every judge is null; keep at least one.")
    return judges


def heldout_loader(datamodule: Any, source: str, max_pairs: int | None, batch_size: int):
    """Held-out preference pairs of ``source`` (its format detected from its first row),
    tokenized like the run's data (same template and truncation), in file order."""
    spec = SplitSpec(source, "train", max_pairs, "evaluation.pairs_file")
    built = build_split(
        spec,
        "auto",
        datamodule.tokenizer,
        datamodule.template_settings,
        datamodule.truncation,
        datamodule.on_bad_row,
    )
    return DataLoader(built.dataset, batch_size=batch_size, collate_fn=datamodule.collator)


def copy_to_latest(out_dir: Path, latest_dir: str | Path) -> None:
    """Copy the evaluation folder to ``latest_dir``, pointing summary.json at the copies."""
    latest = Path(latest_dir)
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(out_dir, latest)
    copied = json.loads((latest / "summary.json").read_text())
    for key in ("generations", "plot", "feature_report"):
        if copied.get(key):
            copied[key] = str((latest / Path(copied[key]).name).resolve())
    (latest / "summary.json").write_text(json.dumps(copied, indent=2))
    log.info("evaluation copied to %s", latest)


def scalars_of(result: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``<prefix>/<key>`` for the numbers of the summary, ``<prefix>/judges/<name>/<key>``
    per judge and ``<prefix>/degeneration/<policy|reference>/<metric>``."""
    scalars = {
        f"{prefix}/{k}": float(v)
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for group in ("judges", "degeneration"):
        for name, block in (result.get(group) or {}).items():
            for key, value in block.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    scalars[f"{prefix}/{group}/{name}/{key}"] = float(value)
    return scalars


VALIDATION_PREFIX = "val/sampled"


def sample_and_judge(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    judges: dict[str, Any],
    settings: dict[str, Any],
    prompts_file: str,
    num_prompts: int | None,
    cache: ReferenceSideCache | None = None,
) -> dict[str, Any]:
    """`evaluate_sentiment` on the prompts of ``prompts_file`` with the evaluation settings
    (the reference's samples read from / stored in ``cache``)."""
    return evaluate_sentiment(
        policy,
        reference,
        tokenizer,
        read_prompts(prompts_file, num_prompts),
        judges,
        num_samples=settings.get("num_samples", 1),
        max_new_tokens=settings.get("max_new_tokens", 24),
        batch_size=settings.get("batch_size", 32),
        seed=settings.get("seed", 0),
        logits_chunk_size=settings.get("logits_chunk_size", 256),
        cache=cache,
    )


def check_validation_prompts(settings: dict[str, Any]) -> None:
    """Refuse the test prompts as model-selection prompts (checked before any sampling)."""
    chosen = (settings.get("validation") or {}).get("prompts_file")
    if chosen and Path(chosen).resolve() == Path(settings["prompts_file"]).resolve():
        raise UserError(
            "evaluation.validation.prompts_file is the test prompts_file "
            f"({settings['prompts_file']}): model selection needs prompts of its own."
        )


# Further prompt sets, each evaluated like the test prompts when ``evaluation.<key>.
# prompts_file`` is set: key -> (scalar prefix, plot title). Files go to ``<out>/<key>/``.
PROMPT_SETS = {
    "validation": (VALIDATION_PREFIX, "validation prompts (model selection)"),
    "ood_test": ("eval/ood_test", "test prompts from templates train never used"),
}


def prompt_set_scalars(
    key: str,
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    judges: dict[str, Any],
    settings: dict[str, Any],
    out: Path,
    cache: ReferenceSideCache | None = None,
) -> dict[str, float]:
    """Judge scores, win rate, KL and degeneration on ``evaluation.<key>.prompts_file``
    (`PROMPT_SETS`), written to ``<out>/<key>/``; returns them under the set's prefix
    (``val/sampled/*`` for model selection, ``eval/ood_test/*``). ``{}`` when unset."""
    chosen = settings.get(key) or {}
    if not chosen.get("prompts_file"):
        return {}
    prefix, title = PROMPT_SETS[key]
    result = sample_and_judge(
        policy,
        reference,
        tokenizer,
        judges,
        settings,
        chosen["prompts_file"],
        chosen.get("num_prompts"),
        cache,
    )
    write_evaluation(result, out / key, title=title)
    return scalars_of(result, prefix)


def evaluate_validation_only(
    policy: nn.Module,
    reference: nn.Module,
    run: EvaluationInputs,
    judges: dict[str, Any],
    loggers: list,
    cache: ReferenceSideCache | None = None,
) -> dict[str, float]:
    """``evaluation.validation_only``: step 4 alone (the validation prompts, ``val/sampled/*``
    and ``<out>/validation/``); no test prompt, test pair or second test set is touched. For
    runs that only choose (e.g. ``fpo-calibrate``'s, which read the validation KL)."""
    scalars = prompt_set_scalars(
        "validation", policy, reference, run.tokenizer, judges, run.settings, run.out_dir, cache
    )
    if not scalars:
        raise UserError(
            "evaluation.validation_only=true needs evaluation.validation.prompts_file: "
            "there is nothing else to evaluate."
        )
    for logger in loggers:
        logger.log_metrics(scalars)
    return scalars


def evaluate_run(
    policy: nn.Module,
    reference: nn.Module,
    run: EvaluationInputs,
    loggers: list,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Evaluate ``policy`` against ``reference``, the run's initial weights (module
    docstring).

    Args:
        run: the run's settings, data, objective and SAE (`EvaluationInputs`).
        device: where the policy, the reference and the SAE run (default: the policy's
            device). fpo-train passes the training device: Lightning's teardown leaves the
            policy on the CPU after fit.

    Returns the ``eval/*`` scalars (also sent to ``loggers``).
    """
    settings, out = run.settings, run.out_dir
    started = time.perf_counter()
    check_validation_prompts(settings)
    judges = build_judges(settings.get("judges"))
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    policy.to(device)
    reference.to(device)
    cache = reference_side_cache(settings.get("reference_cache_dir"), reference)
    if settings.get("validation_only"):
        return evaluate_validation_only(policy, reference, run, judges, loggers, cache)
    chunk = settings.get("logits_chunk_size", 256)
    result = sample_and_judge(
        policy,
        reference,
        run.tokenizer,
        judges,
        settings,
        settings["prompts_file"],
        settings.get("num_prompts"),
        cache,
    )
    sampled = time.perf_counter()
    rows, shift = None, None
    pairs_file = heldout_pairs_file(settings)
    if pairs_file:
        sae, hook_name = run.sae, run.hook_name
        if sae is not None:
            sae.to(device)
        k = run.objective.constraints.features.k or DEFAULT_DRIFT_K
        loader = heldout_loader(
            run.datamodule,
            pairs_file,
            settings.get("num_pairs"),
            settings.get("pairs_batch_size", 8),
        )
        metrics, shift = heldout_pair_metrics(
            policy,
            reference,
            loader,
            run.objective,
            sae=sae,
            hook_name=hook_name,
            drift_k=k if run.objective.feature_k else DEFAULT_DRIFT_K,
            logits_chunk_size=chunk,
            contexts=settings.get("feature_contexts", 3),
            packing=run.packing,
            cache=cache,
        )
        result.update(metrics)
        result["settings"]["pairs_file"] = str(pairs_file)
        result["settings"]["feature_drift"] = (
            f"feature_mse of pooled SAE features at {hook_name}, top-k union / k, "
            "mean of chosen and rejected, over held-out pairs"
        )
    result["seconds"] = {
        "sampling_and_judging": round(sampled - started, 2),
        "heldout_pairs": round(time.perf_counter() - sampled, 2),
    }
    other_sets: dict[str, float] = {}  # validation (val/sampled/*), ood_test (eval/ood_test/*)
    for key, (prefix, _) in PROMPT_SETS.items():
        began = time.perf_counter()
        found = prompt_set_scalars(
            key, policy, reference, run.tokenizer, judges, settings, out, cache
        )
        if found:
            result["seconds"][key] = round(time.perf_counter() - began, 2)
            result[key] = {k.removeprefix(f"{prefix}/"): v for k, v in found.items()}
            other_sets.update(found)
    del reference
    summary_path = write_evaluation(result, out)
    summary = json.loads(summary_path.read_text())
    if shift is not None:
        rows = feature_rows(shift, run.tokenizer, settings.get("feature_report_top", 10))
        meta = {
            "sae": run.sae_label,
            "hook_name": hook_name,
            "responses": shift.count,
            "pairs_file": pairs_file,
        }
        summary["feature_report"] = str(write_feature_report(rows, meta, out))
        summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(format_summary(result), flush=True)
    if settings.get("latest_dir"):
        copy_to_latest(summary_path.parent, settings["latest_dir"])
    scalars = {**scalars_of(result), **other_sets}
    for logger in loggers:
        logger.log_metrics(scalars)
    log_evaluation_to_wandb(loggers, summary, rows, summary.get("plot"), summary.get("generations"))
    return scalars
