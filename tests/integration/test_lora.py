"""``model.lora``: LoRA adapters (peft) on the policy, the reference for free.

The online reference is the policy with its adapters off: it must give exactly the
statistics of a separate frozen copy of the initial weights, whatever the adapters hold; only
adapter weights train; the cache's fingerprint is the base model's (a full fine-tuning cache
serves a LoRA run); the saved policy and checkpoints hold the adapters and load back.
"""

from __future__ import annotations

import json
import re

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from fpo.builder import RunParts, build_run_parts, frozen_copy, load_model, online_reference
from fpo.commands.cache import build as build_cache
from fpo.commands.common import CONFIG_DIR
from fpo.errors import UserError
from fpo.logprobs import response_positions
from fpo.lora import AdapterFreeReference, base_state_dict, is_lora
from fpo.policy_io import load_policy_weights, save_policy
from fpo.reference.base import OnlineReference
from fpo.testing import QUIET_TRAINER, compose_train, run_module

LORA = ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8")


def lora_parts(tmp_path, objective: str, *overrides: str) -> RunParts:
    cfg = compose_train(
        "experiment=smoke", f"objective={objective}", f"paths.output_dir={tmp_path}", *overrides
    )
    return build_run_parts(cfg)


def first_batch(parts: RunParts) -> dict:
    parts.datamodule.setup("fit")
    return next(iter(parts.datamodule.train_dataloader()))


def randomize_adapters(policy: torch.nn.Module, seed: int = 0) -> None:
    """Give every adapter weight a random value: a trained policy, far from its reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def policy_logits(policy: torch.nn.Module, batch: dict) -> torch.Tensor:
    policy.eval()
    with torch.no_grad():
        return policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("objective", ["fpo", "tdpo2", "dpo"])
def test_adapter_free_reference_equals_a_separate_frozen_copy(tmp_path, objective):
    parts = lora_parts(tmp_path, objective, *LORA)
    module = parts.build_module()
    reference = module.reference
    assert isinstance(reference, AdapterFreeReference) and reference.model is parts.policy
    # no second copy: the reference holds no weights of its own, checkpoints hold the policy once
    assert not any(k.startswith("reference.model") for k in module.state_dict())
    copy = online_reference(
        frozen_copy(load_model(parts.cfg.model.loader)[0]),  # the initial weights, apart
        parts.objective,
        sae=parts.sae,
        hook_name=parts.hook_name,
    )
    assert type(copy) is OnlineReference
    randomize_adapters(parts.policy)
    batch = first_batch(parts)
    positions = response_positions(batch["labels"])
    needs = parts.objective.needs
    ask = dict(features=needs.features, token_kl=needs.reference_logits)
    module.policy.train()
    shared, separate = reference.stats(batch, positions, **ask), copy.stats(batch, positions, **ask)
    assert module.policy.training  # the pass restores the policy's mode (adapter dropout)
    assert all(p.requires_grad for n, p in parts.policy.named_parameters() if ".lora_" in n)
    if needs.reference_logits:  # TDPO: the reference's final hidden states and head
        torch.testing.assert_close(shared.head_inputs.hidden, separate.head_inputs.hidden)
    else:
        for field in ("sum", "avg", "n_tokens"):
            assert torch.equal(getattr(shared.logps, field), getattr(separate.logps, field))
    if needs.features:
        assert torch.equal(shared.topk_indices, separate.topk_indices)
        torch.testing.assert_close(shared.topk_values, separate.topk_values)
    # ... while the adapters themselves are live: the policy is not its reference
    assert not torch.allclose(policy_logits(parts.policy, batch), policy_logits(copy.model, batch))


def test_the_reference_moves_and_casts_the_policy_it_runs(tmp_path):
    """fpo-cache's predictor module owns the reference alone: ``to(device)`` must reach the
    policy (not a child of the reference)."""
    parts = lora_parts(tmp_path, "dpo", *LORA)
    reference = parts.cache_reference()
    assert isinstance(reference, AdapterFreeReference)
    reference.double()
    assert {p.dtype for p in parts.policy.parameters()} == {torch.float64}


def fit(parts: RunParts, steps: int = 2, **trainer_args) -> L.Trainer:
    module = parts.build_module()
    args = QUIET_TRAINER | dict(max_steps=steps) | trainer_args
    trainer = parts.build_trainer(**args)
    trainer.fit(module, datamodule=parts.datamodule)
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA FPO policy after two optimizer steps (checkpoint kept) and its base before."""
    tmp = tmp_path_factory.mktemp("lora")
    parts = lora_parts(tmp, "fpo", *LORA, "optimizer.lr=0.05")
    before = {k: v.clone() for k, v in parts.policy.state_dict().items()}
    fit(parts, enable_checkpointing=True, default_root_dir=str(tmp))
    (checkpoint,) = tmp.rglob("*.ckpt")
    return parts, before, checkpoint


def test_only_adapter_weights_change(trained):
    parts, before, _ = trained
    after = parts.policy.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), changed[:5]
    assert any(".lora_B." in k for k in changed)  # B starts at zero: the update is on


def test_adapters_train_under_gradient_checkpointing(tmp_path):
    """Frozen embeddings give the checkpointed layers no input that needs a gradient; the
    adapters inside them must still get theirs."""
    parts = lora_parts(
        tmp_path, "dpo", *LORA, "optimizer.lr=0.05", "model.gradient_checkpointing=true"
    )
    before = {k: v.clone() for k, v in parts.policy.state_dict().items() if ".lora_B." in k}
    fit(parts, steps=1, callbacks=[])
    after = parts.policy.state_dict()
    assert parts.policy.is_activation_checkpointing
    assert all(not torch.equal(after[k], v) for k, v in before.items())


def test_saved_adapters_and_checkpoint_load_into_a_fresh_run(trained, tmp_path):
    parts, _, checkpoint = trained
    batch = first_batch(parts)
    expected = policy_logits(parts.policy, batch)
    folder = save_policy(parts.policy, parts.tokenizer, tmp_path / "policy")
    assert (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()  # the adapters, not the base weights
    for source in (folder, checkpoint):
        fresh = lora_parts(tmp_path, "fpo", *LORA)
        loaded = load_policy_weights(fresh.policy, source)
        assert is_lora(loaded)
        torch.testing.assert_close(policy_logits(loaded, batch), expected)
    merged = save_policy(parts.policy, None, tmp_path / "merged", merge_adapters=True)
    assert (merged / "model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()
    fresh = lora_parts(tmp_path, "fpo", *LORA)
    loaded = load_policy_weights(fresh.policy, merged)
    assert not is_lora(loaded)  # the merged weights in the plain model
    torch.testing.assert_close(policy_logits(loaded, batch), expected, rtol=1e-4, atol=1e-4)
    assert is_lora(parts.policy)  # merging on save left the policy's adapters in place
    plain = lora_parts(tmp_path, "fpo")
    with pytest.raises(UserError, match=r"model\.lora\.enabled=true"):
        load_policy_weights(plain.policy, folder)


def test_cache_fingerprint_is_the_base_models_and_a_full_cache_serves_lora(tmp_path):
    base = ("experiment=smoke", "objective=fpo", f"paths.output_dir={tmp_path}")
    base += ("reference=cached", f"reference.path={tmp_path / 'cache'}")
    plain = build_run_parts(compose_train(*base))
    lora = lora_parts(tmp_path, "fpo", *LORA)
    randomize_adapters(lora.policy)  # the adapters never enter the fingerprint
    assert base_state_dict(lora.policy).keys() == plain.policy.state_dict().keys()
    settings = plain.cache_settings()
    fingerprints = settings.model_fingerprints(plain.policy, plain.sae)
    assert settings.model_fingerprints(lora.policy, lora.sae) == fingerprints
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        build_cache(compose(config_name="cache", overrides=list(base)))  # for full fine-tuning
    cached = build_run_parts(compose_train(*base, *LORA))
    from_cache = cached.build_reference()  # accepted: the same reference
    batch = first_batch(cached)  # with the cache's ref_* fields
    ask = dict(positions=response_positions(batch["labels"]), features=True, token_kl=False)
    stored, online = from_cache.stats(batch, **ask), lora.build_reference().stats(batch, **ask)
    torch.testing.assert_close(stored.logps.sum, online.logps.sum)
    assert torch.equal(stored.topk_indices, online.topk_indices)
    torch.testing.assert_close(stored.topk_values, online.topk_values)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("model.lora.target_modules=[lm_head]",), "includes the LM head"),
        (("model.lora.target_modules=[no_such_layer]",), "model.lora.target_modules"),
        (("model.lora.r=0",), "model.lora.r"),
        (("model.lora.dropout=1.5",), "model.lora.dropout"),
        (("objective=dpo", "reference.dtype=bfloat16"), "the policy itself"),
    ],
)
def test_bad_lora_settings_are_user_errors(tmp_path, overrides, key):
    with pytest.raises(UserError, match=re.escape(key)):
        lora_parts(tmp_path, "fpo", *LORA, *overrides).build_module()


def test_fpo_eval_run_dir_loads_the_adapters(tmp_path):
    logs = tmp_path / "logs"
    common = (f"paths.log_dir={logs}", "experiment=smoke", "objective=fpo", "evaluation=smoke")
    result = run_module("fpo.commands.train", *common, *LORA, "optimizer.lr=0.05", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (logs / "smoke" / "runs").iterdir()
    assert (run / "policy" / "adapter_config.json").is_file()
    after_fit = json.loads((run / "evaluation" / "summary.json").read_text())
    evaluated = run_module("fpo.commands.eval", f"run_dir={run}", f"paths.log_dir={logs}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((run / "evaluation" / "summary.json").read_text())
    assert again["kl"] == after_fit["kl"] != 0 and again["win_rate"] == after_fit["win_rate"]
