"""One forward for a batch's response statistics: `response_stats`.

Every per-batch statistic of a model's responses (summed/averaged log-probs and token counts,
the full-vocabulary token KL against a reference, predictive entropies, pooled SAE features)
is computed here, by one function, for training (the policy's side of a step), the online
reference (and so the offline cache build), held-out evaluation and sampled-KL scoring. Each
caller says what it needs with a `StatsRequest`. A call runs the decoder trunk once
(`forward_response_positions`: optionally packed, `fpo.packing`; optionally capturing the SAE
hook, `fpo.sae.ActivationCapture`), then the LM head on the ``M`` response positions only,
chunk by chunk (`fpo.logprobs.response_token_stats`, the engine): no ``[N, T, vocab]`` tensor
is ever built. ``N`` is the batch's rows (chosen then rejected for a preference batch).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor, nn

from fpo.logprobs import (
    Head,
    ResponsePositions,
    SequenceLogps,
    gather_positions,
    response_token_stats,
    segment_mean,
    segment_sum,
    sequence_logps,
)
from fpo.models.hf import CausalLMParts
from fpo.models.tied import TiedPass
from fpo.packing import Packing, check_packable, pack_rows
from fpo.phases import phase
from fpo.sae import ActivationCapture

if TYPE_CHECKING:
    from fpo.objective import Needs


class ResponseActivations(NamedTuple):
    """Activations at the ``M`` positions that predict response tokens.

    hidden: ``[M, H]`` final hidden states (after the final norm), input to the LM head.
    hooked: ``[M, d_in]`` activation at the SAE hook (``None`` without a hook).
    """

    hidden: Tensor
    hooked: Tensor | None


class HeadInputs(NamedTuple):
    """A model's LM-head input at the ``M`` response positions: ``hidden [M, H]`` and its
    ``head`` (``[C, H] -> [C, V]`` logits), for another model's pass to read (TDPO's KL)."""

    hidden: Tensor
    head: Head


@dataclass(frozen=True)
class StatsRequest:
    """What :func:`response_stats` computes (everything off by default).

    logps: per-row response log-probs (:class:`~fpo.logprobs.SequenceLogps`, ``[N]``); with
        a ``reference`` also the reference's.
    token_kl: per-row sum over response tokens of ``KL(pi_ref || pi)`` over the full
        vocabulary, ``[N]`` (TDPO); needs a ``reference``.
    entropy: per-row mean predictive entropy ``[N]`` (and the reference's); the log-probs
        and KL are then read from a full log-softmax per chunk (held-out evaluation's way).
    features: pooled SAE features ``[N, d_sae]`` (needs the SAE and its hook module).
    codes: also keep the per-position SAE features ``[M, d_sae]``.
    hooked: keep the activations at the hook module, ``[M, d_in]``.
    head_inputs: keep the final hidden states and the LM head (:class:`HeadInputs`), for
        another model's pass, instead of running the head here.
    """

    logps: bool = False
    token_kl: bool = False
    entropy: bool = False
    features: bool = False
    codes: bool = False
    hooked: bool = False
    head_inputs: bool = False

    @classmethod
    def for_policy(cls, needs: Needs) -> StatsRequest:
        """A training step's policy side, from the objective's ``needs``: log-probs, the
        token KL (``reference_logits``, TDPO), pooled features (``features``, FPO)."""
        return cls(logps=True, token_kl=needs.reference_logits, features=needs.features)

    @classmethod
    def for_reference(cls, *, features: bool, token_kl: bool) -> StatsRequest:
        """A reference's side: its log-probs, or (``token_kl``) its head inputs for the
        policy's pass, which computes them beside the KL; pooled features with ``features``."""
        return cls(logps=not token_kl, head_inputs=token_kl, features=features)

    @property
    def runs_head(self) -> bool:
        return self.logps or self.token_kl or self.entropy

    @property
    def encodes(self) -> bool:
        return self.features or self.codes

    @property
    def captures(self) -> bool:
        return self.encodes or self.hooked


@dataclass
class ResponseStats:
    """The result of :func:`response_stats`: a field is ``None`` unless requested.

    logps, ref_logps: :class:`~fpo.logprobs.SequenceLogps` of the model and of the
        ``reference`` (``[N]`` each). kl: ``[N]``. entropy, ref_entropy: ``[N]``.
    pooled: ``[N, d_sae]``; codes: ``[M, d_sae]``; hooked: ``[M, d_in]``.
    head_inputs: :class:`HeadInputs` (``hidden [M, H]``).
    """

    logps: SequenceLogps | None = None
    ref_logps: SequenceLogps | None = None
    kl: Tensor | None = None
    entropy: Tensor | None = None
    ref_entropy: Tensor | None = None
    pooled: Tensor | None = None
    codes: Tensor | None = None
    hooked: Tensor | None = None
    head_inputs: HeadInputs | None = None


def response_stats(
    parts: CausalLMParts,
    batch: dict,
    positions: ResponsePositions,
    request: StatsRequest,
    *,
    hook_module: nn.Module | None = None,
    sae: nn.Module | None = None,
    packing: Packing | None = None,
    logits_chunk_size: int | None = None,
    checkpoint_logits: bool = False,
    reference: HeadInputs | None = None,
) -> ResponseStats:
    """A batch's response statistics for one model, as ``request`` asks.

    Args:
        parts: the model's trunk and LM head (`fpo.models.hf.split_causal_lm`).
        batch: ``input_ids`` and ``attention_mask`` ``[N, T]``.
        positions: the batch's response positions (`fpo.logprobs.response_positions`).
        request: what to compute (:class:`StatsRequest`).
        hook_module: the module the SAE reads (captured only when the request needs it).
        sae: the frozen SAE (``features`` / ``codes``).
        packing: run the trunk on the real tokens only (`fpo.packing`; ``None``: padded).
        logits_chunk_size: response positions per LM-head chunk (``None``: all at once).
        checkpoint_logits: recompute each LM-head chunk in backward (grad enabled only).
        reference: another model's :class:`HeadInputs` at the same positions: its log-probs
            (and entropy, KL) come from the same chunked head pass (TDPO's fused KL).

    Grad flows wherever the caller enables it; the reference's head runs without grad.
    """
    if request.token_kl and reference is None:
        raise ValueError("response_stats: token_kl needs the reference's head inputs")
    if request.captures and hook_module is None:
        raise ValueError("response_stats: SAE features or hooked activations need hook_module")
    if request.encodes and sae is None:
        raise ValueError("response_stats: SAE features need the SAE")
    hook = hook_module if request.captures else None
    tie = parts.tie() if request.runs_head and parts.tie is not None else None
    acts = forward_response_positions(parts, batch, positions, hook, packing, tie)
    head = parts.head if tie is None else partial(parts.head, tie=tie)
    rows, num_rows = positions.rows, positions.num_rows
    out = ResponseStats()
    if request.head_inputs:
        out.head_inputs = HeadInputs(acts.hidden, parts.head)
    if request.runs_head:
        tokens = response_token_stats(
            acts.hidden,
            head,
            positions.targets,
            logits_chunk_size,
            ref_hidden=None if reference is None else reference.hidden,
            ref_head=None if reference is None else reference.head,
            checkpoint=checkpoint_logits,
            kl=request.token_kl,
            entropy=request.entropy,
        )
        out.logps = sequence_logps(tokens.policy_logps, rows, num_rows)
        if reference is not None:
            out.ref_logps = sequence_logps(tokens.ref_logps, rows, num_rows)
        if request.token_kl:
            out.kl = segment_sum(tokens.kl, rows, num_rows)
        if request.entropy:
            out.entropy = _row_mean(tokens.policy_entropy, rows, num_rows)
            if reference is not None:
                out.ref_entropy = _row_mean(tokens.ref_entropy, rows, num_rows)
    if request.encodes:
        codes = sae.encode(acts.hooked)
        out.pooled = segment_mean(codes, rows, num_rows)
        out.codes = codes if request.codes else None
    if request.hooked:
        out.hooked = acts.hooked
    return out


def _row_mean(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Per-row mean of per-position values ``[M] -> [N]`` (0 for a row without positions)."""
    return segment_mean(values.unsqueeze(1), rows, num_rows).squeeze(1)


@phase("trunk")
def forward_response_positions(
    parts: CausalLMParts,
    batch: dict,
    positions: ResponsePositions,
    hook_module: nn.Module | None = None,
    packing: Packing | None = None,
    tie: TiedPass | None = None,
) -> ResponseActivations:
    """Run the decoder trunk once (no LM head) and keep only response positions: the trunk
    step of :func:`response_stats` (callers use that).

    ``batch`` holds ``input_ids`` and ``attention_mask`` ``[N, T]``. With ``packing``, the
    trunk runs on the real tokens only (`fpo.packing`: ``[P, L]`` packed rows, no pads); the
    result is the same up to float rounding, in the same ``[M, ...]`` order. ``tie``: the
    embeddings come from its lookup (`fpo.models.tied`; the same values).
    """
    if packing is None:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        select = partial(gather_positions, positions=positions)
    else:
        check_packable(parts.decoder)
        packed = pack_rows(batch["input_ids"], batch["attention_mask"], packing)
        # no attention_mask: transformers builds the block-diagonal mask from position_ids
        inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids}
        select = partial(packed.gather, positions=positions)
    capture = ActivationCapture(hook_module) if hook_module is not None else nullcontext()
    with capture as captured:
        if tie is not None:  # the same embeddings; a tied weight's gradients added in place
            inputs["inputs_embeds"] = tie.embed(inputs.pop("input_ids"))
        output = parts.decoder(**inputs, use_cache=False)
        hooked = None if captured is None else select(captured.activation)
    return ResponseActivations(select(output.last_hidden_state), hooked)
