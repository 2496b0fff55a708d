"""Collect activations at one decoder layer's hook site, once, into a tensor.

The hooked activation is ``blocks.{L}.hook_{site}`` (`fpo.hook_sites.SAE_SITES`): ``resid_post`` =
the output of ``model.model.layers[L]`` (before the final norm), ``mlp_out`` = what layer L's
MLP adds to the residual stream (Gemma 2/3: after ``post_feedforward_layernorm``); the module
is the one `fpo.sae.resolve_hook_module` finds during training. The forward is stopped right
after that module (a hook raises `_StopForward`), so the later layers and the LM head, the
expensive part of a 262k-vocab model, never run.

Texts are tokenized without special tokens and packed (joined by a blank line) into windows
of ``seq_len - 1`` tokens; each window gets BOS prepended (the way the model always sees
text). Collected positions
are the real tokens: pad positions are dropped, and BOS positions too when
``exclude_bos`` (BOS residual norms are ~2x the others and would dominate the SAE loss).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from fpo.errors import UserError
from fpo.hook_sites import hook_name_for_layer
from fpo.sae import resolve_hook_module


def token_windows(
    tokenizer, texts: Sequence[str], seq_len: int, separator: str = "\n\n"
) -> Iterator[list[int]]:
    """Packed token-id windows: ``[bos] + stream[i : i + seq_len - 1]`` (no bos: no prefix).

    ``stream`` is the texts' token ids joined by the ids of `separator`, so every window
    but the last is full (short texts do not waste the forward on padding). Every window
    has at least one text token, so a window never consists of BOS alone.
    """
    if seq_len < 2:
        raise UserError(f"seq_len must be >= 2 (BOS + one token), got {seq_len}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"]
    step = seq_len - len(bos)
    buffer: list[int] = []
    for i, text in enumerate(texts):
        buffer += (sep if i else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
        while len(buffer) >= step:
            yield bos + buffer[:step]
            buffer = buffer[step:]
    if buffer:
        yield bos + buffer


def _pad_batch(windows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad windows into ``input_ids [B, T]`` and ``attention_mask [B, T]``."""
    rows = [torch.tensor(window, dtype=torch.long) for window in windows]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(window) for window in windows])
    return input_ids, (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass after the hooked layer."""


@torch.inference_mode()
def layer_output(
    model: nn.Module,
    layer: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    site: str = "resid_post",
) -> torch.Tensor:
    """Activation at ``blocks.{layer}.hook_{site}`` for a batch, ``[B, T, d_model]``; the
    forward stops there (later modules skipped)."""
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    module = resolve_hook_module(model, hook_name_for_layer(layer, site))
    handle = module.register_forward_hook(capture)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


def collect_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    hook_layer: int,
    max_tokens: int,
    seq_len: int = 128,
    exclude_bos: bool = True,
    batch_size: int = 8,
    log_every: int = 0,
    site: str = "resid_post",
) -> torch.Tensor:
    """Activations at ``blocks.{hook_layer}.hook_{site}``: ``FloatTensor[N, d_model]``.

    ``N = min(max_tokens, number of kept positions)``; kept positions are the non-pad tokens
    of every window, minus the BOS positions when `exclude_bos`. Rows come in text order.
    The model runs in eval mode (its previous mode is restored) and in inference mode.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos_id = tokenizer.bos_token_id
    chunks: list[torch.Tensor] = []
    n_kept = 0
    was_training = model.training
    model.eval()
    try:
        windows = token_windows(tokenizer, texts, seq_len)
        while n_kept < max_tokens:
            batch = [w for _, w in zip(range(batch_size), windows, strict=False)]
            if not batch:
                break
            input_ids, attention_mask = _pad_batch(batch, pad_id)
            hidden = layer_output(model, hook_layer, input_ids, attention_mask, site)
            keep = attention_mask.bool()
            if exclude_bos and bos_id is not None:
                keep &= input_ids != bos_id
            chunks.append(hidden[keep].float().clone())
            n_kept += chunks[-1].shape[0]
            if log_every and len(chunks) % log_every == 0:
                print(f"collected {min(n_kept, max_tokens)}/{max_tokens} activations", flush=True)
    finally:
        model.train(was_training)
    if not chunks:
        raise UserError("no text to collect activations from (the corpus is empty)")
    return torch.cat(chunks)[:max_tokens]
