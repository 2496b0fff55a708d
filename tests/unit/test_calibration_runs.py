"""The runs behind fpo-calibrate without training (fpo.calibration.runs, plan, report): one
job per knob value in a folder named after it, finished runs read and never rerun, only the
validation metrics read, the knob map and the checks on the composed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpo.calibration.knobs import SPAN, VAL_KL, VAL_SCORE, Knob, load_knobs
from fpo.calibration.report import build_report, markdown
from fpo.calibration.runs import Runner, format_knob
from fpo.calibration.search import Tolerance, calibrate_target
from fpo.commands.calibrate_plan import make_plan
from fpo.errors import UserError
from fpo.sweep import STATUS_FILE
from fpo.testing import PRESETS, compose_train


def fake_job(curve, status: str = "finished", with_validation: bool = True):
    """A launcher standing in for ``fpo-train -m``: writes the job's status and metrics
    (the test KL deliberately different from the validation KL)."""
    launched = []

    def launch(command: list[str]) -> int:
        launched.append(command)
        knob_arg = next(a for a in command if a.startswith("optimizer.lr="))
        value = float(knob_arg.split("=", 1)[1])
        folder = next(a for a in command if a.startswith("hydra.sweep.dir="))
        run_dir = Path(folder.split("=", 1)[1].strip("'")) / "run"
        run_dir.mkdir(parents=True)
        metrics = {"eval/kl": 100.0 + curve(value), "eval/policy_judge_mean": -1.0}
        if with_validation:
            metrics |= {VAL_KL: curve(value), VAL_SCORE: 0.5}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        (run_dir / STATUS_FILE).write_text(json.dumps({"status": status, "error": "boom"}))
        return 0 if status == "finished" else 1

    return launch, launched


def curve(lr: float) -> float:
    return 22.0 * (lr / 1e-5) ** 1.3


def test_each_value_runs_once_in_its_folder_and_finished_runs_are_read(tmp_path):
    launch, launched = fake_job(curve)
    runner = Runner(tmp_path, "optimizer.lr", ["experiment=x", "seed=0"], launcher=launch)
    first = calibrate_target(runner.measure, 3.0, 1e-7, 1e-5, max_runs=10)
    assert len(launched) == len(first.new_runs) == len(runner.points) > 2
    command = launched[0]
    assert command[1:5] == ["-m", "fpo.commands.train", "-m", "experiment=x"]
    assert "optimizer.lr=1e-07" in command and "hydra.sweep.subdir=run" in command
    assert "++evaluation.validation_only=true" in command  # no test prompt is sampled
    assert f"hydra.sweep.dir='{tmp_path / 'optimizer.lr=1e-07'}'" in command
    # only the validation metrics enter: the test KL (100 + KL) never does
    assert runner.points[1e-7].val_kl == curve(1e-7) and runner.points[1e-7].val_score == 0.5
    # a new command finds the finished runs and runs none of them again
    relaunch, relaunched = fake_job(curve)
    again = Runner(tmp_path, "optimizer.lr", ["experiment=x", "seed=0"], launcher=relaunch)
    assert set(again.finished()) == set(runner.points)
    known = {k: p.val_kl for k, p in again.points.items()}
    redone = calibrate_target(again.measure, 3.0, 1e-7, 1e-5, known=known, max_runs=10)
    assert relaunched == [] and redone.seed_knobs == first.seed_knobs
    # measuring a finished value reads it too, with or without finished() first
    fresh = Runner(tmp_path, "optimizer.lr", [], launcher=relaunch)
    assert fresh.measure(1e-7) == curve(1e-7) and relaunched == []
    # runs of another knob in the same folder are not taken for this one's
    assert Runner(tmp_path, "objective.beta", []).finished() == {}


def test_an_unfinished_run_is_launched_again_and_a_failed_one_stops_with_its_error(tmp_path):
    (tmp_path / "optimizer.lr=1e-06" / "run").mkdir(parents=True)
    (tmp_path / "optimizer.lr=1e-06" / "run" / STATUS_FILE).write_text('{"status": "running"}')
    launch, launched = fake_job(curve, status="failed")
    runner = Runner(tmp_path, "optimizer.lr", [], launcher=launch)
    assert runner.finished() == {}  # interrupted: not read
    with pytest.raises(UserError, match=r"did not finish \(boom\)"):
        runner.measure(2e-6)
    assert len(launched) == 1


def test_a_run_without_validation_metrics_is_a_user_error(tmp_path):
    launch, _ = fake_job(curve, with_validation=False)
    runner = Runner(tmp_path, "optimizer.lr", [], launcher=launch)
    with pytest.raises(UserError, match=r"no val/sampled/kl.*validation.prompts_file"):
        runner.measure(1e-6)


def test_knob_values_round_trip_through_folder_names():
    for value in (1e-05, 0.0001, 3.0, 0.316, 2.65e-06):
        assert float(format_knob(value)) == value


def test_every_preset_names_a_knob_that_its_protocol_config_has():
    knobs = load_knobs()
    assert set(knobs) == set(PRESETS)
    assert knobs["simpo"] == Knob("optimizer.lr", increases_kl=True)
    assert knobs["fpo"] == Knob("objective.constraints.features.alpha", increases_kl=False)
    for name in ("dpo", "tdpo1", "tdpo2"):
        assert knobs[name] == Knob("objective.beta", increases_kl=False)
    for name, knob in knobs.items():
        cfg = compose_train(f"experiment=matched_kl/{name}")
        assert cfg.objective.name == name
        value = cfg
        for part in knob.key.split("."):
            value = value[part]
        assert isinstance(value, float) and value > 0, (name, knob.key)


def test_plan_defaults_and_checks(tmp_path):
    common = [f"paths.log_dir={tmp_path}", "experiment=matched_kl/fpo"]
    plan = make_plan(common, seed=0)
    assert plan.knob.key == "objective.constraints.features.alpha"
    assert (plan.low, plan.high) == pytest.approx((1e-4 / SPAN, 1e-4 * SPAN))
    assert plan.series_dir.parent == tmp_path / "matched_kl" / "calibration" / "fpo"
    assert make_plan(common, seed=0).series_dir == plan.series_dir  # same command, same runs
    assert make_plan(common, seed=1).series_dir != plan.series_dir
    assert make_plan(common, seed=0, knob="objective.beta").knob == Knob("objective.beta")
    refusals = {
        "needs evaluation.validation.prompts_file": (["experiment=smoke"], {}),
        "sweeps hydra.sweeper.params": (["experiment=comparison/frontier_dpo"], {}),
        "no such key": (common, {"knob": "objective.betta"}),
        "--seed N": ([*common, "seed=3"], {}),
        "has no strength knob": ([*common, "objective.name=mine"], {}),
        "drop it from the overrides": ([*common, "objective.constraints.features.alpha=1"], {}),
        "0 < low < high": (common, {"low": 1e-3, "high": 1e-4}),
    }
    for message, (overrides, options) in refusals.items():
        with pytest.raises(UserError, match=message):
            make_plan(overrides, seed=0, **options)


def test_a_reached_target_with_no_run_under_it_names_the_end_to_move(tmp_path):
    """KL levels off at 3.1 (over the target 3, within its tolerance): the target is reached,
    but no seed's two runs could straddle it, so the report names the side to widen."""
    launch, _ = fake_job(lambda lr: max(3.1, curve(lr)))
    plan = make_plan(
        [f"paths.log_dir={tmp_path}", "experiment=matched_kl/simpo"], seed=0, low=1e-7, high=1e-5
    )
    runner = Runner(plan.series_dir, plan.knob.key, plan.overrides, launcher=launch)
    result = calibrate_target(runner.measure, 3.0, plan.low, plan.high, max_runs=10)
    report = build_report(
        plan, [result], runner.points, tolerance=Tolerance(), max_runs=10, seeds=[1],
        command="fpo-calibrate ...",
    )  # fmt: skip
    (target,) = report["targets"]
    assert target["status"] == "converged" and target["below"] is None
    assert target["finding"].endswith(
        "; no run under 3 in [1e-07, 1e-05] (lower --low to reach it)"
    )
    assert report["seed_command"] is None


def test_report_names_unreachable_targets_and_the_seed_command(tmp_path):
    launch, _ = fake_job(curve)
    plan = make_plan(
        [f"paths.log_dir={tmp_path}", "experiment=matched_kl/simpo"], seed=0, low=1e-7, high=1e-5
    )
    runner = Runner(plan.series_dir, plan.knob.key, plan.overrides, launcher=launch)
    results = [
        calibrate_target(runner.measure, t, plan.low, plan.high, max_runs=10) for t in (3.0, 40.0)
    ]
    report = build_report(
        plan, results, runner.points, tolerance=Tolerance(), max_runs=10, seeds=[1, 2],
        command="fpo-calibrate ...",
    )  # fmt: skip
    reached, unreachable = report["targets"]
    assert reached["status"] == "converged" and reached["chosen"]["val_kl"] == pytest.approx(3, 0.1)
    assert reached["seed_knobs"] == [reached["below"]["knob"], reached["above"]["knob"]]
    assert unreachable["finding"] == (
        "unreachable within [1e-07, 1e-05]: KL range measured [0.0553, 22] (raise --high to "
        "reach it)"
    )
    assert unreachable["seed_knobs"] is None
    assert ";" not in reached["finding"]  # runs on both sides: nothing to widen
    values = ",".join(format_knob(v) for v in sorted(reached["seed_knobs"]))
    assert report["seed_command"] == (
        f"fpo-train -m paths.log_dir={tmp_path} experiment=matched_kl/simpo "
        f"optimizer.lr={values} seed=1,2"
    )
    text = markdown(report)
    assert "| 40 | unreachable | - |" in text and report["seed_command"] in text
    assert all("eval/" not in json.dumps(p) for p in report["points"])


def test_a_report_rewritten_from_finished_runs_is_the_same(tmp_path):
    """A second invocation that finds every run finished (the study calls ``fpo-calibrate``
    again on each restart) writes the same report: nothing in it counts one invocation's
    runs, and the markdown counts the series' runs."""
    launch, launched = fake_job(curve)
    plan = make_plan(
        [f"paths.log_dir={tmp_path}", "experiment=matched_kl/simpo"], seed=0, low=1e-7, high=1e-5
    )

    def invocation() -> dict:
        runner = Runner(plan.series_dir, plan.knob.key, plan.overrides, launcher=launch)
        runner.finished()
        results = []
        for target in (3.0, 6.0):
            known = {k: p.val_kl for k, p in runner.points.items()}
            results.append(
                calibrate_target(runner.measure, target, plan.low, plan.high, known=known)
            )
        return build_report(
            plan, results, runner.points, tolerance=Tolerance(), max_runs=6, seeds=[1],
            command="fpo-calibrate ...",
        )  # fmt: skip

    first = invocation()
    count = len(launched)
    assert invocation() == first and len(launched) == count > 2
    assert f"new runs per target in each invocation; {count} runs in all" in markdown(first)
