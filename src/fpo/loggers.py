"""Logger factories the ``logger`` configs name: W&B with sweep groups, tags and config.

`wandb_logger` is Lightning's ``WandbLogger`` with three additions: runs of one Hydra
multirun share a group (``<task_name>/<sweep folder name>``; a single run's group is its
``task_name``), every run carries its objective and seed as tags (``objective:fpo``,
``seed:0``) and as W&B config, and the mode is passed explicitly (``offline`` unless the
config says otherwise), so no account or network is needed. A W&B run still open in this
process (the previous job of a multirun) is finished first: Lightning would otherwise log
the new job into it. `tensorboard_logger` is Lightning's ``TensorBoardLogger`` once the
optional ``tensorboard`` extra is found (else a message naming it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from fpo.extras import require


def sweep_group(task_name: str) -> str:
    """``<task_name>/<sweep folder>`` inside a Hydra multirun job, else ``task_name``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
    except (ValueError, ImportError):
        return task_name
    if hydra.mode == RunMode.MULTIRUN:
        return f"{task_name}/{Path(hydra.sweep.dir).name}"
    return task_name


def wandb_logger(
    project: str = "fpo",
    name: str | None = None,
    group: str | None = None,
    task_name: str = "train",
    tags: Sequence[str] = (),
    objective: str | None = None,
    seed: int | None = None,
    save_dir: str = ".",
    mode: str = "offline",
    log_model: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """A ``WandbLogger`` (module docstring); ``group=None`` means `sweep_group`."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    labels = [*tags]
    if objective is not None:
        labels.append(f"objective:{objective}")
    if seed is not None:
        labels.append(f"seed:{seed}")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    config = {"objective": objective, "seed": seed, **kwargs.pop("config", {})}
    return WandbLogger(
        project=project,
        name=name,
        group=group or sweep_group(task_name),
        tags=list(dict.fromkeys(str(label) for label in labels)),
        save_dir=save_dir,
        log_model=log_model,
        mode=mode,
        config=config,
        **kwargs,
    )


def tensorboard_logger(**kwargs: Any) -> TensorBoardLogger:
    """A ``TensorBoardLogger(**kwargs)``; a `UserError` naming the ``tensorboard`` extra when
    it is not installed."""
    require("tensorboard")
    return TensorBoardLogger(**kwargs)
