"""SAE hook sites: ``blocks.L.hook_mlp_out`` reads what layer L's MLP adds to the residual
stream (not the residual stream itself) in the SAE-training collector, in training and in
evaluation, and the residual-vs-MLP-output ablation composes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from transformers import LlamaConfig, LlamaForCausalLM

import fpo.forward
from fpo.builder import build_run_parts
from fpo.commands.common import CONFIG_DIR
from fpo.errors import UserError
from fpo.models.tiny import build_tiny_model
from fpo.sae import ActivationCapture, build_random_sae, load_sae, resolve_hook_module
from fpo.sae_maker import collect_activations, hook_name_for_layer
from fpo.testing import compose_train

MLP_OUT = "blocks.1.hook_mlp_out"


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(5, 261, (2, 9), generator=torch.Generator().manual_seed(3))


def residual_parts(model, layer: torch.nn.Module, pre_mlp_norm: str, input_ids) -> dict:
    """Layer `layer`'s residual stream before its MLP (``resid_mid``, the input of the pre-MLP
    norm) and after the layer (``resid_post``), captured independently of `fpo.sae`."""
    parts = {}
    handles = [
        getattr(layer, pre_mlp_norm).register_forward_hook(
            lambda _m, inputs, _o: parts.setdefault("resid_mid", inputs[0])
        ),
        layer.register_forward_hook(lambda _m, _i, out: parts.setdefault("resid_post", out)),
    ]
    try:
        with ActivationCapture(resolve_hook_module(model, MLP_OUT)) as capture:
            model(input_ids)
            parts["captured"] = capture.activation
    finally:
        for handle in handles:
            handle.remove()
    return parts


@pytest.mark.parametrize("architecture", ["gemma3", "gemma2"])
def test_mlp_out_is_what_the_mlp_adds_to_the_residual_stream(architecture, input_ids):
    """Gemma 2/3 sandwich-normed MLP: captured == resid_post - resid_mid (the MLP's additive
    contribution, after post_feedforward_layernorm), not resid_post nor the raw MLP output."""
    model = build_tiny_model(architecture=architecture).eval()
    layer = model.model.layers[1]
    assert resolve_hook_module(model, MLP_OUT) is layer.post_feedforward_layernorm
    with torch.no_grad():
        parts = residual_parts(model, layer, "pre_feedforward_layernorm", input_ids)
        raw_mlp = layer.mlp(layer.pre_feedforward_layernorm(parts["resid_mid"]))
    captured, contribution = parts["captured"], parts["resid_post"] - parts["resid_mid"]
    assert captured.shape == (2, 9, 32)
    torch.testing.assert_close(captured, contribution, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(captured, parts["resid_post"], atol=1e-3)
    assert not torch.allclose(captured, raw_mlp, atol=1e-3)  # the post-MLP norm is applied


def test_mlp_out_without_a_post_mlp_norm_is_the_mlp_output(input_ids):
    """Llama-style layers add the MLP output itself: the hook falls back to ``layer.mlp``."""
    config = LlamaConfig(
        vocab_size=261,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[1]
    assert resolve_hook_module(model, MLP_OUT) is layer.mlp
    with torch.no_grad():
        parts = residual_parts(model, layer, "post_attention_layernorm", input_ids)
    contribution = parts["resid_post"] - parts["resid_mid"]
    torch.testing.assert_close(parts["captured"], contribution, atol=1e-5, rtol=1e-5)


def test_mlp_out_layer_out_of_range_and_unknown_site_are_user_errors(tiny_model):
    with pytest.raises(UserError, match="has 2 layers"):
        resolve_hook_module(tiny_model, "blocks.2.hook_mlp_out")
    with pytest.raises(UserError, match="hook site 'attn_out'"):
        hook_name_for_layer(1, "attn_out")
    assert hook_name_for_layer(17, "mlp_out") == "blocks.17.hook_mlp_out"


def test_collector_rows_are_the_mlp_contribution(tiny_model, tiny_tokenizer):
    """`collect_activations(site="mlp_out")` (what ``fpo-make-sae --site mlp_out`` trains on)
    gives the hooked tensor the training forward captures, at the non-BOS positions."""
    texts = ["A wonderful film with great actors.", "Slow and dull."]
    rows = collect_activations(
        tiny_model, tiny_tokenizer, texts, hook_layer=1, max_tokens=10_000, seq_len=64,
        site="mlp_out",
    )  # fmt: skip
    ids = tiny_tokenizer("A wonderful film with great actors.\n\nSlow and dull.")["input_ids"]
    input_ids = torch.tensor([ids])
    tiny_model.eval()
    with torch.no_grad(), ActivationCapture(resolve_hook_module(tiny_model, MLP_OUT)) as cap:
        tiny_model(input_ids)
        expected = cap.activation[0, 1:]  # BOS excluded
    torch.testing.assert_close(rows, expected)
    resid = collect_activations(
        tiny_model, tiny_tokenizer, texts, hook_layer=1, max_tokens=10_000, seq_len=64
    )
    assert resid.shape == rows.shape and not torch.allclose(resid, rows, atol=1e-3)


def test_saved_mlp_out_sae_resolves_through_its_cfg_json(tiny_model, tmp_path):
    """The hook name an SAE folder carries (cfg.json metadata) is what training and
    evaluation resolve (`load_sae` -> `sae_hook_name` -> `resolve_hook_module`)."""
    build_random_sae(model=tiny_model, hook_name=MLP_OUT).save_model(tmp_path)
    cfg = compose_train(
        "experiment=smoke",
        "objective=fpo",
        "sae=gemma3_270m_l17_mlp",
        f"sae.loader.path={tmp_path}",
    )
    experiment = build_run_parts(cfg)
    assert experiment.hook_name == MLP_OUT
    layer = experiment.policy.model.layers[1]
    assert experiment.build_module().hook_module is layer.post_feedforward_layernorm
    assert load_sae(path=str(tmp_path)).cfg.metadata.hook_name == MLP_OUT


def test_fpo_training_steps_with_an_mlp_out_sae(tmp_path, monkeypatch):
    """Two FPO steps on the tiny model with a random SAE at ``blocks.1.hook_mlp_out``: every
    activation capture (policy and online reference) hooks post_feedforward_layernorm."""
    hooked: list[torch.nn.Module] = []

    class SpyCapture(ActivationCapture):
        def __init__(self, module: torch.nn.Module) -> None:
            hooked.append(module)
            super().__init__(module)

    monkeypatch.setattr(fpo.forward, "ActivationCapture", SpyCapture)
    cfg = compose_train("experiment=smoke", "objective=fpo", f"+sae.loader.hook_name={MLP_OUT}")
    with open_dict(cfg):
        cfg.trainer.max_steps = 2
        cfg.trainer.limit_val_batches = 0
        cfg.logger, cfg.callbacks = {}, {}
        cfg.paths.output_dir = str(tmp_path)
        cfg.objective.constraints.features.k = 16
    OmegaConf.resolve(cfg)
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    before = {k: v.clone() for k, v in experiment.policy.state_dict().items()}
    trainer = experiment.build_trainer(enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=experiment.datamodule)
    assert trainer.global_step == 2
    expected = {
        id(model.model.layers[1].post_feedforward_layernorm)
        for model in (experiment.policy, module.reference.model)
    }
    assert {id(m) for m in hooked} == expected  # policy and reference, nothing else
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    assert math.isfinite(metrics["train/loss"])
    after = experiment.policy.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())


def test_site_ablation_sweeps_the_residual_and_the_mlp_output_sae():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["experiment=ablation/sae_site"],
            return_hydra_config=True,
        )
    assert cfg.hydra.sweeper.params.sae == "gemma3_270m_l17,gemma3_270m_l17_mlp"
    assert cfg.reference.source == "online"
    features = cfg.objective.constraints.features
    assert features.normalize is True and features.alpha == 32.0
    hooks = {}
    for option in ("gemma3_270m_l17", "gemma3_270m_l17_mlp"):
        root = f"paths.root_dir={Path(CONFIG_DIR).parent}"
        sae_cfg = compose_train("experiment=ablation/sae_site", f"sae={option}", root).sae
        hooks[option] = load_sae(path=sae_cfg.loader.path).cfg.metadata.hook_name
    assert hooks == {
        "gemma3_270m_l17": "blocks.17.hook_resid_post",
        "gemma3_270m_l17_mlp": "blocks.17.hook_mlp_out",
    }
