"""Loading Hugging Face causal LMs and splitting them into decoder trunk and LM head.

Every model loader in `fpo.models` returns ``(model, tokenizer)`` so a Hydra ``model``
config group can point at any of them with ``_target_``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fpo.errors import UserError
from fpo.models.tied import TiedPass, tied_pass


class CausalLMParts(NamedTuple):
    """The trunk (embeddings + decoder layers + final norm) and the head of a causal LM.

    ``decoder(input_ids, attention_mask).last_hidden_state`` is ``[N, T, H]`` (after the
    final norm); ``head(hidden [M, H]) -> logits [M, V]`` applies the LM head and, for
    models that have it (Gemma-2), the final logit soft-capping. ``tie()``: for one
    forward, a `fpo.models.tied.TiedPass` (its ``embed`` feeds the decoder; every head
    call of that forward is ``head(hidden, tie)``), or ``None`` where a tied weight's
    gradients cannot be shared (then the model runs as it is).
    """

    decoder: nn.Module
    head: Callable[..., Tensor]
    tie: Callable[[], TiedPass | None] | None = None


def contiguous_grad_head(lm_head: nn.Module) -> Callable[[Tensor], Tensor]:
    """``lm_head`` as ``hidden [C, H] -> logits [C, V]`` whose weight gradient is a fresh
    contiguous ``[V, H]`` tensor.

    In fp32, ``F.linear``'s weight gradient is a transposed view. A view cannot take the
    tied input embedding's gradient in place, so autograd adds the two into a third
    ``[V, H]`` tensor at the peak of backward (0.625 GiB for gemma-3-270m: its peak RSS on
    the CPU benchmark fell from 7.63 to 6.90 GiB); with an untied head the view is copied
    into ``.grad`` instead. ``weight @ hidden^T`` (then transposed) gives the same logits
    (a ``[C, V]`` view with strides ``(1, C)``) and makes the matrix multiply's output itself
    the weight's gradient. Under bf16 autocast the weight's cast already hands back a fresh
    fp32 gradient, so there it changes nothing (``tests/unit/test_lm_head.py``).

    Only a plain bias-free ``nn.Linear`` without forward hooks is rewritten, checked at each
    call (strategies wrap and hook modules after the model is split): anything else (a bias,
    a LoRA or quantised head, the FSDP or DeepSpeed hooks that gather a sharded weight) is
    called as is, as are inputs that are not 2-D.
    """

    def head(hidden: Tensor, tie: TiedPass | None = None) -> Tensor:
        if hidden.dim() != 2 or not _plain_linear(lm_head):
            return lm_head(hidden)
        if tie is not None:  # the same product, its weight gradient deferred
            return tie.head(hidden)
        return torch.mm(lm_head.weight, hidden.t()).t()

    return head


def _plain_linear(module: nn.Module) -> bool:
    """A bias-free ``nn.Linear`` (not a subclass) whose call no forward hook changes."""
    return (
        type(module) is nn.Linear
        and module.bias is None
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def split_causal_lm(model: PreTrainedModel) -> CausalLMParts:
    """Split ``model`` so logits are computed only where they are needed."""
    decoder = model.get_decoder()
    output_embeddings = model.get_output_embeddings()
    lm_head = contiguous_grad_head(output_embeddings)
    tie = partial(tied_pass, model.get_input_embeddings(), output_embeddings, _plain_linear)
    config = getattr(model.config, "text_config", model.config)
    softcap = getattr(config, "final_logit_softcapping", None)

    if softcap is None:
        return CausalLMParts(decoder, lm_head, tie)

    def head(hidden: Tensor, tie: TiedPass | None = None) -> Tensor:
        return torch.tanh(lm_head(hidden, tie) / softcap) * softcap

    return CausalLMParts(decoder, head, tie)


def load_hf_causal_lm(
    name_or_path: str,
    dtype: str = "float32",
    attn_implementation: str | None = "eager",
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load a hub model (users with network) or a local folder: ``(model, tokenizer)``.

    Gemma-2 wants ``attn_implementation="eager"`` (soft-capped attention) for training.
    """
    if os.path.sep in name_or_path and not os.path.exists(name_or_path):
        raise UserError(f"model.name_or_path: local model folder {name_or_path!r} does not exist.")
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=getattr(torch, dtype),
            attn_implementation=attn_implementation,
            use_safetensors=True,  # never unpickle .bin weights
            **kwargs,
        )
    except Exception as err:  # a truncated file, no safetensors weights, a broken config
        if not os.path.isdir(name_or_path):
            raise
        raise UserError(
            f"model.name_or_path={name_or_path!r}: could not load the model folder "
            f"({type(err).__name__}: {err}). Its files are truncated or unreadable, or it "
            "has no *.safetensors weights (fpo loads no pickled .bin weights); rewrite it with "
            "save_pretrained."
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
