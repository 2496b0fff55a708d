"""benchmarks/run.py's plans and report: the CPU and GPU sections of docs/benchmarks.md are
regenerated separately, and a run cut short or with a failed configuration still reports."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import report
from benchmarks.run import configurations

CHECK = {
    "precision": "bf16",
    "lr": 0.01,
    "tolerance": [0.005, 0.005],
    "ok": True,
    **{k: {"ours": [0.69, 0.1], "trl": [0.69, 0.1], "diff": [0.0, 0.0]} for k in ("dpo", "simpo")},
}


def run(config: str, framework: str = "ours", step: float = 1.0, **extra) -> dict:
    return {
        "framework": framework,
        "config": config,
        "row_set": "fixed",
        "round": 0,
        "step_times": [step, step],
        "tokens": [100, 100],
        "positions": [50, 50],
        "padded_tokens": [100, 100],
        "peak_memory": 2**30,
        "base_rss": 0,
        **extra,
    }


def record(device: str, runs: list[dict], complete: bool = True, failed=()) -> dict:
    entry = {
        "spec": {
            "batch_pairs": 2,
            "accumulation": 1,
            "max_prompt": 8,
            "max_length": 16,
            "warmup": 1,
            "steps": 2,
            "ours_checkpointing": False,
        },
        "check": CHECK,
        "counts": {"trunk": 1000, "head": 100},
        "runs": runs,
        "failed": list(failed),
    }
    machine = {"device": device, "cpus": 2, "host": "h"}
    if device == "cuda":
        machine["gpu"] = "Some GPU"
    return {
        "command": "python benchmarks/run.py",
        "date": "2026-11-27T00:00:00",
        "machine": machine,
        "versions": {},
        "config": {"cpu": {"rounds": 1}, "cuda": {"rounds": 1}},
        "peak": {"flops": 1e12, "dtype": "torch.bfloat16"},
        "models": {"m": entry},
        "complete": complete,
    }


def test_cpu_and_gpu_sections_do_not_overwrite_each_other(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written\n")
    cpu = record(
        "cpu", [run("SimPO", step=2.0), run("TRL SimPO", "trl", 4.0, trl_checkpointing=False)]
    )
    gpu = record("cuda", [run("SimPO", step=0.25)])
    report.update_docs(docs, cpu, tmp_path / "cpu.json")
    report.update_docs(docs, gpu, tmp_path / "gpu.json")
    report.update_docs(docs, cpu, tmp_path / "cpu.json")  # a rerun replaces its own section
    text = docs.read_text()
    assert text.count(report.START) == 1 and text.count(report.START_GPU) == 1
    assert "hand-written" in text
    cpu_part = text.split(report.START)[1].split(report.END)[0]
    gpu_part = text.split(report.START_GPU)[1].split(report.END_GPU)[0]
    assert "| SimPO | 2.000 |" in cpu_part and "| SimPO | 0.250 |" not in cpu_part
    assert "| SimPO | 0.250 |" in gpu_part and "on the GPU" in gpu_part
    assert "SimPO / TRL SimPO step time, checkpointing off (fixed): 0.500" in cpu_part


def test_a_run_cut_short_or_with_a_failure_says_so(tmp_path):
    failed = {
        **run("DPO online"),
        "error": "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory",
    }
    text = report.render(
        record("cuda", [run("SimPO")], complete=False, failed=[failed]), Path("x.json")
    )
    assert "cut short" in text
    assert "**DPO online (fixed) failed**: torch.OutOfMemoryError: CUDA out of memory" in text
    assert "cut short" not in report.render(record("cuda", [run("SimPO")]), Path("x.json"))


def test_a_row_sets_plan_replaces_the_global_lists():
    cfg = {
        "ours": ["DPO online", "SimPO"],
        "trl": ["TRL SimPO"],
        "trl_checkpointing": [True, False],
        "plan": {"spread": {"ours": ["SimPO"], "trl_checkpointing": [True]}},
    }
    spread = configurations(cfg, "spread")
    assert spread == [
        {"framework": "ours", "config": "SimPO"},
        {"framework": "trl", "config": "TRL SimPO", "trl_checkpointing": True},
    ]
    assert len(configurations(cfg, "fixed")) == 4


def test_the_json_is_written_where_the_docs_say(tmp_path):
    path = report.write_json(record("cuda", []), str(tmp_path))
    assert path.name == "2026-11-27-some-gpu.json"
    assert json.loads(path.read_text())["complete"] is True
