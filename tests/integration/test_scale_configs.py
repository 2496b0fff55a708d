"""Every experiment, search, strategy and launcher config composes; strategies instantiate
where their library is installed; every swept key exists (no hub, no GPU needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from fpo.commands.common import CONFIG_DIR
from fpo.errors import UserError
from fpo.objective import build_objective
from fpo.strategies import is_decoder_layer

CONFIGS = Path(CONFIG_DIR)
EXPERIMENTS = sorted(
    str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
    for p in (CONFIGS / "experiment").rglob("*.yaml")
)
SEARCHES = sorted(
    p.stem for p in (CONFIGS / "hparams_search").glob("*.yaml") if not p.stem.startswith("_")
)
OPTUNA = {"fpo_optuna": "fpo", "dpo_optuna": "dpo", "simpo_optuna": "simpo", "tdpo_optuna": "tdpo2"}
TRAINERS = sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml"))
LAUNCHERS = sorted(p.stem for p in (CONFIGS / "hydra" / "launcher").glob("*.yaml"))
GROUPS = {p.name for p in CONFIGS.iterdir() if p.is_dir()}


def compose_train(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


def check_sweep_params(cfg, overrides: tuple[str, ...]) -> None:
    """Each swept key names a config group option that composes, or an existing key."""
    for key, values in (cfg.hydra.sweeper.params or {}).items():
        if key in GROUPS:
            for option in str(values).split(","):
                compose_train(*overrides, f"{key}={option.strip()}")
        else:
            assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key


def test_the_new_configs_are_all_listed():
    assert {"ablation/alpha_stopgrad", "ablation/sae_layer", "gemma2_9b_ultrafeedback"} <= set(
        EXPERIMENTS
    )
    assert set(OPTUNA) <= set(SEARCHES)
    assert {"ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= set(TRAINERS)
    assert {"parallel", "slurm"} <= set(LAUNCHERS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_its_sweep_keys_exist(experiment):
    cfg = compose_train(f"experiment={experiment}", hydra=True)
    OmegaConf.to_container(cfg.objective, resolve=True)
    OmegaConf.to_container(cfg.sae, resolve=True)
    assert cfg.trainer._target_.endswith("Trainer")
    check_sweep_params(cfg, (f"experiment={experiment}",))


@pytest.mark.parametrize("search", SEARCHES)
def test_every_search_composes_and_its_keys_exist(search):
    overrides = ("experiment=smoke", f"hparams_search={search}")
    check_sweep_params(compose_train(*overrides, hydra=True), overrides)


@pytest.mark.parametrize("search", sorted(OPTUNA))
@pytest.mark.parametrize("experiment", ["smoke", "sentiment_gemma3"])
def test_every_optuna_search_composes_on_a_validation_metric(search, experiment):
    overrides = (f"experiment={experiment}", f"hparams_search={search}")
    cfg = compose_train(*overrides, hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric.startswith("val/")
    assert cfg.hydra.sweeper.storage.startswith("sqlite:///")
    assert cfg.hydra.sweeper.storage.endswith("/optuna.sqlite")
    check_sweep_params(cfg, overrides)
    assert cfg.objective.name == OPTUNA[search]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_launcher_composes_and_its_plugin_is_installed(launcher):
    cfg = compose_train(f"hydra/launcher={launcher}", hydra=True)
    get_class(cfg.hydra.launcher._target_)
    OmegaConf.to_container(cfg.hydra.launcher, resolve=False)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_composes(trainer):
    cfg = compose_train(f"trainer={trainer}")
    assert cfg.trainer._target_.endswith("Trainer")
    if trainer in ("gpu", "ddp", "fsdp") or trainer.startswith("deepspeed"):
        assert cfg.trainer.precision == "bf16-mixed"


def test_fsdp_strategy_instantiates_and_wraps_decoder_layers(tiny_model):
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = instantiate(compose_train("trainer=fsdp").trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] is True
    wrapped = [n for n, m in tiny_model.named_modules() if is_decoder_layer(m)]
    assert wrapped == [f"model.layers.{i}" for i in range(len(tiny_model.model.layers))]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_strategy(stage):
    cfg = compose_train(f"trainer=deepspeed_zero{stage}")
    assert cfg.trainer.strategy.stage == stage
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(InstantiationException, match="pip install deepspeed") as error:
            instantiate(cfg.trainer.strategy)
        assert isinstance(error.value.__cause__, UserError)  # fpo-train: one paragraph, exit 2
        pytest.skip("deepspeed is not installed here: composed, and the error is clear")
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy.config["zero_optimization"]["stage"] == stage


def test_gemma_scope_sae_ids_are_in_the_sae_lens_registry():
    """Offline: the release and sae_id of every hub SAE config is in sae-lens's registry."""
    registry_file = Path(importlib.util.find_spec("sae_lens").origin).parent
    registry = yaml.safe_load((registry_file / "pretrained_saes.yaml").read_text())
    hub_saes = [p for p in (CONFIGS / "sae").glob("*.yaml") if "release:" in p.read_text()]
    assert {p.stem for p in hub_saes} >= {
        "gemma_scope_2b_l25",
        "gemma_scope_9b_l41",
        "gemma_scope_2_270m_l5",
        "gemma_scope_2_270m_l15",
    }
    for path in hub_saes:
        sae = compose_train(f"sae={path.stem}").sae
        ids = {entry["id"] for entry in registry[sae.loader.release]["saes"]}
        assert sae.loader.sae_id in ids, (path.name, sae.loader.sae_id)


def test_paper_9b_setting():
    cfg = compose_train("experiment=gemma2_9b_ultrafeedback", "objective=fpo")
    assert cfg.model.loader.name_or_path == "google/gemma-2-9b"
    assert cfg.model.loader.dtype == "float32"  # fp32 master weights under bf16-mixed
    assert cfg.model.gradient_checkpointing is True
    assert (cfg.sae.loader.release, cfg.sae.loader.sae_id) == (
        "gemma-scope-9b-pt-res",
        "layer_41/width_16k/average_l0_52",
    )
    assert cfg.trainer.strategy._target_ == "fpo.strategies.fsdp"
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.objective.name == "fpo" and cfg.step.global_batch_size == 32
    assert cfg.reference.dtype is None  # FSDP: one dtype; FPO: the policy's


def test_every_local_sae_config_has_its_shipped_folder_and_card():
    local = [p for p in (CONFIGS / "sae").glob("*.yaml") if "path:" in p.read_text()]
    assert len(local) >= 3  # layer 17 (the main job's) and the ablation layers
    for path in local:
        folder = Path(
            compose_train(
                f"sae={path.stem}", "paths.root_dir=" + str(CONFIGS.parent)
            ).sae.loader.path
        )
        assert (folder / "cfg.json").exists(), path.name
        card = (folder / "SAE_CARD.md").read_text()
        assert "\nfpo-make-sae --" in card, path.name  # the remake command
        assert (folder / "sae_weights.safetensors").stat().st_size < 11 * 2**20, path.name


def test_fsdp_clips_by_the_sharded_roots_norm(monkeypatch):
    """Under FSDP the module clips with the root's ``clip_grad_norm_`` (all shards), not
    through Lightning's FSDP precision plugin, which refuses ``'norm'``; other strategies
    keep Lightning's clipping."""
    from types import SimpleNamespace

    import lightning as L
    from torch.distributed.fsdp import FullyShardedDataParallel

    from fpo.module import FPOLightningModule

    class Root(FullyShardedDataParallel):
        def __init__(self):  # no process group needed to be recognised
            self.calls = []

        def clip_grad_norm_(self, max_norm, norm_type=2.0):
            self.calls.append(max_norm)

    lightning_calls = []
    monkeypatch.setattr(
        L.LightningModule,
        "configure_gradient_clipping",
        lambda self, *args: lightning_calls.append(args),
    )
    module = object.__new__(FPOLightningModule)
    root = Root()
    module.__dict__["_trainer"] = SimpleNamespace(strategy=SimpleNamespace(model=root))
    module.configure_gradient_clipping(None, 1.0, "norm")
    assert root.calls == [1.0] and lightning_calls == []
    module.__dict__["_trainer"] = SimpleNamespace(strategy=SimpleNamespace(model=object()))
    module.configure_gradient_clipping(None, 1.0, "norm")
    assert root.calls == [1.0] and len(lightning_calls) == 1


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (("objective=fpo",), "spurious D"),
        (("objective=dpo", "trainer=fsdp"), "FSDP"),
        (("objective=dpo",), None),
        (("objective=fpo", "reference.dtype=float32"), None),
    ],
)
def test_reference_dtype_is_refused_where_it_is_wrong(overrides, refused):
    """A bf16 reference copy of an fp32 policy: refused for FPO's feature term (spurious D
    at step 0) and under FSDP (one dtype per flat parameter); allowed for DPO (memory)."""
    from fpo.builder import build_run_parts

    cfg = compose_train(
        "experiment=smoke", "reference=online", "reference.dtype=bfloat16", *overrides
    )
    experiment = build_run_parts(cfg)
    if refused:
        with pytest.raises(UserError, match=rf"reference.dtype=\w+ .*{refused}"):
            experiment.build_reference()
    else:
        reference = experiment.build_reference()
        wanted = getattr(torch, cfg.reference.dtype)
        assert next(reference.model.parameters()).dtype == wanted


@pytest.mark.parametrize(
    ("objective", "alpha"),
    [("fpo", 1e-4), ("dpo", 0.0), ("simpo", 0.0), ("tdpo1", 0.0), ("tdpo2", 0.0)],
)
def test_the_embedded_default_gives_only_fpo_the_feature_term(objective, alpha):
    """FPO's alpha is the SAE config's feature_alpha (1e-4 for the shipped gemma-3-270m SAE of
    experiment=sentiment_gemma3); the baselines composed with it stay baselines (no feature
    term slipped in)."""
    cfg = compose_train("experiment=sentiment_gemma3", f"objective={objective}")
    assert cfg.objective.constraints.features.alpha == alpha
    assert compose_train("objective=fpo").objective.constraints.features.alpha == 0.5
    # what training uses (fpo.builder builds it from the objective node): the
    # ${sae.feature_alpha} interpolation resolved against the whole config
    assert build_objective(cfg.objective).constraints.features.alpha == alpha
    comparison = compose_train("experiment=comparison/frontier_fpo")
    assert build_objective(comparison.objective).constraints.features.alpha == 1e-4
