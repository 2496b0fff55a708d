"""Batched, seeded sampling of completions from a causal LM (any policy or reference).

Prompts are expanded prompt-major (``num_samples`` copies of prompt 0, then of prompt 1,
...), cut into batches of ``batch_size`` sequences, LEFT-padded so that every row's last
prompt token sits in the last column (what ``model.generate`` needs for batched decoding),
and decoded with ``model.generate``.

Sampling is exact ancestral sampling, done by `InverseCdfSampler`, a logits processor run
under greedy decoding: with ``p = softmax(warp(logits))`` and ``F = cumsum(p)``, it draws
``u ~ U[0, F_V)`` and keeps only the token ``min{i : F_i > u}`` (score 0, all others -inf),
which the greedy ``argmax`` then picks. On CPU this is ~7x faster than the
``torch.multinomial`` call inside ``generate`` (0.03 s vs 0.19 s per step for
``[32, 262144]`` logits) and draws from its own ``torch.Generator(seed)``, so results are
reproducible for the same (seed, prompts, num_samples, batch_size) and the caller's global
RNG is untouched. ``temperature``/``top_k``/``top_p`` reuse transformers' warpers.

Only the new tokens are returned: generation stops at EOS or after ``max_new_tokens``; the
EOS and the padding after it are not part of the completion. The model's saved
``generation_config`` (repetition penalty, suppressed tokens, ...) is ignored while sampling,
only its special-token ids are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fpo.errors import UserError


class InverseCdfSampler(LogitsProcessor):
    """Sample one token per row from ``softmax(warp(scores))``; return a one-hot score row.

    ``scores`` ``[N, V]`` -> ``[N, V]`` with 0 at the sampled token and ``-inf`` elsewhere,
    so a following ``argmax`` (greedy decoding) returns the sample.
    """

    def __init__(
        self,
        generator: torch.Generator,
        temperature: float = 1.0,
        top_k: int | None = 0,
        top_p: float = 1.0,
    ) -> None:
        self.generator = generator
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def sample(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        """The sampled token ids ``[N]``."""
        probs = torch.softmax(self.warpers(input_ids, scores.float()), dim=-1)
        cdf = probs.cumsum(dim=-1)  # [N, V]
        uniform = torch.rand(
            (cdf.shape[0], 1), generator=self.generator, device=cdf.device, dtype=cdf.dtype
        )
        tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
        return tokens.clamp_(max=cdf.shape[-1] - 1).squeeze(1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        tokens = self.sample(input_ids, scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[Any]:
    """Temporarily pad on the left (and with EOS when the tokenizer has no pad token)."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad


@contextmanager
def _plain_generation_config(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Swap in a fresh ``GenerationConfig`` (special-token ids only) while generating.

    The model's saved config may carry settings that change the distribution (repetition
    penalty, suppressed tokens, min length, ...); samples must come from the model itself.
    """
    original = model.generation_config
    keep = ("bos_token_id", "pad_token_id", "eos_token_id")
    model.generation_config = GenerationConfig(**{k: getattr(original, k, None) for k in keep})
    try:
        yield model
    finally:
        model.generation_config = original


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put the model in eval mode (no dropout) and restore its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_args(num_samples: int, max_new_tokens: int, batch_size: int, temperature: float):
    for name, value in (
        ("num_samples", num_samples),
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise UserError(f"sampling: {name}={value} must be >= 1")
    if temperature < 0:
        raise UserError(f"sampling: temperature={temperature} must be >= 0 (0 = greedy)")


def sample_completion_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    stop_token_ids: Sequence[int] = (),
) -> list[list[list[int]]]:
    """Sample ``num_samples`` completions per prompt; return their token ids.

    Args:
        prompts: P prompt texts, tokenized with the tokenizer's special tokens (its BOS).
        temperature: softmax temperature; 0 means greedy decoding.
        top_k: keep the k most likely tokens; 0 or None = no top-k filter.
        top_p: nucleus threshold; 1.0 = no filter.
        batch_size: sequences (not prompts) per ``generate`` call.
        progress: called after each batch with ``(sequences_done, sequences_total)``.
        stop_token_ids: extra ids that end a completion like EOS (e.g. a document separator).

    Returns:
        ``ids[p][s]``: the new token ids of sample ``s`` of prompt ``p`` (``P x num_samples``
        lists), the stop token (EOS or ``stop_token_ids``) and padding removed.
    """
    _check_args(num_samples, max_new_tokens, batch_size, temperature)
    flat = [prompt for prompt in prompts for _ in range(num_samples)]
    eos_ids = eos_token_ids(model, tokenizer) | set(stop_token_ids)
    device = next(model.parameters()).device
    processors = LogitsProcessorList()
    if temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
        processors.append(InverseCdfSampler(generator, temperature, top_k, top_p))
    out: list[list[int]] = []
    with (
        _left_padding(tokenizer),
        eval_mode(model),
        _plain_generation_config(model),
        torch.no_grad(),
    ):
        for start in range(0, len(flat), batch_size):
            enc = tokenizer(flat[start : start + batch_size], return_tensors="pt", padding=True)
            enc = {key: value.to(device) for key, value in enc.items()}
            generated = model.generate(
                **enc,
                do_sample=False,  # greedy over the sampler's one-hot scores = sampling
                logits_processor=processors,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(eos_ids),
            )
            new = generated[:, enc["input_ids"].shape[1] :].tolist()
            out.extend(_cut_at_eos(row, eos_ids) for row in new)
            if progress is not None:
                progress(len(out), len(flat))
    return [out[p * num_samples : (p + 1) * num_samples] for p in range(len(prompts))]


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """EOS ids from the model's generation config (may be a list) and the tokenizer."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None) if config is not None else None
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _cut_at_eos(row: list[int], eos_ids: set[int]) -> list[int]:
    """The tokens before the first EOS (``generate`` pads finished rows after their EOS)."""
    for i, token in enumerate(row):
        if token in eos_ids:
            return row[:i]
    return row
