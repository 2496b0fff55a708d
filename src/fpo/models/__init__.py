"""Model loaders (each returns ``(model, tokenizer)``) and model-structure helpers."""

from fpo.models.hf import CausalLMParts, load_hf_causal_lm, split_causal_lm

__all__ = ["CausalLMParts", "load_hf_causal_lm", "split_causal_lm"]
