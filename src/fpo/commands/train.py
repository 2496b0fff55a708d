"""``fpo-train``: compose the Hydra config, build everything, fit, return the metric."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from fpo.builder import RunParts, build_run_parts
from fpo.checkpoints import resolve_ckpt_path
from fpo.commands.common import CONFIG_DIR, run_hydra, user_errors
from fpo.errors import UserError
from fpo.policy_io import POLICY_DIR, save_policy, should_save_policy
from fpo.settings_check import check_settings
from fpo.sweep import run_job

log = logging.getLogger("fpo.train")


def evaluate(experiment: RunParts, loggers: list, device: torch.device) -> dict[str, float]:
    """Evaluate the trained policy against a fresh load of the initial weights, on the
    training ``device`` (the code ``fpo-eval`` runs too:
    `fpo.evaluation.after_fit.evaluate_experiment`)."""
    from fpo.evaluation.after_fit import evaluate_experiment

    return evaluate_experiment(experiment, experiment.policy, loggers, device=device)


def reset_peak_memory() -> None:
    """Start this run's peak-memory count afresh: the jobs of a Hydra multirun share one
    process, whose peak RSS would otherwise carry over from the jobs before (Linux:
    ``/proc/self/clear_refs`` 5 resets ``VmHWM``)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):  # not Linux: ru_maxrss, the process's peak
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb() -> float:
    """Peak memory since `reset_peak_memory`: CUDA max allocated on a GPU, else the peak RSS
    (``VmHWM`` on Linux, the process's ``ru_maxrss`` elsewhere)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit one run; returns the final callback metrics as floats (also in metrics.json)."""
    check_settings(cfg)  # before seeding (seed) and resolving ckpt_path
    started = time.perf_counter()
    reset_peak_memory()
    ckpt_path = resolve_ckpt_path(cfg)  # ckpt_path=last: this config's newest last.ckpt
    L.seed_everything(cfg.seed, workers=True)
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    loggers = experiment.build_loggers()
    trainer = experiment.build_trainer(loggers)
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    fit_started, fit_cpu_started = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=experiment.datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["run/fit_seconds"] = time.perf_counter() - fit_started
    # CPU time of this process (all its threads): unlike wall time, barely moved by other
    # jobs on a shared machine; compare it between runs on the same thread count.
    metrics["run/fit_cpu_seconds"] = time.process_time() - fit_cpu_started
    metrics["run/peak_memory_gb"] = peak_memory_gb()
    if trainer.is_global_zero and should_save_policy(cfg):
        save_policy(
            experiment.policy, experiment.tokenizer, Path(cfg.paths.output_dir) / POLICY_DIR
        )
    if cfg.get("evaluation") and trainer.is_global_zero:
        metrics.update(evaluate(experiment, loggers, trainer.strategy.root_device))
    metrics["run/wall_seconds"] = time.perf_counter() - started
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("final metrics written to %s", output_dir / "metrics.json")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen reference and SAE stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    torch.set_float32_matmul_precision("high")
    with user_errors():
        # In multirun mode: status per job, skip finished / resume interrupted (fpo.sweep).
        return run_job(cfg, train_and_select)


def train_and_select(cfg: DictConfig) -> float | None:
    """Train; return the value of ``cfg.optimized_metric``."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if name and name not in metrics:
        raise UserError(
            f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}."
        )
    return metrics.get(name) if name else None


def main() -> None:
    """``fpo-train``: Hydra, with config errors as user errors (exit 2)."""
    run_hydra(hydra_main)


if __name__ == "__main__":
    main()
