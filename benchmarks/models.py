"""The benchmark's models, loaded the same way for our trainer and for TRL's.

``load_model(name, device)`` returns ``(model, tokenizer)`` in train mode, fp32 weights:

* ``tiny``: the tests' random Gemma-3 (hidden 32, 2 layers, vocabulary 261).
* ``gemma3_270m``: google/gemma-3-270m, real weights (``fpo.models.gemma3_gguf``).
* ``gemma2_2b``: the Gemma-2-2B shape (hidden 2304, 26 layers, vocabulary 256,000) with random
  weights, built directly on ``device`` (no download); eager attention (soft-capped).
* ``gemma2_tiny``: the same architecture a few units wide: the GPU path's logic on a CPU.

FLOP counts (``model_flops``) are the usual dense estimates used for MFU.
"""

from __future__ import annotations

import torch
from torch import nn

#: Gemma-2-2B's shape (google/gemma-2-2b config.json).
GEMMA2_2B = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
    sliding_window=4096,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
)
GEMMA2_TINY = dict(
    vocab_size=261,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=2048,
    sliding_window=64,
    query_pre_attn_scalar=16,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
)
MODELS = ("tiny", "gemma3_270m", "gemma2_2b", "gemma2_tiny")


def _random_gemma2(shape: dict, device: str, seed: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from fpo.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Gemma2Config(
        **shape, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True
    )
    config._attn_implementation = "eager"  # soft-capped attention (the paper configs' path)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM(config)
    return model.float().train(), tokenizer


def load_model(name: str, device: str = "cpu", seed: int = 0, cache_dir: str | None = None):
    """``(model, tokenizer)`` of benchmark model ``name`` on ``device`` (fp32, train mode).

    The tokenizer only supplies BOS/EOS/pad ids: the rows are token ids (``rows.py``).
    """
    if name == "tiny":
        from fpo.models.tiny import load_tiny

        model, tokenizer = load_tiny(seed=seed)
    elif name == "gemma3_270m":
        from fpo.models.gemma3_gguf import load_gemma3_270m

        model, tokenizer = load_gemma3_270m(cache_dir=cache_dir)
    elif name in ("gemma2_2b", "gemma2_tiny"):
        shape = GEMMA2_2B if name == "gemma2_2b" else GEMMA2_TINY
        return _random_gemma2(shape, device, seed)
    else:
        raise ValueError(f"benchmark model {name!r}: choose one of {', '.join(MODELS)}")
    return model.to(device).train(), tokenizer


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``trunk`` (every parameter but the token embedding) and ``head`` (``V x H``)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return {
        "trunk": total - embedding.numel(),
        "head": model.get_output_embeddings().weight.numel(),
    }


def model_flops(
    counts: dict[str, int], tokens: int, positions: int, reference_forward: bool
) -> float:
    """FLOPs of one step's useful work: forward + backward (``6 x params x tokens``) of the
    trunk on the real tokens and of the LM head on the response positions, plus a forward
    (``2 x``) of the reference when it runs online. Attention's ``T^2`` term, padding and
    recomputation (checkpointing) are not counted: MFU is useful work over time."""
    work = counts["trunk"] * tokens + counts["head"] * positions
    return (6 + (2 if reference_forward else 0)) * work
