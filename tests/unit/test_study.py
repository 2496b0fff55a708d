"""fpo-study (fpo.study.comparison): the validation-only selection rule and the commands it
derives."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def comparison():
    return importlib.import_module("fpo.study.comparison")


def job(beta: str, score: float, kl: float, test_score: float = 0.0) -> dict:
    return {
        "overrides": [f"objective.beta={beta}", "experiment=comparison/frontier_dpo"],
        "metrics": {
            "val/sampled/policy_judge_mean": score,
            "val/sampled/kl": kl,
            "eval/policy_judge_mean": test_score,
        },
    }


def test_choose_takes_the_best_validation_score_within_the_kl_budget(comparison):
    budget = comparison.KL_BUDGET
    candidates = [job("0.03", 0.9, budget + 5), job("0.1", 0.7, budget), job("0.3", 0.5, 1.0)]
    best, reason = comparison.choose(candidates)
    assert best["overrides"][0] == "objective.beta=0.1"
    assert "highest validation judge score" in reason


def test_choose_never_reads_test_numbers(comparison):
    """A candidate that is best on the test prompts but not on validation is not chosen."""
    candidates = [job("0.1", 0.6, 1.0, test_score=0.1), job("0.3", 0.5, 1.0, test_score=0.99)]
    best, _ = comparison.choose(candidates)
    assert best["overrides"][0] == "objective.beta=0.1"


def test_choose_falls_back_to_the_lowest_kl(comparison):
    over = comparison.KL_BUDGET + 1
    best, reason = comparison.choose([job("0.03", 0.9, over + 2), job("0.3", 0.5, over)])
    assert best["overrides"][0] == "objective.beta=0.3"
    assert "lowest validation KL" in reason


SELECTION = {
    name: {"experiment": f"frontier_{name}", "overrides": ["objective.beta=0.1"]}
    for name in ("fpo", "dpo", "simpo", "tdpo1", "tdpo2")
}


def test_seed_runs_share_the_grid_runs_config(comparison):
    """Seeds 1 and 2 run in the chosen point's own frontier experiment with the same
    objective overrides, so fpo-compare groups them with the seed-0 grid run."""
    commands = comparison.seed_commands(SELECTION)
    assert commands["seeds_tdpo1"] == [
        "experiment=comparison/frontier_tdpo1",
        "objective.beta=0.1",
        "seed=1,2",
        "sweep.name=seeds_tdpo1",
    ]


def test_ablations_wait_for_the_selection_and_each_has_its_folder(comparison):
    assert comparison.ablation_commands({"fpo": SELECTION["fpo"]}) == {}
    commands = comparison.ablation_commands(SELECTION)
    assert {c[-1] for c in commands.values()} == {f"sweep.name={n}" for n in commands}
    assert "objective.constraints.features.alpha=0" in commands["ablation_alpha0"]
    for name, command in commands.items():
        assert command[0].startswith("experiment=comparison/frontier_"), name
        assert "objective.beta=0.1" in command, name


def test_a_frontier_counts_as_complete_only_with_all_its_grid_points(comparison):
    """Selection waits for every grid point, also one whose job never started."""
    assert comparison.expected_jobs("frontier_dpo") == 3
    assert comparison.expected_jobs("frontier_simpo_gamma") == 1
    assert sum(comparison.expected_jobs(e) for e in comparison.frontier_commands()) == 16


def test_the_chosen_points_table_averages_that_points_seeds_only(comparison, monkeypatch):
    from types import SimpleNamespace

    def run(beta: str, seed: int, score: float, sweep: str | None = None):
        overrides = {"experiment": "comparison/frontier_fpo", "objective.beta": beta}
        if sweep:
            overrides["sweep.name"] = sweep
        return SimpleNamespace(overrides=overrides, row={"seed": seed, "judge_score": score})

    runs = [
        run("0.1", 0, 0.5),
        run("0.3", 0, 0.9),  # another grid point: not averaged in
        run("0.1", 1, 0.6, "seeds_fpo"),
        run("0.1", 2, 0.7, "seeds_fpo"),
    ]
    monkeypatch.setattr(comparison, "run_rows", lambda rs: [r.row for r in rs])
    selection = {"fpo": {"experiment": "frontier_fpo", "overrides": ["objective.beta=0.1"]}}
    table = comparison.chosen_table(runs, selection)
    (line,) = [row for row in table.splitlines() if row.startswith("| fpo")]
    assert "| 0,1,2 | 0.600 ± 0.058 |" in line
