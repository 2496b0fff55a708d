"""Measure FPO's D at step 0 (policy = reference) when the policy runs under bf16 autocast.

The reference's pooled features come from one padded batch of all pairs (as the cache
builds them), the policy's from batches of ``--policy-pairs`` pairs (as training sees them),
with the same weights: any D > 0 is numerical noise that FPO's constraint would fight. Each
of policy and reference runs in fp32 or under ``torch.autocast(bfloat16)``, with the SAE
encoding in bf16 (as training does: it encodes inside the autocast) or forced to fp32; one
more reference is a bfloat16 copy of the model under the same autocast (the online reference
with ``reference.dtype=bfloat16``, as the paper experiments set it). Every
``--sae`` folder is measured on the same forward passes, so the rows of the TopK and the
JumpReLU SAE are comparable::

    .venv/bin/python -m benchmarks.bf16_feature_drift --pairs 16 --policy-pairs 1 2 4 16

Models: ``gemma3-270m`` (the real weights, the sentiment training pairs) or
``random-gemma3-270m`` (gemma-3-270m's shape with seeded random weights and seeded random
token pairs: no tokenizer or download, for a GPU machine without the weights). A random model's
residual stream is far smaller than the real one, so its hooked activations are multiplied by
one gain (``--hook-gain auto``: mean norm of the real layer-17 residual stream / the random
model's mean norm at the reference's fp32 pass) before the SAE reads them; the gain is the same
for every pass, in every precision.

Per SAE, composition (policy pairs per batch) and precision row the output JSON holds:
``D_mean``, ``D_max``, ``D_relative_mean`` (``D / E_ref``, as ``normalize=true`` uses),
``topk_overlap_mean`` (the fraction of the reference's top-k features that are also the
policy's top-k) and ``hooked_rel_err`` (``|h_policy - h_ref| / |h_ref|`` of the hooked
activations over all response positions: the forward pass's own noise, SAE-independent).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fpo.data.collate import PreferenceCollator
from fpo.forward import StatsRequest, response_stats
from fpo.logprobs import IGNORE_INDEX, response_positions, segment_mean
from fpo.losses import feature_mse
from fpo.models.hf import split_causal_lm
from fpo.sae import load_sae, resolve_hook_module, sae_hook_name

DEFAULT_SAES = ("assets/sae/gemma3-270m-layer17", "assets/sae/gemma3-270m-layer17-jumprelu")
# Mean L2 norm of gemma-3-270m's blocks.17.hook_resid_post on the SAEs' held-out text (fp32,
# 5,000 tokens; the mean vector alone has norm 35,857): the scale --hook-gain auto restores.
REAL_LAYER17_MEAN_NORM = 37641.0
# gemma-3-270m (google/gemma-3-270m config.json): the shape of --model random-gemma3-270m.
GEMMA3_270M_SHAPE = {
    "vocab_size": 262144,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class Row:
    """One line of the table: the precision of each side and of the SAE encoding.

    ``reference``: ``fp32``, ``bf16`` (the fp32 model under bf16 autocast, as the policy) or
    ``bf16-weights`` (a bfloat16 copy of the model under bf16 autocast: the online reference
    with ``reference.dtype=bfloat16``, as the paper experiments configure it).
    """

    name: str
    reference: str
    policy_bf16: bool
    encode_fp32: bool


ROWS = (
    Row("policy fp32, reference fp32", "fp32", False, True),
    Row("policy bf16 (SAE encode bf16), reference fp32", "fp32", True, False),
    Row("policy bf16 (SAE encode fp32), reference fp32", "fp32", True, True),
    Row("policy bf16, reference bf16 (SAE encode bf16 both)", "bf16", True, False),
    Row("policy bf16, reference bf16 (SAE encode fp32 both)", "bf16", True, True),
    Row("policy bf16, reference bf16 weights (SAE encode bf16 both)", "bf16-weights", True, False),
)
REFERENCE_MODES = ("fp32", "bf16", "bf16-weights")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", action="append", default=None, help="SAE folder (repeatable)")
    p.add_argument("--pairs", type=int, default=16, help="preference pairs measured")
    p.add_argument("--k", type=int, default=50, help="FPO's objective.constraints.features.k")
    p.add_argument(
        "--policy-pairs", type=int, nargs="+", default=[2], help="pairs per policy batch"
    )
    p.add_argument("--model", choices=["gemma3-270m", "random-gemma3-270m"], default="gemma3-270m")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--hook-gain", default=None, help="'auto' or a number (default: 1 for real)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sequence (at most)")
    p.add_argument("--seed", type=int, default=0, help="random model and random pairs")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument(
        "--summarize", type=Path, default=None, help="print a JSON's tables (no model) and exit"
    )
    args = p.parse_args(argv)
    args.sae = args.sae or list(DEFAULT_SAES)
    for pairs in args.policy_pairs:
        if pairs < 1 or args.pairs % pairs:
            p.error(f"--policy-pairs {pairs} must divide --pairs {args.pairs}")
    if args.k < 1:
        p.error(f"--k must be >= 1, got {args.k}")
    return args


# ----------------------------------------------------------------------------- model and data


def random_gemma3_270m(seed: int, device: str) -> torch.nn.Module:
    """A gemma-3-270m-shaped ``Gemma3ForCausalLM`` with seeded random weights, fp32, eval."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**GEMMA3_270M_SHAPE)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
    return model.float().eval()


def random_pairs(pairs: int, max_length: int, vocab: int, seed: int) -> list[dict]:
    """Seeded random preference items: prompt 4..max/2 tokens, responses of different lengths.

    Token ids avoid the special ids 0..3; labels are -100 on the prompt (as the collator sees).
    """
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(pairs):
        prompt = int(torch.randint(4, max_length // 2, (1,), generator=g))
        item: dict = {"example_id": f"random-{i}"}
        for side in ("chosen", "rejected"):
            response = int(torch.randint(2, max_length - prompt, (1,), generator=g))
            ids = torch.randint(4, vocab, (1 + prompt + response,), generator=g)
            ids[0] = GEMMA3_270M_SHAPE["bos_token_id"]
            labels = ids.clone()
            labels[: 1 + prompt] = IGNORE_INDEX
            item[f"{side}_input_ids"], item[f"{side}_labels"] = ids.tolist(), labels.tolist()
        items.append(item)
    return items


def sentiment_pairs(tokenizer, pairs: int, max_length: int) -> tuple[list[dict], int]:
    """The first `pairs` sentiment training pairs, tokenized as the embedded task does."""
    from fpo.data import PreferenceDataModule

    data = PreferenceDataModule(
        train_source="data/sentiment/train.jsonl", tokenizer=tokenizer, format="plain",
        chat_template=False, plain_template="{prompt}", append_eos=False, max_length=max_length,
        max_prompt_length=max_length // 2, batch_size=pairs, shuffle=False,
        max_train_samples=pairs,
    )  # fmt: skip
    data.setup("fit")
    dataset = data.dataset("train", wrapped=False)
    return [dataset[i] for i in range(pairs)], data.collator.pad_token_id


def load_model_and_items(args) -> tuple[torch.nn.Module, list[dict], int]:
    """``(model on args.device, items, pad_token_id)`` for ``--model``."""
    if args.model == "gemma3-270m":
        from fpo.models.gemma3_gguf import load_gemma3_270m

        model, tokenizer = load_gemma3_270m(dtype="float32")
        items, pad = sentiment_pairs(tokenizer, args.pairs, args.max_length)
        return model.to(args.device).eval(), items, pad
    model = random_gemma3_270m(args.seed, args.device)
    items = random_pairs(args.pairs, args.max_length, GEMMA3_270M_SHAPE["vocab_size"], args.seed)
    return model, items, GEMMA3_270M_SHAPE["pad_token_id"]


# ----------------------------------------------------------------------------- measurement


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def hooked(model, hook, batch: dict, bf16: bool, device_type: str) -> Tensor:
    """``[M, d_in]`` hooked activations at the response positions (bf16 autocast or fp32)."""
    positions = response_positions(batch["labels"])
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        parts, request = split_causal_lm(model), StatsRequest(hooked=True)
        return response_stats(parts, batch, positions, request, hook_module=hook).hooked


@torch.no_grad()
def pooled(sae, acts: Tensor, labels: Tensor, autocast: bool, encode_fp32: bool) -> Tensor:
    """``[N, d_sae]`` mean SAE features per row; the encoding runs in bf16 iff `autocast`
    and not `encode_fp32` (training encodes inside the policy's autocast)."""
    positions = response_positions(labels)
    device_type = acts.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast and not encode_fp32):
        features = sae.encode(acts.float() if encode_fp32 else acts).float()
    return segment_mean(features, positions.rows, positions.num_rows)


def split_policy(parts: list[Tensor], per: int) -> Tensor:
    """Reorder per-batch rows (each ``[chosen x per, rejected x per]``) as the whole batch's
    ``[all chosen, all rejected]``."""
    return torch.cat([p[:per] for p in parts] + [p[per:] for p in parts])


def measure(sae, ref_acts, policy_acts, whole, halves, row: Row, k: int, per: int) -> dict:
    """D statistics of one precision row for one SAE and one policy composition."""
    bf16 = row.reference != "fp32"
    reference = pooled(sae, ref_acts, whole["labels"], bf16, row.encode_fp32)
    top = reference.topk(k, dim=1)
    policy = split_policy(
        [
            pooled(sae, acts, batch["labels"], row.policy_bf16, row.encode_fp32)
            for acts, batch in zip(policy_acts, halves, strict=True)
        ],
        per,
    )
    d = feature_mse(policy, top.indices, top.values, k=k)
    relative = feature_mse(policy, top.indices, top.values, k=k, normalize=True)
    policy_top = policy.topk(k, dim=1).indices
    overlap = (policy_top.unsqueeze(2) == top.indices.unsqueeze(1)).any(2).float().mean(1)
    return {
        "D_mean": float(d.mean()),
        "D_max": float(d.max()),
        "D_relative_mean": float(relative.mean()),
        "topk_overlap_mean": float(overlap.mean()),
    }


def policy_order(acts: list[Tensor], halves: list[dict], per: int) -> Tensor:
    """The policy's hooked activations ``[M, d_in]`` in the whole batch's row order."""
    chosen, rejected = [], []
    for a, batch in zip(acts, halves, strict=True):
        rows = response_positions(batch["labels"]).rows
        chosen.append(a[rows < per])
        rejected.append(a[rows >= per])
    return torch.cat(chosen + rejected)


def resolve_gain(args, fp32_reference_acts: Tensor) -> float:
    """``--hook-gain``: a number, or ``auto`` (the default for the random model; 1 for the
    real one): the real stream's mean norm / the mean norm of `fp32_reference_acts`."""
    hook_gain = args.hook_gain or ("1" if args.model == "gemma3-270m" else "auto")
    if hook_gain == "auto":
        return REAL_LAYER17_MEAN_NORM / float(fp32_reference_acts.norm(dim=1).mean())
    try:
        return float(hook_gain)
    except ValueError:
        raise SystemExit(f"--hook-gain must be 'auto' or a number, got {hook_gain!r}") from None


def reference_acts(model, hook, whole: dict, device_type: str) -> dict[str, Tensor]:
    """The reference batch's hooked activations per `Row.reference` mode (bf16 weights: a
    bfloat16 copy of `model`, dropped afterwards)."""
    acts = {"fp32": hooked(model, hook, whole, False, device_type)}
    acts["bf16"] = hooked(model, hook, whole, True, device_type)
    hook_path = next(name for name, module in model.named_modules() if module is hook)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    acts["bf16-weights"] = hooked(
        bf16_model, bf16_model.get_submodule(hook_path), whole, True, device_type
    )
    del bf16_model
    return acts


def relative_error(x: Tensor, reference: Tensor) -> float:
    """``|x - reference| / |reference|`` (Frobenius norms, in fp32)."""
    return float((x.float() - reference.float()).norm() / reference.float().norm())


def device_name(device_type: str) -> str:
    """The GPU's name, or the CPU's (as the platform reports it)."""
    return (
        torch.cuda.get_device_name()
        if device_type == "cuda"
        else (platform.processor() or platform.machine())
    )


def run(args) -> dict:
    """Measure every ``--sae`` x ``--policy-pairs`` x precision row; returns the JSON dict."""
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model, items, pad = load_model_and_items(args)
    saes = {path: load_sae(path=path, device=args.device) for path in args.sae}
    hooks = {sae_hook_name(sae) for sae in saes.values()}
    if len(hooks) != 1:
        raise SystemExit(f"--sae folders must share one hook, got {sorted(hooks)}")
    hook = resolve_hook_module(model, hooks.pop())
    collate = PreferenceCollator(pad)
    device_type = torch.device(args.device).type
    whole = to_device(collate(items), args.device)  # the "cache" batch
    ref = reference_acts(model, hook, whole, device_type)
    gain = resolve_gain(args, ref["fp32"])
    ref = {mode: gain * acts for mode, acts in ref.items()}
    out: dict = {
        "model": args.model,
        "device": args.device,
        "device_name": device_name(device_type),
        "torch": torch.__version__,
        "pairs": args.pairs,
        "k": args.k,
        "hook_gain": gain,
        "saes": {},
        "hooked_rel_err": {},
    }
    policy_acts = {}
    for per in args.policy_pairs:
        halves = [
            to_device(collate(items[s : s + per]), args.device) for s in range(0, args.pairs, per)
        ]
        policy_acts[per] = (
            halves,
            {bf16: [gain * hooked(model, hook, b, bf16, device_type) for b in halves]
             for bf16 in (False, True)},
        )  # fmt: skip
        out["hooked_rel_err"][str(per)] = {
            f"policy {'bf16' if p else 'fp32'}, reference {r}": relative_error(
                policy_order(policy_acts[per][1][p], halves, per), ref[r]
            )
            for p, r in ((False, "fp32"), (True, "fp32"), (True, "bf16"), (True, "bf16-weights"))
        }
    for path, sae in saes.items():
        reference_l0 = float((sae.encode(ref["fp32"].float()) > 0).sum(1).float().mean())
        result: dict = {"architecture": sae.cfg.architecture(), "d_sae": int(sae.cfg.d_sae),
                        "L0_reference_fp32": reference_l0, "compositions": {}}  # fmt: skip
        for per, (halves, acts) in policy_acts.items():
            result["compositions"][str(per)] = {
                row.name: measure(
                    sae, ref[row.reference], acts[row.policy_bf16], whole, halves, row, args.k, per
                )
                for row in ROWS
            }
        out["saes"][path] = result
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _number(x: float) -> str:
    return "0" if x == 0 else f"{x:.2g}" if abs(x) < 1e3 else f"{x:,.0f}"


def tables(result: dict) -> str:
    """Markdown tables of a result: D per SAE, composition and precision row; hooked error."""
    lines = [
        f"{result['model']} on {result['device']} ({result['device_name'] or '?'}), torch "
        f"{result['torch']}, {result['pairs']} pairs, k {result['k']}, hook gain "
        f"{result['hook_gain']:.4g}",
        "",
        "| SAE | L0 | policy pairs/batch | row | mean D | max D | mean D/E_ref | top-k overlap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, sae in result["saes"].items():
        for per, rows in sae["compositions"].items():
            for name, r in rows.items():
                lines.append(
                    f"| {Path(path).name} ({sae['architecture']}) | "
                    f"{sae['L0_reference_fp32']:.0f} | {per} | {name} | {_number(r['D_mean'])} | "
                    f"{_number(r['D_max'])} | {_number(r['D_relative_mean'])} | "
                    f"{r['topk_overlap_mean']:.3f} |"
                )
    lines += ["", "| policy pairs/batch | precisions | hooked rel. error |", "|---|---|---|"]
    for per, errs in result["hooked_rel_err"].items():
        lines += [f"| {per} | {name} | {_number(err)} |" for name, err in errs.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize is not None:
        print(tables(json.loads(args.summarize.read_text(encoding="utf-8"))))
        return
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    print(tables(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
