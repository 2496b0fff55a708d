"""Checkpoints a run can trust: atomic writes, safe loads, ``ckpt_path=last``, strict weights.

* :class:`AtomicCheckpointIO` (every trainer built by ``fpo.builder`` uses it) writes a
  checkpoint to a temporary name in the same folder, fsyncs it and renames it over the
  target, so a kill or a full disk never leaves a truncated ``last.ckpt``: the previous one
  stays. It loads with ``torch.load(weights_only=True)`` (no pickled code).
* :func:`resolve_ckpt_path` turns ``ckpt_path=last`` into the run folder's own
  ``last.ckpt`` or else the newest ``last.ckpt`` of an earlier run of the same config (or
  says why there is none); a path must exist.
* :func:`check_policy_state` compares a checkpoint's weights with the module's: every policy
  weight present with its shape, nothing unknown. Only the frozen reference and SAE, which
  ``FPOLightningModule.on_save_checkpoint`` strips, may be absent.
* :func:`rng_states` / :func:`restore_rng_states`: the global RNGs (torch, CUDA, numpy,
  Python) as plain values, stored in every checkpoint.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf

from fpo.atomic import atomic_save_bytes
from fpo.errors import UserError

log = logging.getLogger("fpo.checkpoints")

#: Keys that may differ between a run and the run that resumes it (``ckpt_path=last``).
RESUME_IGNORED_KEYS = (
    "ckpt_path",
    "callbacks",
    "logger",
    "tags",
    "evaluation",
    "trainer.max_epochs",
    "trainer.max_steps",
)
#: Frozen parts that checkpoints leave out (module attribute prefixes).
FROZEN_PREFIXES = ("reference.", "sae.")


def plain_containers(value: Any) -> Any:
    """``value`` with every OmegaConf container in it (at any depth) as plain dicts and lists.

    Hyperparameters instantiated from a Hydra config (``data.columns``, ``data.load_kwargs``)
    arrive as ``DictConfig``; pickled as such, the checkpoint could not be loaded with
    ``weights_only=True`` and a run could not resume from it.
    """
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        items = {k: plain_containers(v) for k, v in value.items()}
        if any(items[k] is not v for k, v in value.items()):
            value = copy.copy(value)  # the same dict type (Lightning's AttributeDict...)
            value.update(items)
    elif isinstance(value, list):
        items = [plain_containers(v) for v in value]
        if any(a is not b for a, b in zip(items, value, strict=True)):
            value = items
    return value


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, written atomically in place and loaded weights-only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        plain = plain_containers(checkpoint)
        atomic_save_bytes(Path(path), lambda f: torch.save(plain, f))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: Any = None):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path}")
        try:
            return torch.load(
                path,
                map_location=map_location or (lambda storage, loc: storage),
                weights_only=True,
            )
        except Exception as err:
            raise UserError(
                f"could not read the checkpoint {path} ({type(err).__name__}: {err}); it may be "
                "truncated or not a Lightning checkpoint written by fpo-train."
            ) from err


# ------------------------------------------------------------------ ckpt_path=last


def _comparable(config: Mapping) -> dict[str, Any]:
    """``{dotted key: value}`` of ``config``, interpolations left as written."""
    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return {
        k: v
        for k, v in flat.items()
        if not any(k == i or k.startswith(f"{i}.") for i in RESUME_IGNORED_KEYS)
    }


def config_differences(a: Mapping, b: Mapping) -> list[str]:
    """Dotted keys whose values differ (the keys in ``RESUME_IGNORED_KEYS`` ignored)."""
    fa, fb = _comparable(a), _comparable(b)
    keys = fa.keys() | fb.keys()
    return sorted(k for k in keys if fa.get(k, "<absent>") != fb.get(k, "<absent>"))


def last_checkpoints(root: Path) -> Iterable[Path]:
    """Every ``checkpoints/last.ckpt`` of a run under ``root`` (runs and multirun jobs)."""
    return root.glob("**/checkpoints/last.ckpt") if root.is_dir() else []


def find_last_checkpoint(config: Mapping, runs_root: Path) -> Path:
    """The newest ``last.ckpt`` under ``runs_root`` (``<paths.log_dir>/<task_name>``) whose
    run's saved config (``.hydra/config.yaml``) equals ``config`` (the run's composed
    config as a mapping, interpolations unresolved) up to ``RESUME_IGNORED_KEYS``."""
    matches, near = [], []
    for ckpt in last_checkpoints(runs_root):
        saved = ckpt.parent.parent / ".hydra" / "config.yaml"
        if not saved.is_file():
            continue
        diff = config_differences(config, OmegaConf.load(saved))
        (near if diff else matches).append((ckpt.stat().st_mtime, ckpt, diff))
    if matches:
        return max(matches)[1]
    hint = ""
    if near:
        _, ckpt, diff = max(near)
        hint = (
            f" The newest other run, {ckpt.parent.parent}, differs in {', '.join(diff[:8])}"
            f"{' ...' if len(diff) > 8 else ''}."
        )
    raise UserError(
        f"ckpt_path=last: no last.ckpt of an earlier run with this config under {runs_root}."
        f"{hint} Rerun the exact command of the interrupted run plus ckpt_path=last, pass "
        "ckpt_path=<file.ckpt>, or drop ckpt_path to start from scratch."
    )


def resolve_ckpt_path(
    value: str | None, config: Mapping, runs_root: Path, own_dir: Path | None = None
) -> str | None:
    """``ckpt_path`` ``value`` as a file to resume from: ``None`` (start fresh), ``last``
    or a path that must exist. ``last`` is the run's own ``<own_dir>/checkpoints/last.ckpt``
    when there is one (a run restarted in its folder, e.g. with ``hydra.run.dir=<dir>``),
    else :func:`find_last_checkpoint` of ``config`` under ``runs_root``."""
    if value in (None, ""):
        return None
    if str(value) == "last":
        own = own_dir / "checkpoints" / "last.ckpt" if own_dir is not None else None
        path = own if own is not None and own.is_file() else None
        path = path or find_last_checkpoint(config, runs_root)
        log.info("ckpt_path=last: resuming from %s", path)
        return str(path)
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt_path={value}: no such checkpoint file.")
    return str(path)


# ------------------------------------------------------------------ weights


def check_policy_state(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose weights do not fit the module (``expected``: its state dict).

    Every key of ``expected`` except the frozen reference and SAE must be in ``loaded`` with
    the same shape, and ``loaded`` may hold no other key.
    """
    required = {k for k in expected if not k.startswith(FROZEN_PREFIXES)}
    missing = sorted(required - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    shapes = sorted(
        f"{k} {tuple(loaded[k].shape)} (the model has {tuple(expected[k].shape)})"
        for k in required & loaded.keys()
        if tuple(loaded[k].shape) != tuple(expected[k].shape)
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (
            ("missing policy weights", missing),
            ("unknown weights", unexpected),
            ("wrong shapes", shapes),
        )
        if keys
    ]
    if problems:
        raise UserError(
            "the checkpoint does not fit this model: "
            + "; ".join(problems)
            + ". It was saved for another model config or is damaged; resume with the "
            "config of the run that wrote it, or start without ckpt_path."
        )


# ------------------------------------------------------------------ RNG states


def rng_states() -> dict[str, Any]:
    """torch (CPU, CUDA), numpy and Python RNG states as tensors and plain values."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


# ------------------------------------------------------------------ the callback


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``: the full training state (weights, optimizer, scheduler, loop
    and data positions, RNG), replaced atomically every ``every_n_train_steps`` optimizer
    steps, once more when training ends, and after the step in which a SIGTERM came (see
    `fpo.interrupts`). ``ckpt_path=last`` resumes from it.

    The one written when training ends also holds the run's final metrics (the trainer's
    ``callback_metrics``, under ``FINAL_METRICS``): a run killed after training (during the
    evaluation, say) and resumed from it has nothing left to train, and gets them back.
    When ``trainer.max_steps`` ended training in the middle of an epoch, it records that
    epoch as unfinished (Lightning counts it as done): a resume with a larger ``max_steps``
    goes on with the epoch's next batch, as an uninterrupted run would.
    """

    FINAL_METRICS = "fpo_final_metrics"

    def __init__(self, dirpath: str, every_n_train_steps: int = 100) -> None:
        if int(every_n_train_steps) < 1:
            raise UserError(
                f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps}: must be >= 1"
            )
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=int(every_n_train_steps),
            enable_version_counter=False,
        )

    _final_metrics: dict[str, torch.Tensor] | None = None
    _cut_epoch = False  # saving at the end of training, which max_steps cut mid-epoch

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        # SIGTERM (or Ctrl-C, fpo.interrupts): Lightning stops after this step; save it
        # here, where the periodic saves happen, so that a resume continues exactly.
        if trainer.received_sigterm and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # Always (also when the last step was just saved): after the last validation.
        self._final_metrics = dict(trainer.callback_metrics)
        loop = trainer.fit_loop
        self._cut_epoch = 0 <= loop.max_steps <= trainer.global_step and not (
            loop.epoch_loop.batch_progress.is_last_batch
        )
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._cut_epoch = False
        super().on_train_end(trainer, pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # Resumed from a finished run's last.ckpt, Lightning skips the fit loop (and
        # on_train_end) and has logged nothing: the metrics are the checkpoint's.
        for name, value in (self._final_metrics or {}).items():
            trainer.callback_metrics.setdefault(name, value)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        if self._cut_epoch:  # the state after the epoch's last step, before its end
            checkpoint["epoch"] -= 1
            progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
            for counts in (progress["total"], progress["current"]):
                counts["processed"] -= 1
                counts["completed"] -= 1
        if self._final_metrics is not None:
            checkpoint[self.FINAL_METRICS] = {
                k: v.detach().cpu() if isinstance(v, torch.Tensor) else torch.tensor(v)
                for k, v in self._final_metrics.items()
            }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict) -> None:
        self._final_metrics = checkpoint.get(self.FINAL_METRICS)
