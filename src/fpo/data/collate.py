"""Collation of tokenized preference pairs into one concatenated, right-padded batch.

For B items the batch (docs/architecture.md, "The batch") is::

    input_ids       LongTensor[2B, T]  rows 0..B-1 chosen, B..2B-1 rejected, right-padded
    attention_mask  LongTensor[2B, T]  1 on real tokens, 0 on pad
    labels          LongTensor[2B, T]  input_ids on response tokens, -100 on prompt and pad
    example_id      list[str] (B)

with ``T`` the longest of the 2B sequences. Reference-cache fields pass through: items with
``ref_chosen_<name>`` and ``ref_rejected_<name>`` (numbers or 1-D arrays/tensors) give
``ref_<name>`` = the chosen values stacked, then the rejected ones: shape ``[2B]`` or ``[2B, k]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from fpo.logprobs import IGNORE_INDEX

SIDES = ("chosen", "rejected")
REF_PREFIX = {side: f"ref_{side}_" for side in SIDES}


def _pad_right(rows: Sequence[Any], value: int) -> torch.Tensor:
    """Stack 1-D int sequences into ``LongTensor[N, max_len]``, filling the tail with ``value``."""
    tensors = [torch.as_tensor(row, dtype=torch.long) for row in rows]
    return pad_sequence(tensors, batch_first=True, padding_value=value)


def _ref_names(item: Mapping[str, Any]) -> list[str]:
    """The ``<name>``s of an item's ``ref_chosen_<name>``/``ref_rejected_<name>`` fields."""
    names = {
        side: {key.removeprefix(prefix) for key in item if key.startswith(prefix)}
        for side, prefix in REF_PREFIX.items()
    }
    if names["chosen"] != names["rejected"]:
        raise KeyError(f"reference fields must come in chosen/rejected pairs, got {sorted(item)}")
    return sorted(names["chosen"])


class PreferenceCollator:
    """Callable ``list[item] -> batch`` (module docstring); ``pad_token_id`` fills ``input_ids``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of preference pairs")
        ids = [item[f"{side}_input_ids"] for side in SIDES for item in items]
        labels = [item[f"{side}_labels"] for side in SIDES for item in items]
        input_ids = _pad_right(ids, self.pad_token_id)
        lengths = torch.tensor([len(row) for row in ids])
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": _pad_right(labels, IGNORE_INDEX),
            "example_id": [item["example_id"] for item in items],
        }
        for name in _ref_names(items[0]):
            values = [item[f"{REF_PREFIX[side]}{name}"] for side in SIDES for item in items]
            batch[f"ref_{name}"] = torch.stack([torch.as_tensor(v) for v in values])
        return batch
