"""Samples whose token ids are exactly what the sampler drew, ready to be scored.

`fpo.generation.sample_completion_ids` drops the EOS token, but the probability of
stopping is part of a completion's probability: ``log pi(y | x)`` of a completion that
stopped must include ``log pi(EOS | x, y)``. `generate` stops either at EOS or after
``max_new_tokens`` tokens, so a completion shorter than ``max_new_tokens`` stopped at EOS
(its EOS is appended back here) and one of exactly ``max_new_tokens`` tokens was cut (no EOS).
This needs a single EOS id: with several, which one stopped the row cannot be recovered.

Sampling is plain ancestral sampling (temperature 1, no top-k / top-p), so the samples come
from the very distribution whose log-probs `fpo.evaluation.scoring` computes; a model whose
``generation_config`` would reshape the distribution (repetition penalty, minimum length,
...) is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fpo.errors import UserError
from fpo.generation import eos_token_ids, sample_completion_ids

# generation_config fields that change the sampling distribution, with their neutral values.
_NEUTRAL_GENERATION = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "min_p": (None, 0.0),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


@dataclass(frozen=True)
class Samples:
    """``N = P * num_samples`` sampled completions, prompt-major (all samples of prompt 0 first).

    prompt_index: ``[N]`` the prompt each sample belongs to (``0..P-1``).
    prompt_ids: ``[N]`` the prompt's token ids as the sampler saw them (with BOS).
    completion_ids: ``[N]`` the sampled ids, ending with EOS when the completion stopped.
    stopped: ``[N]`` True when the completion ended at EOS (False: cut at max_new_tokens).
    texts: ``[N]`` the decoded completions (special tokens skipped, leading space kept).
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    stopped: list[bool]
    texts: list[str]


def _check_plain_sampling(model: torch.nn.Module) -> None:
    """Refuse a ``generation_config`` that would make `generate` sample from another law."""
    config = getattr(model, "generation_config", None)
    for field, neutral in _NEUTRAL_GENERATION.items():
        value = getattr(config, field, None)
        if value not in neutral:
            raise UserError(
                f"evaluation: the model's generation_config sets {field}={value!r}, which "
                "changes the sampling distribution; the KL estimate needs plain sampling. "
                f"Set model.generation_config.{field} = None before evaluating."
            )


def single_eos_id(model: torch.nn.Module, tokenizer: Any) -> int:
    """The one token id that stops generation (the sampler's EOS set must have one element)."""
    eos_ids = eos_token_ids(model, tokenizer)
    if len(eos_ids) != 1:
        raise UserError(
            f"evaluation: generation stops at the EOS ids {sorted(eos_ids)} (model "
            "generation_config.eos_token_id and tokenizer.eos_token_id); exactly one is "
            "needed to know which token ended a completion"
        )
    return next(iter(eos_ids))


def sample_for_scoring(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int = 0,
) -> Samples:
    """Sample ``num_samples`` completions per prompt at temperature 1 (no top-k / top-p).

    Seeding follows `fpo.generation.sample_completion_ids`: the result is a deterministic
    function of the arguments.
    """
    _check_plain_sampling(model)
    eos_id = single_eos_id(model, tokenizer)
    sampled = sample_completion_ids(
        model,
        tokenizer,
        prompts,
        num_samples,
        max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        batch_size=batch_size,
        seed=seed,
    )
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    prompt_index, prompt_ids, completion_ids, stopped, cut_ids = [], [], [], [], []
    for p, rows in enumerate(sampled):
        for ids in rows:
            ended = len(ids) < max_new_tokens
            prompt_index.append(p)
            prompt_ids.append(list(encoded[p]))
            completion_ids.append([*ids, eos_id] if ended else list(ids))
            stopped.append(ended)
            cut_ids.append(ids)
    texts = tokenizer.batch_decode(cut_ids, skip_special_tokens=True) if cut_ids else []
    return Samples(prompt_index, prompt_ids, completion_ids, stopped, list(texts))


def num_batches(num_sequences: int, batch_size: int) -> int:
    """How many ``generate`` calls `sample_for_scoring` makes (an upper bound on the seeds
    it uses: ``seed .. seed + num_batches - 1``)."""
    return -(-num_sequences // batch_size)
