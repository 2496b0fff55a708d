"""``fpo-eval``: evaluate a finished run (its own config and final policy), or the initial
model by itself, with the code ``fpo-train`` runs after fit.

- ``run_dir=<run>``: reads ``<run>/.hydra/config.yaml``, loads the run's model and puts the
  saved final policy (``<run>/policy/``, `fpo.policy_io`) into it.
- ``ckpt_path=<file>``: the policy weights of a Lightning checkpoint; the run is the folder
  above it that has ``.hydra/config.yaml`` (or ``run_dir``).
- neither: the config composed here (like ``fpo-train``'s, e.g. ``experiment=...``); the
  policy is the initial model, evaluated against a second load of itself.

Keys given on the command line (``evaluation.num_prompts=8``, ``seed=1``, a group such as
``evaluation=smoke``) replace the run's values. Files go to ``<run>/evaluation`` (``out_dir``
to change it); scalars go to the run's loggers (``eval/*``), whose files are redirected into
that folder so the training logs are not touched.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

import fpo.objective  # noqa: F401  (registers the objective schema the configs name)
from fpo.commands.common import CONFIG_DIR, run_hydra, start_torch, user_errors
from fpo.errors import UserError
from fpo.folders import ensure_writable
from fpo.model_card import CARD_FILE, refresh_card_evaluation

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fpo.eval")
RUN_CONFIG = Path(".hydra") / "config.yaml"
OWN_KEYS = ("run_dir", "ckpt_path", "out_dir")


def find_run_dir(path: str | os.PathLike) -> Path:
    """The nearest folder at or above ``path`` that has ``.hydra/config.yaml``."""
    start = Path(path).resolve()
    for folder in [start, *start.parents]:
        if (folder / RUN_CONFIG).is_file():
            return folder
    raise UserError(f"{path}: no run folder (with {RUN_CONFIG}) at or above it; give run_dir=.")


def command_line_keys() -> list[tuple[str, bool]]:
    """``(key, deleted)`` for each key set (``key=``, ``+key=``) or deleted (``~key``) on the
    command line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [(o.key_or_group, o.is_delete()) for o in overrides]


def run_config(cfg: DictConfig, run_dir: Path, keys: list[tuple[str, bool]]) -> DictConfig:
    """The run's saved config, its output dir set to ``run_dir``, with ``keys`` from ``cfg``
    (deleted keys removed)."""
    run_cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    OmegaConf.update(run_cfg, "paths.output_dir", str(run_dir), force_add=True)
    for key, deleted in keys:
        if key in OWN_KEYS or key.startswith("hydra"):
            continue
        if deleted:
            parent, _, name = key.rpartition(".")
            node = OmegaConf.select(run_cfg, parent) if parent else run_cfg
            if node is not None and name in node:
                node.pop(name)
            continue
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None and key not in cfg:
            log.warning("%s: not a key of the composed config (a global group?); ignored", key)
            continue
        OmegaConf.update(run_cfg, key, value, force_add=True, merge=False)
    return run_cfg


def wandb_group(run_cfg: DictConfig, run_dir: Path | None) -> str:
    """The W&B group of the run's sweep (``<task>/<sweep folder>``) when the run is a
    multirun job, else ``""`` (the logger's own)."""
    if run_dir is not None and run_dir.parent.parent.name == "multiruns":
        return f"{run_cfg.task_name}/{run_dir.parent.name}"
    return ""


def evaluate(cfg: DictConfig) -> dict[str, float]:
    # Here, not at the top: --help and config errors need no model code.
    import lightning as L

    from fpo.builder import build_run_parts
    from fpo.evaluation.after_fit import evaluate_run
    from fpo.policy_io import POLICY_DIR, load_policy_weights

    run_dir = Path(cfg.run_dir).resolve() if cfg.get("run_dir") else None
    ckpt = cfg.get("ckpt_path")
    if ckpt and run_dir is None:
        run_dir = find_run_dir(Path(ckpt).parent)
    if run_dir is not None:
        if not (run_dir / RUN_CONFIG).is_file():
            raise UserError(f"run_dir={run_dir}: no {RUN_CONFIG}; give a run folder of fpo-train.")
        run_cfg = run_config(cfg, run_dir, command_line_keys())
        run_cfg.ckpt_path = None  # the run's resume setting, not ours
        weights = Path(ckpt) if ckpt else run_dir / POLICY_DIR
        if not weights.exists():
            raise UserError(
                f"{weights} does not exist: the run saved no final policy (save_policy=false, "
                "or it stopped before the end). Give ckpt_path=<a checkpoint of the run>."
            )
        out_dir = Path(cfg.out_dir or run_dir / "evaluation")
    else:
        run_cfg, weights = cfg, None
        out_dir = Path(cfg.out_dir or Path(cfg.paths.output_dir) / "evaluation")
    if not run_cfg.get("evaluation"):
        where, given = (f"the run {run_dir}", f" run_dir={run_dir}") if run_dir else ("", "")
        raise UserError(
            f"{where or 'the config'} has no evaluation block: choose one, e.g. "
            f"fpo-eval{given} evaluation=smoke (seconds, for smoke runs) or "
            "evaluation=sentiment (the sentiment task's test split)."
        )
    ensure_writable(out_dir, "out_dir")  # before any model loads
    L.seed_everything(run_cfg.seed, workers=True)
    parts = build_run_parts(run_cfg)
    if weights is not None:
        parts.policy = load_policy_weights(parts.policy, weights)
        log.info("policy weights from %s", weights)
    else:
        log.info("no run given: evaluating the initial model against itself")
    # The run's loggers, writing under out_dir; W&B: job type eval, the run's sweep group.
    loggers = parts.build_loggers(out_dir, "eval", wandb_group(run_cfg, run_dir))
    run, device = parts.evaluation_inputs(out_dir), eval_device(cfg)
    scalars = evaluate_run(parts.policy, parts.load_reference_model(), run, loggers, device)
    for logger in loggers:
        logger.finalize("success")
    finish_wandb()
    refresh_card(run_dir, weights, out_dir)
    return scalars


def refresh_card(run_dir: Path | None, weights: Path | None, out_dir: Path) -> None:
    """Give the run's model card (``<run>/policy/README.md``) this evaluation, when it is of
    the final policy and was written where the card reads it (``<run>/evaluation/``)."""
    from fpo.policy_io import POLICY_DIR

    if run_dir is None or weights != run_dir / POLICY_DIR:
        return
    if out_dir.resolve() == (run_dir / "evaluation").resolve() and refresh_card_evaluation(weights):
        log.info("model card updated with this evaluation: %s", weights / CARD_FILE)


def eval_device(cfg: DictConfig) -> torch.device:
    """``device=...`` of fpo-eval; null: the first GPU when there is one, else the CPU."""
    import torch

    name = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device={name!r}: not a torch device ({err}); e.g. cpu, cuda:0.") from None


def finish_wandb() -> None:
    """Close a W&B run this process opened (its files are complete when we return)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the main judge's win rate."""
    start_torch()
    with user_errors():
        return evaluate(cfg).get("eval/win_rate")


def quote_path_arguments(argv: list[str]) -> list[str]:
    """``run_dir=``, ``ckpt_path=``, ``out_dir=`` values as quoted Hydra strings: multirun
    folders are named ``0_objective=dpo,seed=0``, which Hydra's override grammar rejects."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in OWN_KEYS and value[:1] not in ("'", '"'):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
            arg = f"{key}={value}"
        quoted.append(arg)
    return quoted


def main() -> None:
    """``fpo-eval``: path arguments quoted (`quote_path_arguments`), then Hydra."""
    sys.argv = [sys.argv[0], *quote_path_arguments(sys.argv[1:])]
    run_hydra(hydra_main)


if __name__ == "__main__":
    main()
