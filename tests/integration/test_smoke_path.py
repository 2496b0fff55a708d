"""The README's smoke path as a user runs it: ``fpo-train experiment=smoke`` ends with a
short summary, ``fpo-eval run_dir=<run> evaluation=smoke`` evaluates it (and refreshes its
model card), ``fpo-compare`` says why its frontier is empty."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fpo.testing import run_module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str, str]:
    """``fpo-train experiment=smoke``: (run folder, stdout, stderr)."""
    logs = tmp_path_factory.mktemp("logs")
    result = run_module("fpo.commands.train", "experiment=smoke", f"paths.log_dir={logs}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (logs / "smoke" / "runs").iterdir()
    return run, result.stdout, result.stderr


def test_a_run_ends_with_a_short_summary(smoke):
    run, out, err = smoke
    summary = out[out.index("run finished:") :].splitlines()
    metrics = json.loads((run / "metrics.json").read_text())
    accuracy = metrics["val/rewards/accuracies"]
    assert summary[0] == f"run finished: {run}"
    assert summary[1].startswith(f"  validation  val/rewards/accuracies {accuracy:.3f}, val/loss")
    assert summary[2] == f"  metrics     {run / 'metrics.json'}"
    assert summary[3] == f"  checkpoint  {run / 'checkpoints' / 'last.ckpt'}"
    policy = f"  policy      {run / 'policy'}  (fpo-eval run_dir={run} evaluation=smoke)"
    assert summary[4] == policy  # no evaluation block: the command gives one
    assert summary[5].startswith("  continue    python -m fpo.commands.train experiment=smoke")
    assert "ckpt_path=last" in summary[5] and len(summary) == 6
    assert "💡" not in err and "litlogger" not in err  # Lightning's tips are silenced
    assert "LeafSpec" not in err and "in eval mode" not in err  # known warnings too


def test_fpo_eval_on_a_smoke_run_names_the_evaluation_to_give(smoke, tmp_path):
    run, _, _ = smoke
    result = run_module("fpo.commands.eval", f"run_dir={run}", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"fpo-eval run_dir={run} evaluation=smoke" in result.stderr
    assert "Traceback" not in result.stderr


def test_fpo_eval_evaluates_a_smoke_run_and_refreshes_its_card(smoke, tmp_path):
    run, _, _ = smoke
    card = run / "policy" / "README.md"
    assert "Not evaluated." in card.read_text()
    result = run_module(
        "fpo.commands.eval", f"run_dir={run}", "evaluation=smoke", f"paths.log_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    text = card.read_text()
    assert "Not evaluated." not in text
    assert f"KL(policy ‖ reference): {summary['kl']:.4g}" in text  # this evaluation


def test_fpo_compare_on_unevaluated_runs_says_why_the_frontier_is_empty(smoke, tmp_path):
    run, _, _ = smoke
    bare = tmp_path / "bare"  # the run as it was before fpo-eval, whichever test ran first
    for path in [".hydra", "metrics.json", "csv"]:
        source, target = run / path, bare / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.write_bytes(source.read_bytes())
    result = run_module("fpo.compare", str(bare), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: no frontier.png: none of the 1 runs was evaluated" in result.stdout
    assert f"fpo-eval run_dir={bare} evaluation=smoke" in result.stdout
    assert not (tmp_path / "out" / "frontier.png").exists()
    assert (tmp_path / "out" / "curves.png").is_file()
