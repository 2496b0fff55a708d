"""Our side: a configuration trained by ``fpo-train``'s own code path (``build_run_parts``,
``FPOLightningModule``, a Lightning ``Trainer``) on the benchmark's rows."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from benchmarks.common import Stopwatch
from benchmarks.rows import our_item

#: Our configurations: (objective preset, reference source or None).
OURS = {
    "DPO online": ("dpo", "online"),
    "DPO cached": ("dpo", "cached"),
    "SimPO": ("simpo", None),
    "TDPO-1": ("tdpo1", "online"),
    "TDPO-2": ("tdpo2", "online"),
    "FPO cached": ("fpo", "cached"),
    "FPO online": ("fpo", "online"),
}
#: Padding-free runs (``model.packed=true``, `fpo.packing`) of some of them, named
#: ``"<configuration> (packed)"``: the same objective and reference as the padded one.
PACKED_SUFFIX = " (packed)"
PACKED = ("DPO online", "SimPO", "FPO cached")
OURS |= {f"{name}{PACKED_SUFFIX}": OURS[name] for name in PACKED}
#: LoRA runs (``model.lora.enabled=true``, `fpo.lora`; benchmarks/lora.py): ``"<configuration>
#: (LoRA)"``, the reference the policy with its adapters off, and ``"<configuration> (LoRA,
#: reference copy)"``, the same adapters against a separate frozen load of the initial weights.
LORA_SUFFIX, LORA_COPY_SUFFIX = " (LoRA)", " (LoRA, reference copy)"
LORA = ("FPO online", "TDPO-2")
OURS |= {f"{n}{suffix}": OURS[n] for n in LORA for suffix in (LORA_SUFFIX, LORA_COPY_SUFFIX)}


def is_packed(config: str) -> bool:
    """Whether configuration ``config`` runs the trunk on real tokens only."""
    return config.endswith(PACKED_SUFFIX)


def is_lora(config: str) -> bool:
    """Whether configuration ``config`` trains LoRA adapters (`LORA_SUFFIX`, `LORA_COPY_SUFFIX`)."""
    return config.endswith((LORA_SUFFIX, LORA_COPY_SUFFIX))


def compose(
    spec: dict, objective: str, source: str | None, packed: bool = False, lora: bool = False
):
    """The ``fpo-train`` config of one configuration (our defaults plus the spec's sizes)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fpo.commands.common import CONFIG_DIR

    overrides = [
        "model=gemma3_270m" if spec["model"] == "gemma3_270m" else "model=tiny",
        f"objective={objective}",
        "reference=online",
        "sae=random",
        f"sae.loader.d_sae={spec['d_sae']}",
        f"sae.loader.k={spec['sae_k']}",
        "data=plain_fixture",
        "callbacks=none",
        "~scheduler",
        f"optimizer.lr={spec['lr']}",
        f"step.logits_chunk_size={spec.get('logits_chunk_size') or 'null'}",
        f"model.packed={str(packed).lower()}",
        f"model.lora.enabled={str(lora).lower()}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = spec["workdir"]
    cfg.model.loader = {
        "_target_": "benchmarks.models.load_model",
        "name": spec["model"],
        "device": spec["device"],
        "seed": spec["seed"],
    }
    cfg.model.gradient_checkpointing = bool(spec.get("gradient_checkpointing", False))
    # As the paper experiment configs: a bf16 online reference for DPO/TDPO, the policy's
    # dtype for FPO (a reference in another precision gives a spurious D, fpo.builder).
    # A LoRA policy is its own reference, in its own dtype.
    cfg.reference.dtype = None if objective == "fpo" or lora else spec.get("reference_dtype")
    OmegaConf.resolve(cfg)
    return cfg


class StepTimer(L.Callback):
    """Times each optimizer step (all its micro-batches) and keeps the first loss."""

    def __init__(self, device: str, accumulation: int) -> None:
        self.watch, self.accumulation, self.first_loss = Stopwatch(device), accumulation, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx % self.accumulation == 0:
            self.watch.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.first_loss is None:
            self.first_loss = float(outputs["loss"]) * self.accumulation
        if (batch_idx + 1) % self.accumulation == 0:
            self.watch.stop()


def attach_cached(items: list[dict], cache: dict) -> list[dict]:
    """Add the offline-cache fields (``ref_chosen_<name>``/``ref_rejected_<name>``) to items."""
    out = []
    for item in items:
        fields = cache[item["example_id"]]
        out.append({**item, **fields})
    return out


def build(spec: dict, config: str):
    """``(experiment, module)`` for configuration ``config``."""
    from fpo.builder import build_run_parts, online_reference
    from fpo.reference.base import BatchReference

    objective, source = OURS[config]
    cfg = compose(spec, objective, source, is_packed(config), is_lora(config))
    experiment = build_run_parts(cfg)
    reference = BatchReference() if source == "cached" else None
    if config.endswith(LORA_COPY_SUFFIX):  # what LoRA saves: a second model in memory
        step = experiment.step
        reference = online_reference(
            experiment.load_reference_model(),
            experiment.objective,
            sae=experiment.sae,
            hook_name=experiment.hook_name,
            logits_chunk_size=step.logits_chunk_size,
            packing=step.packing,
        )
    module = experiment.build_module(reference=reference)
    module.sae_report_batches = 0
    return experiment, module


def train(spec: dict, config: str, rows: list[dict], cache: dict | None) -> dict:
    """Train ``warmup + steps`` optimizer steps; step times, first loss."""
    experiment, module = build(spec, config)
    items = [our_item(r) for r in rows]
    if OURS[config][1] == "cached":
        items = attach_cached(items, cache[OURS[config][0]])
    from fpo.data.collate import PreferenceCollator

    loader = DataLoader(
        items,
        batch_size=spec["batch_pairs"],
        collate_fn=PreferenceCollator(experiment.tokenizer.pad_token_id),
        shuffle=False,
    )
    accumulation = spec["accumulation"]
    timer = StepTimer(spec["device"], accumulation)
    gpu = spec["device"].startswith("cuda")
    trainer = experiment.build_trainer(
        callbacks=[timer],
        max_steps=spec["warmup"] + spec["steps"],
        max_epochs=-1,
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        precision="bf16-mixed" if gpu else "32-true",
        accumulate_grad_batches=accumulation,
        gradient_clip_val=1.0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=spec["workdir"],
    )
    trainer.fit(module, train_dataloaders=loader)
    watch = timer.watch
    return {
        "step_times": watch.times,
        "step_cpu_times": watch.cpu_times,
        "first_loss": timer.first_loss,
    }


@torch.no_grad()
def build_cache(spec: dict, rows: list[dict]) -> dict:
    """The offline-cache fields of every row, for DPO (log-probs) and FPO (+ top-k features),
    computed by ``OnlineReference.stats`` exactly as ``fpo-cache`` does."""
    from fpo.data.collate import PreferenceCollator
    from fpo.logprobs import response_positions
    from fpo.reference import cache_rows, item_field

    cache = {}
    for objective in ("dpo", "fpo"):
        experiment, _ = None, None
        from fpo.builder import build_run_parts

        experiment = build_run_parts(compose(spec, objective, "online"))
        reference = experiment.build_reference().to(spec["device"])
        collate = PreferenceCollator(experiment.tokenizer.pad_token_id)
        fields = {}
        for start in range(0, len(rows), spec["batch_pairs"]):
            group = rows[start : start + spec["batch_pairs"]]
            batch = collate([our_item(r) for r in group])
            batch = {k: v.to(spec["device"]) if torch.is_tensor(v) else v for k, v in batch.items()}
            needs = experiment.objective.needs
            stats = reference.stats(
                batch, response_positions(batch["labels"]), features=needs.features, token_kl=False
            )
            sides = cache_rows(stats).items()  # the rows fpo-cache would store
            for i, row in enumerate(group):
                fields[row["example_id"]] = {
                    item_field(side, name): value[i]
                    for side, values in sides
                    for name, value in values.items()
                }
        cache[objective] = fields
        del experiment, reference
    return cache


def cache_path(workdir: str, model: str, row_set: str) -> Path:
    return Path(workdir) / f"cache-{model}-{row_set}.pt"
