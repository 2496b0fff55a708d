"""Equal math first: our first-step losses equal TRL's on the same batch, and again after
one optimizer update (the same SGD update applied to each framework's own gradient).

* DPO: ours (``objective=dpo``, online reference) vs ``DPOTrainer``: both ``ln 2`` at step 0.
* SimPO: ours (``objective=simpo``: beta 2, ``gamma_beta_ratio`` 0.5) vs
  ``CPOTrainer(loss_type="simpo", cpo_alpha=0, beta=2, simpo_gamma=1.0)``: TRL's
  ``simpo_gamma`` is in reward units, ``= beta * gamma_beta_ratio`` (``fpo.objective``).

Both frameworks get the same token ids (``rows.py``), so tokenization (BOS/EOS handling,
prompt/response boundary merges, truncation), batch order and the gamma convention are
equal by construction; what remains is the math.

Under bf16 autocast (GPU) TRL's CPOTrainer keeps its ``[2B, T, V]`` logits in bf16, and its
per-token log-probs, their masked sum and the average stay bf16: an average log-prob near
-12.5 (a 256k vocabulary at initialisation) is rounded to a multiple of 0.0625, so
``beta * (avg_w - avg_l)`` moves in steps of 0.125 at beta 2 and the loss by up to a few
hundredths (the issue's 0.946 ours vs 0.920 TRL). We take the log-softmax in float32
(``fpo.logprobs``). Like is compared with like: in bf16 the SimPO check runs TRL's own code
with its logits cast to float32 before ``get_batch_logps`` (``trl_fp32_logps``), and TRL's
raw bf16 loss is reported beside it (``trl``). TRL's DPOTrainer (a fused LM head that
accumulates in float32) is compared as it is.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import torch

from benchmarks.common import objective_preset
from benchmarks.rows import cpo_item, dpo_item, our_item

#: Largest |ours - TRL| accepted, per precision: (step 0, after one update). After the
#: update the bound is relative to the update's own size, ``|TRL after - TRL before|`` (at
#: least 1): the step multiplies the gradients' float rounding (their summation order over a
#: 262k vocabulary differs between the frameworks) by itself. On gemma-3-270m's fixed rows
#: DPO moves from 0.69 to 11.17 and the two differ by 5e-4 to 1.2e-3 in fp32 (1e-4 of
#: the move), with the same math. A 1% error in beta moves it by about 2%
#: (``tests/test_benchmarks_equal_math.py``).
TOLERANCE = {"fp32": (1e-5, 1e-3), "bf16": (5e-3, 5e-3)}


def allowed(tolerance: tuple[float, float], reference: list[float]) -> list[float]:
    """``[step 0, after one update]`` bounds on ``|ours - TRL|`` given TRL's two losses."""
    return [tolerance[0], tolerance[1] * max(1.0, abs(reference[1] - reference[0]))]


KINDS = {"dpo": "TRL DPO online", "simpo": "TRL SimPO"}


def precision_of(spec: dict) -> str:
    """``bf16`` (autocast over fp32 weights) on GPU, ``fp32`` on CPU unless ``spec`` says."""
    return spec.get("precision") or ("bf16" if spec["device"].startswith("cuda") else "fp32")


def _autocast(spec: dict):
    if precision_of(spec) == "bf16":
        return torch.autocast(spec["device"].split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _two_losses(model, loss_fn, spec: dict) -> list[float]:
    """``[loss at step 0, loss after one SGD step on the same batch]``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=spec["check_lr"])
    with _autocast(spec):
        loss = loss_fn()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), _autocast(spec):
        after = loss_fn()
    return [float(loss), float(after)]


def ours(kind: str, model, tokenizer, rows: list[dict], spec: dict) -> list[float]:
    """Our module's mean loss over ``rows`` (one batch), before and after one update."""
    from fpo.builder import assemble_module, frozen_copy, online_reference
    from fpo.data.collate import PreferenceCollator
    from fpo.objective import build_objective

    objective = build_objective(objective_preset(kind))
    reference = None
    if kind == "dpo":
        reference = online_reference(frozen_copy(model), objective)
    optimizer = partial(torch.optim.SGD, lr=spec["check_lr"])
    module = assemble_module(model, objective, optimizer, reference=reference)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    batch = _to(collate([our_item(r) for r in rows]), spec["device"])
    return _two_losses(model, lambda: module.preference_step(batch)[0].losses.mean(), spec)


def trl(kind: str, load_model, rows: list[dict], spec: dict, fp32_logps: bool = False):
    """TRL's ``compute_loss`` over ``rows`` (one batch), before and after one update; with
    ``fp32_logps`` (SimPO) its logits are cast to float32 before ``get_batch_logps``."""
    from unittest import mock

    from trl.experimental.cpo import CPOTrainer

    if fp32_logps:
        original = CPOTrainer.get_batch_logps

        def upcast(logits, labels, **kwargs):
            return original(logits.float(), labels, **kwargs)

        with mock.patch.object(CPOTrainer, "get_batch_logps", staticmethod(upcast)):
            return trl(kind, load_model, rows, spec)
    from benchmarks import trl_side

    spec = {**spec, "gradient_checkpointing": False, "warmup": 0, "steps": 1}
    model, tokenizer = load_model()
    ref_model = load_model()[0].eval() if kind == "dpo" else None
    trainer = trl_side.build(spec, KINDS[kind], model, tokenizer, rows, ref_model=ref_model)
    item = dpo_item if kind == "dpo" else cpo_item
    inputs = _to(trainer.data_collator([item(r) for r in rows]), spec["device"])
    model.train()
    return _two_losses(model, lambda: trainer.compute_loss(model, inputs), spec)


def check(spec: dict, rows: list[dict], load_model) -> dict:
    """Run both frameworks on ``rows`` for DPO and SimPO; a fresh model per run.

    Returns ``{kind: {"ours": [l0, l1], "trl": [l0, l1], "diff": [...], "allowed": [...],
    "ok": bool}}`` (and
    ``trl_fp32_logps`` for SimPO in bf16, which ``diff`` then compares with), plus
    ``"tolerance"`` and ``"dpo_ln2"`` (|our DPO step-0 loss - ln 2|).
    """
    precision = precision_of(spec)
    tolerance = TOLERANCE[precision]
    out: dict = {"precision": precision, "tolerance": tolerance, "lr": spec["check_lr"]}
    for kind in KINDS:
        model, tokenizer = load_model()
        mine = ours(kind, model, tokenizer, rows, spec)
        del model
        theirs = trl(kind, load_model, rows, spec)
        result = {"ours": mine, "trl": theirs}
        compared = theirs
        if kind == "simpo" and precision == "bf16":
            compared = result["trl_fp32_logps"] = trl(kind, load_model, rows, spec, True)
        if spec["device"].startswith("cuda"):
            torch.cuda.empty_cache()
        diff = [abs(a - b) for a, b in zip(mine, compared, strict=True)]
        bounds = allowed(tolerance, compared)
        ok = all(d <= t for d, t in zip(diff, bounds, strict=True))
        out[kind] = {**result, "diff": diff, "allowed": bounds, "ok": ok}
    out["dpo_ln2"] = abs(out["dpo"]["ours"][0] - math.log(2))
    out["ok"] = all(out[k]["ok"] for k in KINDS) and out["dpo_ln2"] <= tolerance[0]
    return out
