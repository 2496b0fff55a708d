"""Padding-free ("packed") trunk input: a batch's real tokens only, several rows per sequence.

A preference batch is ``N`` rows padded to ``T`` (``input_ids``/``attention_mask`` ``[N, T]``;
the collator pads on the right, but any side works here as long as each row's real tokens
are contiguous). Packing places every row's real tokens, in order, into ``P`` packed rows of
``L`` tokens (first-fit over rows sorted longest first), with ``position_ids`` restarting at 0
at each row's first token. No ``attention_mask`` is given to the decoder, so transformers
(5.x, ``masking_utils.find_packed_sequence_indices``) reads the restarts in ``position_ids``
and builds a block-diagonal causal mask (sliding-window layers included, with per-row
positions): a token sees exactly the tokens it saw in the padded batch, and the trunk spends
nothing on pads. The free tail of a packed row (when its rows do not fill ``L``) is filled with
``pad_id`` tokens at positions ``0, 1, ...``: after every real token (causal), in a segment of
its own, never gathered.

``L`` defaults to ``T`` (the batch's longest row): the linear layers then see about ``S``
(real) token slots instead of ``N * T``, and a dense-mask attention costs ``P * L^2`` instead
of ``N * T^2``. ``L >= S`` gives one ``[1, S]`` sequence (no tail pads at all, but a dense-mask
attention then costs ``S^2``, more than padding for many rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fpo.errors import UserError
from fpo.logprobs import ResponsePositions

#: Attention implementations whose masks transformers builds from packed ``position_ids``
#: (``create_causal_mask`` / ``create_sliding_window_causal_mask``), checked by the tests.
PACKABLE_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class Packing:
    """How to pack a batch: ``length`` tokens per packed row (``None``: the batch's ``T``)."""

    length: int | None = None

    def __post_init__(self) -> None:
        if self.length is not None and (isinstance(self.length, bool) or self.length < 1):
            raise UserError(f"model.pack_length={self.length!r}: a positive integer or null.")


class PackedRows(NamedTuple):
    """A batch's real tokens packed into ``P`` rows of ``L`` (module docstring).

    ``input_ids``, ``position_ids``: ``LongTensor[P, L]`` (the decoder's inputs, no mask;
    ``L`` is the fullest packed row's token count, at most ``Packing.length``).
    ``slot``: ``LongTensor[N, T]``, the flat index ``p * L + l`` of each real token of the
    padded batch in the packed one, ``-1`` on pads.
    """

    input_ids: Tensor
    position_ids: Tensor
    slot: Tensor

    def gather(self, x: Tensor, positions: ResponsePositions) -> Tensor:
        """``x[P, L, ...]`` (a packed trunk output) at the padded ``positions``: ``[M, ...]``,
        the rows of ``gather_positions(x_padded, positions)``."""
        return x.flatten(0, 1)[self.slot[positions.rows, positions.cols]]


def check_packable(model: nn.Module) -> None:
    """Refuse a model whose attention implementation is not known to honour packing."""
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn not in PACKABLE_ATTENTION:
        raise UserError(
            f"model.packed=true: {type(model).__name__} uses attn_implementation={attn!r}; "
            f"packing is checked for {' / '.join(PACKABLE_ATTENTION)} only. Set "
            "model.packed=false or load the model with one of those."
        )


def _bins(lengths: list[int], capacity: int) -> tuple[list[tuple[int, int]], list[int]]:
    """First-fit decreasing: the ``(packed row, offset)`` of each row of ``lengths``, and the
    number of tokens in each packed row."""
    fills: list[int] = []
    place = [(0, 0)] * len(lengths)
    for row in sorted(range(len(lengths)), key=lambda n: -lengths[n]):
        n = lengths[row]
        for p, fill in enumerate(fills):
            if fill + n <= capacity:
                place[row], fills[p] = (p, fill), fill + n
                break
        else:
            place[row] = (len(fills), 0)
            fills.append(n)
    return place, fills


def pack_rows(
    input_ids: Tensor, attention_mask: Tensor, packing: Packing, pad_id: int = 0
) -> PackedRows:
    """Pack the real tokens of ``input_ids[N, T]`` (``attention_mask`` 1 on them).

    Raises:
        ValueError: a row whose real tokens are not contiguous.
        UserError: ``packing.length`` shorter than the longest row (a row is never split).
    """
    real = attention_mask.bool()
    width = real.shape[1]
    lengths = real.sum(dim=1)
    starts = real.long().argmax(dim=1)  # first real column (0 for right padding)
    cols = torch.arange(width, device=real.device)
    offsets = cols - starts[:, None]  # [N, T]: a real token's position within its row
    if not torch.equal((offsets >= 0) & (offsets < lengths[:, None]), real):
        raise ValueError("pack_rows: each row's real tokens (attention_mask 1) must be contiguous")
    sizes = lengths.tolist()
    longest = max(sizes)
    capacity = packing.length or max(longest, 1)
    if longest > capacity:
        raise UserError(
            f"model.pack_length={capacity} is shorter than a row of {longest} tokens "
            "(rows are never split); raise it or set it to null (the batch's longest row)."
        )
    place, fills = _bins(sizes, capacity)
    bins, length = len(fills), max(max(fills), 1)  # packed rows no longer than their content
    base = torch.tensor([p * length + o for p, o in place], device=real.device)
    slot = torch.where(real, base[:, None] + offsets, -1)  # bin * L + offset + (t - start)
    targets = slot[real]
    flat_ids = input_ids.new_full((bins * length,), pad_id)
    flat_ids[targets] = input_ids[real]
    flat_pos = torch.zeros(bins * length, dtype=torch.long, device=real.device)
    flat_pos[targets] = offsets[real]
    # the free tail of each packed row: positions 0, 1, ... from its first free slot
    fill = torch.tensor(fills, device=real.device)[:, None]
    tail = torch.arange(length, device=real.device) - fill
    position_ids = torch.where(tail < 0, flat_pos.view(bins, length), tail)
    return PackedRows(flat_ids.view(bins, length), position_ids, slot)
