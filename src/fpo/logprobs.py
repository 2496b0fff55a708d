"""Per-token log-probabilities and per-sequence reductions on packed response positions.

A batch row ``n`` of ``labels[N, T]`` (prompt and pad set to ``ignore_index``, not shifted)
has its response predicted by positions ``t`` with ``labels[n, t + 1] != ignore_index``.
All per-token work runs only on those ``M`` positions, packed as :class:`ResponsePositions`
(``docs/architecture.md``); per-sequence results are segment reductions with ``rows`` as
segment ids. Log-probabilities never materialise a ``[..., vocab]`` log-softmax for the
whole batch: the target logit is gathered and the log-sum-exp is taken chunk by chunk, in
float32.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from fpo.phases import phase

__all__ = [
    "IGNORE_INDEX",
    "ResponsePositions",
    "SequenceLogps",
    "TokenStats",
    "gather_positions",
    "response_positions",
    "response_token_stats",
    "segment_counts",
    "segment_mean",
    "segment_sum",
    "sequence_logps",
]

Head = Callable[[Tensor], Tensor]

IGNORE_INDEX = -100
"""The ``labels`` value of prompt and pad positions (not scored; PyTorch's and HF's default)."""


class ResponsePositions(NamedTuple):
    """Packed positions that predict a response token, sorted row-major.

    ``rows[M]``, ``cols[M]``: the (row, position) of each of the ``M`` predicting positions;
    ``targets[M]``: the token it predicts, ``labels[row, col + 1]``; ``num_rows``: ``N``.
    """

    rows: Tensor
    cols: Tensor
    targets: Tensor
    num_rows: int


class TokenStats(NamedTuple):
    """Per-position statistics, all ``[M]`` float32.

    ``policy_logps``: ``log pi_theta(target)``; ``ref_logps``: ``log pi_ref(target)`` (no
    grad); ``kl``: ``KL(pi_ref || pi_theta)`` over the full vocabulary (grad to the policy);
    ``policy_entropy``, ``ref_entropy``: ``-sum_v p(v) log p(v)``. A field is ``None`` when
    not asked for (the ``ref_*`` ones and ``kl`` need a reference).
    """

    policy_logps: Tensor
    ref_logps: Tensor | None
    kl: Tensor | None
    policy_entropy: Tensor | None = None
    ref_entropy: Tensor | None = None


class SequenceLogps(NamedTuple):
    """Per-row reductions of token log-probs, all ``[N]``.

    ``sum = sum_t lp_t``; ``avg = sum / max(n_tokens, 1)``; ``n_tokens`` (int64) counts the
    row's response tokens.
    """

    sum: Tensor
    avg: Tensor
    n_tokens: Tensor


def response_positions(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> ResponsePositions:
    """Pack the positions of ``labels[N, T]`` that predict a response token.

    Position ``(n, t)`` is included iff ``labels[n, t + 1] != ignore_index``; its target is
    ``labels[n, t + 1]``. The result is sorted row-major (by ``n``, then ``t``).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [N, T], got shape {tuple(labels.shape)}")
    next_labels = labels[:, 1:]
    rows, cols = (next_labels != ignore_index).nonzero(as_tuple=True)
    return ResponsePositions(rows, cols, next_labels[rows, cols], labels.shape[0])


def gather_positions(x: Tensor, positions: ResponsePositions) -> Tensor:
    """Select the packed positions of ``x[N, T, ...]``: ``x[rows, cols]``, shape ``[M, ...]``."""
    return x[positions.rows, positions.cols]


def _chunk_bounds(num_positions: int, size: int | None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(num_positions)``; one chunk when ``None``."""
    if size is None:
        return [(0, num_positions)]
    if size < 1:
        raise ValueError(f"logits_chunk_size must be a positive integer or None, got {size}")
    return [(s, min(s + size, num_positions)) for s in range(0, num_positions, size)]


#: Rows per ``logsumexp`` call in :class:`_TargetLogProbs` (its temporaries are ``[rows, V]``).
LSE_ROWS = 32


class _TargetLogProbs(torch.autograd.Function):
    """``(logps [C], log_z [C])`` of ``logits [C, V]``: ``log_z = logsumexp_v logits``,
    ``logps[i] = logits[i, targets[i]] - log_z[i]``.

    Autograd's own graph for this (``logsumexp`` and ``gather``) builds the gradient out of
    several fresh ``[C, V]`` tensors alive together at the peak of backward, beside the
    saved logits. Here backward makes one, ``d/d logits = softmax * (g_log_z - g_logps) +
    onehot(targets) * g_logps``, and works in place on it; with ``overwrite`` it makes
    none and works in the saved logits themselves (for a caller whose logits nothing else
    reads; a second backward through the same graph then fails on their version counter
    instead of reading them).
    """

    @staticmethod
    def forward(
        ctx, logits: Tensor, targets: Tensor, overwrite: bool = False
    ) -> tuple[Tensor, Tensor]:
        # logsumexp makes [rows, V] temporaries: a few rows at a time keeps them small
        log_z = (
            torch.cat([torch.logsumexp(block, dim=1) for block in logits.split(LSE_ROWS)])
            if logits.shape[0]
            else logits.new_zeros(0)
        )
        logps = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - log_z
        ctx.save_for_backward(logits, log_z, targets)
        ctx.overwrite = overwrite
        return logps, log_z

    @staticmethod
    def backward(ctx, grad_logps: Tensor | None, grad_log_z: Tensor | None):
        logits, log_z, targets = ctx.saved_tensors
        grad_logps = torch.zeros_like(log_z) if grad_logps is None else grad_logps
        softmax_scale = -grad_logps if grad_log_z is None else grad_log_z - grad_logps
        shifted = logits.sub_ if ctx.overwrite else partial(torch.sub, logits)
        grad = shifted(log_z.unsqueeze(1)).exp_().mul_(softmax_scale.unsqueeze(1))
        grad.scatter_add_(1, targets.unsqueeze(1), grad_logps.unsqueeze(1).to(grad.dtype))
        return grad, None, None


def target_logprobs(
    logits: Tensor, targets: Tensor, overwrite: bool = False
) -> tuple[Tensor, Tensor]:
    """``(log softmax(logits)[i, targets[i]], logsumexp(logits[i]))``, both ``[C]``, for
    ``logits [C, V]`` (see :class:`_TargetLogProbs`). ``overwrite``: backward computes the
    gradient in ``logits``' memory (no new ``[C, V]`` tensor at the peak of backward); only
    for logits that nothing reads after the forward but this function's backward."""
    return _TargetLogProbs.apply(logits, targets, overwrite)


def _chunk_token_stats(
    policy_head: Head,
    ref_head: Head | None,
    policy_hidden: Tensor,
    targets: Tensor,
    ref_hidden: Tensor | None,
    kl: bool = True,
    entropy: bool = False,
) -> tuple[Tensor | None, ...]:
    """One chunk of :func:`response_token_stats` (the unit that is checkpointed): the
    :class:`TokenStats` fields of ``C`` positions, ``[C]`` each.

    ``KL(pi_ref || pi_theta) = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v))`` per position.
    """
    logits = policy_head(policy_hidden).float()
    policy_entropy = ref_entropy = None
    if entropy:  # the full log-softmax is needed anyway: the log-probs are read from it
        policy_log_probs = torch.log_softmax(logits, dim=1)
        policy_logps = policy_log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        policy_entropy = -(policy_log_probs.exp() * policy_log_probs).sum(dim=1)
    else:
        # logits in memory the head made are this chunk's own: nothing else reads them later
        own = logits.untyped_storage().data_ptr() != policy_hidden.untyped_storage().data_ptr()
        policy_logps, policy_log_z = target_logprobs(logits, targets, overwrite=own)
    if ref_hidden is None:
        return policy_logps, None, None, policy_entropy, None
    with torch.no_grad():
        ref_log_probs = torch.log_softmax(ref_head(ref_hidden).float(), dim=1)
        ref_logps = ref_log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        if entropy:
            ref_entropy = -(ref_log_probs.exp() * ref_log_probs).sum(dim=1)
    token_kl = None
    if kl:
        if not entropy:
            policy_log_probs = logits - policy_log_z.unsqueeze(1)
        token_kl = (ref_log_probs.exp() * (ref_log_probs - policy_log_probs)).sum(dim=1)
    return policy_logps, ref_logps, token_kl, policy_entropy, ref_entropy


@phase("LM head")
def response_token_stats(
    policy_hidden: Tensor,
    policy_head: Head,
    targets: Tensor,
    logits_chunk_size: int | None = None,
    ref_hidden: Tensor | None = None,
    ref_head: Head | None = None,
    checkpoint: bool = False,
    kl: bool = True,
    entropy: bool = False,
) -> TokenStats:
    """Apply the LM head(s) chunk by chunk and return per-position log-probs, KL, entropy.

    Callers go through :func:`fpo.forward.response_stats`, which runs the trunk first.

    Args:
        policy_hidden: ``[M, H]`` the policy's final hidden states at the packed positions.
        policy_head: hidden -> logits ``[C, V]`` (include any final-logit soft-capping).
        targets: ``LongTensor[M]`` the tokens those positions predict.
        logits_chunk_size: positions per chunk; ``None`` = one chunk.
        ref_hidden, ref_head: the reference's ``[M, H]`` hidden states and head; given
            together, they add ``ref_logps`` (no grad) and, with ``kl``, the full-vocabulary
            ``kl = sum_v p_ref(v) (log p_ref(v) - log p_theta(v))`` (grad to the policy).
        checkpoint: when grad is enabled, run each chunk under ``torch.utils.checkpoint`` so
            only one chunk's ``[C, V]`` logits are alive at a time (memory ``O(C * V)``); the
            backward pass recomputes the chunk's heads, the reference's included.
        kl: compute ``kl`` when a reference is given.
        entropy: add ``policy_entropy`` (and ``ref_entropy``); the policy's log-probs (and
            KL) are then read from its full ``log_softmax`` instead of
            :func:`target_logprobs` (equal up to float rounding; held-out evaluation's way).

    Returns:
        :class:`TokenStats` of ``[M]`` float32 tensors.
    """
    if (ref_hidden is None) != (ref_head is None):
        raise ValueError("response_token_stats: give ref_hidden and ref_head together")
    if policy_hidden.shape[0] != targets.shape[0] or (
        ref_hidden is not None and ref_hidden.shape[0] != targets.shape[0]
    ):
        raise ValueError(
            "response_token_stats: hidden states and targets must have the same number of "
            f"positions; got policy {tuple(policy_hidden.shape)}, targets {tuple(targets.shape)}"
            + ("" if ref_hidden is None else f", ref {tuple(ref_hidden.shape)}")
        )
    use_checkpoint = checkpoint and torch.is_grad_enabled()
    columns: list[list[Tensor | None]] = [[] for _ in TokenStats._fields]
    for s, e in _chunk_bounds(targets.shape[0], logits_chunk_size):
        args = (
            policy_head,
            ref_head,
            policy_hidden[s:e],
            targets[s:e],
            None if ref_hidden is None else ref_hidden[s:e],
            kl,
            entropy,
        )
        if use_checkpoint:
            chunk = _checkpoint(_chunk_token_stats, *args, use_reentrant=False)
        else:
            chunk = _chunk_token_stats(*args)
        for column, value in zip(columns, chunk, strict=True):
            column.append(value)
    has_ref = ref_hidden is not None
    wanted = (True, has_ref, has_ref and kl, entropy, has_ref and entropy)
    return TokenStats(
        *(
            _cat_float(column, policy_hidden) if keep else None
            for column, keep in zip(columns, wanted, strict=True)
        )
    )


def _cat_float(parts: list[Tensor], like: Tensor) -> Tensor:
    """Concatenate per-chunk ``[C]`` results; an empty float32 ``[0]`` when there are none."""
    return torch.cat(parts) if parts else like.new_zeros(0, dtype=torch.float32)


def segment_counts(rows: Tensor, num_rows: int) -> Tensor:
    """Number of packed positions per row: ``LongTensor[N]`` (zero for rows with none)."""
    return torch.bincount(rows, minlength=num_rows)


def segment_sum(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """``out[n] = sum_{m : rows[m] = n} values[m]``: ``[M, ...] -> [N, ...]`` (differentiable)."""
    out = values.new_zeros((num_rows, *values.shape[1:]))
    return out.index_add(0, rows, values)


def _divide_by_counts(totals: Tensor, counts: Tensor) -> Tensor:
    """``totals[n] / max(counts[n], 1)``, broadcast over trailing dims (empty row stays 0)."""
    denominator = counts.clamp(min=1).to(totals.dtype)
    return totals / denominator.reshape(-1, *([1] * (totals.dim() - 1)))


def segment_mean(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """Mean over each row's positions: ``[M, F] -> [N, F]``.

    ``out[n] = segment_sum(values)[n] / count[n]`` with ``count[n]`` the row's number of
    response positions (never its padded length); a row without positions gives zeros.
    """
    return _divide_by_counts(segment_sum(values, rows, num_rows), segment_counts(rows, num_rows))


def sequence_logps(token_logps: Tensor, rows: Tensor, num_rows: int) -> SequenceLogps:
    """Per-row ``sum``, ``avg`` and ``n_tokens`` of packed token log-probs ``[M] -> [N]``.

    ``sum[n] = sum_{rows[m] = n} lp[m]``, ``avg[n] = sum[n] / max(n_tokens[n], 1)``: a row
    with no response tokens gives ``sum = avg = 0``, never NaN.
    """
    totals = segment_sum(token_logps, rows, num_rows)
    n_tokens = segment_counts(rows, num_rows)
    return SequenceLogps(totals, _divide_by_counts(totals, n_tokens), n_tokens)
