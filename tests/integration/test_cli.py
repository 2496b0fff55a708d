"""`fpo-train` as a user runs it: Hydra composition, multirun, and user errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import fpo.objective  # noqa: F401  (registers objective_schema, the presets' base)
from fpo.commands.common import CONFIG_DIR
from fpo.testing import ROOT, run_module

OBJECTIVES = ["dpo", "simpo", "tdpo1", "tdpo2", "fpo"]


def run_train(
    tmp_path: Path, *overrides: str, multirun: bool = False
) -> subprocess.CompletedProcess:
    multi = ["--multirun"] if multirun else []
    return run_module("fpo.commands.train", *multi, f"paths.log_dir={tmp_path}", *overrides)


def test_smoke_multirun_all_objectives(tmp_path):
    result = run_train(
        tmp_path, "experiment=smoke", f"objective={','.join(OBJECTIVES)}", multirun=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "smoke" / "multiruns").glob("*/*") if p.is_dir())
    assert len(runs) == 5, runs
    for run, name in zip(runs, OBJECTIVES, strict=True):
        assert run.name.endswith(f"objective={name}"), run
        metrics = json.loads((run / "metrics.json").read_text())
        assert 0.0 <= metrics["val/rewards/accuracies"] <= 1.0
        assert metrics["train/loss"] > 0
        assert list(run.glob("csv/version_0/metrics.csv")), "CSV logger wrote nothing"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["objective=nonsense"], "'nonsense' is not an option of the config group objective"),
        (
            ["data.train_source=/nowhere/pairs.jsonl"],
            "/nowhere/pairs.jsonl",
        ),
        (["+sae.loader.d_in=16"], "d_in=16, but the model Gemma3ForCausalLM has hidden size 32"),
        (["objective.margin=orpo"], "orpo"),
        (["objective.bta=0.1"], "Did you mean objective.beta=0.1?"),
        (["objective=tdpo2", "reference=cached"], "use reference=online"),
        (["objective.constraints.features.k=500"], "features.k=500"),
        # internal files are no options: the objective schema, the shared bases
        (["objective=schema"], "'schema' is not an option of the config group objective"),
        (
            ["objective=objective_schema"],
            "'objective_schema' is not an option of the config",
        ),
        (["data=_base"], "'_base' is not an option of the config group data"),
        (["data=data_base"], "'data_base' is not an option of the config group data"),
        (
            ["hparams_search=_optuna"],
            "'_optuna' is not an option of the config group",
        ),
        (["trainer=default"], "'default' is not an option of the config group trainer"),
        (["trainer=trainer_base"], "'trainer_base' is not an option of the config group trainer"),
        (["callbacks=checkpoint"], "'checkpoint' is not an option of the config group callbacks"),
    ],
)
def test_user_errors_are_one_paragraph(tmp_path, overrides, expected):
    result = run_train(tmp_path, "experiment=smoke", "objective=fpo", *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "use +" not in result.stderr, result.stderr[-2000:]  # Hydra's advice, which fails later


def test_a_sweep_that_does_not_compose_leaves_no_folder(tmp_path):
    """A misspelt option among a sweep's values: the closest option, exit 2, and the sweep
    folder made before the jobs' configs were composed is removed again."""
    result = run_train(tmp_path, "experiment=smoke", "objective=dpo,fpoo", multirun=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Did you mean objective=dpo,fpo?" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not list(tmp_path.iterdir()), list(tmp_path.rglob("*"))


def test_new_combinations_train_in_the_smoke_setup(tmp_path):
    """SimPO and DPO margins with FPO's feature term, with and without TDPO's token KL."""
    result = run_train(
        tmp_path,
        "experiment=smoke",
        "objective=simpo,dpo",
        "objective.constraints.features.alpha=0.5",
        "objective.constraints.token_kl.alpha=0,0.5",
        multirun=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "smoke" / "multiruns").glob("*/*") if p.is_dir())
    assert len(runs) == 4, runs
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["train/fmse/rejected"] > 0, run.name
        assert ("train/kl/rejected" in metrics) == ("token_kl.alpha=0.5" in run.name), run.name


def test_bad_row_with_fail_policy_names_the_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    rows = [
        {"prompt": "Say hi", "chosen": "Hi there!", "rejected": "Go away."},
        {"prompt": "Say bye", "chosen": "Bye!", "rejected": "Bye!"},
    ]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_train(
        tmp_path,
        "experiment=smoke",
        "objective=simpo",
        "data=plain_fixture",
        f"data.train_source={bad}",
        "data.on_bad_row=fail",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "bad.jsonl" in result.stderr and "1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["train", "eval", "cache"])
def test_help_offers_only_real_options(command):
    """``fpo-train --help`` (and fpo-eval's, fpo-cache's) is the project's own: the five
    objectives, each group's options, the main commands; internal files (the objective
    schema, the bases of the data, trainer, callbacks and Optuna options) are no options."""
    result = run_module(f"fpo.commands.{command}", "--help", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith(f"fpo-{command}: "), out[:500]
    objectives = out.split("Objectives (objective=..., default fpo):\n")[1].split("\n\n")[0]
    assert [line.split()[0] for line in objectives.splitlines()] == OBJECTIVES
    assert f"Main commands:\n  fpo-{command} " in out
    assert "== Config ==" not in out and "_target_" not in out  # no composed config dump
    block = out.split("Config groups (group=option):\n")[1].split("\n\n")[0]
    offered = {
        group: set(options.split(", "))
        for group, options in (line.split(": ", 1) for line in block.splitlines())
    }
    assert set(offered) == {  # every group is a real choice; no folder of internal files
        "callbacks", "data", "debug", "evaluation", "experiment", "experiment/ablation",
        "experiment/comparison", "experiment/matched_kl", "hparams_search", "logger", "model",
        "objective", "optimizer", "paths", "reference", "sae", "scheduler", "trainer",
    }  # fmt: skip
    assert offered["objective"] == set(OBJECTIVES)
    assert offered["data"] == {
        "hh_rlhf",
        "plain_fixture",
        "sentiment",
        "ultrafeedback",
        "ultrafeedback_fixture",
    }
    assert offered["trainer"] == {"cpu", "gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"}
    assert offered["callbacks"] == {"default", "throughput", "none"}
    assert "_optuna" not in offered["hparams_search"] and "fpo_optuna" in offered["hparams_search"]
    assert offered["optimizer"] == {"adamw"} and offered["scheduler"] == {"constant_with_warmup"}
    internal = {"schema", "objective_schema", "_base", "data_base", "_optuna", "optuna_base"}
    assert not [o for options in offered.values() for o in options if o in internal]


CONFIG_GROUPS = {
    "objective": OBJECTIVES,
    "trainer": ["cpu", "gpu", "ddp"],
    "logger": ["csv", "wandb", "tensorboard", "many"],
    "data": ["ultrafeedback_fixture", "plain_fixture", "ultrafeedback", "hh_rlhf", "sentiment"],
    "model": ["tiny", "gemma2_2b", "gemma3_270m"],
    "debug": ["fdr", "limit"],
}


@pytest.mark.parametrize(
    "override", [f"{group}={name}" for group, names in CONFIG_GROUPS.items() for name in names]
)
def test_every_config_option_composes_and_resolves(override):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[override], return_hydra_config=False)
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg.objective, resolve=True)
    assert container["name"] in OBJECTIVES
    assert cfg.trainer._target_.endswith("Trainer")


def test_evaluation_after_fit_writes_summary_to_latest(tmp_path):
    """The main job's last stage, on the tiny model: summary.json, generations and plot."""
    latest = tmp_path / "latest"
    result = run_train(
        tmp_path,
        "experiment=smoke",
        "objective=simpo",
        "evaluation=sentiment",
        f"evaluation.prompts_file={ROOT}/tests/fixtures/plain_pairs.jsonl",
        "evaluation.num_prompts=3",
        "evaluation.max_new_tokens=4",
        f"evaluation.latest_dir={latest}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((latest / "summary.json").read_text())
    for key in ("policy_judge_mean", "reference_judge_mean", "win_rate", "kl"):
        assert isinstance(summary[key], float), key
    rows = [json.loads(line) for line in Path(summary["generations"]).read_text().splitlines()]
    assert len(rows) == 3
    assert all({"prompt", "policy", "reference"} <= set(row) for row in rows)
    assert Path(summary["plot"]).read_bytes().startswith(b"\x89PNG")
    assert Path(summary["generations"]).parent == latest.resolve()
