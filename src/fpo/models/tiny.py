"""Tiny random models and a locally built tokenizer, for tests and smoke runs.

Nothing here touches the network: the tokenizer is a byte-level BPE with no merges (every
UTF-8 byte is one token, so any text round-trips), the model is a randomly initialised
Gemma-3 text model of the same architecture as the embedded default, a few layers wide.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
)

ARCHITECTURES = {
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    # Gemma-2 (the FPO paper's model): soft-capped attention and final logits.
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
}

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]

# Gemma-style chat template (the same turn markers as google/gemma-3 instruction models).
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 5 special tokens + 256 byte tokens (vocab 261).

    Adds `<bos>` at the start of each encoded text (like the Gemma tokenizers), has
    `<eos>` and `<pad>`, and, with ``chat_template=True``, a Gemma-style chat template.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    vocab_size: int = 261,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 16,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: str = "float32",
    architecture: str = "gemma3",
):
    """A randomly initialised Gemma-3 (or Gemma-2) text model, seeded, in train mode.

    Token ids follow `build_tiny_tokenizer`: pad 0, bos 1, eos 2.
    """
    config_class, model_class = ARCHITECTURES[architecture]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        sliding_window=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.to(getattr(torch, dtype))
    model.train()
    return model


def load_tiny(chat_template: bool = True, **model_kwargs):
    """``(model, tokenizer)`` for the ``model=tiny`` config (tests and smoke runs)."""
    tokenizer = build_tiny_tokenizer(chat_template=chat_template)
    model = build_tiny_model(vocab_size=len(tokenizer), **model_kwargs)
    return model, tokenizer
