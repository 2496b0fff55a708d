"""The benchmark's preference rows: token ids, identical for our trainer and for TRL's.

Rows are generated as token ids (not text), so both frameworks see exactly the same
sequences whatever their tokenization code: ``prompt_ids`` starts with BOS, each response
ends with EOS (both frameworks' convention for plain rows), ids are uniform over ordinary
(non-special) tokens. Two row sets:

``fixed``: every prompt has ``max_prompt`` tokens and every response
    ``max_length - max_prompt`` (no padding at all).
``spread``: an UltraFeedback-like spread (padding is most of the work there). Lengths are
    log-normal, drawn for the paper's caps (prompt 256, prompt + response 768 tokens) and
    scaled by ``max_length / 768`` for smaller caps, then truncated keep-start like both
    frameworks do. Medians and spreads (see ``SPREAD``) are *approximations* of
    UltraFeedback-binarized's published per-row length statistics under a Gemma-class
    tokenizer (prompts: median of order 100 tokens with a long tail; chosen responses of
    order 250-300 tokens, rejected somewhat shorter, both spanning a few tokens to over a
    thousand); no network was used and they were not measured on the dataset here.
"""

from __future__ import annotations

import math

import numpy as np

#: Log-normal lengths at the paper's caps: (median tokens, sigma of the log).
SPREAD = {"prompt": (110.0, 1.0), "chosen": (260.0, 0.8), "rejected": (210.0, 0.8)}
#: The caps SPREAD's medians refer to (FPO paper: 256-token prompts, 768 tokens in all).
REFERENCE_MAX_LENGTH = 768
ROW_SETS = ("fixed", "spread")


def _lengths(rng: np.random.Generator, median: float, sigma: float, n: int, scale: float):
    return np.maximum(1, np.round(scale * rng.lognormal(math.log(median), sigma, n))).astype(int)


def make_rows(
    row_set: str,
    n_pairs: int,
    *,
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    max_prompt: int,
    max_length: int,
    seed: int = 0,
) -> list[dict]:
    """``n_pairs`` rows ``{"example_id", "prompt_ids", "chosen_ids", "rejected_ids"}`` (lists
    of ints); every row has ``|prompt| <= max_prompt``, ``|prompt| + |response| <= max_length``
    and at least one response token (the EOS, when truncation keeps it)."""
    if row_set not in ROW_SETS:
        raise ValueError(f"row set {row_set!r}: choose one of {', '.join(ROW_SETS)}")
    if not 1 < max_prompt < max_length:
        raise ValueError(f"need 1 < max_prompt ({max_prompt}) < max_length ({max_length})")
    rng = np.random.default_rng(seed)
    low = 5 if vocab_size < 1000 else 1000  # skip special and control tokens
    if row_set == "fixed":
        sizes = {"prompt": [max_prompt] * n_pairs}
        sizes["chosen"] = sizes["rejected"] = [max_length - max_prompt] * n_pairs
    else:
        scale = max_length / REFERENCE_MAX_LENGTH
        sizes = {k: _lengths(rng, m, s, n_pairs, scale) for k, (m, s) in SPREAD.items()}
    rows = []
    for i in range(n_pairs):
        n_prompt = min(int(sizes["prompt"][i]), max_prompt)
        prompt = [bos_id, *rng.integers(low, vocab_size, n_prompt - 1).tolist()]
        row = {"example_id": f"{row_set}-{seed}-{i}", "prompt_ids": prompt}
        for side in ("chosen", "rejected"):
            n = min(int(sizes[side][i]), max_length - n_prompt)
            row[f"{side}_ids"] = [*rng.integers(low, vocab_size, n - 1).tolist(), eos_id][-n:]
        rows.append(row)
    return rows


def our_item(row: dict) -> dict:
    """A row as our data module's item (``fpo.data.tokenize.TokenizedPair.to_item``)."""
    prompt = row["prompt_ids"]
    item = {"example_id": row["example_id"]}
    for side in ("chosen", "rejected"):
        response = row[f"{side}_ids"]
        item[f"{side}_input_ids"] = prompt + response
        item[f"{side}_labels"] = [-100] * len(prompt) + response
    return item


def cpo_item(row: dict) -> dict:
    """A row as TRL's ``CPOTrainer.tokenize_row`` output (decoder-only)."""
    prompt = row["prompt_ids"]
    item = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = prompt + row[f"{side}_ids"]
        item[f"{side}_input_ids"] = ids
        item[f"{side}_attention_mask"] = [1] * len(ids)
        item[f"{side}_labels"] = [-100] * len(prompt) + row[f"{side}_ids"]
    return item


def dpo_item(row: dict) -> dict:
    """A row as TRL's ``DPOTrainer`` tokenized dataset (``prompt_ids``, ``chosen_ids``, ...)."""
    return {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def batches(rows: list, batch_pairs: int) -> list[list]:
    """Consecutive groups of ``batch_pairs`` rows (the last partial group dropped)."""
    return [rows[i : i + batch_pairs] for i in range(0, len(rows) - batch_pairs + 1, batch_pairs)]
