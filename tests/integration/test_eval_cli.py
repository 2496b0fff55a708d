"""``fpo-eval``, ``fpo-compare`` and the comparison notebook on one tiny real sweep, and W&B
offline logging: run as a user runs them (``python -m`` subprocesses, PYTHONPATH inherited)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fpo.testing import ROOT, run_module, run_python

# Numbers that may differ between two evaluations of the same policy: wall time and paths.
VOLATILE = {"seconds", "generations", "plot", "feature_report"}
NEW_TEMPLATES = ROOT / "data" / "sentiment" / "test_new_templates.jsonl"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """``fpo-train -m experiment=smoke objective=dpo,fpo seed=0,1 evaluation=smoke``."""
    logs = tmp_path_factory.mktemp("logs")
    result = run_module(
        "fpo.commands.train", "-m", f"paths.log_dir={logs}", "experiment=smoke",
        "objective=dpo,fpo", "seed=0,1", "evaluation=smoke", timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (logs / "smoke" / "multiruns").iterdir()
    return folder


def _runs(sweep: Path) -> list[Path]:
    return sorted(p.parent.parent for p in sweep.glob("*/.hydra/config.yaml"))


def _stable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VOLATILE}


def test_sweep_runs_save_policy_and_full_evaluation(sweep):
    runs = _runs(sweep)
    assert len(runs) == 4
    for run in runs:
        assert (run / "policy" / "model.safetensors").is_file()
        summary = json.loads((run / "evaluation" / "summary.json").read_text())
        for key in ("win_rate", "kl", "entropy", "preference_accuracy", "feature_drift"):
            assert isinstance(summary[key], float), key
            assert isinstance(summary[f"{key}_stderr"], float), key
        assert set(summary["judges"]) == {"vader", "afinn"}
        assert summary["implicit_reward_accuracy"] is not None
        assert (run / "evaluation" / "feature_report.md").read_text().count("\n| ") >= 5
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["eval/feature_drift"] == summary["feature_drift"]
        assert "eval/judges/afinn/win_rate" in metrics


def test_fpo_eval_reproduces_the_after_fit_summary(sweep):
    run = next(r for r in _runs(sweep) if "objective=fpo" in r.name)
    after_fit = json.loads((run / "evaluation" / "summary.json").read_text())
    generations = (run / "evaluation" / "generations.jsonl").read_text()
    curves = sorted(run.glob("*/version_*/metrics.csv"))
    cache = sweep.parent / "reference_side"
    # the reference's side computed and stored, then read back: the same summary each time
    for stored in (0, 2):
        assert len(list(cache.glob("*.pt"))) == stored
        result = run_module(
            "fpo.commands.eval", f"run_dir={run}", f"paths.log_dir={sweep.parent}",
            f"evaluation.reference_cache_dir={cache}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        again = json.loads((run / "evaluation" / "summary.json").read_text())
        assert _stable(again) == _stable(after_fit)
        assert (run / "evaluation" / "generations.jsonl").read_text() == generations
    assert "the reference's samples read from" in result.stdout + result.stderr
    assert after_fit["kl"] != 0 and after_fit["feature_drift"] > 0  # a trained policy
    # the evaluation's own logger files stay out of the training curves fpo-compare reads
    assert sorted(run.glob("*/version_*/metrics.csv")) == curves
    assert list((run / "evaluation").glob("csv/version_*/metrics.csv"))


def test_fpo_eval_command_line_keys_replace_the_runs(sweep, tmp_path):
    run = _runs(sweep)[0]
    result = run_module(
        "fpo.commands.eval", f"run_dir={run}", f"out_dir={tmp_path}", "evaluation.num_prompts=2",
        "~evaluation.judges.afinn", f"paths.log_dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["num_prompts"] == 2 and set(summary["judges"]) == {"vader"}


def test_fpo_eval_without_a_run_evaluates_the_initial_model_against_itself(tmp_path):
    result = run_module(
        "fpo.commands.eval", "experiment=smoke", "evaluation=smoke", f"paths.log_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (summary_path,) = tmp_path.glob("eval/runs/*/evaluation/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["kl"] == 0.0 and summary["feature_drift"] == 0.0
    assert summary["preference_accuracy"] == 0.5 and summary["win_rate"] == 0.5
    assert summary["entropy"] == summary["reference_entropy"]


def test_fpo_eval_without_a_saved_policy_is_a_user_error(sweep, tmp_path):
    run = _runs(sweep)[0]
    fake = tmp_path / "run"
    (fake / ".hydra").mkdir(parents=True)
    (fake / ".hydra" / "config.yaml").write_text((run / ".hydra" / "config.yaml").read_text())
    result = run_module("fpo.commands.eval", f"run_dir={fake}", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2 and "saved no final policy" in result.stderr


def test_fpo_compare_on_the_sweep_gives_table_and_both_plots(sweep, tmp_path):
    result = run_module("fpo.compare", str(sweep), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "comparison.md").read_text()
    assert "dpo" in table and "fpo" in table and "feature_drift" in table
    for plot in ("frontier.png", "curves.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG"), plot


def test_compare_notebook_executes_on_the_sweep(sweep, tmp_path):
    """As the README runs it: ``jupyter nbconvert --execute`` (the ``notebook`` extra, in
    ``dev``); a missing jupyter or nbconvert fails here."""
    done = run_python(
        "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
        "--output-dir", str(tmp_path), "notebooks/compare_sweep.ipynb",
        env={"FPO_SWEEP": str(sweep), "FPO_COMPARE_OUT": str(tmp_path)}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "frontier.png").is_file() and (tmp_path / "curves.png").is_file()
    assert (tmp_path / "compare_sweep.ipynb").is_file()  # the executed copy


# --------------------------------------------------------------------------- W&B offline


def wandb_records(path: Path):
    """Records of a ``.wandb`` file (W&B's LevelDB-style log of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def test_wandb_offline_sweep_groups_tags_tables_and_images(tmp_path):
    result = run_module(
        "fpo.commands.train", "-m", f"paths.log_dir={tmp_path}", "experiment=smoke",
        "objective=dpo", "seed=0,1", "evaluation=smoke", "logger=wandb",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "smoke" / "multiruns").iterdir()
    groups = set()
    for seed in (0, 1):
        (job,) = sweep_dir.glob(f"*seed={seed}")
        (run_dir,) = job.glob("wandb/offline-run-*")
        (records_file,) = run_dir.glob("run-*.wandb")
        (run,) = [
            r.run for r in wandb_records(records_file) if r.WhichOneof("record_type") == "run"
        ][:1]
        groups.add(run.run_group)
        assert {"objective:dpo", f"seed:{seed}"} <= set(run.tags)
        config = {item.key: item.value_json for item in run.config.update}
        assert json.loads(config["objective"]) == "dpo" and json.loads(config["seed"]) == seed
        media = run_dir / "files" / "media"
        for table in ("summary", "judges", "feature_report", "generations"):
            (found,) = media.glob(f"table/eval/{table}_*.table.json")  # one per run: no reuse
            assert json.loads(found.read_text())["data"], table
        (image,) = media.glob("images/eval/frontier_*.png")
        assert image.read_bytes().startswith(b"\x89PNG")
        report = json.loads(next(media.glob("table/eval/feature_report_*.table.json")).read_text())
        assert report["columns"][:3] == ["rank", "feature", "change"]
    assert groups == {f"smoke/{sweep_dir.name}"}  # one sweep, one group
    # fpo-eval on a job of the sweep logs into the same group, as an eval job
    (job,) = sweep_dir.glob("*seed=0")
    result = run_module(
        "fpo.commands.eval", f"run_dir={job}", f"paths.log_dir={tmp_path}",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (records_file,) = job.glob("evaluation/wandb/offline-run-*/run-*.wandb")
    run = next(r.run for r in wandb_records(records_file) if r.WhichOneof("record_type") == "run")
    assert run.run_group == f"smoke/{sweep_dir.name}" and run.job_type == "eval"
    assert list(job.glob("evaluation/wandb/offline-run-*/files/media/images/eval/frontier_*.png"))


def test_validation_prompts_give_selection_metrics_apart_from_test(tmp_path):
    """``evaluation.validation.prompts_file``: a second sampling pass on the validation
    prompts, in <run>/evaluation/validation and as ``val/sampled/*`` (usable as
    optimized_metric); the test-split numbers stay as they were. The test prompts file
    itself is refused as validation. ``evaluation.ood_test.prompts_file`` likewise gives
    <run>/evaluation/ood_test and ``eval/ood_test/*``."""
    validation = ROOT / "tests" / "fixtures" / "plain_pairs.jsonl"
    common = [f"paths.log_dir={tmp_path}", "experiment=smoke", "objective=dpo", "evaluation=smoke"]
    result = run_module(
        "fpo.commands.train", *common, f"evaluation.validation.prompts_file={validation}",
        "evaluation.validation.num_prompts=3", "optimized_metric=val/sampled/policy_judge_mean",
        f"evaluation.ood_test.prompts_file={NEW_TEMPLATES}", "evaluation.ood_test.num_prompts=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p.parent for p in tmp_path.glob("smoke/runs/*/metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    chosen = json.loads((run / "evaluation" / "validation" / "summary.json").read_text())
    test = json.loads((run / "evaluation" / "summary.json").read_text())
    assert chosen["num_prompts"] == 3 and test["num_prompts"] == 4
    prompts = [json.loads(line)["prompt"] for line in validation.read_text().splitlines()][:3]
    generations = (run / "evaluation" / "validation" / "generations.jsonl").read_text()
    rows = [json.loads(line) for line in generations.splitlines()]  # every sample (2 each)
    assert [row["prompt"] for row in rows] == [p for p in prompts for _ in range(2)]
    assert metrics["val/sampled/policy_judge_mean"] == chosen["policy_judge_mean"]
    assert metrics["val/sampled/kl"] == chosen["kl"]
    assert metrics["val/sampled/judges/afinn/win_rate"] == chosen["judges"]["afinn"]["win_rate"]
    assert metrics["eval/kl"] == test["kl"] != chosen["kl"]
    assert test["validation"]["kl"] == chosen["kl"]
    # the second test set (evaluation.ood_test): its own folder and eval/ood_test/* scalars
    ood = json.loads((run / "evaluation" / "ood_test" / "summary.json").read_text())
    assert ood["num_prompts"] == 2 and test["ood_test"]["kl"] == ood["kl"]
    assert metrics["eval/ood_test/kl"] == ood["kl"] != test["kl"]
    assert (
        metrics["eval/ood_test/degeneration/policy/distinct_1"]
        == ood["degeneration"]["policy"]["distinct_1"]
    )
    assert "val/sampled/ood_test/kl" not in metrics and "eval/validation/kl" not in metrics

    test_file = ROOT / "tests" / "fixtures" / "ultrafeedback_binarized.jsonl"
    refused = run_module(
        "fpo.commands.train", *common, f"paths.log_dir={tmp_path / 'same'}",
        f"evaluation.validation.prompts_file={test_file}",
    )  # fmt: skip
    assert refused.returncode != 0
    assert "model selection needs prompts of its own" in refused.stderr


def test_validation_only_samples_the_validation_prompts_alone(tmp_path):
    """``evaluation.validation_only=true`` (fpo-calibrate's runs): ``val/sampled/*`` and
    <run>/evaluation/validation as without it, and nothing of the test prompts, the test
    pairs or the second test set; the test files are never opened (a missing one is fine)."""
    validation = ROOT / "tests" / "fixtures" / "plain_pairs.jsonl"
    result = run_module(
        "fpo.commands.train", f"paths.log_dir={tmp_path}", "experiment=smoke", "objective=dpo",
        "evaluation=smoke", f"evaluation.validation.prompts_file={validation}",
        "evaluation.validation.num_prompts=3", "evaluation.validation_only=true",
        f"evaluation.prompts_file={tmp_path / 'absent.jsonl'}",
        f"evaluation.ood_test.prompts_file={NEW_TEMPLATES}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p.parent for p in tmp_path.glob("smoke/runs/*/metrics.json")]
    metrics = json.loads((run / "metrics.json").read_text())
    chosen = json.loads((run / "evaluation" / "validation" / "summary.json").read_text())
    assert chosen["num_prompts"] == 3 and metrics["val/sampled/kl"] == chosen["kl"]
    assert not [key for key in metrics if key.startswith("eval/")]
    assert sorted(p.name for p in (run / "evaluation").iterdir()) == ["validation"]
