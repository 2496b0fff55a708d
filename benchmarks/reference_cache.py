"""Benchmark: FPO from the offline reference cache vs FPO online, SimPO, TDPO-2 (and DPO).

On google/gemma-3-270m (fp32, CPU), each configuration trains a few steps (forward +
backward + AdamW step) on the same batch, in a fresh subprocess so that its peak memory is
its own; all configurations run sequentially in one invocation so their ratios are
comparable. The cache (FPO: k=50; DPO: log-probs only) is built first with the real
``fpo-cache`` code (a Lightning predict loop), which gives the build throughput and the
bytes per pair. The SAE is a *random* TopK SAE (d_in 640) at ``blocks.17.hook_resid_post``:
its values are meaningless but its cost is that of a real one of the same width.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.reference_cache --write docs/benchmarks.md

Memory is the peak resident set size (``getrusage`` ``ru_maxrss``) of the configuration's
process, and its increase over the RSS after the imports (before the model is loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: This benchmark as ``python -m`` runs it from :data:`ROOT` (each worker is another one).
MODULE = "benchmarks.reference_cache"
ROOT = Path(__file__).resolve().parents[1]
#: name -> (objective preset, reference source or None); SimPO first: the baseline of the
#: ratios. Presets as in configs/objective (FPO k=50; DPO caches log-probs only).
CONFIGS = {
    "SimPO": ("simpo", None),
    "FPO cached": ("fpo", "cached"),
    "FPO online": ("fpo", "online"),
    "TDPO-2": ("tdpo2", "online"),
    "DPO cached": ("dpo", "cached"),
    "DPO online": ("dpo", "online"),
}
#: Measured unless --only says otherwise (add "DPO cached" "DPO online" for DPO).
DEFAULT_CONFIGS = ("SimPO", "FPO cached", "FPO online", "TDPO-2")
#: docs/benchmarks.md keeps the hand-written text from this line on when regenerated.
NOTES_MARKER = "<!-- hand-written notes below: kept when the script rewrites this file -->"
POSITIVE = (
    "The acting is superb and every scene feels alive.",
    "I loved the warm, funny script and the beautiful music.",
    "It is a wonderful story, told with real heart and great skill.",
    "The cast is brilliant, and the ending left me smiling for days.",
    "Honestly, it is one of the best films I have enjoyed in years.",
    "The photography is gorgeous and the pacing is perfect.",
)
NEGATIVE = (
    "The acting is wooden and every scene drags on forever.",
    "I hated the dull, clumsy script and the annoying music.",
    "It is a boring story, told badly and with no care at all.",
    "The cast is terrible, and the ending made me angry for days.",
    "Honestly, it is one of the worst films I have suffered in years.",
    "The photography is ugly and the pacing is painfully slow.",
)


# ------------------------------------------------------------------------------- data
def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    """``n`` review-style pairs (plain format): chosen positive, rejected negative; each
    response is longer than the truncation so all responses have the same token count."""
    from fpo.review_data.prompts import make_prompts

    rng = random.Random(seed)
    with open(path, "w") as f:
        for prompt in make_prompts(n, seed):
            chosen = " " + " ".join(rng.choice(POSITIVE) for _ in range(12))
            rejected = " " + " ".join(rng.choice(NEGATIVE) for _ in range(12))
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- workers
def compose_config(args, objective: str, source: str | None):
    """The fpo-train config of one configuration, built like any run (fpo.builder)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fpo.commands.common import CONFIG_DIR

    pairs = Path(args.workdir) / "pairs.jsonl"
    overrides = [
        "model=gemma3_270m",
        f"objective={objective}",
        f"reference={source or 'online'}",
        "sae=random",  # d_in and the last layer (blocks.17) are read from the model
        f"sae.loader.d_sae={args.d_sae}",
        f"sae.loader.k={args.sae_k}",
        "data=plain_fixture",
        f"data.train_source={pairs}",
        f"data.val_source={pairs}",
        f"data.max_length={args.prompt_tokens + args.response_tokens}",
        f"data.max_prompt_length={args.prompt_tokens}",
        f"data.batch_size={args.batch_pairs}",
        f"data.eval_batch_size={args.build_batch}",
        "data.shuffle=false",
        "+trainer.enable_progress_bar=false",
        "optimizer.lr=1e-6",
        "~scheduler",
        "callbacks=none",
    ]
    if source == "cached":
        overrides.append(f"reference.path={Path(args.workdir) / 'cache' / objective}")
    name = "cache" if source == "cached" else "train"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    cfg.paths.output_dir = args.workdir
    OmegaConf.resolve(cfg)
    return cfg


def worker_build(args) -> dict:
    """Build the FPO and DPO caches of all pairs; throughput and bytes per pair."""
    from fpo.commands.cache import build

    base = current_rss()
    out = {}
    for objective in ("fpo", "dpo"):
        cfg = compose_config(args, objective, "cached")
        cfg.cache.overwrite, cfg.cache.batch_size = True, args.build_batch
        _, results = build(cfg)
        result = results["train"]
        out[objective] = {
            "pairs": result["manifest"]["num_pairs"],
            "seconds": result["seconds"],
            "pairs_per_s": result["computed"] / result["seconds"],
            "bytes_per_pair": result["manifest"]["bytes_per_pair"],
        }
    out["peak_rss"], out["base_rss"] = peak_rss(), base
    return out


def worker_train(args) -> dict:
    """A few optimizer steps of one configuration on the first batch."""
    import torch

    from fpo.builder import build_run_parts

    base = current_rss()
    experiment = build_run_parts(compose_config(args, *CONFIGS[args.config]))
    policy = experiment.policy
    module = experiment.build_module()
    module.sae_report_batches = 0
    datamodule = experiment.datamodule
    datamodule.setup("fit")
    optimizer = module.configure_optimizers()
    batch = next(iter(datamodule.train_dataloader()))
    times, cpu_times = [], []
    for _ in range(args.warmup + args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        result, _ = module.preference_step(batch)
        result.losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    return {
        "step_times": times[args.warmup :],
        "cpu_times": cpu_times[args.warmup :],
        "tokens": int(batch["attention_mask"].sum()),
        "response_tokens": int((batch["labels"] != -100).sum()),
        "peak_rss": peak_rss(),
        "base_rss": base,
        "loss": float(result.losses.mean()),
        "threads": torch.get_num_threads(),
        "trunk_params": sum(p.numel() for n, p in policy.named_parameters() if "embed" not in n),
        "head_params": policy.get_output_embeddings().weight.numel(),
    }


# ------------------------------------------------------------------------------ parent
def run_worker(args, kind: str, config: str | None = None) -> dict:
    command = [sys.executable, "-m", MODULE, "--worker", kind, *worker_args(args)]
    if config:
        command += ["--config", config]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {config or ''} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    print(f"  {config or kind}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def worker_args(args) -> list[str]:
    keys = ("workdir", "pairs", "batch_pairs", "build_batch", "prompt_tokens")
    keys += ("response_tokens", "d_sae", "sae_k", "steps", "warmup")
    return [
        item for key in keys for item in (f"--{key.replace('_', '-')}", str(getattr(args, key)))
    ]


def combine(runs: list[dict]) -> dict:
    """One configuration over its rounds: the *fastest* measured step (wall and CPU), the
    least disturbed by other jobs on a shared machine, and the highest peak memory."""
    walls = [t for run in runs for t in run["step_times"]]
    cpus = [t for run in runs for t in run["cpu_times"]]
    highest = max(runs, key=lambda run: run["peak_rss"] - run["base_rss"])
    return {
        **highest,
        "step_s": min(walls),
        "cpu_s": min(cpus),
        "step_median_s": statistics.median(walls),
        "cpu_median_s": statistics.median(cpus),
    }


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def render(args, build: dict, results: dict[str, dict], command: str) -> str:
    """The markdown of docs/benchmarks.md: setup, table, cache numbers, target check."""
    base = results["SimPO"]

    def increase(r: dict) -> int:
        return r["peak_rss"] - r["base_rss"]

    lines = [
        "| configuration | reference model in memory | step wall (s) | x SimPO | step CPU (s) "
        "| x SimPO | median wall (s) | peak RSS (GiB) | RSS increase (GiB) | x SimPO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        in_memory = "yes" if CONFIGS[name][1] == "online" else "no"
        lines.append(
            f"| {name} | {in_memory} | {r['step_s']:.2f} | {r['step_s'] / base['step_s']:.2f} | "
            f"{r['cpu_s']:.2f} | {r['cpu_s'] / base['cpu_s']:.2f} | {r['step_median_s']:.2f} | "
            f"{gib(r['peak_rss'])} | "
            f"{gib(increase(r))} | {increase(r) / increase(base):.3f} |"
        )
    fpo, dpo = build["fpo"], build["dpo"]
    tokens, positions = base["tokens"], base["response_tokens"]
    model_gflop = 2 * (base["trunk_params"] * tokens + base["head_params"] * positions) / 1e9
    sae_gflop = 2 * positions * 640 * args.d_sae / 1e9
    why = (
        f"Expected from the work done: the policy's forward on this batch is about "
        f"{model_gflop:.0f} GFLOP (2 x {base['trunk_params'] / 1e6:.0f}M trunk parameters x "
        f"{tokens} tokens + 2 x {base['head_params'] / 1e6:.0f}M LM-head parameters x "
        f"{positions} response positions). FPO cached adds only the SAE encoder on the "
        f"response positions, {sae_gflop:.1f} GFLOP forward ({sae_gflop / model_gflop:.1%}), "
        "and reads k = 50 values per row from the cache; FPO online, DPO online and TDPO-2 "
        "add a forward of the reference without backward (TDPO-2 also a full-vocabulary "
        "log-softmax and KL at every response position) and hold a second copy of the "
        "weights (1.0 GiB in fp32)."
    )
    cached = results.get("FPO cached")
    verdict = []
    if cached:
        ratios = {
            "wall time": cached["step_s"] / base["step_s"],
            "CPU time": cached["cpu_s"] / base["cpu_s"],
            "memory increase": increase(cached) / increase(base),
        }
        verdict.append(
            "Target (FPO cached within 5% of SimPO): "
            + "; ".join(
                f"{what} {ratio:.3f} ({'met' if ratio <= 1.05 else 'MISSED'})"
                for what, ratio in ratios.items()
            )
            + "."
        )
        for other in ("FPO online", "TDPO-2"):
            if other in results:
                r = results[other]
                verdict.append(
                    f"FPO cached / {other}: wall {cached['step_s'] / r['step_s']:.2f}, CPU "
                    f"{cached['cpu_s'] / r['cpu_s']:.2f}, memory increase "
                    f"{increase(cached) / increase(r):.2f}."
                )
    return "\n".join(
        [
            "# Benchmarks",
            "",
            "## Offline reference cache (issue 3)",
            "",
            "Produced by (from the repository root):",
            "",
            f"    {command}",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs "
            f"while measured, Python {platform.python_version()}, torch {torch_version()}, "
            f"CPU, fp32, {base['threads']} torch thread(s) per process.",
            f"Model: google/gemma-3-270m (fp32). Batch: {args.batch_pairs} preference pairs = "
            f"{2 * args.batch_pairs} sequences, {base['tokens']} tokens, "
            f"{base['response_tokens']} of which predict response tokens (max_length "
            f"{args.prompt_tokens + args.response_tokens}); the same batch every step. AdamW. "
            f"Each configuration runs in its own process, {args.rounds} time(s), the "
            f"configurations interleaved: {args.warmup} warm-up step(s), then {args.steps} "
            "measured steps (forward + backward + optimizer step). Step wall / step CPU: the "
            "fastest measured step (least disturbed by other jobs), in wall-clock and in "
            "process CPU time (all threads). RSS increase = peak RSS minus the RSS after the "
            "imports (the highest over the rounds).",
            f"SAE: random TopK (d_in 640, d_sae {args.d_sae}, k {args.sae_k}) at "
            "blocks.17.hook_resid_post; "
            "fine for timing, meaningless values. FPO k = 50. LM head over all response "
            "positions at once (step.logits_chunk_size null, the default).",
            "",
            *lines,
            "",
            *verdict,
            "",
            why,
            "",
            f"Cache build (Lightning predict loop, batch {args.build_batch}, {fpo['pairs']} "
            f"pairs): FPO (k = 50, float32 values) {fpo['pairs_per_s']:.2f} pairs/s, "
            f"{fpo['bytes_per_pair']:.0f} bytes per pair; DPO (log-probs only) "
            f"{dpo['pairs_per_s']:.2f} pairs/s, {dpo['bytes_per_pair']:.0f} bytes per pair. "
            "Bytes per pair include each shard's Arrow schema and footer (a few kB, with the "
            "fingerprint in the schema metadata); this 8-pair cache is one shard, so it pays "
            "them on 8 pairs, while a real one spreads them over 1024 pairs per shard. The "
            "payload is 16 (id) + 2 x 12 (log-probs, count) + 2 x k x 8 (top-k indices "
            f"int32 and values float32) = {16 + 24 + 2 * 50 * 8} bytes per pair for FPO "
            "(640 with float16 values), 40 for DPO. Peak RSS of the build: "
            f"{gib(build['peak_rss'])} GiB.",
            "",
        ]
    )


def write_keeping_notes(path: Path, report: str) -> None:
    """Write ``report`` to ``path``, keeping hand-written text from the NOTES marker on."""
    notes = ""
    if path.exists() and NOTES_MARKER in (old := path.read_text()):
        notes = old[old.index(NOTES_MARKER) :]
    path.write_text(report + ("\n" + notes if notes else ""))


def torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=["build", "train"])
    parser.add_argument("--config", choices=list(CONFIGS))
    parser.add_argument("--workdir")
    parser.add_argument("--pairs", type=int, default=8, help="pairs in the cache build")
    parser.add_argument("--batch-pairs", type=int, default=2)
    parser.add_argument("--build-batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--sae-k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs per config")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=list(CONFIGS),
        default=list(DEFAULT_CONFIGS),
        help="configurations to measure (SimPO always runs: it is the baseline)",
    )
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--write", help="write the markdown report to this file")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        worker = worker_build if args.worker == "build" else worker_train
        print(json.dumps(worker(args)), flush=True)
        return
    threads = os.environ.get("OMP_NUM_THREADS", "?")
    command = " ".join([f"OMP_NUM_THREADS={threads}", ".venv/bin/python -m", MODULE, *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="fpo-bench-") as tmp:
        args.workdir = args.workdir or tmp
        write_pairs(Path(args.workdir) / "pairs.jsonl", args.pairs)
        started = time.perf_counter()
        build = run_worker(args, "build")
        names = ["SimPO", *(n for n in args.only if n != "SimPO")]
        rounds = [{name: run_worker(args, "train", name) for name in names}]
        for _ in range(args.rounds - 1):  # interleaved: each round runs every config once
            rounds.append({name: run_worker(args, "train", name) for name in names})
        results = {name: combine([r[name] for r in rounds]) for name in names}
        report = render(args, build, results, command)
    print(report)
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    if args.write:
        write_keeping_notes(Path(args.write), report)


if __name__ == "__main__":
    main()
