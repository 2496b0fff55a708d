"""fpo.packing: the padding-free trunk forward equals the padded one (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from fpo.errors import UserError
from fpo.forward import forward_response_positions
from fpo.logprobs import IGNORE_INDEX, response_positions, response_token_stats, sequence_logps
from fpo.models.hf import split_causal_lm
from fpo.packing import Packing, check_packable, pack_rows
from fpo.sae import resolve_hook_module

VOCAB = 97
#: (prompt, response) lengths: the longest row (index 2) has no pad, row 3 a 1-token response.
ROWS = [(4, 5), (3, 2), (5, 7), (2, 1), (6, 3)]
#: smaller than most rows, so the sliding-window layers' mask matters
WINDOW = 3
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**SIZES))


def _gemma3():
    config = Gemma3TextConfig(**SIZES, sliding_window=WINDOW, layer_types=None)
    config.layer_types = ["sliding_attention", "full_attention"]
    return Gemma3ForCausalLM(config)


def _gemma2():
    return Gemma2ForCausalLM(Gemma2Config(**SIZES, sliding_window=WINDOW))


MODELS = {"llama": _llama, "gemma3": _gemma3, "gemma2": _gemma2}
CASES = [
    ("llama", "sdpa"),
    ("llama", "eager"),
    ("gemma3", "sdpa"),
    ("gemma3", "eager"),
    ("gemma2", "eager"),  # soft-capped attention
]


def make_model(name: str, attn: str):
    torch.manual_seed(0)
    model = MODELS[name]()
    model.config._attn_implementation = attn
    return model.float().eval()


def make_batch(rows=ROWS, left: bool = False) -> dict:
    """Right- (or left-) padded rows of random tokens; labels -100 on prompt and pad."""
    generator = torch.Generator().manual_seed(1)
    width = max(p + r for p, r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for n, (prompt, response) in enumerate(rows):
        length = prompt + response
        start = width - length if left else 0
        ids[n, start : start + length] = torch.randint(3, VOCAB, (length,), generator=generator)
        mask[n, start : start + length] = 1
        labels[n, start + prompt : start + length] = ids[n, start + prompt : start + length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(model, batch, packing):
    """Hidden states, hooked activations (layer 0's output), token and sequence log-probs."""
    parts = split_causal_lm(model)
    positions = response_positions(batch["labels"])
    hook = resolve_hook_module(model, "blocks.0.hook_resid_post")
    out = forward_response_positions(parts, batch, positions, hook, packing)
    tokens = response_token_stats(out.hidden, parts.head, positions.targets, 4)
    sums = sequence_logps(tokens.policy_logps, positions.rows, positions.num_rows)
    return out.hidden, out.hooked, tokens.policy_logps, sums.sum, sums.avg


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ layout


def test_pack_rows_layout_right_padded():
    batch = make_batch()
    packed = pack_rows(batch["input_ids"], batch["attention_mask"], Packing())
    real = batch["attention_mask"].bool()
    lengths = [p + r for p, r in ROWS]
    assert packed.input_ids.shape[1] == max(lengths)  # L = the longest row
    assert packed.input_ids.numel() < batch["input_ids"].numel()
    flat_ids, flat_pos = packed.input_ids.flatten(), packed.position_ids.flatten()
    assert torch.equal(flat_ids[packed.slot[real]], batch["input_ids"][real])
    for n, length in enumerate(lengths):  # positions restart at 0 for every row
        assert flat_pos[packed.slot[n, :length]].tolist() == list(range(length))
    assert (packed.slot[~real] == -1).all()
    assert packed.slot[real].unique().numel() == sum(lengths)


def test_pack_rows_one_sequence_and_left_padding():
    batch = make_batch(left=True)
    packed = pack_rows(batch["input_ids"], batch["attention_mask"], Packing(10_000))
    total = sum(p + r for p, r in ROWS)
    assert tuple(packed.input_ids.shape) == (1, total)  # no tail: [1, S]
    real = batch["attention_mask"].bool()
    assert torch.equal(packed.input_ids.flatten()[packed.slot[real]], batch["input_ids"][real])
    assert (packed.position_ids == 0).sum() == len(ROWS)


def test_pack_rows_refuses_bad_input():
    batch = make_batch()
    with pytest.raises(UserError, match=r"model\.pack_length=4"):
        pack_rows(batch["input_ids"], batch["attention_mask"], Packing(4))
    holes = batch["attention_mask"].clone()
    holes[0, 1] = 0
    with pytest.raises(ValueError, match="contiguous"):
        pack_rows(batch["input_ids"], holes, Packing())
    with pytest.raises(UserError, match=r"model\.pack_length"):
        Packing(0)


def test_check_packable_refuses_other_attention():
    model = make_model("llama", "sdpa")
    check_packable(model)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match=r"model\.packed=true.*flash_attention_2"):
        check_packable(model)


# ------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("packing", [Packing(), Packing(10_000)], ids=["bins", "one_row"])
@pytest.mark.parametrize(("name", "attn"), CASES)
def test_packed_forward_equals_padded(name, attn, packing):
    model = make_model(name, attn)
    batch = make_batch()
    with torch.no_grad():
        padded = run(model, batch, None)
        packed = run(model, batch, packing)
    for got, want in zip(packed, padded, strict=True):
        assert got.shape == want.shape
        assert_close(got, want)


@pytest.mark.parametrize(("name", "attn"), [("llama", "sdpa"), ("gemma3", "sdpa")])
def test_packed_forward_equals_padded_on_left_padding(name, attn):
    """Pads anywhere at a row's ends are dropped (the collator pads on the right)."""
    model = make_model(name, attn)
    right, left = make_batch(), make_batch(left=True)
    with torch.no_grad():
        padded = run(model, right, None)
        packed = run(model, left, Packing())
    for got, want in zip(packed, padded, strict=True):
        assert_close(got, want)


@pytest.mark.parametrize(("name", "attn"), [("gemma3", "sdpa"), ("gemma2", "eager")])
def test_packed_gradients_equal_padded(name, attn):
    grads = []
    for packing in (None, Packing()):
        model = make_model(name, attn).train()
        _, hooked, _, sums, avgs = run(model, make_batch(), packing)
        (sums.sum() + avgs.sum() + hooked.square().mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for n, grad in grads[0].items():
        torch.testing.assert_close(grads[1][n], grad, atol=1e-5, rtol=1e-4, msg=n)


# ------------------------------------------------------------------ evaluation paths


def test_packed_heldout_metrics_and_scoring_equal_padded(monkeypatch):
    import fpo.forward

    calls = []
    monkeypatch.setattr(fpo.forward, "pack_rows", lambda *a: calls.append(1) or pack_rows(*a))
    from fpo.evaluation.heldout import heldout_pair_metrics
    from fpo.evaluation.scoring import sequence_logprob
    from fpo.sae import build_random_sae
    from fpo.testing import preset

    reference = make_model("gemma3", "sdpa")
    policy = make_model("gemma3", "sdpa")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sae = build_random_sae(d_in=32, d_sae=16, hook_name="blocks.0.hook_resid_post")
    batch = make_batch(ROWS[:4])
    results = []
    for packing in (None, Packing()):
        metrics, _ = heldout_pair_metrics(
            policy,
            reference,
            [batch],
            preset("tdpo1"),
            sae,
            sae.cfg.metadata.hook_name,
            drift_k=4,
            logits_chunk_size=4,
            packing=packing,
        )
        prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
        completions = [[14, 15], [16, 17, 18, 19, 20, 21], [22]]
        scores = sequence_logprob(policy, 0, prompts, completions, 4, packing=packing)
        results.append((metrics, scores))
        assert len(calls) == (0 if packing is None else 3)  # policy, reference; scoring
    (padded, padded_scores), (packed, packed_scores) = results
    assert padded["entropy"] > 0 and padded["feature_drift"] > 0
    assert padded.keys() == packed.keys()
    for key, value in padded.items():
        if isinstance(value, float):
            assert packed[key] == pytest.approx(value, abs=1e-5), key
    assert_close(packed_scores, padded_scores)
