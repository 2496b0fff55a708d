"""One forward: every caller's response statistics come from `fpo.forward.response_stats`.

Two kinds of checks. The source checks fail when a caller computes statistics its own way
again (runs the trunk, the LM-head engine or a log-softmax itself) or imports a private
name. The numeric checks compare each caller with the code path it had before
`response_stats` existed (copied here verbatim on top of the same engine): the values must
be bit-identical, gradients included.
"""

from __future__ import annotations

import ast
from functools import partial
from pathlib import Path

import pytest
import torch

from fpo import losses
from fpo.builder import StepSettings, assemble_module, frozen_copy, online_reference
from fpo.evaluation import scoring_batch, sequence_logprob
from fpo.forward import StatsRequest, forward_response_positions, response_stats
from fpo.logprobs import (
    response_positions,
    response_token_stats,
    segment_mean,
    segment_sum,
    sequence_logps,
)
from fpo.models.hf import split_causal_lm
from fpo.objective import build_objective
from fpo.packing import Packing
from fpo.sae import build_random_sae, resolve_hook_module

ROOT = Path(__file__).resolve().parents[2]
#: A judge's own language model reads its next-token distribution over label words: not a
#: response statistic of the policy or the reference.
NOT_RESPONSE_STATISTICS = {ROOT / "src" / "fpo" / "evaluation" / "instruct_judge.py"}
SOURCES = [
    path
    for path in (*(ROOT / "src").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py"))
    if path not in NOT_RESPONSE_STATISTICS
]
#: What computes statistics, and the one file allowed to call it.
ENGINE = {
    "forward_response_positions": "src/fpo/forward.py",
    "response_token_stats": "src/fpo/forward.py",
    "sequence_logps": "src/fpo/forward.py",
    "ActivationCapture": "src/fpo/forward.py",
    "target_logprobs": "src/fpo/logprobs.py",
    "log_softmax": "src/fpo/logprobs.py",
    "logsumexp": "src/fpo/logprobs.py",
}
CALLERS = (
    "src/fpo/module.py",
    "src/fpo/reference/base.py",
    "src/fpo/evaluation/heldout.py",
    "src/fpo/evaluation/scoring.py",
)
HOOK = "blocks.1.hook_resid_post"
OBJECTIVES = {
    "dpo": {"margin": "dpo", "beta": 0.1},
    "simpo": {"margin": "simpo", "beta": 2.0},
    "tdpo": {"margin": "dpo", "beta": 0.1, "constraints": {"token_kl": {"alpha": 0.5}}},
    "fpo": {"margin": "ln_dpo", "constraints": {"features": {"alpha": 0.5, "k": 8}}},
}
#: An objective whose online reference keeps the top 8 pooled features.
FEATURES_K8 = build_objective(OBJECTIVES["fpo"])


def called_names(path: Path) -> set[str]:
    """Names called in ``path``: ``f(...)``, ``x.f(...)``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


def test_only_the_one_forward_runs_the_trunk_and_the_lm_head():
    offenders = [
        f"{path.relative_to(ROOT)} calls {name}"
        for path in SOURCES
        for name in called_names(path) & ENGINE.keys()
        if str(path.relative_to(ROOT)) != ENGINE[name]
    ]
    assert not offenders, "use fpo.forward.response_stats:\n" + "\n".join(offenders)


def test_every_caller_uses_response_stats():
    assert all("response_stats" in called_names(ROOT / caller) for caller in CALLERS)


def test_no_private_names_are_imported_across_modules():
    offenders = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fpo"):
                names = [alias.name for alias in node.names if alias.name.startswith("_")]
                offenders += [f"{path.relative_to(ROOT)}: {node.module}.{n}" for n in names]
    assert not offenders, offenders


def test_benchmarks_do_not_spell_the_cache_row_layout():
    """The layout lives in `fpo.reference` (`cache_rows`, `item_field`)."""
    for path in (ROOT / "benchmarks").rglob("*.py"):
        strings = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not strings & {"sum_logps", "avg_logps", "n_tokens", "topk_values"}, path


# ------------------------------------------------------------- the code paths before
def old_chunked_head_stats(policy_hidden, policy_head, ref_hidden, ref_head, targets, chunk_size,
                           token_kl=False):  # fmt: skip
    """Held-out evaluation's own LM-head loop (before: `heldout.chunked_head_stats`)."""
    names = ["policy_logps", "ref_logps", "policy_entropy", "ref_entropy"]
    names += ["kl"] if token_kl else []
    parts = {name: [] for name in names}
    size = chunk_size or max(targets.shape[0], 1)
    with torch.no_grad():
        for start in range(0, targets.shape[0], size):
            end = min(start + size, targets.shape[0])
            target = targets[start:end].unsqueeze(1)
            logs = {}
            for side, hidden, head in (
                ("policy", policy_hidden, policy_head),
                ("ref", ref_hidden, ref_head),
            ):
                log_probs = torch.log_softmax(head(hidden[start:end]).float(), dim=-1)
                parts[f"{side}_logps"].append(log_probs.gather(1, target).squeeze(1))
                parts[f"{side}_entropy"].append(-(log_probs.exp() * log_probs).sum(dim=-1))
                logs[side] = log_probs
            if token_kl:
                ref = logs["ref"]
                parts["kl"].append((ref.exp() * (ref - logs["policy"])).sum(dim=-1))
    return {name: torch.cat(values) for name, values in parts.items()}


@torch.no_grad()
def old_reference_stats(reference, batch, positions, features, token_kl):
    """`OnlineReference.stats` before."""
    hook = resolve_hook_module(reference.model, reference.hook_name) if features else None
    out = forward_response_positions(reference.parts, batch, positions, hook, reference.packing)
    stats = {"hidden": out.hidden}
    if features:
        pooled = segment_mean(reference.sae.encode(out.hooked), positions.rows, positions.num_rows)
        top = pooled.topk(reference.k, dim=-1)
        stats["topk_indices"], stats["topk_values"] = top.indices, top.values.float()
    if not token_kl:
        tokens = response_token_stats(
            out.hidden, reference.parts.head, positions.targets, reference.logits_chunk_size
        )
        stats["logps"] = sequence_logps(tokens.policy_logps, positions.rows, positions.num_rows)
    return stats


def old_preference_step(module, batch):
    """`FPOLightningModule.preference_step` before."""
    needs, positions = module.objective.needs, response_positions(batch["labels"])
    rows = positions.num_rows
    ref = None
    if needs.reference:
        ref = old_reference_stats(
            module.reference, batch, positions, needs.features, needs.reference_logits
        )
    out = forward_response_positions(
        module.parts, batch, positions, module.hook_module, module.packing
    )
    tokens = response_token_stats(
        out.hidden,
        module.parts.head,
        positions.targets,
        module.logits_chunk_size,
        ref_hidden=ref["hidden"] if needs.reference_logits else None,
        ref_head=module.reference.parts.head if needs.reference_logits else None,
        checkpoint=module.checkpoint_logits,
    )
    policy_logps = sequence_logps(tokens.policy_logps, positions.rows, rows)
    stats = {}
    ref_logps = ref.get("logps") if ref is not None else None
    if needs.reference_logits:
        ref_logps = sequence_logps(tokens.ref_logps, positions.rows, rows)
        stats["kl"] = segment_sum(tokens.kl, positions.rows, rows)
    if needs.features:
        pooled = segment_mean(module.sae.encode(out.hooked), positions.rows, rows)
        stats["fmse"] = losses.feature_mse(
            pooled,
            ref["topk_indices"],
            ref["topk_values"],
            k=module.objective.feature_k,
            normalize=module.objective.constraints.features.normalize,
        )
    result = module.objective.loss(policy_logps, ref_logps, stats)
    stats["logps"] = getattr(policy_logps, module.objective.logps_field).detach()
    return result, stats


# ------------------------------------------------------------------------ numbers
def batch_of_pairs() -> dict:
    prompts = [[1, 40 + i, 41 + i, 50] for i in range(3)]
    chosen = [[70, 71, 72, 73][: i + 2] for i in range(3)]
    rejected = [[75, 76, 77][: 3 - i] + [80] * i for i in range(3)]
    return scoring_batch(prompts + prompts, chosen + rejected, pad_id=0)


def make_module(model, name, chunk, checkpoint, packing):
    torch.manual_seed(3)
    reference = frozen_copy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    objective = build_objective(OBJECTIVES[name])
    sae = build_random_sae(d_in=32, d_sae=64, k=8, hook_name=HOOK)
    online = None
    if objective.needs.reference:
        online = online_reference(
            reference, objective, sae=sae, hook_name=HOOK, logits_chunk_size=chunk,
            packing=packing,
        )  # fmt: skip
    return assemble_module(
        model, objective, partial(torch.optim.SGD, lr=0.0), reference=online, sae=sae,
        hook_name=HOOK, step=StepSettings(chunk, checkpoint, "stop", packing),
    )  # fmt: skip


SETTINGS = {"whole": (None, False, None), "chunked-checkpointed-packed": (3, True, Packing())}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", OBJECTIVES)
def test_training_step_is_bit_identical_to_the_old_path(tiny_model, name, setting):
    module = make_module(tiny_model, name, *SETTINGS[setting])
    batch = batch_of_pairs()
    runs = []
    for step in (module.preference_step, partial(old_preference_step, module)):
        result, stats = step(batch)
        result.losses.sum().backward()
        grads = [p.grad.clone() for p in module.policy.parameters()]
        module.policy.zero_grad(set_to_none=True)
        runs.append((result, stats, grads))
    (new, new_stats, new_grads), (old, old_stats, old_grads) = runs
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(getattr(new, field), getattr(old, field)), field
    assert new_stats.keys() == old_stats.keys()
    assert all(torch.equal(new_stats[key], old_stats[key]) for key in new_stats)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads, strict=True))


@pytest.mark.parametrize("features", [False, True])
@pytest.mark.parametrize("chunk", [None, 3])
def test_online_reference_is_bit_identical_to_the_old_path(tiny_model, features, chunk):
    sae = build_random_sae(d_in=32, d_sae=64, k=8, hook_name=HOOK)
    reference = online_reference(
        tiny_model, FEATURES_K8, sae=sae, hook_name=HOOK, logits_chunk_size=chunk
    )
    batch = batch_of_pairs()
    positions = response_positions(batch["labels"])
    new = reference.stats(batch, positions, features=features, token_kl=False)
    old = old_reference_stats(reference, batch, positions, features, token_kl=False)
    assert all(torch.equal(a, b) for a, b in zip(new.logps, old["logps"], strict=True))
    if features:
        assert torch.equal(new.topk_indices, old["topk_indices"])
        assert torch.equal(new.topk_values, old["topk_values"])
    tdpo = reference.stats(batch, positions, features=features, token_kl=True)
    assert tdpo.logps is None and torch.equal(tdpo.head_inputs.hidden, old["hidden"])


@pytest.mark.parametrize("token_kl", [False, True])
@pytest.mark.parametrize("chunk", [None, 3])
def test_evaluation_head_stats_are_bit_identical_to_the_old_loop(token_kl, chunk):
    """Held-out evaluation reads log-probs, entropies and the KL from full log-softmaxes."""
    generator = torch.Generator().manual_seed(0)
    hidden, ref_hidden = torch.randn(2, 11, 16, generator=generator)
    weight, ref_weight = torch.randn(2, 16, 300, generator=generator) * 3

    def head(h):
        return 30 * torch.tanh(h @ weight / 30)  # soft-capped, as Gemma-2

    def ref_head(h):
        return h @ ref_weight

    targets = torch.randint(0, 300, (11,), generator=generator)
    new = response_token_stats(hidden, head, targets, chunk, ref_hidden, ref_head,
                               kl=token_kl, entropy=True)  # fmt: skip
    old = old_chunked_head_stats(hidden, head, ref_hidden, ref_head, targets, chunk, token_kl)
    for name, value in old.items():
        assert torch.equal(getattr(new, name), value), name
    assert (new.kl is None) == (not token_kl)


@pytest.mark.parametrize("packing", [None, Packing()])
def test_sequence_logprob_is_bit_identical_to_the_old_path(tiny_model, packing):
    prompts = [[1, 40 + i, 41 + i] for i in range(4)]
    completions = [[70 + i] + [5] * i for i in range(4)]  # sorted by length: scored in order
    new = sequence_logprob(tiny_model, 0, prompts, completions, 3, packing=packing)
    batch = scoring_batch(prompts, completions, 0)
    positions = response_positions(batch["labels"])
    parts = split_causal_lm(tiny_model.eval())
    with torch.no_grad():
        hidden = forward_response_positions(parts, batch, positions, None, packing).hidden
        tokens = response_token_stats(hidden, parts.head, positions.targets, 3)
    old = sequence_logps(tokens.policy_logps, positions.rows, positions.num_rows).sum
    assert torch.equal(new, old)


def test_response_stats_pools_and_keeps_what_is_asked(tiny_model):
    """``pooled`` is the per-row mean of ``codes``; unrequested fields stay ``None``."""
    sae = build_random_sae(d_in=32, d_sae=64, k=8, hook_name=HOOK)
    batch = batch_of_pairs()
    positions = response_positions(batch["labels"])
    request = StatsRequest(codes=True, hooked=True)
    hook = resolve_hook_module(tiny_model, HOOK)
    with torch.no_grad():
        out = response_stats(split_causal_lm(tiny_model), batch, positions, request,
                             hook_module=hook, sae=sae)  # fmt: skip
    assert out.logps is None and out.kl is None and out.head_inputs is None
    assert out.codes.shape == (positions.rows.shape[0], 64)
    assert torch.equal(out.codes, sae.encode(out.hooked))
    for row in range(positions.num_rows):
        mine = out.codes[positions.rows == row]
        torch.testing.assert_close(out.pooled[row], mine.mean(0))
    with pytest.raises(ValueError, match="token_kl needs"):
        response_stats(split_causal_lm(tiny_model), batch, positions, StatsRequest(token_kl=True))
