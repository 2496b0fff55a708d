"""One forward pass of a causal LM over a preference batch, reduced to response positions."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import NamedTuple

from torch import Tensor, nn

from fpo.logprobs import ResponsePositions, gather_positions
from fpo.models.hf import CausalLMParts
from fpo.packing import Packing, check_packable, pack_rows
from fpo.phases import phase
from fpo.sae import ActivationCapture


class ResponseActivations(NamedTuple):
    """Activations at the ``M`` positions that predict response tokens.

    hidden: ``[M, H]`` final hidden states (after the final norm), input to the LM head.
    hooked: ``[M, d_in]`` activation at the SAE hook (``None`` without a hook).
    """

    hidden: Tensor
    hooked: Tensor | None


@phase("trunk")
def forward_response_positions(
    parts: CausalLMParts,
    batch: dict,
    positions: ResponsePositions,
    hook_module: nn.Module | None = None,
    packing: Packing | None = None,
) -> ResponseActivations:
    """Run the decoder trunk once (no LM head) and keep only response positions.

    The LM head is applied later, chunk by chunk, to the ``M`` positions only: no
    ``[2B, T, vocab]`` tensor is ever built. ``batch`` holds ``input_ids`` and
    ``attention_mask`` ``[N, T]``. With ``packing``, the trunk runs on the real tokens only
    (`fpo.packing`: ``[P, L]`` packed rows, no pads); the result is the same up to float
    rounding, in the same ``[M, ...]`` order.
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
        output = parts.decoder(**inputs, use_cache=False)
        hooked = None if captured is None else select(captured.activation)
    return ResponseActivations(select(output.last_hidden_state), hooked)
