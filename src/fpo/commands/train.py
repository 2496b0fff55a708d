"""``fpo-train``: compose the Hydra config, build everything, fit, return the metric."""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

import fpo.objective  # noqa: F401  (registers the objective schema the configs name)
from fpo.commands.common import CONFIG_DIR, run_hydra, start_torch, user_errors
from fpo.commands.summary import run_summary
from fpo.errors import UserError
from fpo.run_lock import folder_lock
from fpo.settings_check import check_settings
from fpo.sweep import JobSettings, in_multirun, sweep_job

if TYPE_CHECKING:
    import torch

    from fpo.builder import RunParts

log = logging.getLogger("fpo.train")


def evaluate(parts: RunParts, loggers: list, device: torch.device) -> dict[str, float]:
    """Evaluate the trained policy against a fresh load of the initial weights, on the
    training ``device`` (the code ``fpo-eval`` runs too: `fpo.evaluation.after_fit`)."""
    from fpo.evaluation import after_fit

    run = parts.evaluation_inputs()
    return after_fit.evaluate_run(
        parts.policy, parts.load_reference_model(), run, loggers, device=device
    )


def reset_peak_memory() -> None:
    """Start this run's peak-memory count afresh: the jobs of a Hydra multirun share one
    process, whose peak RSS would otherwise carry over from the jobs before (Linux:
    ``/proc/self/clear_refs`` 5 resets ``VmHWM``)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):  # not Linux: ru_maxrss, the process's peak
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb() -> float:
    """Peak memory since `reset_peak_memory`: CUDA max allocated on a GPU, else the peak RSS
    (``VmHWM`` on Linux, the process's ``ru_maxrss`` elsewhere)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit one run; returns the final callback metrics as floats (also in metrics.json)."""
    # Imported here, not at the top: fpo-train --help and config errors need none of them
    # (docs/benchmarks.md, "Start-up time").
    import lightning as L

    from fpo.builder import build_training
    from fpo.checkpoints import resolve_ckpt_path
    from fpo.commands.card import card_values
    from fpo.fit_clock import FitClock
    from fpo.interrupts import Interrupted, report, resume_command, stop_on_signals
    from fpo.model_card import refresh_card_evaluation
    from fpo.policy_io import POLICY_DIR, save_policy, should_save_policy

    check_settings(cfg)  # before seeding (seed) and resolving ckpt_path
    started = time.perf_counter()
    reset_peak_memory()
    # ckpt_path=last: the newest last.ckpt of an earlier run of this config
    runs_root = Path(cfg.paths.log_dir) / str(cfg.task_name)
    config = OmegaConf.to_container(cfg, resolve=False)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), config, runs_root, own_dir=output_dir)
    L.seed_everything(cfg.seed, workers=True)
    run = build_training(cfg)
    trainer, parts = run.trainer, run.parts
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in run.loggers:
        logger.log_hyperparams(config)
    try:
        with stop_on_signals(trainer):  # SIGTERM/SIGINT: last.ckpt saved, exit 143/130
            trainer.fit(run.module, datamodule=parts.datamodule, ckpt_path=ckpt_path)
    except Interrupted as stop:
        if trainer.is_global_zero:
            last = output_dir / "checkpoints" / "last.ckpt"
            report(stop.signum, last, in_multirun(), stop.ranks)
        raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # fit wall and CPU time summed over every attempt (a resumed run counts its earlier
    # ones) and the machine's load meanwhile: `fpo.fit_clock`
    (clock,) = (callback for callback in trainer.callbacks if isinstance(callback, FitClock))
    metrics.update(clock.totals())
    metrics["run/peak_memory_gb"] = peak_memory_gb()
    has_evaluation = bool(cfg.get("evaluation"))
    save = cfg.get("save_policy", "auto")
    saved = trainer.is_global_zero and should_save_policy(save, has_evaluation)
    if saved:
        card = card_values(cfg, parts, trainer)
        merge = bool((cfg.model.get("lora") or {}).get("merge"))  # LoRA: merged weights
        save_policy(parts.policy, parts.tokenizer, output_dir / POLICY_DIR, card, merge)
    if has_evaluation and trainer.is_global_zero:
        metrics.update(evaluate(parts, run.loggers, trainer.strategy.root_device))
        if saved:  # the card reports the evaluation
            refresh_card_evaluation(output_dir / POLICY_DIR)
    metrics["run/wall_seconds"] = time.perf_counter() - started
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("final metrics written to %s", output_dir / "metrics.json")
        resume = None if in_multirun() else resume_command()
        summary = run_summary(
            metrics, output_dir, cfg.get("optimized_metric"), resume, has_evaluation
        )
        print(summary, flush=True)
    return metrics


def selected_metric(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value of ``cfg.optimized_metric`` in ``metrics`` (``None`` when unset)."""
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        raise UserError(
            f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}."
        )
    return metrics.get(name) if name else None


def job_settings(cfg: DictConfig) -> JobSettings:
    """What `fpo.sweep.sweep_job` reads of this job's config."""
    sweep = cfg.get("sweep") or {}
    return JobSettings(
        job_dir=Path(cfg.paths.output_dir),
        optimized_metric=cfg.get("optimized_metric"),
        resume=bool(sweep.get("resume", True)),
        keep_last_checkpoint=bool(sweep.get("keep_last_checkpoint", True)),
        ckpt_path_given=cfg.get("ckpt_path") is not None,
        has_last_checkpoint=bool((cfg.get("callbacks") or {}).get("last_checkpoint")),
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers.

    In multirun mode `fpo.sweep.sweep_job` keeps each job's status, skips a finished job
    and resumes an interrupted one; then `train` runs the job.
    """
    start_torch()
    settings = job_settings(cfg)
    # One process per run folder (each job's own folder in a multirun).
    lock = folder_lock(settings.job_dir, "paths.output_dir")
    with user_errors(), lock, sweep_job(settings) as job:
        if not job.skip:
            if job.resume_from is not None:
                with open_dict(cfg):
                    cfg.ckpt_path = str(job.resume_from)
            job.value = selected_metric(cfg, train(cfg))
    return job.value


def main() -> None:
    """``fpo-train``: Hydra, with config errors as user errors (exit 2)."""
    run_hydra(hydra_main)


if __name__ == "__main__":
    main()
