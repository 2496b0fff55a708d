"""TRL's side: ``DPOTrainer`` (online or ``precompute_ref_log_probs``) and
``CPOTrainer(loss_type="simpo", cpo_alpha=0)`` trained by TRL's own ``Trainer.train`` loop on
the benchmark's rows (token ids, handed over already tokenized: TRL's tokenization is
bypassed so both frameworks see identical sequences)."""

from __future__ import annotations

from contextlib import ExitStack
from unittest import mock

from benchmarks.common import Stopwatch, objective_preset
from benchmarks.rows import cpo_item, dpo_item

#: TRL configurations: (trainer, extra config keys). "(liger)": ``use_liger_kernel=True``,
#: which in TRL 1.16's DPOTrainer swaps in Liger's Triton kernels for the decoder layers
#: (RMSNorm, RoPE, the gated MLP); its LM head is TRL's own chunked one either way (TRL
#: refuses Liger's fused linear cross-entropy there, and CPOTrainer takes no Liger option).
#: CUDA only (Triton); needs the ``liger-kernel`` package.
TRL = {
    "TRL DPO online": ("dpo", {}),
    "TRL DPO online (liger)": ("dpo", {"use_liger_kernel": True}),
    "TRL DPO precomputed": ("dpo", {"precompute_ref_log_probs": True}),
    "TRL SimPO": ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0}),
}


def trl_hyperparameters(kind: str) -> dict:
    """TRL's arguments for our presets (configs/objective): DPO ``beta``; SimPO ``beta`` and
    ``simpo_gamma = beta * gamma_beta_ratio`` (TRL's gamma is in reward units, ours is the
    SimPO repository's ratio: preset beta 2, ratio 0.5 -> simpo_gamma 1.0)."""
    if kind == "dpo":
        return {"beta": objective_preset("dpo")["beta"]}
    simpo = objective_preset("simpo")
    return {"beta": simpo["beta"], "simpo_gamma": simpo["beta"] * simpo["gamma_beta_ratio"]}


def build(
    spec: dict, config: str, model, tokenizer, rows: list[dict], callbacks=(), ref_model=None
):
    """A TRL trainer for ``config`` over ``rows`` (no shuffling: rows in the given order).

    ``ref_model``: online DPO's reference, a second load of the policy's weights (TRL would
    load it again from the policy's hub id; the benchmark's models have none)."""
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    kind, extra = TRL[config]
    gpu = spec["device"].startswith("cuda")
    common = dict(
        output_dir=spec["workdir"] + "/trl",
        per_device_train_batch_size=spec["batch_pairs"],
        gradient_accumulation_steps=spec["accumulation"],
        max_steps=spec["warmup"] + spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        max_length=spec["max_length"],
        gradient_checkpointing=bool(spec["gradient_checkpointing"]),
        bf16=gpu,
        use_cpu=not gpu,
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
    )
    with ExitStack() as stack:
        if kind == "dpo":
            args = DPOConfig(**trl_hyperparameters("dpo"), **common, **extra)
            dataset = Dataset.from_list([dpo_item(r) for r in rows])
            # rows are already tokenized: skip TRL's text -> ids preparation
            stack.enter_context(
                mock.patch.object(DPOTrainer, "_prepare_dataset", lambda self, ds, *a, **k: ds)
            )
            trainer_class = DPOTrainer
        else:
            args = CPOConfig(**trl_hyperparameters("cpo"), **common, **extra)
            dataset = Dataset.from_list([cpo_item(r) for r in rows])
            stack.enter_context(
                mock.patch.object(CPOTrainer, "tokenize_row", lambda self, row, model=None: row)
            )
            trainer_class = CPOTrainer
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=list(callbacks),
            **({"ref_model": ref_model} if ref_model is not None else {}),
        )
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)
    return trainer


def step_timer(device: str):
    """A ``TrainerCallback`` timing each optimizer step (``on_step_begin`` .. ``on_step_end``)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.watch = Stopwatch(device)

        def on_step_begin(self, args, state, control, **kwargs):
            self.watch.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.watch.stop()

    return StepTimer()


def train(spec: dict, config: str, rows: list[dict]) -> dict:
    """Train ``warmup + steps`` optimizer steps with TRL; step times."""
    from benchmarks.models import load_model

    model, tokenizer = load_model(spec["model"], spec["device"], spec["seed"])
    timer = step_timer(spec["device"])
    ref_model = None
    if config.startswith("TRL DPO online"):
        ref_model = load_model(spec["model"], spec["device"], spec["seed"])[0].eval()
    trainer = build(spec, config, model, tokenizer, rows, callbacks=[timer], ref_model=ref_model)
    trainer.train()
    return {"step_times": timer.watch.times, "first_loss": None}
