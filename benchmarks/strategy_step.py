"""A few optimizer steps of the paper setting under one trainer strategy; writes one JSON.

The FPO paper's Gemma-2-2B / UltraFeedback experiment (``experiment=gemma2_2b_ultrafeedback
objective={objective}``, FPO with ``reference.dtype=null``), composed as a GPU user would,
with hub-free stand-ins: a Gemma-2-2B-shaped ``Gemma2ForCausalLM`` with RANDOM weights
built directly on the device (fp32, as ``model=gemma2_2b`` loads it), a random JumpReLU SAE
of the Gemma Scope shape (d_in 2304, 16,384 latents, ``blocks.25.hook_resid_post``), the
byte-level tiny tokenizer (its ids are valid Gemma ids) and synthetic UltraFeedback rows of
the configured maximum lengths (prompt ``data.max_prompt_length`` = 512 tokens, prompt +
response ``data.max_length`` = 1024). Everything else (bf16-mixed, gradient checkpointing,
AdamW at lr 5e-7, DPO's bf16 online reference, logits chunking) is the experiment's own;
the warm-up is set to 0 so the first steps already update the weights, and the global batch
defaults to one micro-batch per optimizer step (``--global-batch 32`` is the paper's: 16
accumulated micro-batches of 2).

Measured (``--out`` JSON): peak CUDA memory (``max_memory_allocated`` / reserved over the fit,
the weights included), every optimizer step's wall time and their median without the first,
the losses, and whether the fp32 master weights changed: a few tracked matrices are read
back after the fit as the strategy keeps them (DeepSpeed: its fp32 partitions via
``safe_get_full_fp32_param``; FSDP: ``summon_full_params``), compared with their initial
values, and with what a bf16 parameter would have kept (``bf16_visible_fraction``).

    python -m benchmarks.strategy_step --strategy fsdp --objective fpo --out fsdp_fpo.json
    python -m benchmarks.strategy_step --strategy single --tiny --cpu --out t.json  # CPU check

``--strategy``: ``single`` (``trainer=gpu``), ``fsdp``, ``fsdp_fp32_reference`` (FSDP with
the online reference in fp32, see `STRATEGIES`), ``deepspeed_zero2``, ``deepspeed_zero3``.
``--tiny``: a 2-layer, 64-wide Gemma-2 and short rows, for checking the script on a CPU
(``--cpu``: ``trainer.accelerator=cpu``, fp32 unless ``--precision`` says otherwise).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import random
import statistics
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
# --strategy: the trainer config and any other override. The paper configs keep the online
# reference in bf16 next to the fp32 policy; FSDP flattens the parameters that no decoder-layer
# unit holds (the policy's and the reference's embeddings and final norms, the SAE) into one
# root unit, which must have one dtype, so `fsdp_fp32_reference` also runs it in fp32.
STRATEGIES = {
    "single": ("gpu", []),
    "fsdp": ("fsdp", []),
    "fsdp_fp32_reference": ("fsdp", ["reference.dtype=null"]),
    "deepspeed_zero2": ("deepspeed_zero2", []),
    "deepspeed_zero3": ("deepspeed_zero3", []),
}
# google/gemma-2-2b's config.json (the architecture; the weights here are random).
GEMMA2_2B = {
    "vocab_size": 256_000,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 8192,
    "sliding_window": 4096,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh",
}
TINY = {
    **GEMMA2_2B,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
}
GEMMA_SCOPE = {"d_sae": 16_384, "layer": 25}  # gemma-scope-2b-pt-res layer_25/width_16k
TRACKED = ("model.layers.0.mlp.down_proj.weight", "model.layers.{last}.self_attn.q_proj.weight")


def stub_wandb() -> bool:
    """sae-lens imports wandb at import time (only its training code uses it); when wandb is
    not installed (the GPU image), an empty module stands in. Returns whether it did."""
    try:
        if importlib.util.find_spec("wandb") is not None:
            return False
    except (ImportError, ValueError):  # a broken install counts as missing
        pass
    stub = types.ModuleType("wandb")
    stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    sys.modules["wandb"] = stub
    return True


def random_gemma2(shape: str = "2b", device: str = "cuda", dtype: str = "float32", **_: Any):
    """``(model, tokenizer)``: a Gemma-2 of `shape` (``2b`` or ``tiny``) with random weights,
    built on `device`, and the byte-level tiny tokenizer (ids < 261 < vocab)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from fpo.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(chat_template=True)
    config = Gemma2Config(
        **(GEMMA2_2B if shape == "2b" else TINY),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForCausalLM(config).to(getattr(torch, dtype))
    return model.train(), tokenizer


WORDS = ("the", "model", "reads", "a", "long", "review", "and", "writes", "careful", "answer")


def _text(chars: int, rng: random.Random) -> str:
    """Exactly `chars` characters of space-separated `WORDS` (seeded)."""
    text = ""
    while len(text) < chars:
        text += rng.choice(WORDS) + " "
    return text[:chars]


def synthetic_rows(path: Path, n: int, prompt_chars: int, response_chars: int) -> Path:
    """`n` UltraFeedback-schema rows whose prompt and responses fill the length budgets (one
    byte-level token per character; the data module truncates what the template adds)."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        prompt = _text(prompt_chars, rng)
        row = {"prompt": prompt, "prompt_id": f"synthetic-{i}"}
        for key in ("chosen", "rejected"):
            row[key] = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": _text(response_chars, rng)},
            ]
        rows.append({**row, "score_chosen": 8.0, "score_rejected": 2.0})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def compose(args: argparse.Namespace, data_file: Path):
    """The experiment's config with the stand-ins (model, SAE, data) and the measurement's
    trainer settings; the paper's precision, dtype, optimizer and objective unchanged."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from fpo.commands.common import CONFIG_DIR

    overrides = [
        "experiment=gemma2_2b_ultrafeedback",
        f"objective={args.objective}",
        # FPO's feature term needs the online reference in the policy's dtype
        *(["reference.dtype=null"] if args.objective == "fpo" else []),
        f"trainer={STRATEGIES[args.strategy][0]}",
        "reference=online",  # no fpo-cache beforehand: the experiment's bf16 online reference
        f"paths.root_dir={ROOT}",
        *STRATEGIES[args.strategy][1],
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    device = "cpu" if args.cpu else "cuda"
    hidden = (GEMMA2_2B if not args.tiny else TINY)["hidden_size"]
    layers = (GEMMA2_2B if not args.tiny else TINY)["num_hidden_layers"]
    with open_dict(cfg):
        cfg.model.loader = {
            "_target_": "benchmarks.strategy_step.random_gemma2",
            "shape": "tiny" if args.tiny else "2b",
            "device": device,
            "dtype": cfg.model.loader.dtype,
        }
        cfg.sae.loader = {
            "_target_": "fpo.sae.build_random_sae",
            "d_in": hidden,
            "d_sae": 256 if args.tiny else GEMMA_SCOPE["d_sae"],
            "architecture": "jumprelu",
            "hook_name": f"blocks.{min(GEMMA_SCOPE['layer'], layers - 1)}.hook_resid_post",
        }
        cfg.data.train_source = cfg.data.val_source = str(data_file)
        cfg.data.train_split = cfg.data.val_split = "train"
        cfg.data.num_workers = 0
        cfg.data.shuffle = False
        if args.tiny:
            cfg.data.max_length, cfg.data.max_prompt_length = 96, 48
        cfg.step.global_batch_size = args.global_batch or cfg.data.batch_size
        cfg.trainer.max_steps = args.steps
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.val_check_interval = None
        cfg.scheduler.num_warmup_steps = 0  # the paper's 150 warm-up steps start at lr 0
        cfg.logger, cfg.callbacks = {}, {}
        cfg.paths.output_dir = str(args.workdir)
        if args.cpu:
            cfg.trainer.accelerator = "cpu"
            cfg.trainer.devices = 1
            cfg.trainer.precision = "32-true"
        if args.precision is not None:
            cfg.trainer.precision = args.precision
        if args.lr is not None:
            cfg.optimizer.lr = args.lr
    return cfg


class StepTimer(L.Callback):
    """Wall time of every optimizer step (from its first micro-batch to the end of the one
    that stepped; CUDA synchronised) and ``train/loss`` after it."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []
        self.losses: list[float] = []
        self._start: float | None = None
        self._step = 0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # accumulating
            return
        self.times.append(self._now() - self._start)
        self._start, self._step = None, trainer.global_step
        loss = trainer.callback_metrics.get("train/loss")
        self.losses.append(float(loss) if loss is not None else float("nan"))


class WeightProbe(L.Callback):
    """Reads the tracked parameters' fp32 values as the strategy keeps them (`full_fp32`) when
    training starts (after the strategy's setup: DeepSpeed's fp32 masters are made from its
    bf16 copy of the loaded weights) and when it ends (before the strategy's teardown, which
    moves the module to the CPU), and reports the change (`weight_report`)."""

    def __init__(self, params: dict, loaded: dict) -> None:
        self.params, self.loaded = params, loaded
        self.start: dict[str, Any] = {}
        self.report: dict[str, Any] = {}
        self.error: str | None = None

    def _read(self, trainer) -> dict[str, Any]:
        return {name: full_fp32(trainer, param) for name, param in self.params.items()}

    def on_train_start(self, trainer, pl_module) -> None:
        try:
            self.start = self._read(trainer)
        except Exception as error:
            self.error = f"at the start: {type(error).__name__}: {error}"

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.start:
            return
        try:  # a failure here must not lose the memory and time measurements
            self.report = weight_report(self.params, self.loaded, self.start, self._read(trainer))
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"


def full_fp32(trainer, param) -> Any:
    """The full fp32 value of `param` as the strategy keeps it now (a CPU copy)."""
    name = type(trainer.strategy).__name__
    if name == "DeepSpeedStrategy":
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is None:
            raise RuntimeError("DeepSpeed keeps no fp32 master copy of this parameter")
        return master.detach().float().cpu().clone()
    if name == "FSDPStrategy":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            return param.detach().float().cpu().clone()
    return param.detach().to(torch.float32).cpu().clone()


def weight_report(params: dict, loaded: dict, start: dict, end: dict) -> dict[str, Any]:
    """Per tracked tensor (``[out, in]`` fp32 values on the CPU): the dtype the module keeps,
    the fraction of fp32 (master) elements that changed during training and the largest
    change, the fraction whose bf16 rounding changed (what a bf16 parameter would have kept),
    and how far the masters at the start are from the loaded fp32 weights (DeepSpeed's bf16
    mode rounds them once)."""
    report = {}
    for name, param in params.items():
        before, after = start[name], end[name]
        report[name] = {
            "module_dtype": str(param.dtype).removeprefix("torch."),
            "changed_fraction": float((after != before).double().mean()),
            "max_abs_change": float((after - before).abs().max()),
            "bf16_visible_fraction": float((after.bfloat16() != before.bfloat16()).double().mean()),
            "start_vs_loaded_max_abs": float((before - loaded[name]).abs().max()),
        }
    return report


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Build the experiment, fit ``--steps`` optimizer steps, return the measurements."""
    from omegaconf import OmegaConf

    from fpo.builder import build_run_parts

    cuda = not args.cpu
    data_file = synthetic_rows(
        args.workdir / "rows.jsonl", n=max(8, 2 * args.steps * (args.global_batch or 2)),
        prompt_chars=40 if args.tiny else 520, response_chars=60 if args.tiny else 560,
    )  # fmt: skip
    cfg = compose(args, data_file)
    OmegaConf.resolve(cfg)
    started = time.perf_counter()
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    last = len(experiment.policy.model.layers) - 1
    names = [name.format(last=last) for name in TRACKED]
    params = dict(experiment.policy.named_parameters())
    params = {name: params[name] for name in names}
    loaded = {name: p.detach().float().cpu().clone() for name, p in params.items()}
    setup_s = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize()
        weights_gib = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    timer, probe = StepTimer(cuda), WeightProbe(params, loaded)
    trainer = experiment.build_trainer(
        callbacks=[timer, probe], enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=experiment.datamodule)
    steady = timer.times[1:] or timer.times
    result = {
        "strategy": args.strategy,
        "objective": args.objective,
        "model": "gemma-2-2b shape, random weights" if not args.tiny else "tiny gemma-2",
        "trainer_strategy": type(trainer.strategy).__name__,
        "precision": str(trainer.precision),
        "reference_dtype": str(next(module.reference.parameters()).dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in experiment.policy.parameters()),
        "micro_batch_pairs": int(cfg.data.batch_size),
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        "max_length": int(cfg.data.max_length),
        "max_prompt_length": int(cfg.data.max_prompt_length),
        "optimizer_steps": int(trainer.global_step),
        "step_seconds": timer.times,
        "median_step_seconds_after_first": statistics.median(steady) if steady else None,
        "losses": timer.losses,
        "setup_seconds": setup_s,
        "weights": probe.report,
    }
    if probe.error:
        result["weights_error"] = probe.error
    if cuda:
        result.update(
            device=torch.cuda.get_device_name(),
            memory_before_fit_gib=weights_gib,
            peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
        )
    weights = result["weights"].values()
    result["weights_changed"] = bool(weights) and all(w["changed_fraction"] > 0 for w in weights)
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.strategy_step", description=__doc__)
    p.add_argument("--strategy", choices=sorted(STRATEGIES), required=True)
    p.add_argument("--objective", choices=["fpo", "dpo"], default="fpo")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is warm-up)")
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="pairs per optimizer step (default: one micro-batch; the paper: 32)",
    )
    p.add_argument(
        "--precision", default=None, help="trainer.precision (default: the experiment's)"
    )
    p.add_argument("--lr", type=float, default=None, help="default: the experiment's 5e-7")
    p.add_argument("--tiny", action="store_true", help="a tiny Gemma-2 (checks on a CPU)")
    p.add_argument("--cpu", action="store_true", help="trainer.accelerator=cpu, fp32")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/strategy_step"))
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Write the measurements (or the error) to ``--out``; exit 1 on an error."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stubbed = stub_wandb()
    try:
        result = {**measure(args), "status": "ok"}
    except BaseException as error:  # the JSON says what failed; the caller goes on
        result = {"strategy": args.strategy, "objective": args.objective, "status": "failed",
                  "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
    result["wandb_stubbed"] = stubbed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "traceback"}), flush=True)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
