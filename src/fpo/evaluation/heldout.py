"""Metrics on held-out preference pairs: entropy, preference accuracy, SAE feature drift.

One pass per model over the pairs (batches of chosen + rejected rows, the training layout)
through `fpo.forward.response_stats`: the reference's first (`reference_pair_side`: its
log-probs, entropy and SAE features, which depend on nothing the run trains, so a
`fpo.evaluation.reference_side` cache keeps them across runs), then the policy's. Each runs
its decoder trunk once and its LM head on response positions only, in chunks of
``logits_chunk_size`` positions (at most ``chunk x vocab`` float32 logits at a time, never
``[B, T, vocab]``; TDPO's token KL runs the reference's head beside the policy's, on the
reference's kept LM-head inputs); the SAE encodes the hooked activations at the same
positions. The numbers are those of one fused pass of both models, bit for bit.

With ``w`` chosen, ``l`` rejected, ``avg_lp`` the per-token mean response log-prob:

- ``entropy``: per held-out *chosen* response, the mean over its response positions of the
  predictive entropy ``H(pi_theta(.|ctx_t)) = -sum_v p(v) log p(v)`` (nats), then the mean
  over responses (stderr over responses). ``reference_entropy``: the same for the reference.
- ``preference_accuracy`` (method-agnostic, comparable across objectives): the pair is right
  when ``avg_lp_policy(w) - avg_lp_ref(w) > avg_lp_policy(l) - avg_lp_ref(l)``.
- ``implicit_reward_accuracy``: the run's own objective (``Objective.loss`` on the pair,
  its constraint terms included) gives ``chosen_rewards > rejected_rewards``. For both
  accuracies a tie counts half (a policy equal to its reference scores 0.5, chance);
  stderr over pairs.
- ``feature_drift``: FPO's discrepancy ``D`` (`fpo.losses.feature_mse`, top-``k`` union,
  ``/ k``) between the policy's and the reference's pooled SAE features of each response,
  averaged over the pair's two responses, then over pairs (stderr over pairs). It is
  computed for every objective, with the run's SAE.

`FeatureShift` also accumulates the mean pooled feature change ``policy - reference`` over
responses and, per feature, the positions where each model activates it most (for the
feature report, `fpo.evaluation.features`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from fpo.evaluation.reference_side import ReferenceSideCache
from fpo.evaluation.stats import grouped_mean_stderr
from fpo.forward import HeadInputs, StatsRequest, response_stats
from fpo.generation import eval_mode
from fpo.hashing import hash_json, hash_state_dict, sae_config_hash
from fpo.logprobs import SequenceLogps, response_positions
from fpo.losses import feature_mse
from fpo.models.hf import split_causal_lm
from fpo.objective import Objective
from fpo.packing import Packing
from fpo.sae import resolve_hook_module

DEFAULT_DRIFT_K = 50


@dataclass
class FeatureShift:
    """Running per-feature statistics over held-out responses (see the module docstring).

    ``top`` keeps, per model and feature, the ``contexts`` largest activations seen so far
    and the global position id of each (``positions[id] = (row, col)``, ``rows[row]`` the
    row's token ids), so memory is ``O(contexts x d_sae)`` whatever the number of pairs.
    ``sums[model]``: the sum over responses of the model's pooled features, ``[d_sae]``.
    """

    d_sae: int
    contexts: int = 3
    count: int = 0
    sums: dict[str, Tensor] = field(default_factory=dict)
    top: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    positions: list[tuple[int, int]] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)

    @property
    def policy_sum(self) -> Tensor:
        return self.sums["policy"]

    @property
    def ref_sum(self) -> Tensor:
        return self.sums["ref"]

    def update(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        rows: Tensor,
        cols: Tensor,
        acts: dict[str, Tensor],
        pooled: dict[str, Tensor],
    ) -> None:
        """One batch: token rows, packed ``(rows, cols)``, per-position ``acts[model]``
        ``[M, d_sae]`` and pooled ``[N, d_sae]`` features of ``policy`` and/or ``ref``."""
        row_offset, position_offset = len(self.rows), len(self.positions)
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            self.rows.append([token for token, keep in zip(ids, mask, strict=True) if keep])
        self.positions += [
            (row_offset + r, c) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
        ]
        self.count += input_ids.shape[0]
        for model, values in pooled.items():
            if model not in self.sums:
                self.sums[model] = torch.zeros(self.d_sae, dtype=torch.float64)
            self.sums[model] += values.double().sum(0).cpu()
        ids = torch.arange(position_offset, len(self.positions))
        for model, values in acts.items():
            values = values.float().cpu()
            take = min(self.contexts, values.shape[0])
            if take == 0:
                continue
            best, where = values.topk(take, dim=0)  # [take, d_sae]
            found = ids[where]
            if model in self.top:
                old_values, old_ids = self.top[model]
                best, found = torch.cat([old_values, best]), torch.cat([old_ids, found])
                keep = min(self.contexts, best.shape[0])
                best, order = best.topk(keep, dim=0)
                found = found.gather(0, order)
            self.top[model] = (best, found)

    def mean_change(self) -> Tensor:
        """``mean(policy pooled) - mean(reference pooled)`` per feature, ``[d_sae]``."""
        return (self.policy_sum - self.ref_sum) / max(self.count, 1)


def _rate(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return grouped_mean_stderr(values, list(range(len(values))))


def _outcomes(chosen: Tensor, rejected: Tensor) -> list[float]:
    """1 if chosen > rejected, 0.5 on a tie, 0 otherwise."""
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).tolist()


def reference_pair_side(
    reference: nn.Module,
    batches: list[dict],
    sae: nn.Module | None,
    hook_name: str | None,
    logits_chunk_size: int | None,
    contexts: int,
    packing: Packing | None,
    keep_hidden: bool,
) -> dict[str, Any]:
    """The reference's statistics on the held-out pair ``batches`` (on its device), all that
    `heldout_pair_metrics` needs of it: per batch ``sum``, ``avg``, ``n_tokens`` (its
    `fpo.logprobs.SequenceLogps`, ``[N]``) and ``entropy`` ``[N]``; with an SAE ``pooled``
    ``[N, d_sae]``, and over all batches ``pooled_sum`` ``[d_sae]`` and ``top`` (its
    `FeatureShift` top contexts); with ``keep_hidden`` (TDPO's token KL) ``hidden`` ``[M, H]``,
    the LM-head inputs. Tensors on the CPU (what `fpo.evaluation.reference_side` stores)."""
    parts = split_causal_lm(reference)
    hook = resolve_hook_module(reference, hook_name) if sae is not None else None
    request = StatsRequest(logps=True, entropy=True, codes=sae is not None, head_inputs=keep_hidden)
    shift = FeatureShift(int(sae.cfg.d_sae), contexts) if sae is not None else None
    per_batch = []
    with eval_mode(reference), torch.no_grad():
        for batch in batches:
            positions = response_positions(batch["labels"])
            out = response_stats(
                parts, batch, positions, request, hook_module=hook, sae=sae,
                packing=packing, logits_chunk_size=logits_chunk_size,
            )  # fmt: skip
            stats = {**out.logps._asdict(), "entropy": out.entropy}
            if keep_hidden:
                stats["hidden"] = out.head_inputs.hidden
            if shift is not None:
                stats["pooled"] = out.pooled
                shift.update(
                    batch["input_ids"], batch["attention_mask"], positions.rows,
                    positions.cols, {"ref": out.codes}, {"ref": out.pooled},
                )  # fmt: skip
            per_batch.append({key: value.cpu() for key, value in stats.items()})
    side: dict[str, Any] = {"batches": per_batch}
    if shift is not None:
        side["pooled_sum"] = shift.sums.get("ref")
        side["top"] = list(shift.top["ref"]) if "ref" in shift.top else None
    return side


def pair_batches_key(batches: list[dict]) -> str:
    """sha256 of the pair batches' token ids, masks and labels, batch by batch (the pairs
    file, template, truncation, tokenizer, ``num_pairs`` and batch size, as the model sees
    them)."""
    keys = ("input_ids", "attention_mask", "labels")
    return hash_json([[batch[key].tolist() for key in keys] for batch in batches])


def heldout_pair_metrics(
    policy: nn.Module,
    reference: nn.Module,
    batches: Iterable[dict],
    objective: Objective,
    sae: nn.Module | None = None,
    hook_name: str | None = None,
    drift_k: int = DEFAULT_DRIFT_K,
    logits_chunk_size: int | None = 256,
    contexts: int = 3,
    packing: Packing | None = None,
    cache: ReferenceSideCache | None = None,
) -> tuple[dict[str, Any], FeatureShift | None]:
    """The module docstring's metrics over ``batches`` (collated preference batches).

    Returns the JSON-ready metrics (``entropy``, ``reference_entropy``,
    ``preference_accuracy``, ``implicit_reward_accuracy``, ``feature_drift``, each with
    ``*_stderr``, and ``heldout_pairs``) and the `FeatureShift` (``None`` without an SAE).
    ``packing``: run both trunks on the real tokens only (`fpo.packing`). ``cache``: read
    the reference's side (`reference_pair_side`) from it, or compute and store it there.
    """
    needs = objective.needs
    device = next(policy.parameters()).device
    batches = [
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        for batch in batches
    ]
    hook = None
    if sae is not None:
        hook = resolve_hook_module(policy, hook_name)
        drift_k = min(drift_k, int(sae.cfg.d_sae))
    args = (sae, hook_name, logits_chunk_size, contexts, packing, needs.reference_logits)
    compute = partial(reference_pair_side, reference, batches, *args)
    if cache is None:
        side = compute()
    else:
        components = {
            "pairs": pair_batches_key(batches),
            "sae_weights": "none" if sae is None else hash_state_dict(sae),
            "sae_config": "none" if sae is None else sae_config_hash(sae),
            "settings": [hook_name, logits_chunk_size, contexts, str(packing)],
            "hidden": needs.reference_logits,
        }
        side = cache.fetch("pair_stats", components, compute)
    objective_k = objective.feature_k
    shift = FeatureShift(int(sae.cfg.d_sae), contexts) if sae is not None else None
    request = StatsRequest(
        logps=True, entropy=True, token_kl=needs.reference_logits, codes=sae is not None
    )
    parts, ref_head = split_causal_lm(policy), split_causal_lm(reference).head
    entropy, ref_entropy, agnostic, implicit, drift = [], [], [], [], []
    with eval_mode(policy), torch.no_grad():
        for batch, ref in zip(batches, side["batches"], strict=True):
            ref = {key: value.to(device) for key, value in ref.items()}
            positions = response_positions(batch["labels"])
            out = response_stats(
                parts, batch, positions, request, hook_module=hook, sae=sae, packing=packing,
                logits_chunk_size=logits_chunk_size,
                reference=HeadInputs(ref["hidden"], ref_head) if "hidden" in ref else None,
            )  # fmt: skip
            ref_logps = SequenceLogps(ref["sum"], ref["avg"], ref["n_tokens"])
            pairs = positions.num_rows // 2
            entropy += out.entropy[:pairs].tolist()
            ref_entropy += ref["entropy"][:pairs].tolist()
            agnostic += _outcomes(*(out.logps.avg - ref_logps.avg).chunk(2))
            stats: dict[str, Tensor] = {"kl": out.kl} if needs.reference_logits else {}
            if shift is not None:
                pooled = {"policy": out.pooled, "ref": ref["pooled"]}
                drift += _pair_mean(_discrepancy(pooled, drift_k)).tolist()
                if objective_k:
                    stats["fmse"] = _discrepancy(pooled, objective_k)
                shift.update(
                    batch["input_ids"], batch["attention_mask"], positions.rows,
                    positions.cols, {"policy": out.codes}, {"policy": out.pooled},
                )  # fmt: skip
            result = objective.loss(out.logps, ref_logps, stats)
            implicit += _outcomes(result.chosen_rewards, result.rejected_rewards)
    if shift is not None and side.get("pooled_sum") is not None:
        shift.sums["ref"] = side["pooled_sum"]
        if side["top"] is not None:
            shift.top["ref"] = tuple(side["top"])
    metrics: dict[str, Any] = {"heldout_pairs": len(agnostic)}
    for key, values in (
        ("entropy", entropy),
        ("reference_entropy", ref_entropy),
        ("preference_accuracy", agnostic),
        ("implicit_reward_accuracy", implicit),
        ("feature_drift", drift),
    ):
        metrics[key], metrics[f"{key}_stderr"] = _rate(values)
    metrics["feature_drift_k"] = drift_k if sae is not None else None
    return metrics, shift


def _discrepancy(pooled: dict[str, Tensor], k: int) -> Tensor:
    """``feature_mse`` of the policy's pooled features against the reference's top-k: ``[N]``."""
    top = pooled["ref"].topk(k, dim=-1)
    return feature_mse(pooled["policy"], top.indices, top.values, k=k)


def _pair_mean(values: Tensor) -> Tensor:
    """``[2B]`` rows chosen-then-rejected -> ``[B]`` mean of each pair's two values."""
    chosen, rejected = values.chunk(2)
    return (chosen + rejected) / 2
