"""Reference statistics behind one interface: `OnlineReference` runs a frozen copy of the
model, `BatchReference` reads the ``ref_*`` fields the offline cache puts into each batch."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from fpo.forward import HeadInputs, StatsRequest, response_stats
from fpo.logprobs import ResponsePositions, SequenceLogps
from fpo.models.hf import split_causal_lm
from fpo.packing import Packing, check_packable
from fpo.phases import phase
from fpo.sae import resolve_hook_module


class ReferenceStats(NamedTuple):
    """What the objectives need from the reference, rows chosen-then-rejected.

    logps: summed/averaged response log-probs and token counts, each ``[2B]`` (``None``
        when ``head_inputs`` are returned instead: TDPO computes them with its KL in one pass).
    topk_indices, topk_values: ``[2B, k]`` top-k of the pooled SAE features (FPO).
    head_inputs: the ``[M, H]`` final hidden states at response positions and the LM head
        (TDPO's full-vocabulary KL, `fpo.forward.HeadInputs`).
    """

    logps: SequenceLogps | None
    topk_indices: Tensor | None = None
    topk_values: Tensor | None = None
    head_inputs: HeadInputs | None = None


class ReferenceSource(Protocol):
    def stats(
        self, batch: dict, positions: ResponsePositions, *, features: bool, token_kl: bool
    ) -> ReferenceStats: ...


class OnlineReference(nn.Module):
    """A frozen reference ``model`` (an identical load of the policy's weights) run under
    ``no_grad`` every step, and by the cache builder. With the frozen ``sae`` (FPO) it keeps
    the top ``k`` pooled features per row (``1 <= k <= d_sae``), read at ``hook_name``
    (required with an SAE; the caller resolves it). ``logits_chunk_size``: positions per
    LM-head chunk; ``packing``: run the trunk on real tokens only (`fpo.packing`)."""

    def __init__(
        self,
        model: nn.Module,
        sae: nn.Module | None = None,
        hook_name: str | None = None,
        k: int = 0,
        logits_chunk_size: int | None = None,
        packing: Packing | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.parts = split_causal_lm(model)
        self.sae, self.hook_name = sae, hook_name if sae is not None else None
        if sae is not None and not hook_name:
            raise ValueError("OnlineReference needs the resolved hook_name with an SAE")
        if sae is not None:
            resolve_hook_module(model, hook_name)  # fail at start-up
        self.k, self.logits_chunk_size = k, logits_chunk_size
        if packing is not None:
            check_packable(model)
        self.packing = packing

    def train(self, mode: bool = True) -> OnlineReference:
        """The reference stays in eval mode (no dropout) whatever Lightning asks."""
        return super().train(False)

    @phase("reference")
    @torch.no_grad()
    def stats(
        self, batch: dict, positions: ResponsePositions, *, features: bool, token_kl: bool
    ) -> ReferenceStats:
        if features and self.sae is None:
            raise ValueError("SAE features asked of an OnlineReference built without an SAE")
        self.model.eval()
        hook = resolve_hook_module(self.model, self.hook_name) if features else None
        request = StatsRequest.for_reference(features=features, token_kl=token_kl)
        settings = dict(hook_module=hook, sae=self.sae, packing=self.packing)
        settings |= dict(logits_chunk_size=self.logits_chunk_size)
        out = response_stats(self.parts, batch, positions, request, **settings)
        if not features:
            return ReferenceStats(out.logps, head_inputs=out.head_inputs)
        top = out.pooled.topk(self.k, dim=-1)
        return ReferenceStats(out.logps, top.indices, top.values.float(), out.head_inputs)


class BatchReference:
    """Reads the reference statistics the offline cache put into the batch: ``ref_sum_logps``,
    ``ref_avg_logps``, ``ref_n_tokens`` ``[2B]`` and, for FPO, ``ref_topk_indices`` /
    ``ref_topk_values`` ``[2B, k]`` (see docs/architecture.md)."""

    def stats(
        self, batch: dict, positions: ResponsePositions, *, features: bool, token_kl: bool
    ) -> ReferenceStats:
        if token_kl:  # the objective layer refuses this combination for the user
            raise ValueError("the offline cache has no full-vocabulary logits for a token KL")
        sums, avgs = batch["ref_sum_logps"].float(), batch["ref_avg_logps"].float()
        logps = SequenceLogps(sums, avgs, batch["ref_n_tokens"])
        if not features:
            return ReferenceStats(logps)
        indices, values = batch["ref_topk_indices"].long(), batch["ref_topk_values"].float()
        return ReferenceStats(logps, indices, values)
