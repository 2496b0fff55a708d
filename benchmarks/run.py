"""Our objectives side by side with TRL 1.16 (issue 11): one command, config in config.yaml.

    OMP_NUM_THREADS=2 python -m benchmarks.run                # CPU: tiny + gemma-3-270m
    python -m benchmarks.run --device cuda                    # GPU: the Gemma-2-2B shape
    python -m benchmarks.run --device cpu --models gemma2_tiny --set cpu.rounds=1   # GPU logic

Run from the repository root (``benchmarks`` is a package there, not an installed one).

Writes ``benchmarks/results/<date>-<machine>.json`` and regenerates the TRL section of
``docs/benchmarks.md`` (``--no-docs`` to skip; ``--out DIR`` for the JSON). Order of work,
each in its own process: the matrix-multiply peak (the MFU denominator), per model the rows
and our offline-cache fields (``prepare``), the equal-math check (``check``; a failure stops
the run), then ``rounds`` rounds in which every (row set, configuration) trains once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]

CONFIG = Path(__file__).with_name("config.yaml")


# ----------------------------------------------------------------------------- workers
def worker(kind: str, spec: dict) -> dict:
    """One unit of work in this (fresh) process; returns what the parent records."""
    if spec.get("framework") == "ours":  # what fpo-train's entry points do (fpo.commands.common)
        from fpo.commands.common import default_cuda_allocator

        default_cuda_allocator()
    import torch

    from benchmarks.common import current_rss, matmul_peak, peak_memory

    if kind == "peak":
        dtype = torch.bfloat16 if spec["device"].startswith("cuda") else torch.float32
        return {"flops": matmul_peak(spec["device"], dtype), "dtype": str(dtype)}
    from benchmarks.models import load_model
    from benchmarks.rows import batches, make_rows

    rows_file = Path(spec["workdir"]) / f"rows-{spec['model']}-{spec['row_set']}.json"
    if kind == "prepare":
        from benchmarks import ours

        model, tokenizer = load_model(spec["model"], spec["device"], spec["seed"])
        vocab = {"gemma2_2b": 256000}.get(spec["model"], len(tokenizer))
        rows = make_rows(
            spec["row_set"],
            spec["pairs"],
            vocab_size=vocab,
            bos_id=tokenizer.bos_token_id,
            eos_id=tokenizer.eos_token_id,
            max_prompt=spec["max_prompt"],
            max_length=spec["max_length"],
            seed=spec["seed"],
        )
        rows_file.write_text(json.dumps(rows))
        from benchmarks.models import parameter_counts

        counts = parameter_counts(model)
        del model
        if spec.get("cache"):
            torch.save(ours.build_cache(spec, rows), ours.cache_path(**_cache_key(spec)))
        return {"rows": len(rows), "counts": counts}
    rows = json.loads(rows_file.read_text())
    if kind == "check":
        from benchmarks import equal_math

        first = rows[: spec["batch_pairs"]]
        return equal_math.check(
            spec, first, lambda: load_model(spec["model"], spec["device"], spec["seed"])
        )
    if spec["framework"] == "ours":  # imports first: the RSS increase is the training's
        import fpo.builder  # noqa: F401
    else:
        import trl.experimental.cpo  # noqa: F401
    base = current_rss()
    with profiled(spec):
        if spec["framework"] == "ours":
            from benchmarks import ours

            cache = None
            if ours.OURS[spec["config"]][1] == "cached":
                cache = torch.load(ours.cache_path(**_cache_key(spec)), weights_only=True)
            out = ours.train(spec, spec["config"], rows, cache)
        else:
            from benchmarks import trl_side

            out = trl_side.train(spec, spec["config"], rows)
    from benchmarks.common import batch_work, padded_tokens

    per_step = spec["batch_pairs"] * spec["accumulation"]
    groups = batches(rows, per_step)[spec["warmup"] : spec["warmup"] + spec["steps"]]
    work = [batch_work(g) for g in groups]
    padded = [
        sum(padded_tokens(micro) for micro in batches(g, spec["batch_pairs"])) for g in groups
    ]
    return {
        **out,
        "step_times": out["step_times"][spec["warmup"] :],
        "tokens": [w["tokens"] for w in work],
        "positions": [w["positions"] for w in work],
        "padded_tokens": padded,
        "peak_memory": peak_memory(spec["device"]),
        "base_rss": base,
        "threads": torch.get_num_threads(),
    }


@contextlib.contextmanager
def profiled(spec: dict):
    """With ``profile=DIR`` set, the run under ``torch.profiler`` (CPU, and CUDA on a GPU):
    ``DIR/<model>-<row set>-<configuration>.txt`` gets the operators and kernels by their
    own device time (CPU time on a CPU) over the whole training call: model building,
    warm-up and the trainer's teardown are in it too (Lightning's moves the model and the
    optimizer state to the CPU: the device-to-host copies in our H100 tables). Profiling
    slows the run, and its step times land in that invocation's JSON: profile in an
    invocation of its own."""
    if not spec.get("profile"):
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    gpu = spec["device"].startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        yield
    name = f"{spec['model']}-{spec['row_set']}-{report.label(spec)}"
    path = Path(spec["profile"]) / (re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_") + ".txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    if gpu:
        torch.cuda.synchronize()
    averages = prof.key_averages()
    sorts = ["self_cuda_time_total", "cpu_time_total"] if gpu else ["self_cpu_time_total"]
    tables = [
        f"sorted by {sort}:\n"
        + averages.table(sort_by=sort, row_limit=40, max_name_column_width=70)
        for sort in sorts
    ]
    path.write_text("\n\n".join(tables))


def _cache_key(spec: dict) -> dict:
    return {"workdir": spec["workdir"], "model": spec["model"], "row_set": spec["row_set"]}


# ------------------------------------------------------------------------------ parent
def run_worker(kind: str, spec: dict, timeout: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.run", "--worker", kind, "--spec", json.dumps(spec)]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_MODE", "disabled")
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} {spec.get('config', '')} failed:\n{done.stderr[-6000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the whole process: imports, model building, warm-up and measured steps
    result["process_s"] = time.perf_counter() - started
    label = " ".join(str(spec.get(k, "")) for k in ("model", "row_set", "config"))
    print(f"[{result['process_s']:6.1f} s] {kind} {label}", file=sys.stderr, flush=True)
    return result


def load_config(path: Path, sets: list[str]):
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(sets))
    return OmegaConf.to_container(cfg, resolve=True)


def configurations(cfg: dict, row_set: str) -> list[dict]:
    """(framework, config name, gradient checkpointing for TRL) on one row set: the global
    ``ours`` / ``trl`` / ``trl_checkpointing`` lists, or ``plan.<row_set>``'s where it names
    them (a short GPU schedule runs only what the issue's targets compare on each row set)."""
    lists = {**cfg, **(cfg.get("plan") or {}).get(row_set, {})}
    out = [{"framework": "ours", "config": name} for name in lists["ours"]]
    for checkpointing in lists["trl_checkpointing"]:
        out += [
            {"framework": "trl", "config": n, "trl_checkpointing": checkpointing}
            for n in lists["trl"]
        ]
    return out


def model_specs(cfg: dict, device: str, model: str, workdir: str) -> dict:
    mode = cfg["cuda" if device.startswith("cuda") else "cpu"]
    if model not in mode:
        raise SystemExit(f"benchmarks/config.yaml: no settings for model {model!r} in that mode")
    settings = dict(mode[model])
    pairs = (
        settings["batch_pairs"]
        * settings["accumulation"]
        * (settings["warmup"] + settings["steps"])
    )
    return {
        **settings,
        "model": model,
        "device": device,
        "seed": cfg["seed"],
        "lr": cfg["lr"],
        "check_lr": cfg.get("check_lr", 0.01),
        "pairs": pairs,
        "workdir": workdir,
        "profile": cfg.get("profile"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker")
    parser.add_argument("--spec")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", nargs="*", help="override the mode's model list")
    parser.add_argument("--set", nargs="*", default=[], help="dotted config overrides")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument(
        "--from-json",
        help="regenerate the docs section from a results JSON (e.g. one a device call "
        "brought back, complete or cut short) instead of running anything",
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))), flush=True)
        return
    if args.from_json:
        path = Path(args.from_json)
        report.update_docs(Path(args.docs), json.loads(path.read_text()), path)
        print(f"updated {args.docs}", file=sys.stderr)
        return
    cfg = load_config(Path(args.config), args.set)
    mode = cfg["cuda" if args.device.startswith("cuda") else "cpu"]
    models = args.models or mode["models"]
    started = time.perf_counter()
    record = {
        "command": " ".join(
            [
                f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}",
                "python -m",
                "benchmarks.run",
                *sys.argv[1:],
            ]
        ),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": args.device,
        },
        "versions": report.versions(),
        "config": cfg,
        "models": {},
    }
    # The JSON is rewritten after every worker, so a run cut short (a device call's time
    # limit, a crash) keeps every finished configuration; "complete" says whether it ended.
    record["complete"] = False
    with tempfile.TemporaryDirectory(prefix="fpo-trl-bench-") as workdir:
        record["peak"] = run_worker("peak", {"device": args.device}, args.timeout)
        if args.device.startswith("cuda"):
            record["machine"]["gpu"] = report.gpu_name()
        report.write_json(record, args.out)
        for model in models:
            base = model_specs(cfg, args.device, model, workdir)
            for row_set in cfg["row_sets"]:
                prepared = run_worker(
                    "prepare", {**base, "row_set": row_set, "cache": True}, args.timeout
                )
            check = run_worker("check", {**base, "row_set": cfg["row_sets"][0]}, args.timeout)
            entry = record["models"][model] = {"spec": base, "check": check, "runs": []}
            entry["counts"] = prepared["counts"]
            report.write_json(record, args.out)
            if not check["ok"]:
                raise SystemExit(f"equal-math check failed for {model}: {json.dumps(check)}")
            for round_index in range(mode["rounds"]):
                for row_set in cfg["row_sets"]:
                    for item in configurations(cfg, row_set):
                        checkpointing = item.get("trl_checkpointing", base["ours_checkpointing"])
                        spec = {
                            **base,
                            **item,
                            "row_set": row_set,
                            "gradient_checkpointing": checkpointing,
                        }
                        run = {**item, "row_set": row_set, "round": round_index}
                        try:
                            run.update(run_worker("train", spec, args.timeout))
                        except (RuntimeError, subprocess.TimeoutExpired) as error:
                            # one configuration failing (out of memory, say) must not lose
                            # the others: recorded, reported, and the run goes on
                            print(str(error), file=sys.stderr, flush=True)
                            entry.setdefault("failed", []).append(
                                {**run, "error": str(error)[-2000:]}
                            )
                        else:
                            entry["runs"].append(run)
                        report.write_json(record, args.out)
    record["wall_s"] = time.perf_counter() - started
    record["complete"] = True
    path = report.write_json(record, args.out)
    print(f"wrote {path}", file=sys.stderr)
    if not args.no_docs:
        report.update_docs(Path(args.docs), record, path)
        print(f"updated {args.docs}", file=sys.stderr)


if __name__ == "__main__":
    main()
