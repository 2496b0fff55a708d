"""The module's loss equals the objective's formula computed independently of its code path.

The pure losses are tested in ``tests/unit/test_objectives.py``; these tests check what the
module feeds them: sums vs per-token averages, the reference's values, the full-vocabulary
KL, the pooled SAE features, Gemma-2's final logit soft-capping, and the presets' values.
"""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger

from fpo.builder import assemble_module, online_reference
from fpo.models.tiny import build_tiny_model, load_tiny
from fpo.objective import Objective
from fpo.sae import build_random_sae
from fpo.testing import PRESETS, fixture_datamodule, preset

HOOK_LAYER = 0  # hidden_states[1] is the output of decoder layer 0, before any final norm


def fixture_batch(tokenizer, fixtures_dir, batch_size=4):
    datamodule = fixture_datamodule(
        tokenizer, fixtures_dir, batch_size, eval_batch_size=batch_size, shuffle=False
    )
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def perturbed_pair(model):
    """``(policy, reference)``: the reference is ``model``, the policy a perturbed copy."""
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval(), reference.eval()


def make_module(objective, policy, reference_model, sae, hook):
    """The module of ``objective`` with ``reference_model`` (used as given) as reference."""
    reference = None
    if objective.needs.reference:
        reference = online_reference(reference_model, objective, sae=sae, hook_name=hook)
    optimizer = partial(torch.optim.SGD, lr=0.0)
    return assemble_module(
        policy, objective, optimizer, reference=reference, sae=sae, hook_name=hook
    )


# ------------------------------------------------------------------- pinned preset values
# Per-pair losses of the five presets on the first 4 fixture pairs (policy = seeded random
# tiny model perturbed by 0.05 * N(0, 1) with seed 1; reference = the unperturbed model;
# random TopK SAE d_sae 64, k 8 at blocks.1; FPO k 16), computed by the code before the
# objectives were made composable (fpo.methods). SimPO: gamma_beta_ratio 0.5 x beta 2 =
# a margin of 1.0 in reward units (the FPO paper's baseline; the old preset's gamma 0.5 was
# a ratio of 0.25).
PINNED = {
    "dpo": [0.7107377, 0.5031153, 0.9035971, 0.621298],
    "simpo": [1.2829098, 1.0789082, 1.3597584, 1.2628093],
    "tdpo1": [0.6914747, 0.4284564, 0.8308203, 0.532792],
    "tdpo2": [0.7010605, 0.4646091, 0.8667287, 0.5757891],
    "fpo": [0.7113147, 0.6879385, 0.7575604, 0.6805339],
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_give_the_pinned_losses(name, tiny_tokenizer, fixtures_dir):
    torch.manual_seed(0)
    policy, reference = perturbed_pair(build_tiny_model())
    batch = fixture_batch(tiny_tokenizer, fixtures_dir)
    sae = build_random_sae(d_in=32, d_sae=64, k=8, hook_name="blocks.1.hook_resid_post")
    objective = preset(name, "objective.constraints.features.k=16")
    module = make_module(objective, policy, reference, sae, "blocks.1.hook_resid_post")
    result, _ = module.preference_step(batch)
    torch.testing.assert_close(result.losses, torch.tensor(PINNED[name]), atol=2e-6, rtol=0)


# ------------------------------------------------------------ an independent computation
def naive_response_stats(model, batch):
    """Per row: summed and averaged response log-probs, the full logits ``[N, T, V]`` at the
    positions predicting each response token, and the response mask, straight from
    ``model(...)`` (soft-capping, if any, applied by the model itself)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
    )
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    summed = (token_logps * mask).sum(-1)
    return {
        "sum": summed,
        "avg": summed / mask.sum(-1),
        "logits": logits,
        "mask": mask,
        "hidden": out.hidden_states[HOOK_LAYER + 1][:, :-1],
    }


def naive_sequence_kl(reference, policy):
    """``sum_t KL(pi_ref || pi_theta)`` over response positions, from full logits."""
    ref_logp = reference["logits"].log_softmax(-1)
    pol_logp = policy["logits"].log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - pol_logp)).sum(-1)
    return (kl * policy["mask"]).sum(-1)


def naive_pooled_features(sae, stats):
    features = sae.encode(stats["hidden"])  # [N, T-1, d_sae]
    mask = stats["mask"][..., None]
    return (features * mask).sum(1) / mask.sum(1)


def naive_loss(objective: Objective, policy, reference, sae):
    """The objective from its docstring formula, with plain tensors."""
    field = "sum" if objective.margin == "dpo" else "avg"
    pw, pl = policy[field].chunk(2)
    beta, gamma = objective.beta, 0.0
    if objective.margin == "simpo":
        margin, gamma = pw - pl, beta * objective.gamma_beta_ratio
    else:
        rw, rl = reference[field].chunk(2)
        margin = (pw - rw) - (pl - rl)
    kl = objective.constraints.token_kl
    if kl.alpha:
        kw, kl_l = naive_sequence_kl(reference, policy).chunk(2)
        margin = margin - kl.alpha * (kl_l - kw)
    features = objective.constraints.features
    if features.alpha:
        k = features.k
        cbar = naive_pooled_features(sae, policy)
        ref_cbar = naive_pooled_features(sae, reference)
        ref_top = ref_cbar.topk(k, dim=-1)
        ref_sparse = torch.zeros_like(ref_cbar).scatter(-1, ref_top.indices, ref_top.values)
        union = torch.zeros_like(cbar, dtype=torch.bool)
        union.scatter_(-1, cbar.topk(k, dim=-1).indices, True)
        union.scatter_(-1, ref_top.indices, True)
        d = ((cbar - ref_sparse).square() * union).sum(-1) / k
        if features.normalize:
            d = d / (ref_sparse.square().sum(-1) / k)
        dw, dl = d.chunk(2)
        margin = margin - features.alpha * (dl - dw)
    return -F.logsigmoid(beta * margin - gamma)


COMBINATIONS = {
    **{name: (name,) for name in PRESETS},
    "simpo+features": ("simpo", "objective.constraints.features.alpha=0.5"),
    "dpo+token_kl": ("dpo", "objective.constraints.token_kl.alpha=0.5"),
    "ln_dpo+token_kl": ("tdpo2", "objective.margin=ln_dpo"),
    "fpo normalized": ("fpo", "objective.constraints.features.normalize=true"),
}


@pytest.mark.parametrize("architecture", ["gemma3", "gemma2"])
@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_module_loss_equals_formula_from_the_models_own_logits(
    combination, architecture, tiny_tokenizer, fixtures_dir
):
    """Responses of different lengths; on Gemma-2 the final logit soft-capping is set to 2,
    low enough that the tiny model's logits are visibly capped."""
    name, *overrides = COMBINATIONS[combination]
    objective = preset(name, *overrides, "objective.constraints.features.k=12")
    torch.manual_seed(0)
    model, _ = load_tiny(architecture=architecture, hidden_size=32, num_hidden_layers=2)
    if architecture == "gemma2":
        model.config.final_logit_softcapping = 2.0  # small enough that capping matters
    policy, reference_model = perturbed_pair(model)
    batch = fixture_batch(tiny_tokenizer, fixtures_dir)
    lengths = (batch["labels"] != -100).sum(-1)
    assert len(set(lengths.tolist())) > 2, "the check needs responses of different lengths"
    hook = f"blocks.{HOOK_LAYER}.hook_resid_post"
    sae = build_random_sae(d_in=32, d_sae=48, k=10, hook_name=hook)
    module = make_module(objective, policy, reference_model, sae, hook)
    result, _ = module.preference_step(batch)
    with torch.no_grad():
        expected = naive_loss(
            objective,
            naive_response_stats(policy, batch),
            naive_response_stats(reference_model, batch),
            sae,
        )
    torch.testing.assert_close(result.losses, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- per-step train metrics
class MicroBatchLosses(L.Callback):
    """Records every micro-batch's mean loss (Lightning hands it over divided by the number
    of accumulated micro-batches)."""

    def __init__(self):
        self.micro = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.micro.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


class RecordingLogger(Logger):
    """Keeps what is logged: ``[(step, {name: value})]``."""

    def __init__(self):
        super().__init__()
        self.records = []

    name = "recording"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_train_metrics_aggregate_one_optimizer_step_only(tiny_tokenizer, fixtures_dir):
    """``train/loss`` of step s is the mean over step s's micro-batches (equal sizes), not
    a running mean since the start: the metrics restart every optimizer step."""
    torch.manual_seed(0)
    policy, reference_model = perturbed_pair(build_tiny_model())
    datamodule = fixture_datamodule(tiny_tokenizer, fixtures_dir, batch_size=1, shuffle=False)
    objective = preset("dpo")
    module = assemble_module(
        policy.train(),
        objective,
        partial(torch.optim.SGD, lr=1e-2),
        reference=online_reference(reference_model, objective),
    )
    capture, logger = MicroBatchLosses(), RecordingLogger()
    trainer = L.Trainer(
        max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=logger,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, callbacks=[capture],
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    logged = [metrics["train/loss"] for _, metrics in logger.records if "train/loss" in metrics]
    per_step = [sum(capture.micro[2 * s : 2 * s + 2]) / 2 for s in range(3)]
    assert len(logged) == 3 and len(set(per_step)) == 3
    for step, (value, expected) in enumerate(zip(logged, per_step, strict=True)):
        assert abs(value - expected) < 1e-6, f"step {step}: logged {value}, expected {expected}"
