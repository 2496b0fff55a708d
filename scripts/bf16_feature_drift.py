"""Measure FPO's D at step 0 (policy = reference) when the policy runs under bf16 autocast.

The reference's pooled features come from one padded batch of all pairs (as the cache
builds them), the policy's from batches of 2 pairs (as training sees them), with the same
weights: any D > 0 is numerical noise that FPO's constraint would fight. Each of policy and
reference runs in fp32 or under ``torch.autocast(bfloat16)``, with the SAE encoding in bf16
or forced to fp32; the SAE is the shipped TopK SAE (layer 17, k 64 of 2048 features).

    .venv/bin/python scripts/bf16_feature_drift.py --pairs 16
"""

from __future__ import annotations

import argparse
import json

import torch

from fpo.data import PreferenceDataModule
from fpo.forward import forward_response_positions
from fpo.logprobs import response_positions, segment_mean
from fpo.models.gemma3_gguf import load_gemma3_270m
from fpo.models.hf import split_causal_lm
from fpo.objectives import feature_mse
from fpo.sae import load_sae, resolve_hook_module, sae_hook_name


def pooled(model, sae, batch, autocast: bool, encode_fp32: bool) -> torch.Tensor:
    positions = response_positions(batch["labels"])
    hook = resolve_hook_module(model, sae_hook_name(sae))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = forward_response_positions(split_causal_lm(model), batch, positions, hook)
        with torch.autocast("cpu", enabled=autocast and not encode_fp32):
            acts = out.hooked.float() if encode_fp32 else out.hooked
            features = sae.encode(acts).float()
    return segment_mean(features, positions.rows, positions.num_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--k", type=int, default=50)
    args = parser.parse_args()
    model, tokenizer = load_gemma3_270m(dtype="float32")
    model.eval()
    sae = load_sae(path="assets/sae/gemma3-270m-layer17")
    data = PreferenceDataModule(
        train_source="data/sentiment/train.jsonl", tokenizer=tokenizer, format="plain",
        chat_template=False, plain_template="{prompt}", append_eos=False, max_length=64,
        max_prompt_length=32, batch_size=args.pairs, shuffle=False,
        max_train_samples=args.pairs,
    )  # fmt: skip
    data.setup("fit")
    dataset = data.dataset("train", wrapped=False)
    whole = data.collator([dataset[i] for i in range(args.pairs)])  # the "cache" batch
    halves = [data.collator([dataset[i] for i in range(s, s + 2)]) for s in range(0, args.pairs, 2)]
    results = {}
    for name, ref_autocast, autocast, encode_fp32 in [
        ("policy fp32, reference fp32", False, False, True),
        ("policy bf16 (SAE encode bf16), reference fp32", False, True, False),
        ("policy bf16 (SAE encode fp32), reference fp32", False, True, True),
        ("policy bf16, reference bf16 (SAE encode bf16 both)", True, True, False),
        ("policy bf16, reference bf16 (SAE encode fp32 both)", True, True, True),
    ]:
        reference = pooled(model, sae, whole, ref_autocast, encode_fp32)
        top = reference.topk(args.k, dim=1)
        rows = [pooled(model, sae, batch, autocast, encode_fp32) for batch in halves]
        chosen = torch.cat([r[:2] for r in rows])
        rejected = torch.cat([r[2:] for r in rows])
        policy = torch.cat([chosen, rejected])
        d = feature_mse(policy, top.indices, top.values, k=args.k)
        relative = feature_mse(policy, top.indices, top.values, k=args.k, normalize=True)
        results[name] = {"D_mean": float(d.mean()), "D_max": float(d.max()),
                         "D_relative_mean": float(relative.mean())}  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
