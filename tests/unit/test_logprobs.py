"""Unit tests for fpo.logprobs: packed positions, chunked log-probs and KL, segment reductions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fpo.logprobs import (
    ResponsePositions,
    gather_positions,
    response_positions,
    response_token_stats,
    segment_mean,
    segment_sum,
    sequence_logps,
    target_logprobs,
)

IGNORE = -100

# Three rows, T = 5. Position t predicts labels[n, t + 1]:
#   row 0: labels 5, 6 at columns 2, 3 -> positions t = 1, 2
#   row 1: labels 7, 8, 9 at columns 1, 3, 4 -> positions t = 0, 2, 3
#   row 2: no response tokens
LABELS = torch.tensor(
    [
        [IGNORE, IGNORE, 5, 6, IGNORE],
        [IGNORE, 7, IGNORE, 8, 9],
        [IGNORE, IGNORE, IGNORE, IGNORE, IGNORE],
    ]
)
ROWS = torch.tensor([0, 0, 1, 1, 1])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- positions


def test_response_positions_hand_example():
    pos = response_positions(LABELS)
    assert isinstance(pos, ResponsePositions)
    assert pos.rows.tolist() == [0, 0, 1, 1, 1]
    assert pos.cols.tolist() == [1, 2, 0, 2, 3]
    assert pos.targets.tolist() == [5, 6, 7, 8, 9]
    assert pos.num_rows == 3


def test_response_positions_ignores_first_label_and_custom_ignore_index():
    # a label at column 0 is never predicted (no position before it); ignore_index = 0
    labels = torch.tensor([[4, 0, 3, 0]])
    pos = response_positions(labels, ignore_index=0)
    assert pos.rows.tolist() == [0]
    assert pos.cols.tolist() == [1]
    assert pos.targets.tolist() == [3]


def test_response_positions_rejects_non_2d():
    with pytest.raises(ValueError, match="labels must be"):
        response_positions(torch.tensor([1, 2, 3]))


def test_gather_positions():
    x = torch.arange(3 * 5 * 2).reshape(3, 5, 2)
    out = gather_positions(x, response_positions(LABELS))
    # element (n, t, f) of x is 10 n + 2 t + f
    expected = torch.tensor([[2, 3], [4, 5], [10, 11], [14, 15], [16, 17]])
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- log-probs
# With the identity as the head, ``response_token_stats`` takes the logits themselves.


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _naive_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The dense reference: ``log_softmax(logits)[m, targets[m]]`` in float32."""
    return logits.float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("chunk", [None, 1, 8, 100])
def test_policy_logps_match_dense_log_softmax_fp32(chunk):
    logits = torch.randn(37, 50, generator=_gen(0)) * 5
    targets = torch.randint(0, 50, (37,), generator=_gen(1))
    out = response_token_stats(logits, _identity, targets, logits_chunk_size=chunk).policy_logps
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _naive_logps(logits, targets), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [None, 8])
def test_policy_logps_of_bf16_logits_are_computed_in_fp32(chunk):
    logits = (torch.randn(37, 300, generator=_gen(2)) * 8).bfloat16()
    targets = torch.randint(0, 300, (37,), generator=_gen(3))
    out = response_token_stats(logits, _identity, targets, logits_chunk_size=chunk).policy_logps
    assert out.dtype == torch.float32
    # bf16 arithmetic would be off by ~1e-2; an fp32 computation agrees to rounding
    torch.testing.assert_close(out, _naive_logps(logits, targets), atol=1e-5, rtol=0)


def test_policy_logps_gradient_and_empty_input():
    logits = torch.randn(6, 10, generator=_gen(4), requires_grad=True)
    targets = torch.tensor([0, 3, 9, 1, 1, 5])
    stats = response_token_stats(logits, _identity, targets, logits_chunk_size=4)
    stats.policy_logps.sum().backward()
    expected = F.one_hot(targets, 10).float() - logits.detach().softmax(-1)
    torch.testing.assert_close(logits.grad, expected)

    empty = response_token_stats(torch.zeros(0, 10), _identity, torch.zeros(0, dtype=torch.long), 4)
    assert empty.policy_logps.shape == (0,) and empty.policy_logps.dtype == torch.float32


def test_logits_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="logits_chunk_size"):
        response_token_stats(
            torch.zeros(2, 3), _identity, torch.zeros(2, dtype=torch.long), logits_chunk_size=0
        )


# --------------------------------------------------------------------------- token stats

M, H, V = 13, 8, 50


def _heads() -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    policy = torch.nn.Linear(H, V, bias=False)
    ref = torch.nn.Linear(H, V, bias=False)
    ref.requires_grad_(False)
    return policy, ref


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    policy_hidden = torch.randn(M, H, generator=_gen(5)) * 3
    ref_hidden = torch.randn(M, H, generator=_gen(6)) * 3
    targets = torch.randint(0, V, (M,), generator=_gen(7))
    return policy_hidden, ref_hidden, targets


def test_response_token_stats_matches_dense_computation():
    policy_head, ref_head = _heads()
    policy_hidden, ref_hidden, targets = _inputs()
    stats = response_token_stats(
        policy_hidden, policy_head, targets, ref_hidden=ref_hidden, ref_head=ref_head
    )
    policy_lsm = policy_head(policy_hidden).log_softmax(-1)
    ref_lsm = ref_head(ref_hidden).log_softmax(-1)
    torch.testing.assert_close(stats.policy_logps, policy_lsm.gather(1, targets[:, None])[:, 0])
    torch.testing.assert_close(stats.ref_logps, ref_lsm.gather(1, targets[:, None])[:, 0])
    # KL(ref || policy) = sum_v p_ref (log p_ref - log p_policy) = F.kl_div(input=log p_policy,
    # target=log p_ref, log_target=True)
    dense_kl = F.kl_div(policy_lsm, ref_lsm, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(stats.kl, dense_kl)
    assert torch.all(stats.kl > 0)
    assert not stats.ref_logps.requires_grad
    assert stats.kl.requires_grad and stats.policy_logps.requires_grad


def test_response_token_stats_kl_is_zero_for_identical_models():
    policy_head, _ = _heads()
    policy_hidden, _, targets = _inputs()
    stats = response_token_stats(
        policy_hidden, policy_head, targets, ref_hidden=policy_hidden, ref_head=policy_head
    )
    torch.testing.assert_close(stats.kl, torch.zeros(M), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.ref_logps, stats.policy_logps.detach())


def test_response_token_stats_without_reference():
    policy_head, _ = _heads()
    policy_hidden, _, targets = _inputs()
    stats = response_token_stats(policy_hidden, policy_head, targets, logits_chunk_size=4)
    assert stats.ref_logps is None and stats.kl is None
    expected = _naive_logps(policy_head(policy_hidden), targets)
    torch.testing.assert_close(stats.policy_logps, expected)


def _stats_and_grads(chunk, checkpoint):
    policy_head, ref_head = _heads()
    policy_hidden, ref_hidden, targets = _inputs()
    policy_hidden.requires_grad_(True)
    stats = response_token_stats(
        policy_hidden,
        policy_head,
        targets,
        logits_chunk_size=chunk,
        ref_hidden=ref_hidden,
        ref_head=ref_head,
        checkpoint=checkpoint,
    )
    # a loss that uses both outputs, weighted per position
    weights = torch.linspace(0.5, 1.5, M)
    (weights * (stats.kl - stats.policy_logps)).sum().backward()
    return stats, policy_hidden.grad, policy_head.weight.grad


@pytest.mark.parametrize(("chunk", "checkpoint"), [(4, False), (5, True), (None, True)])
def test_response_token_stats_chunking_and_checkpoint_agree(chunk, checkpoint):
    ref_stats, ref_hidden_grad, ref_weight_grad = _stats_and_grads(None, False)
    stats, hidden_grad, weight_grad = _stats_and_grads(chunk, checkpoint)
    for got, want in zip(stats, ref_stats, strict=True):
        torch.testing.assert_close(got, want)
    assert ref_weight_grad.abs().sum() > 0
    torch.testing.assert_close(hidden_grad, ref_hidden_grad)
    torch.testing.assert_close(weight_grad, ref_weight_grad)


def _saved_floats(checkpoint: bool) -> int:
    """Number of float values autograd keeps for backward during the forward pass."""
    policy_head, ref_head = _heads()
    policy_hidden, ref_hidden, targets = _inputs()
    saved = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += x.numel() if x.is_floating_point() else 0
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        response_token_stats(
            policy_hidden,
            policy_head,
            targets,
            logits_chunk_size=4,
            ref_hidden=ref_hidden,
            ref_head=ref_head,
            checkpoint=checkpoint,
        )
    return saved


def test_checkpoint_keeps_no_vocab_sized_tensors():
    # without checkpointing, every chunk's [C, V] logits / probabilities are kept
    assert _saved_floats(checkpoint=False) >= M * V
    # with it, only the chunks' inputs are kept (hidden states and weights), far below M * V
    assert _saved_floats(checkpoint=True) < M * V


def test_response_token_stats_argument_checks():
    policy_head, _ = _heads()
    policy_hidden, ref_hidden, targets = _inputs()
    with pytest.raises(ValueError, match="together"):
        response_token_stats(policy_hidden, policy_head, targets, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="same number of positions"):
        response_token_stats(policy_hidden[:5], policy_head, targets)


# --------------------------------------------------------------------------- segments


def test_sequence_logps_hand_example_and_empty_row():
    token_logps = torch.tensor([-1.0, -2.0, -0.5, -1.5, -1.0])
    out = sequence_logps(token_logps, ROWS, num_rows=3)
    # row 0: -1 - 2 = -3 over 2 tokens; row 1: -0.5 - 1.5 - 1 = -3 over 3; row 2: none
    torch.testing.assert_close(out.sum, torch.tensor([-3.0, -3.0, 0.0]))
    torch.testing.assert_close(out.avg, torch.tensor([-1.5, -1.0, 0.0]))
    assert out.n_tokens.tolist() == [2, 3, 0]
    assert not torch.isnan(out.avg).any()


def test_sequence_logps_gradient():
    token_logps = torch.tensor([-1.0, -2.0, -0.5, -1.5, -1.0], requires_grad=True)
    out = sequence_logps(token_logps, ROWS, num_rows=3)
    (out.sum[0] + out.avg[1]).backward()
    # d sum_0 / d lp = 1 on row 0; d avg_1 / d lp = 1/3 on row 1
    torch.testing.assert_close(token_logps.grad, torch.tensor([1.0, 1.0, 1 / 3, 1 / 3, 1 / 3]))


def test_segment_mean_divides_by_response_count_not_padded_length():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 3.0], [3.0, 0.0], [6.0, 6.0]])
    out = segment_mean(values, ROWS, num_rows=3)
    # row 0: ([1, 2] + [3, 4]) / 2; row 1: ([0, 3] + [3, 0] + [6, 6]) / 3; row 2 empty -> 0
    # (dividing by the padded length T - 1 = 4 would give [1, 1.5] and [2.25, 2.25])
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0], [3.0, 3.0], [0.0, 0.0]]))


def test_segment_sum_trailing_dims():
    values = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3)
    out = segment_sum(values, ROWS, num_rows=4)
    assert out.shape == (4, 2, 3)
    torch.testing.assert_close(out[0], values[0] + values[1])
    torch.testing.assert_close(out[1], values[2] + values[3] + values[4])
    torch.testing.assert_close(out[2:], torch.zeros(2, 2, 3))


# ------------------------------------------------------------ the target log-prob function
def test_target_logprobs_values_and_gradcheck():
    """Both outputs (log-prob of the target, log-partition) and their gradients, alone and
    together (TDPO's KL also reads log_z), against torch's own in float64."""
    logits = torch.randn(6, 11, generator=_gen(8), dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 1, 1, 5])
    logps, log_z = target_logprobs(logits, targets)
    torch.testing.assert_close(log_z, logits.logsumexp(1))
    torch.testing.assert_close(logps, logits.log_softmax(1)[torch.arange(6), targets])
    torch.autograd.gradcheck(lambda x: target_logprobs(x, targets), (logits,))
    torch.autograd.gradcheck(lambda x: target_logprobs(x, targets)[0], (logits,))
    torch.autograd.gradcheck(lambda x: target_logprobs(x, targets)[1], (logits,))
    rows = target_logprobs(torch.randn(70, 5, dtype=torch.float64), torch.zeros(70).long())
    assert rows[1].shape == (70,)  # more rows than one logsumexp block


class _NewTensors(TorchDispatchMode):
    """Counts the ops that return a new tensor of at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inplace = func._schema.name.endswith("_") or any(
            a.alias_info is not None for a in func._schema.returns
        )
        if not inplace and isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.ops.append(func._schema.name)
        return out


def test_backward_makes_no_vocab_sized_tensor():
    """Autograd's logsumexp + gather backward makes several [M, V] tensors alive together at
    the peak of training; ours makes one and works in place on it, and none at all in the
    LM head's pass, where it works in the head's own logits (``overwrite``)."""
    m, h, v = 64, 8, 500  # M x V well above the head's V x H gradient
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False)
    hidden = torch.randn(m, h, requires_grad=True)
    targets = torch.randint(0, v, (m,))
    stats = response_token_stats(hidden, head, targets)
    with _NewTensors(m * v) as counter:
        stats.policy_logps.sum().backward()
    assert len(counter.ops) == 0, counter.ops
    grad = hidden.grad.clone()

    hidden.grad = None
    logps, _ = target_logprobs(head(hidden), targets)  # logits the caller may still read
    with _NewTensors(m * v) as counter:
        logps.sum().backward()
    assert len(counter.ops) == 1, counter.ops
    assert torch.equal(hidden.grad, grad)  # the same gradient either way, bit for bit

    logits = head(hidden)  # the same with torch's own ops: the count the test would see
    naive = logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(1)
    with _NewTensors(m * v) as counter:
        naive.sum().backward()
    assert len(counter.ops) >= 3, counter.ops
