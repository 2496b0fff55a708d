"""fpo-compare on fake run folders with known numbers: tables, statistics, figures, errors."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from fpo.commands.compare import main
from fpo.compare import (
    compare,
    config_rows,
    load_runs,
    mean_curves,
    newest_sweep,
    no_frontier_reason,
    run_rows,
)
from fpo.compare.runs import find_runs
from fpo.errors import UserError
from fpo.testing import ROOT

DPO = {"name": "dpo", "beta": 0.1}
# The redesigned objective shape: nested constraints, one of them unset.
FPO = {
    "name": "fpo",
    "beta": 0.1,
    "margin": 0.0,
    "constraints": {"token_kl": None, "features": {"alpha": 0.5, "k": 16, "stop_gradient": True}},
}


def make_run(
    root: Path,
    name: str,
    objective: dict,
    seed: int,
    metrics: dict | None = None,
    summary: dict | None = None,
    losses: list[float] | None = None,
    overrides: list[str] = (),
) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "objective": objective, "model": {"name": "tiny"}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    all_overrides = [f"objective={objective['name']}", f"seed={seed}", *overrides]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(all_overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if summary is not None:
        (run / "evaluation").mkdir()
        (run / "evaluation" / "summary.json").write_text(json.dumps(summary))
    if losses is not None:
        (run / "csv" / "version_0").mkdir(parents=True)
        with (run / "csv" / "version_0" / "metrics.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", "step", "train/loss", "train/rewards/margins", "val/loss"])
            for step, loss in enumerate(losses):
                writer.writerow([0, step, loss, -loss, ""])
            writer.writerow([0, len(losses) - 1, "", "", 0.5])  # a validation row
    return run


def summary(judge: float, kl: float, win: float) -> dict:
    return {
        "policy_judge_mean": judge,
        "policy_judge_stderr": 0.01,
        "reference_judge_mean": 0.0,
        "win_rate": win,
        "kl": kl,
        "settings": {"judge": "vader-compound"},
        "judges": {"afinn-165": {"win_rate": win / 2}},
        "policy_tokens_mean": 4.0,
        "policy_tokens_stderr": 0.5,
        "seed": 99,
        "generations": "/somewhere/generations.jsonl",
    }


@pytest.fixture
def sweep(tmp_path) -> Path:
    """dpo and fpo x seeds 0, 1; dpo has an evaluation, fpo has none."""
    root = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    make_run(
        root,
        "0_objective=dpo,seed=0",
        DPO,
        0,
        {"val/rewards/accuracies": 0.6, "run/wall_seconds": 10.0, "train/loss": 0.5},
        summary(judge=0.2, kl=1.0, win=0.5),
        losses=[1.0, 0.8],
    )
    make_run(
        root,
        "1_objective=dpo,seed=1",
        DPO,
        1,
        {"val/rewards/accuracies": 0.8, "run/wall_seconds": 14.0},
        summary(judge=0.4, kl=3.0, win=0.7),
        losses=[3.0, 0.4],
    )
    make_run(root, "2_objective=fpo,seed=0", FPO, 0, {"val/rewards/accuracies": 0.5}, losses=[2.0])
    make_run(root, "3_objective=fpo,seed=1", FPO, 1, {"val/rewards/accuracies": 0.9}, losses=[2.0])
    return root


def by_config(rows):
    return {row["objective"]: row for row in rows}


def test_configuration_rows_average_over_seeds(sweep):
    rows = run_rows(load_runs([sweep]))
    assert [row["run"] for row in rows] == [p.name for p in sorted(sweep.iterdir())]
    configs = by_config(config_rows(rows))
    assert len(configs) == 2 and configs["dpo"]["n"] == 2 and configs["dpo"]["seed"] == "0,1"
    assert configs["dpo"]["accuracy"] == pytest.approx(0.7)
    # stderr = sample std / sqrt(n): std(0.6, 0.8) = 0.1414 -> 0.1
    assert configs["dpo"]["accuracy_stderr"] == pytest.approx(0.1)
    assert configs["fpo"]["accuracy_stderr"] == pytest.approx(0.2)
    assert configs["dpo"]["kl"] == pytest.approx(2.0) and configs["dpo"]["kl_stderr"] == 1.0
    assert configs["dpo"]["judge_score"] == pytest.approx(0.3)
    assert configs["dpo"]["judge"] == "vader-compound"
    assert configs["dpo"]["eval:judges/afinn-165/win_rate"] == pytest.approx(0.3)
    assert configs["dpo"]["wall_seconds"] == pytest.approx(12.0)
    # A run's own evaluation stderr is kept in its row; X_stderr pairs with X_mean.
    assert rows[0]["judge_score_stderr"] == 0.01
    assert rows[0]["eval:policy_tokens_mean_stderr"] == 0.5
    assert "eval:seed" not in rows[0] and rows[0]["seed"] == 0


def test_hyperparameters_are_flattened_for_old_and_new_objective_shapes(sweep):
    rows = by_config(run_rows(load_runs([sweep])))
    assert rows["fpo"]["objective.constraints.features.alpha"] == 0.5
    assert rows["fpo"]["objective.constraints.features.stop_gradient"] is True
    assert "objective.constraints.token_kl" not in rows["fpo"]  # unset: not a hyperparameter
    assert rows["dpo"]["objective.beta"] == 0.1 and "objective.name" not in rows["dpo"]
    assert rows["fpo"]["config"].startswith("fpo beta=0.1 constraints.features.alpha=0.5")


def test_differing_overrides_split_configurations_but_seed_does_not(tmp_path):
    for i, (lr, seed) in enumerate([("1e-3", 0), ("1e-3", 1), ("1e-4", 0)]):
        overrides = [f"optimizer.lr={lr}", "experiment=smoke"]
        metrics = {"val/rewards/accuracies": 0.5 + i / 10}
        make_run(tmp_path, f"{i}_run", DPO, seed, metrics, overrides=overrides)
    configs = config_rows(run_rows(load_runs([tmp_path])))
    assert [(c["optimizer.lr"], c["n"]) for c in configs] == [("1e-3", 2), ("1e-4", 1)]
    assert all("experiment" not in c for c in configs)  # the same in every run
    assert configs[1]["accuracy_stderr"] is None  # one seed: no stderr


def test_seeds_run_later_under_another_sweep_name_join_their_configuration(tmp_path):
    """The comparison's seeds 1 and 2 run as ``sweep.name=seeds_dpo`` beside seed 0 of the
    frontier sweep (no sweep name): one configuration of three seeds, not two."""
    for seed, extra in [(0, []), (1, ["sweep.name=seeds_dpo"]), (2, ["sweep.name=seeds_dpo"])]:
        metrics = {"val/rewards/accuracies": 0.5 + seed / 10}
        make_run(tmp_path, f"run{seed}", DPO, seed, metrics, overrides=["beta=0.1", *extra])
    configs = config_rows(run_rows(load_runs([tmp_path])))
    assert [(c["n"], c["seed"]) for c in configs] == [(3, "0,1,2")]


def test_outputs_csv_markdown_and_figures(sweep, tmp_path):
    out = tmp_path / "out"
    result = compare([sweep], out)
    assert (result["runs"], result["configurations"], result["frontier"]) == (4, 2, True)
    with (out / "comparison.csv").open() as handle:
        table = list(csv.DictReader(handle))
    header = list(table[0])
    for column in ["level", "run", "objective", "objective.beta", "seed", "accuracy",
                   "accuracy_stderr", "judge", "win_rate", "kl", "entropy", "feature_drift",
                   "wall_seconds", "peak_memory_gb", "tokens_per_sec"]:  # fmt: skip
        assert column in header, column
    assert [row["level"] for row in table] == ["run"] * 4 + ["config"] * 2
    fpo_run = table[2]
    assert fpo_run["judge_score"] == "" and fpo_run["kl"] == "" and fpo_run["entropy"] == ""
    assert float(table[4]["accuracy_stderr"]) == pytest.approx(0.1)
    markdown = (out / "comparison.md").read_text()
    assert "nan" not in markdown.lower() and "None" not in markdown
    assert "| dpo beta=0.1 | 2 |" in markdown and "0.7 ± 0.1" in markdown
    assert "in comparison.csv: eval:judges/afinn-165/win_rate, eval:policy_tokens_mean" in markdown
    for name in ("frontier.png", "curves.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name


def test_single_seed_shows_dash_and_missing_evaluation_is_blank(tmp_path):
    metrics = {"val/rewards/accuracies": 0.75, "run/peak_memory_gb": math.nan}  # NaN: blank
    make_run(tmp_path, "run", DPO, 0, metrics)
    out = tmp_path / "out"
    result = compare([tmp_path / "run"], out)
    assert not result["frontier"] and not result["curves"]
    (why,) = [note for note in result["notes"] if "frontier" in note]
    assert why.startswith("no frontier.png: none of the 1 runs was evaluated")
    assert f"fpo-eval run_dir={tmp_path / 'run'} evaluation=smoke" in why
    markdown = (out / "comparison.md").read_text()
    assert "0.75 ± -" in markdown and "nan" not in markdown.lower()
    row = next(csv.DictReader((out / "comparison.csv").open()))
    assert row["run"] == "run" and row["win_rate"] == "" and row["kl_stderr"] == ""
    assert row["peak_memory_gb"] == ""
    assert not (out / "frontier.png").exists() and not (out / "curves.png").exists()
    assert "frontier" not in result["files"] and "curves" not in result["files"]


def test_a_figure_with_nothing_to_draw_replaces_no_old_one(sweep, tmp_path):
    """An earlier comparison's figures in the same folder do not survive a comparison of
    runs without evaluation or curves: no stale figure beside the new tables."""
    out = tmp_path / "out"
    assert compare([sweep], out)["frontier"]
    make_run(tmp_path, "bare", DPO, 0, {"val/rewards/accuracies": 0.5})
    result = compare([tmp_path / "bare"], out)
    assert not result["frontier"] and not (out / "frontier.png").exists()
    assert not (out / "curves.png").exists()


def test_the_reason_names_runs_evaluated_in_part(sweep, tmp_path):
    make_run(tmp_path, "bare", DPO, 0, {"val/rewards/accuracies": 0.5})
    runs = load_runs([tmp_path / "bare"]) + load_runs([sweep])
    why = no_frontier_reason(runs)
    assert why.startswith("no frontier.png: no evaluated run has a judge score and a KL")
    assert "3 of 5 runs have no evaluation/summary.json" in why  # fpo's two and bare


def test_newest_sweep_is_the_one_written_last_not_the_alphabetically_last(tmp_path):
    older = tmp_path / "smoke" / "multiruns" / "objective=simpo-aaaa"
    newer = tmp_path / "smoke" / "multiruns" / "objective=dpo-bbbb"
    for sweep, when in ((older, 1_000), (newer, 2_000)):
        sweep.mkdir(parents=True)
        (sweep / "sweep_summary.json").write_text("{}")
        os.utime(sweep / "sweep_summary.json", (when, when))
        os.utime(sweep, (when, when))
    assert newest_sweep(tmp_path) == newer
    os.utime(older / "sweep_summary.json", (3_000, 3_000))  # a job of the older one finished
    assert newest_sweep(tmp_path) == older
    with pytest.raises(UserError, match="no sweep folder"):
        newest_sweep(tmp_path / "smoke")


def test_the_notebook_reads_the_newest_sweep():
    notebook = json.loads((ROOT / "notebooks" / "compare_sweep.ipynb").read_text())
    code = "".join("".join(cell["source"]) for cell in notebook["cells"])
    assert "newest_sweep(LOGS)" in code and "sorted(" not in code
    assert "no_frontier_reason(runs)" in code


def test_training_curves_are_averaged_per_objective_and_step(sweep):
    curves = mean_curves(load_runs([sweep]))
    assert curves["dpo"]["train/loss"] == {0: 2.0, 1: pytest.approx(0.6)}
    assert curves["dpo"]["train/rewards/margins"][0] == -2.0
    assert curves["fpo"]["train/loss"] == {0: 2.0}


def test_unreadable_or_missing_files_become_notes(sweep, tmp_path):
    (sweep / "0_objective=dpo,seed=0" / "metrics.json").write_text("{truncated")
    (sweep / "1_objective=dpo,seed=1" / "metrics.json").unlink()
    result = compare([sweep], tmp_path / "out")
    notes = "\n".join(result["notes"])
    assert "unreadable" in notes and "no metrics.json" in notes
    dpo = by_config(config_rows(run_rows(load_runs([sweep]))))["dpo"]
    assert dpo["accuracy"] is None and not math.isnan(dpo["kl"])


def test_several_directories_prefix_run_names(sweep, tmp_path):
    other = tmp_path / "single"
    make_run(other, "2026-02-02", DPO, 5, {"val/rewards/accuracies": 1.0})
    names = [run.name for run in load_runs([sweep, other / "2026-02-02"])]
    assert names[0] == "2026-01-01_00-00-00/0_objective=dpo,seed=0" and names[-1] == "2026-02-02"
    assert find_runs(sweep.parent) == sorted(p for p in sweep.iterdir())


def test_run_folders_of_the_same_name_get_distinct_names(tmp_path):
    """Calibration runs are ``<series>/<knob>=<value>/run``: given one by one, each keeps
    its own name, so its row and its frontier point keep their own configuration."""
    folders = [tmp_path / f"objective.beta={beta}" for beta in (0.1, 0.3)]
    for folder in folders:
        make_run(folder, "run", DPO, 5, {})
    names = [run.name for run in load_runs([folder / "run" for folder in folders])]
    assert names == ["objective.beta=0.1/run", "objective.beta=0.3/run"]
    single = tmp_path / "single"
    make_run(single, "run", DPO, 5, {})
    assert [run.name for run in load_runs([single / "run"])] == ["run"]  # no clash, as given


def test_cli_writes_outputs_and_names_a_folder_without_runs(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path / "out")])
    assert "compared 4 runs in 2 configurations" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "missing"):
        with pytest.raises(SystemExit) as exit_info:
            main([str(folder), "--out", str(tmp_path / "out2")])
        assert exit_info.value.code == 2
        assert str(folder) in capsys.readouterr().err


@pytest.mark.parametrize(
    ("alpha", "source"),
    [
        ("${sae.feature_alpha}", {"sae": {"feature_alpha": 1e-4, "loader": {}}}),
        # runs saved before FPO's alpha moved into the SAE config (a root-level key)
        ("${oc.select:fpo_alpha,0.5}", {"fpo_alpha": 1e-4}),
    ],
)
def test_interpolated_alpha_is_read_as_its_value(tmp_path, alpha, source):
    """.hydra/config.yaml keeps FPO's alpha as an interpolation to a key outside the objective
    block; the table shows the number it resolved to in that run."""
    interpolated = {**FPO, "constraints": {"features": {"alpha": alpha}}}
    run = make_run(tmp_path, "0_run", interpolated, 0, {"val/rewards/accuracies": 0.5})
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**config, **source}))
    (row,) = run_rows(load_runs([tmp_path]))
    assert row["objective.constraints.features.alpha"] == 1e-4
