"""LoRA (``model.lora``, `fpo.lora`) against full fine-tuning, and its adapter-free reference
against a separate reference copy: peak memory and step time of FPO and TDPO-2 (issue 21).

    OMP_NUM_THREADS=2 python -m benchmarks.lora                  # gemma-3-270m, CPU
    OMP_NUM_THREADS=2 python -m benchmarks.lora --model tiny --no-docs   # seconds

Each configuration trains in its own process (benchmarks/run.py's ``train`` worker: our
trainer, the model's CPU settings in benchmarks/config.yaml, the ``fixed`` rows), one after
another: full fine-tuning with a frozen copy as reference (``FPO online``, ``TDPO-2``), LoRA
with the policy as its own reference, adapters off (``... (LoRA)``), and LoRA against a
separate frozen load of the initial weights (``... (LoRA, reference copy)``), with the
LoRA settings of ``configs/model/`` (r 16, alpha 32, all linear layers but the LM head).
Peak memory is the process's peak RSS (model loading included); step times are wall
clock, so they depend on the machine's load (``--before`` / ``--after``: shell commands run
around each configuration's process, e.g. to pause other jobs). Writes
``benchmarks/results/lora/<date>-<machine>.json`` and replaces its section of
``docs/benchmarks.md`` (``--no-docs`` to skip).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import report
from benchmarks.run import CONFIG, ROOT, load_config, model_specs, run_worker

CONFIGS = (
    "FPO online",
    "FPO online (LoRA)",
    "FPO online (LoRA, reference copy)",
    "TDPO-2",
    "TDPO-2 (LoRA)",
    "TDPO-2 (LoRA, reference copy)",
)
GIB = 2**30
START = "## LoRA against full fine-tuning (issue 21)"
END = "<!-- end of the benchmarks/lora.py section -->"


def table(runs: list[dict], warmup: int) -> str:
    """The markdown table of ``runs`` (one per configuration; ``warmup`` steps left out of
    the CPU times, as run.py leaves them out of the wall times)."""
    lines = [
        "| configuration | median step (s) | min (s) | median step CPU time (s) "
        "| peak RSS (GiB) | increase (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        times, cpu = run["step_times"], run["step_cpu_times"][warmup:]
        lines.append(
            f"| {run['config']} | {statistics.median(times):.3f} | {min(times):.3f} | "
            f"{statistics.median(cpu):.3f} | {run['peak_memory'] / GIB:.2f} | "
            f"{(run['peak_memory'] - run['base_rss']) / GIB:.2f} |"
        )
    return "\n".join(lines)


def section(record: dict, json_path: Path) -> str:
    spec = record["spec"]
    shape = (
        f"Batch {spec['batch_pairs']} pairs x {spec['accumulation']} accumulation per optimizer "
        f"step, prompts <= {spec['max_prompt']} tokens, prompt + response <= "
        f"{spec['max_length']}, rows `{spec['row_set']}`; {spec['warmup']} warm-up step(s), "
        f"then {spec['steps']} measured steps per configuration; fp32, lr {spec['lr']}."
    )
    return "\n\n".join(
        [
            START,
            f"Produced by (from the repository root):\n\n    {record['command']}",
            f"Results: `{json_path.relative_to(ROOT)}`. {record['date']}, "
            f"{record['machine']['cpus']} CPUs, model {spec['model']}, versions "
            f"{json.dumps(record['versions'])}.",
            shape,
            table(record["runs"], spec["warmup"]),
            END,
        ]
    )


def update_docs(path: Path, text: str) -> None:
    """Replace the section between `START` and `END` (appended when absent)."""
    docs = path.read_text()
    if START in docs and END in docs:
        before, rest = docs.split(START, 1)
        docs = before + text + rest.split(END, 1)[1]
    else:
        docs = docs.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--rows", default="fixed", choices=["fixed", "spread"])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--set", nargs="*", default=[], help="dotted benchmarks/config.yaml keys")
    parser.add_argument("--before", help="shell command run before each configuration's run")
    parser.add_argument("--after", help="shell command run after it (also on failure)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora"))
    parser.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--timeout", type=int, default=1800)
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "?")
    record = {
        "command": " ".join(
            [f"OMP_NUM_THREADS={threads}", "python -m benchmarks.lora", *sys.argv[1:]]
        ),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"host": os.uname().nodename, "cpus": os.cpu_count(), "device": "cpu"},
        "versions": report.versions(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="fpo-lora-bench-") as workdir:
        cfg = load_config(CONFIG, args.set)
        spec = model_specs(cfg, "cpu", args.model, workdir) | {"row_set": args.rows}
        record["spec"] = spec
        run_worker("prepare", spec, args.timeout)
        for config in args.configs:
            item = {"framework": "ours", "config": config, "gradient_checkpointing": False}
            if args.before:
                subprocess.run(args.before, shell=True, check=True)
            try:
                out = run_worker("train", spec | item, args.timeout)
            finally:
                if args.after:
                    subprocess.run(args.after, shell=True, check=False)
            record["runs"].append({"config": config, **out})
    path = report.write_json(record, args.out)
    print(table(record["runs"], record["spec"]["warmup"]))
    print(f"wrote {path}", file=sys.stderr)
    if not args.no_docs:
        update_docs(Path(args.docs), section(record, path))
        print(f"updated {args.docs}", file=sys.stderr)


if __name__ == "__main__":
    main()
