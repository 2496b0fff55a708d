"""Faults in process: damaged checkpoints, a full disk, non-finite losses and gradients."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import lightning as L
import pytest
import torch

import fpo.atomic
import fpo.checkpoints
from fpo.builder import build_run_parts
from fpo.checkpoints import AtomicCheckpointIO, LastCheckpoint
from fpo.errors import UserError
from fpo.nonfinite import NonFiniteError
from fpo.reference.build import atomic_write
from fpo.reference.store import ReferenceCache
from fpo.testing import compose_train

BAD_STEP = 2  # 0-based: the third optimizer step gets a non-finite value


def fit(tmp_path: Path, *overrides: str, max_steps: int = 4, ckpt_path=None, poison=None):
    """Train the smoke setup in process; last.ckpt after every step. Returns the module."""
    cfg = compose_train("experiment=smoke", f"paths.output_dir={tmp_path}", *overrides)
    L.seed_everything(0)
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    if poison:
        poison(module)
    trainer = experiment.build_trainer(
        callbacks=[LastCheckpoint(str(tmp_path / "checkpoints"), every_n_train_steps=1)],
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=experiment.datamodule, ckpt_path=ckpt_path)
    return module


def policy_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A last.ckpt after two steps."""
    out = tmp_path_factory.mktemp("trained")
    fit(out, max_steps=2)
    return out / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------- strict checkpoint loading


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("drop", "missing policy weights (1): policy.model.norm.weight"),
        (
            "rename",
            "missing policy weights (1): policy.model.norm.weight; "
            "unknown weights (1): policy.model.norm.wieght",
        ),
        ("reshape", "wrong shapes (1): policy.model.norm.weight (3,)"),
    ],
)
def test_resume_refuses_a_checkpoint_without_every_policy_weight(
    trained, tmp_path, damage, expected
):
    ckpt = torch.load(trained, weights_only=True)
    state = ckpt["state_dict"]
    assert not any(k.startswith(("reference.", "sae.")) for k in state)  # stripped
    weight = state.pop("policy.model.norm.weight")
    if damage == "rename":
        state["policy.model.norm.wieght"] = weight
    if damage == "reshape":
        state["policy.model.norm.weight"] = weight[:3]
    torch.save(ckpt, tmp_path / "damaged.ckpt")
    with pytest.raises(UserError, match="does not fit this model") as err:
        fit(tmp_path, max_steps=3, ckpt_path=str(tmp_path / "damaged.ckpt"))
    assert expected in str(err.value)


def test_resume_from_an_intact_checkpoint_loads(trained, tmp_path):
    module = fit(tmp_path, max_steps=3, ckpt_path=str(trained))
    assert module.global_step == 3


def test_truncated_or_pickled_checkpoints_are_refused(trained, tmp_path):
    data = trained.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"could not read the checkpoint .*truncated"):
        fit(tmp_path, max_steps=3, ckpt_path=str(tmp_path / "truncated.ckpt"))
    # code in a pickle (here a harmless class) is not executed: weights_only=True
    torch.save({"state_dict": {}, "payload": Path("x")}, tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="Weights only load failed"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="checkpoint not found"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "absent.ckpt")


# ---------------------------------------------------------------- a full disk


def full_disk_after(nbytes: int):
    def save(obj, f, *args, **kwargs):
        f.write(b"x" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(
    trained, tmp_path, monkeypatch
):
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    target.write_bytes(trained.read_bytes())
    monkeypatch.setattr(fpo.checkpoints.torch, "save", full_disk_after(1000))
    with pytest.raises(UserError, match=r"could not write .*last\.ckpt: the disk is full"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert target.read_bytes() == trained.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_full_disk_while_writing_a_cache_shard_leaves_no_partial_file(tmp_path, monkeypatch):
    real_fsync = fpo.atomic.os.fsync

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fpo.atomic.os, "fsync", fsync)
    shard = tmp_path / "shards" / "rank0-00000.arrow"
    shard.parent.mkdir()
    with pytest.raises(UserError, match="the disk is full"):
        atomic_write(shard, b"arrow bytes")
    monkeypatch.setattr(fpo.atomic.os, "fsync", real_fsync)
    assert list(shard.parent.iterdir()) == []
    with pytest.raises(UserError, match="incomplete"):
        ReferenceCache.open(tmp_path)


# ---------------------------------------------------------------- non-finite values


def nan_loss_at(step: int):
    def poison(module):
        real = module.preference_step

        def step_fn(batch):
            result, stats = real(batch)
            if module.training and module.global_step == step:
                result = result._replace(losses=result.losses * math.nan)
            return result, stats

        module.preference_step = step_fn

    return poison


def nan_grad_at(step: int):
    def poison(module):
        weight = module.policy.get_input_embeddings().weight
        weight.register_hook(lambda g: g * math.inf if module.global_step == step else g)

    return poison


@pytest.mark.parametrize(
    ("poison", "expected"),
    [(nan_loss_at, "the train loss is nan"), (nan_grad_at, "non-finite gradient")],
)
def test_nonfinite_stops_naming_step_and_examples_keeping_the_last_good_checkpoint(
    tmp_path, poison, expected
):
    with pytest.raises(NonFiniteError) as err:
        fit(tmp_path, poison=poison(BAD_STEP))
    message = str(err.value)
    assert expected in message and f"optimizer step {BAD_STEP + 1}" in message
    assert "examples ['" in message and "step.nonfinite=skip" in message
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == BAD_STEP
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class Snapshots(L.Callback):
    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = policy_state(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = policy_state(module)


@pytest.mark.parametrize("poison", [nan_loss_at, nan_grad_at])
def test_nonfinite_skip_drops_the_step_counts_and_logs_it(tmp_path, poison):
    snapshots = Snapshots()
    cfg = compose_train("experiment=smoke", f"paths.output_dir={tmp_path}", "step.nonfinite=skip")
    L.seed_everything(0)
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    poison(BAD_STEP)(module)
    trainer = experiment.build_trainer(
        callbacks=[snapshots], max_steps=4, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=experiment.datamodule)
    assert module.nonfinite.skipped == 1
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0
    for step in range(4):
        changed = any(
            not torch.equal(snapshots.before[step][k], snapshots.after[step][k])
            for k in snapshots.before[step]
        )
        assert changed == (step != BAD_STEP), step
    assert all(torch.isfinite(v).all() for v in policy_state(module).values())
    # Pinned (docs/reliability.md): the skipped step still advances the learning-rate
    # schedule and global_step, as a GradScaler's skipped step does.
    assert trainer.global_step == 4
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_unknown_nonfinite_mode_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"step\.nonfinite='ignore': choose stop or skip"):
        fit(tmp_path, "step.nonfinite=ignore")
