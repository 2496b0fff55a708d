"""The faster evaluation gives the old numbers: the reference's side computed on its own (and
read back from `fpo.evaluation.reference_side`) against the straightforward path, the
oracle kept here: the reference's head fused into the policy's pass, every batch, every run.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from fpo.evaluation import (
    evaluate_sentiment,
    grouped_mean_stderr,
    sample_for_scoring,
    scoring_batch,
)
from fpo.evaluation.heldout import FeatureShift, heldout_pair_metrics
from fpo.evaluation.reference_side import reference_side_cache
from fpo.evaluation.sampling import num_batches
from fpo.evaluation.sentiment import reference_samples
from fpo.forward import StatsRequest, response_stats
from fpo.logprobs import response_positions
from fpo.losses import feature_mse
from fpo.models.hf import split_causal_lm
from fpo.objective import build_objective
from fpo.sae import build_random_sae, resolve_hook_module, sae_hook_name

PROMPTS = ["I watched The Glass Road and", "The film is", "Overall, it", "Sadly the"]
FPO = {"margin": "ln_dpo", "constraints": {"features": {"alpha": 0.5, "k": 8}}}
TDPO = {"margin": "dpo", "constraints": {"token_kl": {"alpha": 1.0}}}


def _pair_batches(num_pairs: int, batch_pairs: int, seed: int) -> list[dict]:
    """Random preference pairs of varied lengths in the training layout (each batch: its
    chosen rows, then its rejected rows), byte tokens of the tiny tokenizer."""
    generator = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (), generator=generator))
        return torch.randint(40, 120, (length,), generator=generator).tolist()

    batches = []
    for start in range(0, num_pairs, batch_pairs):
        count = min(batch_pairs, num_pairs - start)
        prompts = [[1, *ids(2, 6)] for _ in range(count)]
        responses = [ids(1, 7) for _ in range(2 * count)]
        batches.append(scoring_batch(prompts + prompts, responses, 0))
    return batches


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` with every weight moved a little (its trunk and head differ)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in other.parameters():
            weight.add_(0.05 * torch.randn(weight.shape, generator=generator))
    return other


def _fused_pair_metrics(policy, reference, batches, objective, sae, hook_name, drift_k=8):
    """The oracle: the pair metrics as evaluation computed them before the reference's side
    was split off (the reference's head inside the policy's pass, both every time)."""
    parts = {"policy": split_causal_lm(policy), "ref": split_causal_lm(reference)}
    hooks = {"policy": resolve_hook_module(policy, hook_name)}
    hooks["ref"] = resolve_hook_module(reference, hook_name)
    needs = objective.needs
    requests = {
        "ref": StatsRequest(head_inputs=True, codes=True),
        "policy": StatsRequest(
            logps=True, entropy=True, token_kl=needs.reference_logits, codes=True
        ),
    }
    shift = FeatureShift(int(sae.cfg.d_sae), 3)
    lists = {key: [] for key in ("entropy", "ref_entropy", "agnostic", "implicit", "drift")}
    for batch in batches:
        positions = response_positions(batch["labels"])
        outs = {}
        for side in ("ref", "policy"):
            outs[side] = response_stats(
                parts[side], batch, positions, requests[side], hook_module=hooks[side], sae=sae,
                logits_chunk_size=5,
                reference=outs["ref"].head_inputs if side == "policy" else None,
            )  # fmt: skip
        out, pairs = outs["policy"], positions.num_rows // 2
        pooled = {side: outs[side].pooled for side in parts}
        top = {k: pooled["ref"].topk(k, dim=-1) for k in (drift_k, objective.feature_k or 1)}
        mse = {k: feature_mse(pooled["policy"], t.indices, t.values, k=k) for k, t in top.items()}
        stats = {"kl": out.kl} if needs.reference_logits else {}
        if objective.feature_k:
            stats["fmse"] = mse[objective.feature_k]
        result = objective.loss(out.logps, out.ref_logps, stats)
        lists["entropy"] += out.entropy[:pairs].tolist()
        lists["ref_entropy"] += out.ref_entropy[:pairs].tolist()
        for key, (ours, theirs) in (
            ("agnostic", (out.logps.avg - out.ref_logps.avg).chunk(2)),
            ("implicit", (result.chosen_rewards, result.rejected_rewards)),
        ):
            lists[key] += ((ours > theirs).float() + 0.5 * (ours == theirs).float()).tolist()
        lists["drift"] += (sum(mse[drift_k].chunk(2)) / 2).tolist()
        shift.update(
            batch["input_ids"], batch["attention_mask"], positions.rows, positions.cols,
            {side: outs[side].codes for side in parts}, pooled,
        )  # fmt: skip
    return lists, shift


def _expected(lists: dict) -> dict:
    names = {
        "entropy": "entropy",
        "reference_entropy": "ref_entropy",
        "preference_accuracy": "agnostic",
        "implicit_reward_accuracy": "implicit",
        "feature_drift": "drift",
    }
    expected = {}
    for key, name in names.items():
        values = lists[name]
        expected[key], expected[f"{key}_stderr"] = grouped_mean_stderr(values, range(len(values)))
    return expected


def _same_shift(ours: FeatureShift, oracle: FeatureShift) -> None:
    assert ours.count == oracle.count and ours.positions == oracle.positions
    assert ours.rows == oracle.rows and set(ours.top) == set(oracle.top) == {"policy", "ref"}
    for model in ("policy", "ref"):
        assert torch.equal(ours.sums[model], oracle.sums[model])
        pairs = zip(ours.top[model], oracle.top[model], strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("objective", [FPO, TDPO], ids=["fpo", "tdpo"])
def test_pair_metrics_equal_the_fused_oracle_computed_and_cached(
    tiny_model, tiny_tokenizer, objective, tmp_path
):
    """Bit for bit: the reference's side on its own, then read back from the cache (its
    trunk not run again), gives the oracle's metrics and feature statistics."""
    objective = build_objective(objective)
    policy, reference = _perturbed(tiny_model), tiny_model
    sae = build_random_sae(d_sae=64, k=8, model=tiny_model)
    hook_name = sae_hook_name(sae)
    batches = _pair_batches(num_pairs=6, batch_pairs=4, seed=3)
    with torch.no_grad():
        lists, oracle = _fused_pair_metrics(policy, reference, batches, objective, sae, hook_name)
    expected = _expected(lists)
    assert expected["feature_drift"] > 0 and 0 < expected["preference_accuracy"] < 1
    cache = reference_side_cache(tmp_path, reference)
    trunk_calls = []
    reference.model.register_forward_hook(lambda *args: trunk_calls.append(1))
    # computed; computed and stored; read back (the reference's trunk not run: 0 calls)
    for cached, calls in ((None, 2), (cache, 2), (cache, 0)):
        trunk_calls.clear()
        metrics, shift = heldout_pair_metrics(
            policy, reference, batches, objective, sae=sae, hook_name=hook_name, drift_k=8,
            logits_chunk_size=5, cache=cached,
        )  # fmt: skip
        assert {key: metrics[key] for key in expected} == expected
        assert metrics["heldout_pairs"] == 6
        _same_shift(shift, oracle)
        stored = list(tmp_path.glob("pair_stats-*.pt"))
        assert len(stored) == (0 if cached is None else 1)
        assert len(trunk_calls) == calls


def test_pair_statistics_are_keyed_by_what_the_objective_and_sae_need(tiny_model, tmp_path):
    """One cache, three runs: FPO's entry cannot serve TDPO (which needs the reference's LM-head
    inputs too) nor another SAE; each run equals its oracle."""
    policy, reference = _perturbed(tiny_model), tiny_model
    batches = _pair_batches(num_pairs=4, batch_pairs=2, seed=5)
    cache = reference_side_cache(tmp_path, reference)
    first = build_random_sae(d_sae=64, k=8, model=tiny_model)
    other = build_random_sae(d_sae=64, k=8, model=tiny_model, seed=7)
    for number, (config, sae) in enumerate(((FPO, first), (TDPO, first), (FPO, other)), 1):
        objective, hook_name = build_objective(config), sae_hook_name(sae)
        with torch.no_grad():
            lists, _ = _fused_pair_metrics(policy, reference, batches, objective, sae, hook_name)
        metrics, _ = heldout_pair_metrics(
            policy, reference, batches, objective, sae=sae, hook_name=hook_name, drift_k=8,
            logits_chunk_size=5, cache=cache,
        )  # fmt: skip
        expected = _expected(lists)
        assert {key: metrics[key] for key in expected} == expected
        assert len(list(tmp_path.glob("pair_stats-*.pt"))) == number


# --------------------------------------------------------------------------- samples


class LengthJudge:
    """A pointwise judge: a completion's score is its length."""

    name = "length"

    def __call__(self, texts):
        return [float(len(text)) for text in texts]


def _count_generate(model: torch.nn.Module) -> list[int]:
    calls, generate = [], model.generate

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    model.generate = counted
    return calls


def test_evaluation_with_the_cache_equals_the_one_without(tiny_model, tiny_tokenizer, tmp_path):
    """Summary and generations equal, the reference sampled once for both cached runs."""
    policy, reference = _perturbed(tiny_model), tiny_model
    run = lambda cache: evaluate_sentiment(  # noqa: E731
        policy, reference, tiny_tokenizer, PROMPTS, LengthJudge(), num_samples=2,
        max_new_tokens=6, batch_size=3, seed=5, cache=cache,
    )  # fmt: skip
    expected = run(None)
    ref_seed = 5 + num_batches(len(PROMPTS) * 2, 3)
    oracle = sample_for_scoring(reference, tiny_tokenizer, PROMPTS, 2, 6, 3, seed=ref_seed)
    assert [row["reference"] for row in expected["generations"]] == oracle.texts
    calls = _count_generate(reference)
    cache = reference_side_cache(tmp_path, reference)
    assert run(cache) == expected and len(calls) == 3  # 8 sequences in batches of 3
    assert run(cache) == expected and len(calls) == 3  # read back: not sampled again
    assert len(list(tmp_path.glob("samples-*.pt"))) == 1


SETTINGS = dict(num_samples=2, max_new_tokens=5, batch_size=4)


@pytest.mark.parametrize(
    "change",
    ["seed", "num_samples", "max_new_tokens", "batch_size", "prompts", "weights", "pad_id"],
)
def test_samples_are_keyed_by_everything_they_depend_on(
    tiny_model, tiny_tokenizer, tmp_path, change
):
    """Another seed, setting, prompt list, reference or tokenizer: another entry, computed."""
    reference = copy.deepcopy(tiny_model)
    first = reference_samples(
        reference, tiny_tokenizer, PROMPTS, 7, SETTINGS, reference_side_cache(tmp_path, reference)
    )
    prompts, seed, settings = list(PROMPTS), 7, dict(SETTINGS)
    if change == "seed":
        seed = 8
    elif change == "prompts":
        prompts[1] = "The movie is"
    elif change == "weights":
        reference = _perturbed(reference, seed=9)
    elif change == "pad_id":
        tiny_tokenizer.pad_token = tiny_tokenizer.convert_ids_to_tokens(3)
    else:
        settings[change] += 1
    calls = _count_generate(reference)
    cache = reference_side_cache(tmp_path, reference)
    again = reference_samples(reference, tiny_tokenizer, prompts, seed, settings, cache)
    assert calls and len(list(tmp_path.glob("samples-*.pt"))) == 2
    expected = sample_for_scoring(reference, tiny_tokenizer, prompts, seed=seed, **settings)
    assert again == expected and (again != first or change == "pad_id")


def test_a_stored_entry_for_other_inputs_or_a_damaged_one_is_computed_again(
    tiny_model, tiny_tokenizer, tmp_path, caplog
):
    cache = reference_side_cache(tmp_path, tiny_model)
    expected = reference_samples(tiny_model, tiny_tokenizer, PROMPTS, 0, SETTINGS, cache)
    (path,) = tmp_path.glob("samples-*.pt")
    stored = torch.load(path, weights_only=True)
    forged = {**stored["value"], "texts": ["forged"] * len(expected.texts)}
    for content, message in (
        ({"key": "0" * 64, "value": forged}, "stored for other inputs"),
        (b"not a torch file", "unreadable"),
    ):
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        calls = _count_generate(tiny_model)
        with caplog.at_level(logging.WARNING, logger="fpo.evaluation"):
            again = reference_samples(tiny_model, tiny_tokenizer, PROMPTS, 0, SETTINGS, cache)
        assert again == expected and calls and message in caplog.text
        assert torch.load(path, weights_only=True)["key"] == stored["key"]  # stored again
