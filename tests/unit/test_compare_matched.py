"""fpo-compare --at-kl on synthetic run folders: interpolation, no extrapolation, seeds left
out, the two-level bootstrap's interval and p-value, old runs, the CLI's files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from fpo.commands.compare import main
from fpo.compare import config_rows, load_runs, matched_kl_table, run_rows
from fpo.compare.bootstrap import holm, interpolate, p_value
from fpo.compare.plots import frontier_figure
from fpo.compare.report import frontier_rows
from fpo.errors import UserError

JUDGES = ("vader-compound", "afinn")


def make_run(root: Path, objective: str, seed: int, beta: float) -> Path:
    """A run folder with a config only (the evaluation is written by the callers)."""
    run = root / f"{objective}_beta{beta}_seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "objective": {"name": objective, "beta": beta}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"objective={objective}", f"objective.beta={beta}", f"seed={seed}"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "evaluation").mkdir()
    return run


def write_summary(run: Path, kl: float, score: float) -> None:
    """An older run: summary means, and generations.jsonl without per-sample KL or scores."""
    summary = {
        "kl": kl,
        "policy_judge_mean": score,
        "settings": {"judge": "vader-compound"},
        "judges": {"vader-compound": {"policy_judge_mean": score}},
    }
    (run / "evaluation" / "summary.json").write_text(json.dumps(summary))
    line = {"prompt": "A film", "policy": " fine", "reference": " ok", "policy_score": score}
    (run / "evaluation" / "generations.jsonl").write_text(json.dumps(line) + "\n")


def write_samples(run: Path, kl: np.ndarray, scores: np.ndarray, folder: str = "") -> None:
    """Per-sample generations.jsonl: ``kl`` and ``scores`` are ``(P, S)`` (prompts x samples);
    the afinn score is twice the vader one."""
    out = run / "evaluation" / folder
    out.mkdir(parents=True, exist_ok=True)
    with (out / "generations.jsonl").open("w") as handle:
        for p, s in np.ndindex(kl.shape):
            line = {
                "prompt_index": p,
                "prompt": f"Review of film {p}:",
                "sample": s,
                "policy": " text",
                "reference": " text",
                "kl_log_ratio": float(kl[p, s]),
                "policy_scores": {
                    JUDGES[0]: float(scores[p, s]),
                    JUDGES[1]: 2 * float(scores[p, s]),
                },
                "reference_scores": {JUDGES[0]: 0.0, JUDGES[1]: 0.0},
            }
            handle.write(json.dumps(line) + "\n")


def synthetic_sweep(
    root: Path, prompts: int, objectives: dict[str, float], seeds: int = 3, rng_seed: int = 0
) -> None:
    """Each objective x seed at true KLs 2 and 4 (betas 0.3, 0.1); the true score is
    ``0.1 * KL + offset`` (so ``0.3 + offset`` at KL 3). Samples add noise per prompt
    (shared by every run, as the same test prompts are) and per sample."""
    rng = np.random.default_rng(rng_seed)
    prompt_effect = rng.normal(0, 0.2, size=(prompts, 1))
    for objective, offset in objectives.items():
        for seed in range(seeds):
            for beta, true_kl in ((0.3, 2.0), (0.1, 4.0)):
                kl = true_kl + rng.normal(0, 1.0, size=(prompts, 2))
                score = 0.1 * true_kl + offset + prompt_effect + rng.normal(0, 0.1, (prompts, 2))
                write_samples(make_run(root, objective, seed, beta), kl, score)


def by_key(result) -> dict:
    return {(row["objective"], row["judge"], row["target_kl"]): row for row in result.rows}


def test_interpolation_is_linear_between_the_bracketing_points_in_kl_order():
    kl = np.array([[3.0, 1.0, 5.0], [1.0, 3.0, 5.0]])
    score = np.array([[0.6, 0.2, 0.0], [0.2, 0.6, 0.0]])
    assert interpolate(kl, score, 2.0) == pytest.approx([0.4, 0.4])
    assert interpolate(kl, score, 4.0) == pytest.approx([0.3, 0.3])
    assert interpolate(kl, score, 3.0) == pytest.approx([0.6, 0.6])  # a point exactly there
    assert interpolate(kl, score, 5.0) == pytest.approx([0.0, 0.0])  # the last point
    assert np.isnan(interpolate(kl, score, 0.5)).all() and np.isnan(interpolate(kl, score, 6)).all()


def test_matched_score_averages_seeds_and_leaves_out_a_seed_that_does_not_bracket(tmp_path):
    # seed 0: KL 1 -> 0.2, 3 -> 0.6; seed 1: KL 2 -> 0.5, 4 -> 0.9.
    for seed, points in ((0, [(1.0, 0.2), (3.0, 0.6)]), (1, [(2.0, 0.5), (4.0, 0.9)])):
        for beta, (kl, score) in zip((0.3, 0.1), points, strict=True):
            write_summary(make_run(tmp_path, "dpo", seed, beta), kl, score)
    result = matched_kl_table(load_runs([tmp_path]), [2.5, 1.5, 5.0], baseline="dpo")
    rows = by_key(result)
    both = rows[("dpo", "vader-compound", 2.5)]
    assert both["score"] == pytest.approx((0.5 + 0.6) / 2)
    assert (both["n_seeds"], both["n_seeds_excluded"]) == (2, 0)
    one = rows[("dpo", "vader-compound", 1.5)]  # seed 1 starts at KL 2: left out, counted
    assert one["score"] == pytest.approx(0.3)
    assert (one["n_seeds"], one["n_seeds_excluded"]) == (1, 1)
    outside = rows[("dpo", "vader-compound", 5.0)]  # never extrapolated
    assert outside["score"] is None and outside["n_seeds"] == 0
    assert outside["note"] == "outside measured KL range [1, 4]"
    # Older runs: summary means, no interval, and a note that says so.
    assert both["score_low"] is None and "summary means only" in both["note"]
    assert any("no bootstrap interval" in note for note in result.notes)


def test_bootstrap_interval_covers_the_truth_and_narrows_with_more_prompts(tmp_path):
    widths = []
    for prompts in (16, 256):
        synthetic_sweep(tmp_path / str(prompts), prompts, {"fpo": 0.0})
        result = matched_kl_table(load_runs([tmp_path / str(prompts)]), [3.0], bootstrap=1000)
        row = by_key(result)[("fpo", "vader-compound", 3.0)]
        assert row["score_low"] < 0.3 < row["score_high"], row  # the truth: 0.1 * 3
        assert row["n_seeds"] == 3 and row["note"] == ""
        afinn = by_key(result)[("fpo", "afinn", 3.0)]
        assert afinn["score"] == pytest.approx(2 * row["score"])
        widths.append(row["score_high"] - row["score_low"])
    assert widths[1] < widths[0] / 2, widths


def exact_frontier(root: Path, objective: str, seed: int, per_prompt: np.ndarray) -> None:
    """Runs at KL 2 and 4 exactly; scores ``0.1 * KL + per_prompt`` (``(P,)``), 2 samples."""
    for beta, kl in ((0.3, 2.0), (0.1, 4.0)):
        score = np.repeat((0.1 * kl + per_prompt)[:, None], 2, axis=1)
        write_samples(make_run(root, objective, seed, beta), np.full(score.shape, kl), score)


def test_interval_accounts_for_seeds(tmp_path):
    """No prompt-to-prompt variation: the interval's width is the seeds' spread alone."""
    for seed, offset in enumerate((0.0, 0.1, 0.2)):
        exact_frontier(tmp_path, "fpo", seed, np.full(8, offset))
    row = by_key(matched_kl_table(load_runs([tmp_path]), [3.0], bootstrap=400))
    row = row[("fpo", "vader-compound", 3.0)]
    assert row["score"] == pytest.approx(0.4)
    assert row["score_low"] < 0.35 and row["score_high"] > 0.45, row
    plain = by_key(matched_kl_table(load_runs([tmp_path]), [3.0], bootstrap=0))
    plain = plain[("fpo", "vader-compound", 3.0)]
    assert plain["score"] == pytest.approx(0.4) and plain["score_low"] is None
    assert plain["note"] == "no bootstrap"


def test_difference_shares_the_prompt_draws(tmp_path):
    """Prompts vary a lot but dpo is fpo - 0.1 on every prompt: paired by prompt, the
    difference's interval is -0.1 exactly, though each score's interval is wide."""
    prompts = np.random.default_rng(0).normal(0, 1.0, size=32)
    for seed in range(2):
        exact_frontier(tmp_path, "fpo", seed, prompts)
        exact_frontier(tmp_path, "dpo", seed, prompts - 0.1)
    rows = by_key(matched_kl_table(load_runs([tmp_path]), [3.0], bootstrap=400))
    fpo, dpo = rows[("fpo", "vader-compound", 3.0)], rows[("dpo", "vader-compound", 3.0)]
    assert fpo["score_high"] - fpo["score_low"] > 0.3
    assert dpo["diff_low"] == pytest.approx(-0.1) and dpo["diff_high"] == pytest.approx(-0.1)


def test_difference_from_the_baseline_with_its_p_value(tmp_path):
    synthetic_sweep(tmp_path, 64, {"fpo": 0.0, "dpo": -0.2})
    for run in sorted(tmp_path.glob("fpo_*")):  # simpo: an exact copy of fpo's runs
        copy = shutil.copytree(run, tmp_path / run.name.replace("fpo", "simpo"))
        config = yaml.safe_load((copy / ".hydra" / "config.yaml").read_text())
        config["objective"]["name"] = "simpo"
        (copy / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = by_key(matched_kl_table(load_runs([tmp_path]), [3.0], bootstrap=500))
    worse = rows[("dpo", "vader-compound", 3.0)]
    assert worse["diff"] == pytest.approx(-0.2, abs=0.05)
    assert worse["diff_high"] < 0 and worse["p_value"] == pytest.approx(1 / 500)
    assert worse["p_value_text"] == "< 0.002"
    same = rows[("simpo", "vader-compound", 3.0)]
    assert same["diff"] == 0.0 and same["diff_low"] < 0 < same["diff_high"]
    assert same["p_value"] > 0.5
    assert rows[("fpo", "vader-compound", 3.0)]["diff"] is None  # the baseline itself
    # Holm over the judge's family (dpo and simpo against fpo at KL 3): m = 2
    assert worse["p_holm"] == pytest.approx(2 / 500)
    assert same["p_holm"] == pytest.approx(max(2 / 500, same["p_value"]))
    assert rows[("fpo", "vader-compound", 3.0)]["p_holm"] is None
    # a family the comparison names in full (e.g. four baselines x two targets = 8): the
    # differences without a value count as p = 1, so the smallest p-value is multiplied by 8
    named = by_key(matched_kl_table(load_runs([tmp_path]), [3.0], bootstrap=500, holm_family=8))
    assert named[("dpo", "vader-compound", 3.0)]["p_holm"] == pytest.approx(8 / 500)
    same_p = named[("simpo", "vader-compound", 3.0)]["p_value"]
    assert named[("simpo", "vader-compound", 3.0)]["p_holm"] == pytest.approx(min(1, 7 * same_p))
    with pytest.raises(UserError, match="--holm-family 1: judge 'vader-compound' has 2"):
        matched_kl_table(load_runs([tmp_path]), [3.0], bootstrap=50, holm_family=1)


def test_holm_adjustment_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    # a family of 6 with only these 3 p-values: factors 6, 5, 4 (the missing three are p = 1)
    assert holm([0.02, 0.001, 0.01], family_size=6) == pytest.approx([0.08, 0.006, 0.05])
    with pytest.raises(ValueError, match="family_size 1 is smaller than the 2"):
        holm([0.1, 0.2], family_size=1)


def test_p_value_of_identical_distributions_is_large_and_floors_at_one_over_b():
    assert p_value(np.array([-1.0, 1.0, -2.0, 2.0]))[0] == pytest.approx(1.0)
    assert p_value(np.array([1.0, 2.0, 3.0, 4.0])) == (0.25, True)


def test_a_split_reads_its_own_generations(tmp_path):
    for beta, kl in ((0.3, 1.0), (0.1, 3.0)):
        run = make_run(tmp_path, "fpo", 0, beta)
        write_summary(run, kl + 10, 0.0)  # the main test set: far away
        write_samples(run, np.full((4, 2), kl), np.full((4, 2), kl / 10), folder="ood_test")
    runs = load_runs([tmp_path])
    ood = by_key(matched_kl_table(runs, [2.0], bootstrap=50, split="ood_test"))
    assert ood[("fpo", "vader-compound", 2.0)]["score"] == pytest.approx(0.2)
    main_set = by_key(matched_kl_table(runs, [2.0], bootstrap=50))
    assert main_set[("fpo", "vader-compound", 2.0)]["note"].startswith("outside measured KL")


def test_cli_writes_the_matched_table_and_frontier(tmp_path, capsys):
    synthetic_sweep(tmp_path / "runs", 8, {"fpo": 0.0, "dpo": -0.1}, seeds=2)
    out = tmp_path / "out"
    main([str(tmp_path / "runs"), "--out", str(out), "--at-kl", "3,6", "--bootstrap", "200"])
    assert "matched_kl.md" in capsys.readouterr().out
    with (out / "matched_kl.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 2 * 2  # objectives x judges x targets
    assert rows[0]["objective"] == "fpo" and rows[0]["baseline"] == "fpo"
    dpo = next(r for r in rows if r["objective"] == "dpo" and r["target_kl"] == "3.0")
    assert dpo["n_seeds"] == "2" and float(dpo["diff_low"]) <= float(dpo["diff_high"])
    markdown = (out / "matched_kl.md").read_text()
    assert "| dpo | vader-compound | 3 |" in markdown and "Δ vs fpo" in markdown
    assert "| dpo | vader-compound | 6 | outside measured KL range [" in markdown
    assert "over every difference of the same judge in this table" in markdown
    family_of_8 = ["--at-kl", "3", "--bootstrap", "200", "--holm-family", "8"]
    main([str(tmp_path / "runs"), "--out", str(out), *family_of_8])
    with (out / "matched_kl.csv").open() as handle:
        dpo_3 = next(r for r in csv.DictReader(handle) if r["objective"] == "dpo")
    assert float(dpo_3["p_holm"]) == pytest.approx(min(1, 8 * float(dpo_3["p_value"])))
    assert "over a family of 8 differences" in (out / "matched_kl.md").read_text()
    assert (out / "frontier.png").read_bytes().startswith(b"\x89PNG")
    # the first judge's frontier is frontier.png, every other judge's has its own file
    assert (out / "frontier_afinn.png").read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in out.glob("frontier_*.png")] == ["frontier_afinn.png"]
    for argv in (
        ["--at-kl", "3", "--judges", "nope"],
        ["--baseline", "dpo"],
        ["--holm-family", "8"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "runs"), "--out", str(out), *argv])
        assert exit_info.value.code == 2
    errors = capsys.readouterr().err
    assert "nope" in errors and "--holm-family only apply with --at-kl" in errors


def test_frontier_shows_every_run_per_seed_the_targets_and_short_labels(tmp_path):
    synthetic_sweep(tmp_path, 8, {"fpo": 0.0, "dpo": -0.1}, seeds=2)
    runs = load_runs([tmp_path])
    matched = matched_kl_table(runs, [3.0, 6.0], bootstrap=50)
    vader = [row for row in matched.rows if row["judge"] == "vader-compound"]
    rows = frontier_rows(matched, "vader-compound", run_rows(runs))
    axes = frontier_figure(config_rows(rows), rows, [3.0, 6.0], vader).axes[0]
    seed_lines = [line for line in axes.lines if line.get_alpha() == 0.35]
    assert len(seed_lines) == 2 * 2 and all(len(line.get_xdata()) == 2 for line in seed_lines)
    verticals = [line.get_xdata()[0] for line in axes.lines if line.get_linestyle() == "--"]
    assert verticals == [3.0, 6.0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert sorted(labels) == ["dpo (2 seeds)", "fpo (2 seeds)", "target KL"]
    assert not axes.texts  # no per-point override annotations
    diamonds = [line for line in axes.lines if line.get_marker() == "D"]
    assert len(diamonds) == 2  # both objectives at KL 3; KL 6 is outside their range


def test_single_run_folders_all_called_run_keep_their_own_frontier_points(tmp_path):
    """Calibration runs are ``<series>/<knob>=<value>/run``, passed one by one."""
    folders = []
    for beta, kl in ((0.3, 2.0), (0.1, 4.0)):
        made = make_run(tmp_path / f"objective.beta={beta}", "fpo", 0, beta)
        folders.append(made.rename(made.parent / "run"))
        write_samples(folders[-1], np.full((4, 2), kl), np.full((4, 2), kl / 10))
    runs = load_runs(folders)
    matched = matched_kl_table(runs, [3.0], bootstrap=20)
    plotted = frontier_rows(matched, "vader-compound", run_rows(runs))
    assert sorted(row["kl"] for row in config_rows(plotted)) == pytest.approx([2.0, 4.0])


def test_a_bad_value_in_generations_names_the_file(tmp_path):
    run = make_run(tmp_path, "fpo", 0, 0.1)
    write_samples(run, np.ones((2, 1)), np.ones((2, 1)))
    path = run / "evaluation" / "generations.jsonl"
    path.write_text(path.read_text().replace('"kl_log_ratio": 1.0', '"kl_log_ratio": "x"'))
    with pytest.raises(UserError, match=r"generations\.jsonl: a line with a bad value"):
        matched_kl_table(load_runs([tmp_path]), [1.0])


def test_a_completion_with_a_unicode_line_separator_is_one_sample(tmp_path):
    """The evaluation writes non-ASCII text raw; U+2028 inside a completion is not a row end."""
    run = make_run(tmp_path, "fpo", 0, 0.1)
    write_samples(run, np.full((2, 1), 1.0), np.full((2, 1), 0.5))
    path = run / "evaluation" / "generations.jsonl"
    path.write_text(path.read_text().replace('" text"', '" a\u2028b"'), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    (run_scores,) = matched_kl_table(load_runs([tmp_path]), [1.0], bootstrap=0).scores
    assert run_scores.kl == pytest.approx(1.0)


def test_runs_on_different_prompts_are_resampled_separately_and_say_so(tmp_path):
    exact_frontier(tmp_path / "a", "fpo", 0, np.zeros(4))
    exact_frontier(tmp_path / "b", "dpo", 0, np.zeros(6))  # two more prompts
    result = matched_kl_table(load_runs([tmp_path / "a", tmp_path / "b"]), [3.0], bootstrap=20)
    assert any("2 different prompt sets" in note for note in result.notes)
    assert by_key(result)[("dpo", "vader-compound", 3.0)]["diff"] == pytest.approx(0.0)
