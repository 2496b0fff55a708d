"""fpo-study --protocol matched_kl --stage restore (fpo.study.restore): on a machine without
the study's logs/, the committed export rebuilds what the later stages read, and a second
export loses nothing of what the first one committed."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from fpo.compare import load_runs, run_rows
from fpo.compare.sample_scores import read_run_scores
from fpo.errors import UserError
from fpo.evaluation.degeneration import degeneration_metrics
from fpo.study import matched_kl, restore
from fpo.study.comparison import RUN_COLUMNS
from fpo.sweep import STATUS_FILE, read_status

KNOBS = [1e-4, 3e-4]
SAMPLES = [  # two prompts x two samples; on topic by the title words of their own prompt
    {"prompt": "The Iron Harbor (1968) is a film that", "policy": p, "reference": r}
    for p, r in [(" great great great fun, wonderful!", " a dull story."), (" harbor", " bad.")]
] + [
    {"prompt": "Review of The Red Mill: this one", "policy": p, "reference": r}
    for p, r in [(" the mill was awful", " the mill is old."), (" buy the hotel suite", " ok.")]
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Logs under a temporary folder (paths.log_dir is ./logs), the export under it too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FPO_ROOT", raising=False)
    monkeypatch.setattr(matched_kl, "OUT", tmp_path / "results" / "matched_kl")
    return tmp_path


def calibrate(objective: str = "fpo") -> None:
    """A finished calibration report (two seed knob values) and one calibration run."""
    series = matched_kl.series_dir(objective)
    series.mkdir(parents=True)
    report = {"objective": objective, "knob": "objective.constraints.features.alpha"}
    report |= {"seed_knobs": KNOBS, "targets": [], "points": [{"knob": 1e-4, "val_kl": 3.5}]}
    (series / "calibration.json").write_text(json.dumps(report))
    (series / "calibration.md").write_text("# Calibration\n")
    run = series / "objective.constraints.features.alpha=0.0001" / "run"
    run.mkdir(parents=True)
    clock = {"run/fit_cpu_seconds": 1800.0, "run/wall_seconds": 3600.0, "val/sampled/kl": 3.5}
    (run / "metrics.json").write_text(json.dumps(clock))


def finish_seed_run(seed: int, knob_index: int) -> str:
    """A finished seed run of FPO as fpo-train writes it; its name in runs.csv."""
    sweep = matched_kl.seed_sweeps("fpo")[seed - 1]
    knob = KNOBS[knob_index]
    job = sweep / f"{knob_index}_objective.constraints.features.alpha={knob!r},seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    alpha = f"objective: {{name: fpo, constraints: {{features: {{alpha: {knob!r}}}}}}}"
    (job / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n{alpha}\n")
    (job / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
    clock = {"run/fit_cpu_seconds": 900.0 * seed, "run/wall_seconds": 1000.0, "run/cpu_count": 2.0}
    clock |= {"run/fit_attempts": 1.0, "run/fit_load_average": 1.5, "run/peak_memory_gb": 3.5}
    (job / "metrics.json").write_text(json.dumps(clock))
    rows = [
        {**sample, "prompt_index": i // 2, "sample": i % 2, "kl_log_ratio": 2.0 + i + seed,
         "policy_scores": {"afinn-165": float(i)}, "reference_scores": {"afinn-165": 1.0}}
        for i, sample in enumerate(SAMPLES)
    ]  # fmt: skip
    prompts = [row["prompt"] for row in rows]
    degeneration = {
        side: degeneration_metrics(prompts, [row[side] for row in rows])
        for side in ("policy", "reference")
    }
    summary = {"kl": 3.5, "policy_judge_mean": 1.5, "entropy": 2.25, "degeneration": degeneration}
    for folder in ("evaluation", "evaluation/ood_test"):
        (job / folder).mkdir(parents=True)
        (job / folder / "summary.json").write_text(json.dumps(summary))
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        (job / folder / "generations.jsonl").write_text(lines)
    (job / STATUS_FILE).write_text(json.dumps({"status": "finished"}))
    return f"{sweep.name}__{job.name}"


def summary_of(run, split: str) -> dict:
    return json.loads((run.path / "evaluation" / split / "summary.json").read_text())


def lose_the_machine(in_tmp) -> None:
    shutil.rmtree(in_tmp / "logs")


def test_a_fresh_machine_rebuilds_what_compare_and_the_seed_sweeps_read(in_tmp, capsys):
    calibrate()
    names = [finish_seed_run(1, 0), finish_seed_run(2, 1)]
    before = {run.name: run for run in load_runs(matched_kl.started_seed_sweeps())}
    scores = {name: read_run_scores(run, "ood_test") for name, run in before.items()}
    degeneration = {
        (name, split): summary_of(run, split)["degeneration"]
        for name, run in before.items()
        for split in ("", "ood_test")
    }
    matched_kl.stage_export()
    out = matched_kl.OUT
    exported = {name: (out / name).read_bytes() for name in ("runs.csv", "compute.md")}
    lose_the_machine(in_tmp)

    matched_kl.stage_restore(dry_run=False)
    assert "1 calibration reports and 2 seed runs" in capsys.readouterr().out
    assert matched_kl.read_calibration("fpo")["seed_knobs"] == KNOBS
    after = {run.name: run for run in load_runs(matched_kl.started_seed_sweeps())}
    assert sorted(after) == sorted(before) and len(names) == 2
    for name, run in after.items():
        # the config fpo-train composes from the job's overrides: objective, knob and seed
        assert run.objective == "fpo" and run.seed == before[name].seed
        knob = "objective.constraints.features.alpha"
        assert run.hyperparameters[knob] == before[name].hyperparameters[knob]
        assert run.metrics["run/fit_cpu_seconds"] == before[name].metrics["run/fit_cpu_seconds"]
        assert run.metrics["run/cpu_count"] == 2.0
        # the export as docs/results/matched_kl, not this machine's path
        assert run.metrics[restore.RESTORED] == "/".join(out.parts[-3:])
        again = read_run_scores(run, "ood_test")
        assert again.kl == pytest.approx(scores[name].kl)
        assert again.prompt_means["afinn-165"].tolist() == [0.5, 2.5]
        assert (
            again.prompt_means["afinn-165"].tolist()
            == scores[name].prompt_means["afinn-165"].tolist()
        )
        for split in ("", "ood_test"):  # recomputed from the samples, as the evaluation did
            assert summary_of(run, split)["degeneration"] == degeneration[name, split]
        assert read_status(run.path)["status"] == "finished"  # the seed sweep skips the job
        # fpo-compare's run table reads the committed row's numbers back (comparison.csv)
        (row,) = run_rows([run])
        committed = restore.read_rows(out / "runs.csv")[f"{run.path.parent.name}__{run.path.name}"]
        for column in RUN_COLUMNS[3:]:  # from seed on (config: the composed one's labels)
            assert ("" if row.get(column) is None else str(row[column])) == committed[column]
        assert row["kl"] == 3.5 and row["entropy"] == 2.25 and row["judge_score"] == 1.5

    matched_kl.stage_export()  # a second export keeps the committed rows and the costs
    for name, text in exported.items():
        assert (out / name).read_bytes() == text, name


def test_a_row_restore_cannot_place_is_refused_by_name(in_tmp):
    calibrate()
    name = finish_seed_run(1, 0)
    matched_kl.stage_export()
    lose_the_machine(in_tmp)
    runs = matched_kl.OUT / "runs.csv"
    text = runs.read_text().replace(name, "another-sweep__0_seed=1")
    runs.write_text(text)
    with pytest.raises(UserError, match="another-sweep__0_seed=1 is in no seed sweep"):
        matched_kl.stage_restore(dry_run=False)
    with pytest.raises(UserError, match="not a seed sweep's job folder"):
        restore.job_overrides("last.ckpt")
    assert next(csv.DictReader(runs.open()))["run"] == "another-sweep__0_seed=1"  # untouched


def test_a_restored_calibration_is_not_searched_again(in_tmp, capsys):
    calibrate()
    matched_kl.stage_export()
    lose_the_machine(in_tmp)
    matched_kl.stage_restore(dry_run=False)
    matched_kl.stage_calibrate(dry_run=True)
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$")]
    # fpo-calibrate would find none of its runs and search again
    assert "calibrate: fpo: restored from" in out
    assert not any("experiment=matched_kl/fpo " in c for c in commands)
    assert any("experiment=matched_kl/dpo " in c for c in commands)  # not calibrated yet
    export = matched_kl.OUT / "compute.md"
    matched_kl.stage_export()  # the report's points stand in for the runs
    assert "| fpo | `objective.constraints.features.alpha=0.0001` | 3.5 |" in export.read_text()
