"""The offline reference cache end to end on the tiny model: build, verify, join, train.

Cached values must equal the online reference's (same code), training from the cache must
give the online losses, and every input that changes the values must be refused by name.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import fpo.builder
import fpo.commands.cache
import fpo.reference.settings
from fpo.builder import RunParts, assemble_module, online_reference
from fpo.data import PreferenceDataModule
from fpo.errors import UserError
from fpo.forward import forward_response_positions
from fpo.hashing import hash_state_dict
from fpo.logprobs import response_positions, segment_mean
from fpo.models.hf import split_causal_lm
from fpo.models.tiny import build_tiny_model, build_tiny_tokenizer
from fpo.reference.base import BatchReference
from fpo.reference.build import build_reference_cache
from fpo.reference.settings import CacheSettings
from fpo.reference.store import ReferenceCache, attach_reference_cache
from fpo.sae import build_random_sae, resolve_hook_module
from fpo.testing import preset, run_module

HOOK = "blocks.1.hook_resid_post"
D_SAE = 64
K = 16
REBUILD = "fpo-cache experiment=test"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ultrafeedback_binarized.jsonl"


# ---------------------------------------------------------------------------- helpers
def make_sae(seed: int = 0, sae_k: int = 8):
    return build_random_sae(d_in=32, d_sae=D_SAE, k=sae_k, hook_name=HOOK, seed=seed)


def make_dm(tokenizer, source=FIXTURE, max_length=128, batch_size=2, shuffle=False, **kwargs):
    return PreferenceDataModule(
        train_source=str(source),
        val_source=str(source),
        tokenizer=tokenizer,
        max_length=max_length,
        max_prompt_length=64,
        batch_size=batch_size,
        eval_batch_size=4,
        shuffle=shuffle,
        **kwargs,
    )


def objective_for(name, k=K):
    return preset(name, f"objective.constraints.features.k={k}")


def reference_for(model, sae=None, k=0):
    """The online reference run on ``model`` as given: FPO's with the top ``k`` features of
    ``sae``, or DPO's (log-probs only) when ``k`` is 0."""
    objective = objective_for("fpo", k) if k else objective_for("dpo")
    return online_reference(model, objective, sae=sae, hook_name=HOOK)


def make_settings(root: Path, k: int) -> CacheSettings:
    return CacheSettings(root, k, "float32", HOOK if k else None, "32-true", REBUILD)


def make_trainer(callbacks, extra=()):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        callbacks=[*callbacks, *extra],
    )


def build(root, model, tokenizer, sae, k, dm=None, extra_callbacks=(), **kwargs):
    """Build the cache of both splits with (a frozen copy of) ``model``; the build results."""
    dm = dm or make_dm(tokenizer)
    return build_reference_cache(
        partial(make_trainer, extra=extra_callbacks),
        reference_for(copy.deepcopy(model), sae, k),
        dm,
        make_settings(root, k),
        batch_size=kwargs.pop("batch_size", 4),
        **kwargs,
    )


def test_a_reference_with_another_k_than_the_cache_is_refused(tmp_path, tiny_tokenizer):
    reference = reference_for(build_tiny_model(seed=0), make_sae(), K)
    with pytest.raises(ValueError, match=f"keeps k={K} features, the cache 0"):
        build_reference_cache(make_trainer, reference, make_dm(tiny_tokenizer),
                              make_settings(tmp_path, 0), batch_size=4)  # fmt: skip


IDS = (
    PreferenceDataModule(train_source=str(FIXTURE), tokenizer=build_tiny_tokenizer())
    .dataset("train", wrapped=False)
    .example_ids
)


def contents(path: Path) -> dict[str, dict]:
    """Every stored value of the fixture's pairs (and the cache holds nothing else)."""
    cache = ReferenceCache.open(path)
    assert len(cache) == len(IDS) and not cache.missing(IDS)
    return {i: {key: np.asarray(v).tolist() for key, v in cache.get(i).items()} for i in IDS}


def perturbed(model, scale=0.05, seed=1):
    """A copy of ``model`` with every weight moved: a policy that differs from the reference."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


@torch.no_grad()
def pooled_features(model, sae, batch) -> torch.Tensor:
    """``[2B, d_sae]`` mean SAE features over each row's response-predicting positions."""
    positions = response_positions(batch["labels"])
    hook = resolve_hook_module(model, HOOK)
    out = forward_response_positions(split_causal_lm(model.eval()), batch, positions, hook)
    return segment_mean(sae.encode(out.hooked), positions.rows, positions.num_rows)


def module_for(name, policy, reference, sae=None, k=K, lr=1e-2):
    optimizer = partial(torch.optim.AdamW, lr=lr)
    return assemble_module(
        policy,
        objective_for(name, k),
        optimizer,
        reference=reference,
        sae=sae,
        hook_name=HOOK,
        sae_report_batches=0,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One FPO cache (k=16) of the fixture, built once for the refusal tests."""
    root = tmp_path_factory.mktemp("cache")
    model, tokenizer, sae = build_tiny_model(seed=0), build_tiny_tokenizer(), make_sae()
    results = build(root, model, tokenizer, sae, K)
    return root, results


# ------------------------------------------------------------- equal to the online reference
class LossCapture(L.Callback):
    def __init__(self) -> None:
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def fit_losses(module, dm):
    capture = LossCapture()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[capture],
    )
    trainer.fit(module, datamodule=dm)
    return torch.stack(capture.losses), trainer.callback_metrics["val/loss"]


@pytest.mark.parametrize("stored_k", [0, K])
def test_dpo_from_cache_equals_dpo_online(tmp_path, tiny_tokenizer, stored_k):
    """From a log-probs-only cache, and from an FPO cache (features stored, not read)."""
    reference = build_tiny_model(seed=0)
    build(tmp_path, reference, tiny_tokenizer, make_sae() if stored_k else None, k=stored_k)

    dm_cached = make_dm(tiny_tokenizer, shuffle=True)
    attach_reference_cache(make_settings(tmp_path, 0), dm_cached, reference, None)
    cached = module_for("dpo", copy.deepcopy(reference), BatchReference())
    online = module_for("dpo", copy.deepcopy(reference), reference_for(copy.deepcopy(reference)))
    n_policy = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in cached.parameters()) == n_policy  # no reference model

    losses_cached, val_cached = fit_losses(cached, dm_cached)
    losses_online, val_online = fit_losses(online, make_dm(tiny_tokenizer, shuffle=True))
    assert len(losses_cached) == 8  # 4 steps per epoch, 2 epochs
    assert losses_cached[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert (losses_cached[1:] - math.log(2)).abs().min() > 1e-4  # the policy moved
    # The cache's log-probs come from another batch shape than the online reference's, so
    # they differ in the last float32 bits; over 8 AdamW steps that reached 1.2e-6 here (on
    # the old code too). A wrong cached value (a sum for a mean, another row) moves the loss
    # by more than 1e-3.
    torch.testing.assert_close(losses_cached, losses_online, atol=1e-5, rtol=0)
    torch.testing.assert_close(val_cached, val_online, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [D_SAE, 4])
def test_fpo_from_cache_equals_online_and_the_feature_formula(tmp_path, tiny_tokenizer, k):
    """k = d_sae: D is the dense MSE; small k: D sums over topk(policy) UNION topk(ref)."""
    reference, sae = build_tiny_model(seed=0), make_sae()
    build(tmp_path, reference, tiny_tokenizer, sae, k)
    policy = perturbed(reference)
    dm = make_dm(tiny_tokenizer, batch_size=4)
    attach_reference_cache(make_settings(tmp_path, k), dm, reference, sae)
    cached = module_for("fpo", policy, BatchReference(), sae, k=k)
    online = module_for("fpo", policy, reference_for(reference, sae, k), sae, k=k)
    union_larger_than_k = 0
    for batch in dm.val_dataloader():
        result, stats = cached.preference_step(batch)
        expected, expected_stats = online.preference_step(batch)
        torch.testing.assert_close(result.losses, expected.losses, atol=1e-6, rtol=0)
        torch.testing.assert_close(stats["fmse"], expected_stats["fmse"], atol=1e-7, rtol=0)

        p, r = pooled_features(policy, sae, batch), pooled_features(reference, sae, batch)
        if k == D_SAE:
            dense = (p - r).square().mean(dim=1)
            torch.testing.assert_close(stats["fmse"], dense, atol=1e-7, rtol=1e-5)
            continue
        for row in range(p.shape[0]):
            ref_top = set(r[row].topk(k).indices.tolist())
            assert set(batch["ref_topk_indices"][row].tolist()) == ref_top
            union = set(p[row].topk(k).indices.tolist()) | ref_top
            union_larger_than_k += len(union) > k
            by_hand = sum((p[row, i] - (r[row, i] if i in ref_top else 0.0)) ** 2 for i in union)
            assert stats["fmse"][row].item() == pytest.approx(by_hand.item() / k, rel=1e-6)
    if k < D_SAE:
        assert union_larger_than_k > 0, "the test must exercise a union bigger than k"


def test_shuffled_and_filtered_rows_join_to_their_own_values(built, tmp_path, tiny_tokenizer):
    root, _ = built
    rows = FIXTURE.read_text().splitlines()
    kept = [rows[i] for i in (6, 0, 3, 5, 1)]  # filtered and shuffled
    source = tmp_path / "subset.jsonl"
    source.write_text("\n".join(kept) + "\n")
    reference, sae = build_tiny_model(seed=0), make_sae()
    dm = make_dm(tiny_tokenizer, source=source)
    attach_reference_cache(make_settings(root, K), dm, reference, sae)
    reference = reference_for(reference, sae, K)
    assert len(dm.val_dataset) == 5
    for batch in dm.val_dataloader():
        expected = reference.stats(batch, response_positions(batch["labels"]), features=True,
                                token_kl=False)  # fmt: skip
        # the cache ran these rows in other batches: sums near 200 may differ in the last
        # float32 bit (1.5e-5); another row's value would be off by whole nats
        torch.testing.assert_close(batch["ref_sum_logps"], expected.logps.sum, atol=0, rtol=2e-7)
        torch.testing.assert_close(batch["ref_avg_logps"], expected.logps.avg, atol=0, rtol=2e-7)
        assert torch.equal(batch["ref_n_tokens"], expected.logps.n_tokens)
        assert torch.equal(batch["ref_topk_indices"], expected.topk_indices)


# ------------------------------------------------------------------------------ refusals
#: (component, what changes): each changes that one fingerprint component and nothing else.
CHANGES = [
    ("data", "one chosen response edited"),
    ("tokenizer", "one token added"),
    ("template", "append_eos=False"),
    ("truncation", "max_length=100"),
    ("reference_weights", "one weight moved"),
    ("reference_config", "final_logit_softcapping"),
    ("reference_config", "attn_implementation"),
    ("sae_weights", "another seed"),
    ("sae_config", "TopK k=16 instead of 8, same weights"),
    ("sae_config", "normalize_activations"),
    ("sae_config", "apply_b_dec_to_input"),
    ("sae_hook", "another hook"),
    ("k", "k=8"),
    ("dtype", "float16 values"),
    ("precision", "bf16-mixed"),
    ("versions", "another torch"),
]


def _changed(name, change, root, tmp_path, monkeypatch):
    """(datamodule, policy, sae, settings) of a run that differs from `built` in ``change``."""
    tokenizer, source, dm_kwargs = build_tiny_tokenizer(), FIXTURE, {}
    model, sae, settings = build_tiny_model(seed=0), make_sae(), make_settings(root, K)
    if name == "data":
        rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
        rows[2]["chosen"][-1]["content"] += " (edited)"
        source = tmp_path / "edited.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif name == "tokenizer":
        tokenizer.add_tokens(["<extra_token>"])
    elif name == "template":
        dm_kwargs["append_eos"] = False
    elif name == "truncation":
        dm_kwargs["max_length"] = 100
    elif name == "reference_weights":
        with torch.no_grad():
            next(model.parameters())[0, 0] += 1e-3
    elif change == "final_logit_softcapping":
        model.config.final_logit_softcapping = 30.0
    elif change == "attn_implementation":
        model.set_attn_implementation("eager")
    elif name == "sae_weights":
        sae = make_sae(seed=1)
    elif change.startswith("TopK"):
        sae = make_sae(sae_k=16)
        assert hash_state_dict(sae) == hash_state_dict(make_sae())
    elif change == "normalize_activations":
        sae.cfg.normalize_activations = "layer_norm"
    elif change == "apply_b_dec_to_input":
        sae.cfg.apply_b_dec_to_input = False
    elif name == "sae_hook":
        settings = replace(settings, hook_name="blocks.0.hook_resid_post")
    elif name == "k":
        settings = replace(settings, k=8)
    elif name == "dtype":
        settings = replace(settings, values_dtype="float16")
    elif name == "precision":
        settings = replace(settings, precision="bf16-mixed")
    elif name == "versions":
        versions = {**fpo.reference.settings.library_versions(), "torch": "0.0.1"}
        monkeypatch.setattr(fpo.reference.settings, "library_versions", lambda: versions)
    dm = make_dm(tokenizer, source, **dm_kwargs)
    return dm, model, sae, settings


@pytest.mark.parametrize(("name", "change"), CHANGES, ids=[f"{n}:{c}" for n, c in CHANGES])
def test_each_changed_component_is_refused_by_name(built, tmp_path, monkeypatch, name, change):
    root, _ = built
    dm, model, sae, settings = _changed(name, change, root, tmp_path, monkeypatch)
    with pytest.raises(UserError) as err:
        attach_reference_cache(settings, dm, model, sae)
    message = str(err.value)
    named = [line.split(":")[0].strip() for line in message.splitlines() if line[:2] == "  "]
    assert named == [name], message
    assert f"Rebuild it with: {REBUILD} cache.overwrite=true" in message
    if name == "data":
        assert "1 of the 8 pairs of the train split are not in the cache" in message


def test_every_component_has_a_refusal_test(built):
    root, _ = built
    stored = json.loads((root / "train" / "manifest.json").read_text())["components"]
    assert list(stored) == list(dict.fromkeys(name for name, _ in CHANGES))
    dm, model, sae = make_dm(build_tiny_tokenizer()), build_tiny_model(seed=0), make_sae()
    attach_reference_cache(make_settings(root, K), dm, model, sae)  # unchanged: accepted


def test_missing_incomplete_and_damaged_caches_are_refused(built, tmp_path, tiny_tokenizer):
    root, _ = built
    model, sae = build_tiny_model(seed=0), make_sae()
    with pytest.raises(UserError, match=rf"does not exist\. Build it with: {REBUILD}$"):
        attach_reference_cache(make_settings(tmp_path / "none", K), make_dm(tiny_tokenizer),
                               model, sae)  # fmt: skip
    copy_root = tmp_path / "copy"
    shutil.copytree(root, copy_root)
    shard = sorted((copy_root / "val" / "shards").glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"damaged: shard {re.escape(str(shard))} has .*truncated"):
        attach_reference_cache(make_settings(copy_root, K), make_dm(tiny_tokenizer), model, sae)
    (copy_root / "train" / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"train is incomplete: it has no manifest\.json"):
        attach_reference_cache(make_settings(copy_root, K), make_dm(tiny_tokenizer), model, sae)


# ------------------------------------------------------------------------------ resume
class Crash(L.Callback):
    """Kills the predict loop after ``after`` batches of the first split."""

    def __init__(self, after: int) -> None:
        self.after = after

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0):
        if dl_idx == 0 and batch_idx + 1 == self.after:
            raise RuntimeError("killed")


def test_killed_build_resumes_to_the_uninterrupted_cache(built, tmp_path, tiny_tokenizer):
    root, _ = built
    model, sae = build_tiny_model(seed=0), make_sae()
    with pytest.raises(RuntimeError, match="killed"):
        build(tmp_path, model, tiny_tokenizer, sae, K, extra_callbacks=[Crash(1)], shard_size=4)
    assert len(list((tmp_path / "train" / "shards").glob("*.arrow"))) == 1  # 4 of 8 pairs
    assert not (tmp_path / "train" / "manifest.json").exists()

    results = build(tmp_path, model, tiny_tokenizer, sae, K, shard_size=4)
    assert results["train"]["computed"] == 4 and results["val"]["computed"] == 8
    for split in ("train", "val"):
        assert contents(tmp_path / split) == contents(root / split)

    (tmp_path / "train" / "manifest.json").unlink()  # killed after the shards, before finalize
    results = build(tmp_path, model, tiny_tokenizer, sae, K, shard_size=4)
    assert list(results) == ["train"] and results["train"]["computed"] == 0  # val kept
    assert contents(tmp_path / "train") == contents(root / "train")


# --------------------------------------------------------------------------- fpo-train
def test_train_with_cached_reference_never_builds_a_reference_model(
    built, monkeypatch, tiny_tokenizer
):
    root, _ = built

    def forbidden(*args, **kwargs):
        raise AssertionError("reference=cached built a reference model")

    monkeypatch.setattr(fpo.builder, "OnlineReference", forbidden)
    cfg = OmegaConf.create(
        {
            "reference": {"source": "cached", "path": str(root), "values_dtype": "float32"},
            "trainer": {"precision": "32-true"},
            "step": {"logits_chunk_size": None},
        }
    )
    dm = make_dm(tiny_tokenizer)
    model, sae = build_tiny_model(seed=0), make_sae()
    objective = preset("fpo", f"objective.constraints.features.k={K}")
    experiment = RunParts(cfg, objective, model, tiny_tokenizer, sae, HOOK, dm)
    reference = experiment.build_reference()
    assert isinstance(reference, BatchReference)
    batch = next(iter(dm.train_dataloader()))
    assert batch["ref_topk_indices"].shape == (4, K) and batch["ref_sum_logps"].shape == (4,)


# ------------------------------------------------------------------- the command line
SMOKE = ("experiment=smoke", "objective=fpo")


def run(command: str, tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m fpo.commands.<command>`` with logs and caches under ``tmp`` (nothing in
    the repo)."""
    paths = (f"paths.log_dir={tmp / 'logs'}", f"paths.cache_dir={tmp / 'cache'}")
    return run_module(f"fpo.commands.{command}", *SMOKE, *paths, *overrides)


def cache_root(tmp: Path) -> Path:
    return tmp / "cache" / "reference" / "tiny" / "ultrafeedback_fixture" / "fpo"


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    """``fpo-cache experiment=smoke objective=fpo`` run once, by one process."""
    tmp = tmp_path_factory.mktemp("cli")
    result = run("cache", tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, result


def test_cli_cache_then_train_then_refuse_a_changed_input(cli_cache, capsys, monkeypatch):
    tmp, built_result = cli_cache
    assert "train: 8 pairs" in built_result.stdout and "bytes per pair" in built_result.stdout

    trained = run("train", tmp, "reference=cached")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "no reference model" in trained.stdout + trained.stderr
    metrics = json.loads(next((tmp / "logs").glob("smoke/runs/*/metrics.json")).read_text())
    assert math.isfinite(metrics["val/loss"]) and "val/fmse/chosen" in metrics

    refused = run("train", tmp, "reference=cached", "data.max_length=200")
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert "truncation: expected" in message and "tokenizer:" not in message
    command = (
        f"Rebuild it with: fpo-cache experiment=smoke objective=fpo paths.log_dir={tmp / 'logs'} "
        f"paths.cache_dir={tmp / 'cache'} data.max_length=200 cache.overwrite=true"
    )
    unwrapped = "".join(refused.stderr.split())  # the CLI wraps messages, even at hyphens
    assert "".join(command.split()) in unwrapped, message

    monkeypatch.setattr(sys, "argv", ["fpo-cache", "--info", str(cache_root(tmp))])
    fpo.commands.cache.main()
    info = capsys.readouterr().out
    assert info.count(": complete") == 2 and "/train: complete" in info and "/val: complete" in info
    assert "pairs 8, rows 8, k 50, values float32" in info and "reference_weights" in info


def test_cli_cache_built_by_two_ddp_processes_equals_one_process(cli_cache, tmp_path):
    tmp, _ = cli_cache
    ddp = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    result = run("cache", tmp_path, *ddp, "trainer.precision=32-true", "cache.shard_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    for split in ("train", "val"):
        single, double = cache_root(tmp) / split, cache_root(tmp_path) / split
        manifest = json.loads((double / "manifest.json").read_text())
        assert manifest["world_size"] == 2
        assert {shard["file"][:13] for shard in manifest["shards"]} == {
            "shards/rank0-",
            "shards/rank1-",
        }
        assert (
            manifest["components"]
            == json.loads((single / "manifest.json").read_text())["components"]
        )
        assert contents(double) == contents(single)  # bit-identical: same batches
