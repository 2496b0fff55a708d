"""Trunk FLOPs of a padded vs a packed (``model.packed=true``) batch: counts, no timings.

For the benchmark's row sets (``benchmarks/rows.py``) at the FPO paper's caps (prompt 256,
prompt + response 768 tokens), each batch of ``B`` pairs (``N = 2B`` rows) is laid out
padded (``N x T``), packed into rows of the batch's longest row (``fpo.packing`` default,
``P x L``) and packed into one sequence (``model.pack_length`` >= all tokens, ``1 x S``).
Per layer and forward pass, a token slot costs the linear layers' ``2 * weights`` FLOPs and
every (query, key) pair the dense-mask attention computes costs ``4 * heads * head_dim``
(``QK^T`` and ``AV``): sdpa/eager with a mask compute every pair of a row, masked or not
(``T^2`` per padded row, ``L^2`` per packed row). The LM head is left out (it runs on the
response positions only, the same both ways); backward scales both terms alike.

    python -m benchmarks.packing_flops [--row-set spread] [--pairs 256]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.rows import make_rows
from fpo.packing import Packing, pack_rows

#: (hidden, layers, heads, kv heads, head dim, MLP width) of the decoder trunks.
SHAPES = {
    "gemma-3-270m": (640, 18, 4, 1, 256, 2048),
    "gemma-2-2b": (2304, 26, 8, 4, 256, 9216),
}


def layout(lengths: list[int], packing: Packing | None) -> tuple[int, list[int]]:
    """``(token slots, [row length]*rows)`` of one batch of rows of ``lengths``."""
    width = max(lengths)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    if packing is None:
        return mask.numel(), [width] * len(lengths)
    packed = pack_rows(torch.ones_like(mask), mask, packing)
    rows, length = packed.input_ids.shape
    return rows * length, [length] * rows


def trunk_flops(shape: tuple[int, ...], slots: int, row_lengths: list[int]) -> tuple[float, float]:
    """``(linear, attention)`` forward FLOPs of the trunk on one batch."""
    hidden, layers, heads, kv_heads, head_dim, mlp = shape
    weights = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * mlp
    linear = 2.0 * weights * slots * layers
    attention = 4.0 * heads * head_dim * sum(n * n for n in row_lengths) * layers
    return linear, attention


def measure(row_set: str, pairs: int, batch_pairs: int) -> list[dict]:
    rows = make_rows(
        row_set, pairs, vocab_size=2000, bos_id=1, eos_id=2, max_prompt=256, max_length=768
    )
    batches = [rows[i : i + batch_pairs] for i in range(0, pairs - batch_pairs + 1, batch_pairs)]
    layouts = {"padded": None, "packed (L = T)": Packing(), "packed (1 x S)": Packing(10**9)}
    totals = {name: {"slots": 0, **{m: [0.0, 0.0] for m in SHAPES}} for name in layouts}
    real = 0
    for group in batches:
        lengths = [len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in group] + [
            len(r["prompt_ids"]) + len(r["rejected_ids"]) for r in group
        ]
        real += sum(lengths)
        for name, packing in layouts.items():
            slots, row_lengths = layout(lengths, packing)
            totals[name]["slots"] += slots
            for model, shape in SHAPES.items():
                linear, attention = trunk_flops(shape, slots, row_lengths)
                totals[name][model][0] += linear
                totals[name][model][1] += attention
    out = []
    base = totals["padded"]
    for name, t in totals.items():
        entry = {"layout": name, "slots": t["slots"], "real_tokens": real}
        for model in SHAPES:
            entry[model] = sum(t[model]) / sum(base[model])
            entry[f"{model} attention share"] = t[model][1] / sum(t[model])
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--row-set", default="spread")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-pairs", type=int, nargs="*", default=[2, 4, 8])
    args = parser.parse_args()
    models = list(SHAPES)
    print(f"{args.row_set} rows, {args.pairs} pairs, caps 256 / 768; trunk forward FLOPs")
    print(
        "| pairs/batch | layout | token slots / real | "
        + " | ".join(f"{m} FLOPs vs padded (attention share)" for m in models)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(models))
    for batch_pairs in args.batch_pairs:
        for e in measure(args.row_set, args.pairs, batch_pairs):
            cells = [f"{e[m]:.3f} ({e[f'{m} attention share']:.0%})" for m in models]
            ratio = e["slots"] / e["real_tokens"]
            print(f"| {batch_pairs} | {e['layout']} | {ratio:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
