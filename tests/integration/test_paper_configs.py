"""The paper's Gemma-2-2B / UltraFeedback experiments, composed as a GPU user would and run
end to end with a tiny stand-in of the same architecture (no download)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from fpo.commands.common import CONFIG_DIR
from fpo.commands.train import train

PAPER = {
    "dpo": {"beta": 0.1},
    "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5},
    "tdpo1": {"beta": 0.1, "constraints.token_kl.alpha": 1.0},
    "tdpo2": {"beta": 0.1, "constraints.token_kl.alpha": 0.5},
    "fpo": {"beta": 0.1, "constraints.features.alpha": 0.5, "constraints.features.k": 50},
}


#: What each objective adds to ``experiment=gemma2_2b_ultrafeedback objective=<name>``: FPO's
#: online reference keeps the policy's dtype (a bf16 copy is refused for the feature term).
PAPER_OVERRIDES = {"fpo": ("reference.dtype=null",)}


def paper_overrides(objective: str) -> list[str]:
    """The command line of the paper's setting with ``objective``."""
    extra = PAPER_OVERRIDES.get(objective, ())
    return ["experiment=gemma2_2b_ultrafeedback", f"objective={objective}", *extra]


def compose_paper(objective: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*paper_overrides(objective), *overrides])


@pytest.mark.parametrize("objective", list(PAPER))
def test_paper_hyperparameters(objective):
    cfg = compose_paper(objective)
    assert cfg.objective.name == objective
    for key, value in PAPER[objective].items():
        assert OmegaConf.select(cfg.objective, key) == value, key
    assert cfg.model.loader.name_or_path == "google/gemma-2-2b"
    assert cfg.model.gradient_checkpointing is True
    assert (cfg.sae.loader.release, cfg.sae.loader.sae_id) == (
        "gemma-scope-2b-pt-res",
        "layer_25/width_16k/average_l0_55",
    )
    assert cfg.data.train_source == "HuggingFaceH4/ultrafeedback_binarized"
    assert (cfg.data.train_split, cfg.data.val_split) == ("train_prefs", "test_prefs")
    assert cfg.step.global_batch_size == 32
    assert math.isclose(cfg.optimizer.lr, 5e-7)
    assert cfg.scheduler._target_.endswith("get_constant_schedule_with_warmup")
    assert cfg.scheduler.num_warmup_steps == 150
    assert cfg.trainer.max_epochs == 1
    assert cfg.trainer.precision == "bf16-mixed"


def tiny_stand_in(cfg, tmp_path):
    """Swap the hub model, SAE and data for local stand-ins; keep everything else (the
    model's dtype and the trainer's precision included)."""
    with open_dict(cfg):
        cfg.model.loader = {
            "_target_": "fpo.models.tiny.load_tiny",
            "architecture": "gemma2",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "dtype": cfg.model.loader.dtype,
        }
        cfg.sae.loader = {
            "_target_": "fpo.sae.build_random_sae",
            "d_in": 32,
            "d_sae": 64,
            "k": 8,
            "architecture": "jumprelu",
            "hook_name": "blocks.1.hook_resid_post",
        }
        fixture = f"{cfg.paths.files_dir}/tests/fixtures/ultrafeedback_binarized.jsonl"
        cfg.data.train_source = cfg.data.val_source = fixture
        cfg.data.train_split = cfg.data.val_split = "train"
        cfg.data.max_val_samples = 4
        cfg.data.num_workers = 0
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.max_steps = 1
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.val_check_interval = 1.0
        cfg.logger = {}
        cfg.callbacks = {}
        cfg.paths.output_dir = str(tmp_path)
        # The paper's 5e-7 after 150 warm-up steps (lr 0 at step 0) would not move it.
        cfg.optimizer.lr = 1e-3
        cfg.scheduler.num_warmup_steps = 0
        cfg.objective.constraints.features.k = 16
        cfg.step.global_batch_size = 8  # 2 per step x 4 accumulation on one device
    return cfg


def spy_on_tiny_loader(monkeypatch) -> dict:
    """``{"model", "before"}``: the tiny model the next run builds and its initial weights."""
    from fpo.models import tiny

    built = {}
    original = tiny.load_tiny

    def spy(**kwargs):
        model, tokenizer = original(**kwargs)
        built["model"], built["before"] = model, copy.deepcopy(model.state_dict())
        return model, tokenizer

    monkeypatch.setattr(tiny, "load_tiny", spy)
    return built


@pytest.mark.parametrize("objective", list(PAPER))
def test_paper_experiment_runs_with_tiny_stand_in(objective, tmp_path, monkeypatch):
    built = spy_on_tiny_loader(monkeypatch)
    cfg = tiny_stand_in(compose_paper(objective), tmp_path)
    OmegaConf.resolve(cfg)
    metrics = train(cfg)
    model = built["model"]
    assert type(model).__name__ == "Gemma2ForCausalLM"
    assert model.is_gradient_checkpointing
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, built["before"][k])]
    assert moved, "one optimizer step must change the policy"
    assert math.isfinite(metrics["train/loss"])
    assert (tmp_path / "metrics.json").exists()


def first_update(cfg, monkeypatch) -> dict[str, torch.Tensor]:
    """The change of every policy tensor after one optimizer step of ``cfg``."""
    built = spy_on_tiny_loader(monkeypatch)
    OmegaConf.resolve(cfg)
    train(cfg)
    after = built["model"].state_dict()
    return {k: (after[k].float() - v.float()) for k, v in built["before"].items()}


@pytest.mark.parametrize(
    "experiment",
    [("experiment=gemma2_2b_ultrafeedback", "objective=dpo"), ("experiment=sentiment_gemma3",)],
    ids=["gemma2_2b_ultrafeedback-dpo", "sentiment_gemma3"],
)
def test_updates_at_the_paper_learning_rate_reach_the_weights(experiment, tmp_path, monkeypatch):
    """fp32 master weights: one AdamW step at lr 5e-7 under the experiment's own precision
    and model dtype (bf16-mixed for the paper, on the CPU here) moves the weights like the
    same step in full fp32. A bf16 parameter would keep most of them unchanged."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(experiment))
    if experiment == ("experiment=sentiment_gemma3",):  # its settings, the tiny model
        with open_dict(cfg):
            cfg.objective = compose_paper("dpo").objective
            cfg.reference = {"source": "online"}
            cfg.evaluation = None
            cfg.step.global_batch_size = None
    cfg = tiny_stand_in(cfg, tmp_path)
    cfg.data.format, cfg.data.chat_template = "ultrafeedback", "auto"  # the fixture's rows
    cfg.optimizer.lr = 5e-7
    fp32 = copy.deepcopy(cfg)
    fp32.trainer.precision = "32-true"
    fp32.model.loader.dtype = "float32"
    fp32.paths.output_dir = str(tmp_path / "fp32")
    (tmp_path / "fp32").mkdir()
    update = first_update(cfg, monkeypatch)
    reference_update = first_update(fp32, monkeypatch)
    moved = sum(int((u != 0).sum()) for u in update.values())
    moved_fp32 = sum(int((u != 0).sum()) for u in reference_update.values())
    # (Embedding rows of tokens absent from the batch get no gradient in either run.)
    assert moved > 0.95 * moved_fp32, f"{moved} weights moved, {moved_fp32} in fp32"
    for name, u in update.items():
        if reference_update[name].abs().sum() > 0:
            cosine = torch.nn.functional.cosine_similarity(
                u.flatten(), reference_update[name].flatten(), dim=0
            )
            assert cosine > 0.9, f"{name}: update direction differs from fp32 ({cosine:.3f})"
