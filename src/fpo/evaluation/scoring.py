"""Sequence log-probabilities of given completions, and the log-ratios of the sampled KL.

``sequence_logprob`` scores ``log pi(y | x) = sum_t log pi(y_t | x, y_<t)`` with the
training code path, `fpo.forward.response_stats` (right-padded batch, labels ``-100`` on the
prompt, packed response positions, chunked selective log-softmax), so no ``[N, T, vocab]``
tensor is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from fpo.evaluation.sampling import Samples
from fpo.forward import StatsRequest, response_stats
from fpo.generation import eval_mode
from fpo.logprobs import IGNORE_INDEX, response_positions
from fpo.models.hf import split_causal_lm
from fpo.packing import Packing


def scoring_batch(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Right-padded ``prompt + completion`` rows, in the training batch layout.

    Returns ``input_ids``, ``attention_mask``, ``labels``: ``LongTensor[N, T]`` with
    ``T = max_n len(prompt_n) + len(completion_n)``; ``labels`` holds the completion ids at
    their positions and ``-100`` on prompt and pad (not shifted).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"scoring_batch: {len(prompt_ids)} prompts but {len(completion_ids)} completions"
        )
    if not prompt_ids:
        raise ValueError("scoring_batch: no rows")
    if any(len(prompt) == 0 for prompt in prompt_ids):
        raise ValueError("scoring_batch: empty prompt; the first completion token needs context")
    rows, labels = [], []
    for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
        rows.append(torch.tensor([*prompt, *completion], dtype=torch.long))
        labels.append(torch.tensor([IGNORE_INDEX] * len(prompt) + [*completion], dtype=torch.long))
    lengths = torch.tensor([len(row) for row in rows])
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX).to(device),
    }


def sequence_logprob(
    model: nn.Module,
    tokenizer_pad_id: int,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    logits_chunk_size: int | None = None,
    batch_size: int | None = None,
    packing: Packing | None = None,
) -> Tensor:
    """``log pi(completion_n | prompt_n)`` summed over the completion's tokens, no grad.

    Args:
        tokenizer_pad_id: filler for the padding (masked out, never scored).
        prompt_ids, completion_ids: ``N`` token-id lists each; a completion that stopped at
            EOS must end with the EOS id (its probability is part of the sequence's).
        logits_chunk_size: positions per LM-head chunk (at most ``logits_chunk_size * vocab``
            float32 logits at a time); ``None`` = all response positions of a batch at once.
        batch_size: rows per forward pass; ``None`` = all ``N`` rows at once. Rows are
            batched by length (less padding) and returned in input order.
        packing: run the trunk on the real tokens only (`fpo.packing`).

    Returns:
        ``FloatTensor[N]`` on the CPU, float32; an empty completion scores 0.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(
            f"sequence_logprob: {len(prompt_ids)} prompts but {len(completion_ids)} completions"
        )
    total = len(prompt_ids)
    out = torch.zeros(total, dtype=torch.float32)
    if total == 0:
        return out
    step = batch_size or total
    order = sorted(range(total), key=lambda n: len(prompt_ids[n]) + len(completion_ids[n]))
    parts = split_causal_lm(model)
    device = next(model.parameters()).device
    with eval_mode(model), torch.no_grad():
        for start in range(0, total, step):
            rows = order[start : start + step]
            batch = scoring_batch(
                [prompt_ids[n] for n in rows],
                [completion_ids[n] for n in rows],
                tokenizer_pad_id,
                device,
            )
            positions = response_positions(batch["labels"], IGNORE_INDEX)
            stats = response_stats(
                parts,
                batch,
                positions,
                StatsRequest(logps=True),
                packing=packing,
                logits_chunk_size=logits_chunk_size,
            )
            out[torch.tensor(rows)] = stats.logps.sum.float().cpu()
    return out


def kl_log_ratios(
    policy: nn.Module,
    reference: nn.Module,
    samples: Samples,
    pad_id: int,
    logits_chunk_size: int | None = None,
    batch_size: int | None = None,
    packing: Packing | None = None,
) -> Tensor:
    """``log pi(y_n | x_n) - log pi_ref(y_n | x_n)`` for the policy's samples: ``[N]``.

    Their mean is the Monte-Carlo ``KL(pi || pi_ref)`` per completion, in nats:
    ``KL(pi || pi_ref) = E_x E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)]``, when
    ``samples`` are the POLICY's own samples drawn at temperature 1 without top-k / top-p
    (`sample_for_scoring`), with EOS kept on stopped completions. The estimate is unbiased,
    but a single log-ratio can be negative and its variance is large, so on few samples the
    mean can be noisy or even below 0 (the true KL never is); `grouped_mean_stderr` over
    ``samples.prompt_index`` gives its standard error over prompts.
    """
    args = (
        pad_id,
        samples.prompt_ids,
        samples.completion_ids,
        logits_chunk_size,
        batch_size,
        packing,
    )
    return sequence_logprob(policy, *args) - sequence_logprob(reference, *args)
