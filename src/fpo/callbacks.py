"""Lightning callbacks the configs name (``configs/callbacks``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_pairs(batch: dict) -> int:
    """Preference pairs in a batch (rows are chosen-then-rejected)."""
    return int(batch["input_ids"].shape[0]) // 2


def batch_tokens(batch: dict) -> int:
    """Non-padding tokens in a batch, chosen and rejected rows together."""
    return int(batch["attention_mask"].sum())


def throughput_monitor(window_size: int = 4) -> ThroughputMonitor:
    """Lightning's ``ThroughputMonitor`` counting pairs as samples and tokens as items.

    It logs ``train/samples_per_sec`` (pairs), ``train/items_per_sec`` (tokens) and
    ``train/batches_per_sec``, averaged over the last ``window_size`` micro-batches, once
    per optimizer step.
    """
    return ThroughputMonitor(batch_pairs, batch_tokens, window_size=window_size)
