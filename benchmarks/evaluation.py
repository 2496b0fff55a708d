"""The evaluation's time, phase by phase, against its FLOPs and the CPU's matmul peak; and the
whole evaluation before and after (issue 23), on google/gemma-3-270m.

    python -m benchmarks.evaluation phases            # this checkout, phase by phase
    python -m benchmarks.evaluation compare --base /path/to/old/checkout [--rounds 1]
    python -m benchmarks.evaluation flops [--samples-from <a compare run's cache>]
    python -m benchmarks.evaluation profile           # top operators; sampling by batch size

``--num-prompts N`` cuts each to N test prompts and N pairs (batches stay full: 2N samples).

``phases`` times each phase of the main job's evaluation (``experiment=sentiment_gemma3``:
88 test prompts x 2 samples of 24 tokens, the 88 test pairs) with this checkout's functions
and counts its FLOPs from the very token counts it ran on: per token the trunk's linear layers
(``2 x weights``) and attention (``4 x heads x head_dim`` per attended key), per position
that runs the LM head ``2 x hidden x vocab`` (262,144 words: most of it), per SAE position
``2 x d_in x d_sae``. Sampling runs the trunk on each batch's padded prompts once, then one
token per row and step (the batch runs until its longest completion ends) and the head once
per row and step; scoring and the pairs run the trunk on padded rows and the head on response
positions. The peak is the best of a few ``4096 x 4096`` fp32 ``torch.matmul`` calls.

``compare`` runs ``fpo-eval experiment=sentiment_gemma3`` (the initial model against itself,
what the seeds' runs evaluate after fit) from ``--base`` (an old checkout, e.g. ``git worktree
add ../base 5d14563``) and from this one, interleaved: old; new with an empty reference cache
(``evaluation.reference_cache_dir``: the first run against a reference); new again on the
cache it filled (every later run). Times are the summary's ``seconds`` (inside
``evaluate_run``); the generations and summaries of old and new are compared too.

Results go to ``benchmarks/results/evaluation.json`` (``--out``). Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fpo.testing import ROOT

PEAK_SIZE = 4096


def matmul_peak(size: int = PEAK_SIZE, repeats: int = 5) -> float:
    """Best fp32 ``torch.matmul`` rate of ``size x size`` matrices, FLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


class FlopCounter:
    """Dense FLOP counts of one causal LM (and SAE) by token and position (module docstring)."""

    def __init__(self, model: torch.nn.Module, sae: torch.nn.Module | None = None) -> None:
        config = model.config.get_text_config()
        layers = model.get_decoder().layers
        self.linear = 2 * sum(p.numel() for p in layers.parameters() if p.dim() == 2)
        heads, head_dim = config.num_attention_heads, config.head_dim
        self.attention_per_key = 4 * config.num_hidden_layers * heads * head_dim
        self.head = 2 * config.hidden_size * config.vocab_size
        self.sae = 0 if sae is None else 2 * int(sae.cfg.d_in) * int(sae.cfg.d_sae)

    def trunk(self, tokens: int, keys_per_token: float) -> float:
        return tokens * (self.linear + self.attention_per_key * keys_per_token)

    def sampling(self, prompt_lengths: list[int], lengths: list[int], batch: int) -> float:
        """``generate`` over batches of ``batch`` rows: ``prompt_lengths`` / ``lengths``
        (completion tokens with the EOS, capped by ``max_new_tokens``) per row."""
        total = 0.0
        for start in range(0, len(lengths), batch):
            rows = len(lengths[start : start + batch])
            prompt = max(prompt_lengths[start : start + batch])
            steps = max(lengths[start : start + batch])
            total += rows * (self.trunk(prompt, prompt) + self.head)  # prefill: last logits
            for step in range(1, steps):
                total += rows * (self.trunk(1, prompt + step) + self.head)
        return total

    def padded(self, shapes: list[tuple[int, int]], positions: int, sae: bool = False) -> float:
        """Batches of ``(rows, T)`` padded rows, then the head (and SAE) on ``positions``."""
        trunk = sum(self.trunk(rows * length, length) for rows, length in shapes)
        return trunk + positions * (self.head + (self.sae if sae else 0))

    def scoring(self, prompt_lengths: list[int], lengths: list[int], batch: int) -> float:
        """`sequence_logprob` of the samples: rows sorted by length, ``batch`` at a time."""
        totals = sorted(p + c for p, c in zip(prompt_lengths, lengths, strict=True))
        shapes = [
            (len(totals[s : s + batch]), max(totals[s : s + batch]))
            for s in range(0, len(totals), batch)
        ]
        return self.padded(shapes, sum(lengths))

    def pairs(self, batches: list[dict]) -> float:
        """One model's side of the pair metrics (its trunk, head and SAE)."""
        from fpo.logprobs import response_positions

        shapes = [tuple(batch["input_ids"].shape) for batch in batches]
        positions = sum(response_positions(b["labels"]).rows.numel() for b in batches)
        return self.padded(shapes, positions, sae=True)


def pair_batches(run) -> list[dict]:
    """The held-out pair batches of the evaluation ``run`` (`EvaluationInputs`)."""
    from fpo.evaluation.after_fit import heldout_loader

    settings = run.settings
    source, size = settings["prompts_file"], settings["pairs_batch_size"]
    return list(heldout_loader(run.datamodule, source, settings.get("num_pairs"), size))


def _main_job(overrides: list[str]):
    """The main job's run parts, evaluation inputs and test prompts."""
    from fpo.builder import build_run_parts
    from fpo.evaluation.after_fit import read_prompts
    from fpo.testing import compose_train

    cfg = compose_train("experiment=sentiment_gemma3", "reference=online", *overrides)
    parts = build_run_parts(cfg)
    run = parts.evaluation_inputs(Path(tempfile.mkdtemp()))
    return parts, run, read_prompts(run.settings["prompts_file"], run.settings.get("num_prompts"))


def flops(peak: float, overrides: list[str], samples_dir: Path | None) -> list[dict]:
    """The FLOPs of each phase without running it, and the seconds they take at ``peak``:
    completion lengths from the reference's samples that a ``compare`` run stored under
    ``samples_dir`` (fpo-eval's policy is the reference: the same law), else every row at
    ``max_new_tokens`` (an upper bound)."""
    parts, run, prompts = _main_job(overrides)
    settings, counter = run.settings, FlopCounter(parts.policy, run.sae)
    count, batch = settings["num_samples"], settings["batch_size"]
    prompt_lengths = [len(run.tokenizer(p)["input_ids"]) for p in prompts for _ in range(count)]
    lengths = [settings["max_new_tokens"]] * len(prompt_lengths)
    for path in sorted(samples_dir.glob("samples-*.pt")) if samples_dir else []:
        lengths = [
            len(ids) for ids in torch.load(path, weights_only=True)["value"]["completion_ids"]
        ]
    rows = []
    for phase, value in (
        ("sampling (one model)", counter.sampling(prompt_lengths, lengths, batch)),
        ("KL scoring (one model)", counter.scoring(prompt_lengths, lengths, batch)),
        ("pair metrics (one model)", counter.pairs(pair_batches(run))),
    ):
        rows.append(
            {"phase": phase, "gflop": round(value / 1e9), "seconds_at_peak": round(value / peak, 1)}
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def profile(overrides: list[str], profiled_prompts: int = 32, top: int = 12) -> dict:
    """Where the policy's sampling and scoring spend their time: ``torch.profiler``'s top
    operators (self CPU) over ``profiled_prompts`` prompts, and the sampling of every test
    prompt timed at batch sizes 32, 64 and all at once (other batches draw other samples)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from fpo.evaluation.sampling import sample_for_scoring
    from fpo.evaluation.scoring import sequence_logprob

    parts, run, prompts = _main_job(overrides)
    settings, out = run.settings, {"operators": {}, "sampling_seconds_by_batch": {}}
    sample = {k: settings[k] for k in ("num_samples", "max_new_tokens")}
    pad, chunk = run.tokenizer.pad_token_id, settings["logits_chunk_size"]
    with torch_profile(activities=[ProfilerActivity.CPU]) as sampling:
        few = sample_for_scoring(parts.policy, run.tokenizer, prompts[:profiled_prompts], **sample)
    with torch_profile(activities=[ProfilerActivity.CPU]) as scoring:
        sequence_logprob(
            parts.policy, pad, few.prompt_ids, few.completion_ids, chunk, settings["batch_size"]
        )
    for name, result in (("sampling", sampling), ("scoring", scoring)):
        events = sorted(result.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        out["operators"][name] = {e.key: round(e.self_cpu_time_total / total, 3) for e in events}
        out["operators"][name] = dict(list(out["operators"][name].items())[:top])
        print(name, json.dumps(out["operators"][name]), flush=True)
    for batch in (32, 64, len(prompts) * sample["num_samples"]):
        _, seconds = _timed(
            sample_for_scoring, parts.policy, run.tokenizer, prompts, batch_size=batch, **sample
        )
        out["sampling_seconds_by_batch"][str(batch)] = round(seconds, 1)
        print(f"sampling {len(prompts)} prompts, batch {batch}: {seconds:.1f} s", flush=True)
    return out


def phases(peak: float, overrides: list[str]) -> list[dict]:
    """Each phase of the main job's evaluation, timed, with its FLOPs (module docstring)."""
    from fpo.evaluation.heldout import heldout_pair_metrics, reference_pair_side
    from fpo.evaluation.reference_side import reference_side_cache
    from fpo.evaluation.sampling import sample_for_scoring
    from fpo.evaluation.scoring import sequence_logprob

    parts, run, prompts = _main_job(overrides)
    policy, reference, settings = parts.policy, parts.load_reference_model(), run.settings
    counter = FlopCounter(policy, run.sae)
    sample = {k: settings[k] for k in ("num_samples", "max_new_tokens", "batch_size")}
    chunk, rows = settings["logits_chunk_size"], []

    def row(name: str, seconds: float, flops: float) -> None:
        rows.append({"phase": name, "seconds": round(seconds, 2), "gflop": round(flops / 1e9)})
        rows[-1]["fraction_of_peak"] = round(flops / seconds / peak, 3)
        print(json.dumps(rows[-1]), flush=True)

    for name, model, seed in (("policy", policy, 0), ("reference", reference, 6)):
        samples, seconds = _timed(
            sample_for_scoring, model, run.tokenizer, prompts, seed=seed, **sample
        )
        prompt_lengths = [len(ids) for ids in samples.prompt_ids]
        lengths = [len(ids) for ids in samples.completion_ids]
        flops = counter.sampling(prompt_lengths, lengths, sample["batch_size"])
        row(f"sampling, {name}", seconds, flops)
    scoring_flops = counter.scoring(prompt_lengths, lengths, sample["batch_size"])
    for name, model in (("policy", policy), ("reference", reference)):
        args = (run.tokenizer.pad_token_id, samples.prompt_ids, samples.completion_ids, chunk)
        _, seconds = _timed(sequence_logprob, model, *args, sample["batch_size"])
        row(f"KL scoring, {name}", seconds, scoring_flops)
    batches = pair_batches(run)
    pair_flops = counter.pairs(batches)
    side_args = (run.sae, run.hook_name, chunk, settings["feature_contexts"], run.packing, False)
    _, seconds = _timed(reference_pair_side, reference, batches, *side_args)
    row("pairs, reference side", seconds, pair_flops)
    cache = reference_side_cache(Path(tempfile.mkdtemp()), reference)
    pair_args = dict(sae=run.sae, hook_name=run.hook_name, logits_chunk_size=chunk, cache=cache)
    heldout_pair_metrics(policy, reference, batches, run.objective, **pair_args)  # fills it
    _, seconds = _timed(
        heldout_pair_metrics, policy, reference, batches, run.objective, **pair_args
    )
    row("pairs, policy side", seconds, pair_flops)
    return rows


def children_cpu() -> float:
    """User + system CPU seconds of this process's finished children (all their threads)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def evaluate_with(src: Path, out: Path, cache: Path | None, overrides: list[str]) -> dict:
    """``fpo-eval experiment=sentiment_gemma3`` with the package under ``src``; its summary
    (``seconds``: the phases inside ``evaluate_run``) and generations, and the wall time."""
    args = ["experiment=sentiment_gemma3", "reference=online", f"out_dir={out}"]
    args += [f"paths.log_dir={out / 'logs'}", "evaluation.latest_dir=null", *overrides]
    if cache is not None:
        args.append(f"evaluation.reference_cache_dir={cache}")
    env = {**os.environ, "PYTHONPATH": str(src), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    started, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(
        [sys.executable, "-m", "fpo.commands.eval", *args],
        cwd=src.parent, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"fpo-eval from {src} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    generations = [json.loads(line) for line in (out / "generations.jsonl").open()]
    seconds = summary.pop("seconds")
    return {
        "seconds": {**seconds, "evaluation": round(sum(seconds.values()), 2)},
        "process_wall": round(time.perf_counter() - started, 1),
        "process_cpu": round(children_cpu() - cpu, 1),
        "summary": summary,
        "generations": generations,
    }


def numbers(summary: dict, prefix: str = "") -> dict[str, float]:
    """Every number of a summary, flattened (``judges/vader/win_rate``)."""
    found = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            found.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found[prefix + key] = float(value)
    return found


def differences(old: dict, new: dict) -> dict:
    """Sampled texts equal?, and the largest absolute difference of any summary number and
    of the per-sample KL log-ratios."""
    texts = [(g["policy"], g["reference"]) for g in old["generations"]]
    a, b = numbers(old["summary"]), numbers(new["summary"])
    ratios = zip(old["generations"], new["generations"], strict=True)
    return {
        "same_texts": texts == [(g["policy"], g["reference"]) for g in new["generations"]],
        "same_keys": sorted(a) == sorted(b),
        "max_abs_summary": max(abs(a[k] - b[k]) for k in a if k in b),
        "max_abs_kl_log_ratio": max(abs(x["kl_log_ratio"] - y["kl_log_ratio"]) for x, y in ratios),
    }


def compare(base: Path, rounds: int, overrides: list[str]) -> dict:
    """Old, new (empty cache), new (filled cache), ``rounds`` times, interleaved."""
    work = Path(tempfile.mkdtemp(prefix="fpo-eval-bench-"))
    runs: dict[str, list[dict]] = {"old": [], "new_first_run": [], "new_later_runs": []}
    for number in range(rounds):
        cache = work / f"cache{number}"
        plan = [("old", base / "src", None), ("new_first_run", ROOT / "src", cache)]
        plan.append(("new_later_runs", ROOT / "src", cache))
        for name, src, cache_dir in plan:
            result = evaluate_with(src, work / f"{name}{number}", cache_dir, overrides)
            runs[name].append(result)
            print(name, result["process_cpu"], json.dumps(result["seconds"]), flush=True)
    old = runs["old"][0]
    report = {"rounds": rounds, "cache": str(work / "cache0"), "seconds": {}, "equal_to_old": {}}
    for name, results in runs.items():
        report["seconds"][name] = [r["seconds"] for r in results]
        report["seconds"][f"{name}_process_cpu"] = [r["process_cpu"] for r in results]
        if name != "old":
            report["equal_to_old"][name] = differences(old, results[0])
            mean = lambda rs: sum(r["seconds"]["evaluation"] for r in rs) / len(rs)  # noqa: E731
            report["seconds"][f"{name}_over_old"] = round(mean(results) / mean(runs["old"]), 3)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["phases", "compare", "flops", "profile"])
    parser.add_argument("--samples-from", type=Path, help="flops: a compare run's cache")
    parser.add_argument("--base", type=Path, help="compare: the old checkout (its src/)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--num-prompts", type=int, help="a quick check: this many prompts and pairs"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/evaluation.json")
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    overrides = []
    if args.num_prompts:
        overrides = [f"evaluation.num_prompts={args.num_prompts}"]
        overrides.append(f"evaluation.num_pairs={args.num_prompts}")
    peak = matmul_peak()
    results["cpu"] = {"threads": torch.get_num_threads(), "matmul_peak_gflops": round(peak / 1e9)}
    print(json.dumps(results["cpu"]), flush=True)
    if args.what == "phases":
        results["phases"] = phases(peak, overrides)
    elif args.what == "flops":
        results["flops"] = flops(peak, overrides, args.samples_from)
    elif args.what == "profile":
        results["profile"] = profile(overrides)
    else:
        if args.base is None:
            parser.error("compare needs --base")
        results["compare"] = compare(args.base.resolve(), args.rounds, overrides)
        print(json.dumps({k: v for k, v in results["compare"].items()}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
