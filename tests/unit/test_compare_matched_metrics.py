"""Degeneration metrics and cost at matched KL (`fpo.compare.matched_metrics`): interpolated per
seed between the bracketing runs, averaged over seeds, never extrapolated, per test set; and
their section in fpo-compare's matched_kl.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from fpo.commands.compare import main
from fpo.compare import load_runs, matched_kl_table
from fpo.compare.matched_metrics import matched_run_metrics, reference_degeneration


def make_run(
    root: Path, objective: str, seed: int, beta: float, kl: float, folder: str = "", load=None
):
    """A run whose test set ``folder`` has KL ``kl``, a judge score, degeneration metrics that
    are linear in the KL (distinct-1 = 0.5 - 0.05 KL) and a cost of 100 KL CPU seconds; its
    fit ran at mean load average ``load`` on 2 CPUs (``None``: not recorded)."""
    run = root / f"{objective}_beta{beta}_seed{seed}"
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    config = {"seed": seed, "objective": {"name": objective, "beta": beta}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"objective={objective}", f"objective.beta={beta}", f"seed={seed}"]
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    summary = {
        "kl": kl,
        "policy_judge_mean": 0.1 * kl,
        "settings": {"judge": "vader"},
        "judges": {"vader": {"policy_judge_mean": 0.1 * kl}},
        "degeneration": {  # the reference's samples depend on the run's seed
            "policy": {"distinct_1": 0.5 - 0.05 * kl, "on_topic_rate": 0.9},
            "reference": {"distinct_1": 0.46 + 0.01 * seed, "on_topic_rate": 0.95},
        },
    }
    (run / "evaluation" / folder).mkdir(parents=True, exist_ok=True)
    (run / "evaluation" / folder / "summary.json").write_text(json.dumps(summary))
    metrics = {"run/fit_cpu_seconds": 100.0 * kl + seed, "run/peak_memory_gb": 6.0}
    if load is not None:
        metrics |= {"run/fit_load_average": load, "run/cpu_count": 2.0}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def rows_by_key(rows):
    return {(r["objective"], r["metric"], r["target_kl"]): r for r in rows}


def test_metrics_are_interpolated_per_seed_and_averaged(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path, "dpo", seed, 0.3, 2.0)
        make_run(tmp_path, "dpo", seed, 0.1, 4.0)
    make_run(tmp_path, "dpo", 2, 0.3, 3.5)  # seed 2 does not bracket KL 3
    make_run(tmp_path, "dpo", 2, 0.1, 4.5)
    matched = matched_kl_table(load_runs([tmp_path]), [3.0, 9.0], bootstrap=0)
    rows = rows_by_key(matched_run_metrics(matched.scores, [3.0, 9.0]))
    distinct = rows[("dpo", "degeneration/distinct_1", 3.0)]
    assert distinct["mean"] == pytest.approx(0.35)
    assert distinct["n_seeds"] == 2 and distinct["n_seeds_excluded"] == 1
    cost = rows[("dpo", "fit_cpu_seconds", 3.0)]
    assert cost["mean"] == pytest.approx(300.5)  # seeds 0 and 1: 300 and 301
    assert cost["seed_sd"] == pytest.approx(0.7071, abs=1e-4)
    assert rows[("dpo", "peak_memory_gb", 3.0)]["mean"] == pytest.approx(6.0)
    outside = rows[("dpo", "degeneration/distinct_1", 9.0)]
    assert outside["mean"] is None and outside["note"] == "no seed's runs bracket the target"
    assert reference_degeneration(matched.scores, None) == pytest.approx(
        {"degeneration/distinct_1": 0.47, "degeneration/on_topic_rate": 0.95}
    )  # the mean over the runs: seeds 0, 0, 1, 1, 2, 2


def test_cpu_seconds_come_only_from_runs_that_had_the_machine_to_themselves(tmp_path):
    """A run trained beside other jobs (load 4 on 2 CPUs) gives no CPU seconds, so its seed
    has no cost at the target; its peak memory and degeneration metrics still count."""
    make_run(tmp_path, "dpo", 0, 0.3, 2.0, load=2.1)
    make_run(tmp_path, "dpo", 0, 0.1, 4.0, load=2.15)  # 2.15 <= 1.1 x 2: alone
    make_run(tmp_path, "dpo", 1, 0.3, 2.0, load=4.0)  # shared
    make_run(tmp_path, "dpo", 1, 0.1, 4.0, load=2.0)
    matched = matched_kl_table(load_runs([tmp_path]), [3.0], bootstrap=0)
    rows = rows_by_key(matched_run_metrics(matched.scores, [3.0]))
    cost = rows[("dpo", "fit_cpu_seconds", 3.0)]
    assert cost["mean"] == pytest.approx(300.0)  # seed 0 only
    assert cost["n_seeds"] == 1 and cost["n_seeds_excluded"] == 1
    assert rows[("dpo", "peak_memory_gb", 3.0)]["n_seeds"] == 2
    assert rows[("dpo", "degeneration/distinct_1", 3.0)]["n_seeds"] == 2


def test_a_split_uses_its_own_summary_and_kl(tmp_path):
    for beta, kl in ((0.3, 1.0), (0.1, 3.0)):
        make_run(tmp_path, "fpo", 0, beta, kl + 10)  # the main test set: far away
        make_run(tmp_path, "fpo", 0, beta, kl, folder="ood_test")
    runs = load_runs([tmp_path])
    matched = matched_kl_table(runs, [2.0], bootstrap=0, split="ood_test")
    rows = rows_by_key(matched_run_metrics(matched.scores, [2.0], matched.split))
    assert rows[("fpo", "degeneration/distinct_1", 2.0)]["mean"] == pytest.approx(0.4)
    main_set = matched_kl_table(runs, [2.0], bootstrap=0)
    rows = rows_by_key(matched_run_metrics(main_set.scores, [2.0], main_set.split))
    assert rows[("fpo", "degeneration/distinct_1", 2.0)]["mean"] is None


def test_compare_writes_the_metrics_beside_the_judge_scores(tmp_path):
    for objective in ("fpo", "dpo"):
        for seed in (0, 1):
            make_run(tmp_path / "runs", objective, seed, 0.3, 2.0)
            make_run(tmp_path / "runs", objective, seed, 0.1, 4.0)
    out = tmp_path / "out"
    main([str(tmp_path / "runs"), "--out", str(out), "--at-kl", "3", "--bootstrap", "0"])
    with (out / "matched_kl_metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["metric"] for r in rows} == {
        "degeneration/distinct_1", "degeneration/on_topic_rate", "fit_cpu_seconds",
        "peak_memory_gb",
    }  # fmt: skip
    markdown = (out / "matched_kl.md").read_text()
    assert "## Degeneration and cost at matched KL" in markdown
    assert "| reference (its own samples) | 0 | 0.465 | 0.95 |  |  |" in markdown
    fpo = markdown.index("| fpo | 3 | 0.35 ± 0 (2) | 0.9 ± 0 (2) | 300 ± 0.707 (2) | 6 ± 0 (2) |")
    assert fpo < markdown.index("| dpo | 3 | 0.35 ± 0 (2) |")  # the baseline first
