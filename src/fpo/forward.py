"""One forward pass of a causal LM over a preference batch, reduced to response positions."""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

from torch import Tensor, nn

from fpo.logprobs import ResponsePositions, gather_positions
from fpo.models.hf import CausalLMParts
from fpo.sae import ActivationCapture


class ResponseActivations(NamedTuple):
    """Activations at the ``M`` positions that predict response tokens.

    hidden: ``[M, H]`` final hidden states (after the final norm), input to the LM head.
    hooked: ``[M, d_in]`` activation at the SAE hook (``None`` without a hook).
    """

    hidden: Tensor
    hooked: Tensor | None


def forward_response_positions(
    parts: CausalLMParts,
    batch: dict,
    positions: ResponsePositions,
    hook_module: nn.Module | None = None,
) -> ResponseActivations:
    """Run the decoder trunk once (no LM head) and keep only response positions.

    The LM head is applied later, chunk by chunk, to the ``M`` positions only: no
    ``[2B, T, vocab]`` tensor is ever built.
    """
    capture = ActivationCapture(hook_module) if hook_module is not None else nullcontext()
    with capture as captured:
        output = parts.decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        )
        hooked = None if captured is None else gather_positions(captured.activation, positions)
    return ResponseActivations(gather_positions(output.last_hidden_state, positions), hooked)
