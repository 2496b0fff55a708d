"""``fpo-calibrate`` on the tiny model, as a user runs it (a ``python -m`` subprocess that
starts ``fpo-train`` jobs): three real runs in all, the second command reusing the first's."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fpo.testing import ROOT, run_module


def calibrate(logs: Path, *args: str):
    validation = ROOT / "tests" / "fixtures" / "plain_pairs.jsonl"
    return run_module(
        "fpo.commands.calibrate", f"paths.log_dir={logs}",
        "experiment=smoke", "objective=simpo", "evaluation=smoke",
        f"evaluation.validation.prompts_file={validation}",
        "evaluation.validation.num_prompts=3", "--low", "1e-5", "--high", "1e-2", *args,
        timeout=900,
    )  # fmt: skip


def test_calibrate_runs_reads_back_and_reuses_runs(tmp_path):
    first = calibrate(tmp_path, "--target-kl", "100", "--max-runs", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    (report_file,) = tmp_path.glob("smoke/calibration/simpo/*/calibration.json")
    report = json.loads(report_file.read_text())
    assert report["knob"] == "optimizer.lr"  # SimPO's knob from the map
    ends = report["points"]
    assert [p["knob"] for p in ends] == [1e-5, 1e-2]
    for point in ends:
        metrics = json.loads((Path(point["run_dir"]) / "metrics.json").read_text())
        assert point["val_kl"] == metrics["val/sampled/kl"]
        assert not [key for key in metrics if key.startswith("eval/")]  # no test prompt sampled
    low_kl, high_kl = ends[0]["val_kl"], ends[1]["val_kl"]
    assert low_kl < 0.3 < high_kl < 100, "the tiny model's KL range moved: adjust the targets"
    (target,) = report["targets"]
    assert target["status"] == "unreachable"
    assert target["finding"].startswith("unreachable within [1e-05, 0.01]: KL range measured")
    assert "raise --high" in target["finding"]
    stamps = {p["run_dir"]: os.stat(Path(p["run_dir"]) / "metrics.json").st_mtime_ns for p in ends}

    # the same overrides again, a reachable target (tolerance 0.05 nats, so the low end's
    # KL is not on it): both ends are read, one run is new
    second = calibrate(tmp_path, "--target-kl", "0.3,100", "--max-runs", "1", "--abs-tol", "0.05")
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert len(report["points"]) == 3
    for run_dir, stamp in stamps.items():
        assert os.stat(Path(run_dir) / "metrics.json").st_mtime_ns == stamp  # not rerun
    reached, unreachable = report["targets"]
    (new,) = [p["knob"] for p in report["points"] if p["run_dir"] not in stamps]
    assert 1e-5 < new < 1e-2 and "this invocation started 1 new run\n" in second.stdout
    assert unreachable["status"] == "unreachable" and unreachable["seed_knobs"] is None
    assert reached["below"]["val_kl"] < 0.3 <= reached["above"]["val_kl"]
    assert report["seed_command"].endswith(
        f"optimizer.lr={','.join(repr(k) for k in sorted(reached['seed_knobs']))} seed=1,2,3,4,5"
    )
    assert (report_file.parent / "calibration.md").read_text() in second.stdout
