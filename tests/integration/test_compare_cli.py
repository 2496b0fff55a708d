"""fpo-compare over a real smoke multirun: 2 objectives x 2 seeds, with the evaluation."""

from __future__ import annotations

import csv

from fpo.testing import ROOT, run_module


def test_compare_a_smoke_multirun(tmp_path):
    trained = run_module(
        "fpo.commands.train",
        "--multirun",
        f"paths.log_dir={tmp_path}",
        "experiment=smoke",
        "objective=dpo,fpo",
        "seed=0,1",
        "trainer.max_epochs=1",
        "evaluation=sentiment",
        f"evaluation.prompts_file={ROOT}/tests/fixtures/plain_pairs.jsonl",
        "evaluation.num_prompts=3",
        "evaluation.max_new_tokens=4",
        f"evaluation.latest_dir={tmp_path}/latest",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    (sweep,) = (tmp_path / "smoke" / "multiruns").iterdir()

    out = tmp_path / "comparison"
    compared = run_module("fpo.compare", str(sweep), "--out", str(out))
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "compared 4 runs in 2 configurations" in compared.stdout
    assert "placeholder" not in compared.stdout

    with (out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    configs = {row["objective"]: row for row in rows if row["level"] == "config"}
    assert set(configs) == {"dpo", "fpo"}
    for row in configs.values():
        assert row["n"] == "2" and row["seed"] == "0,1" and row["judge"] == "vader-compound"
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and row["accuracy_stderr"] != ""
        assert row["kl"] != "" and row["win_rate"] != "" and row["tokens_per_sec"] != ""
    alpha = "objective.constraints.features.alpha"
    assert float(configs["fpo"][alpha]) == 0.5 and float(configs["dpo"][alpha]) == 0.0
    for name in ("frontier.png", "curves.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name

    # At matched KL: one knob value per objective brackets no target but its own KL.
    matched = run_module("fpo.compare", str(sweep), "--out", str(out), "--at-kl", "0.5,1e6")
    assert matched.returncode == 0, matched.stderr[-3000:]
    with (out / "matched_kl.csv").open() as handle:
        cells = list(csv.DictReader(handle))
    assert {(row["objective"], row["target_kl"]) for row in cells} >= {("fpo", "1000000.0")}
    assert all(row["note"].startswith("outside measured KL range") for row in cells)

    missing = run_module("fpo.compare", str(tmp_path / "nowhere"), "--out", str(out))
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    assert "Traceback" not in missing.stderr
