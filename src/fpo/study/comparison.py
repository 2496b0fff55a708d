"""The comparison of issue 10, end to end and resumable: FPO vs DPO, SimPO, TDPO-1, TDPO-2 on
the embedded sentiment task (gemma-3-270m, CPU). ``docs/results.md`` reports it.

    fpo-study [--stage export] [--dry-run]  # every stage or one; print the commands only

Stages (each command is a resumable ``fpo-train -m`` sweep: run the script again after an
interruption and finished jobs are skipped, an interrupted job resumes from its last.ckpt):

1. ``cache``: the offline reference caches (DPO log-probs; FPO log-probs + top-50 features).
2. ``frontier``: each objective's strength knob over a small grid, seed 0
   (``experiment=comparison/frontier_<objective>``).
3. ``select``: per objective, the grid point chosen on the VALIDATION prompts only (the rule
   is `choose`; written to ``docs/results/selection.json``).
4. ``seeds``: the chosen point of each objective with seeds 1 and 2 (seed 0 is the grid run).
5. ``ablations``: FPO's ablations at FPO's chosen beta (`ablation_commands`).
6. ``export``: ``fpo-compare`` tables and plots into ``docs/results/`` (main comparison and
   ablations), each run's test generations into ``docs/results/generations/`` and
   ``docs/results/runs.csv``. Runs that have not finished yet are simply absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from fpo.commands.common import user_errors
from fpo.compare import compare, load_runs, mean_stderr, run_rows, write_csv
from fpo.sweep import derive_sweep_name

ROOT = Path(__file__).resolve().parents[3]  # the repository: configs/, logs/, docs/results/

BIN = Path(sys.executable).parent
LOGS = ROOT / "logs"
SWEEPS = LOGS / "comparison" / "multiruns"
RESULTS = ROOT / "docs" / "results"
OBJECTIVES = ("dpo", "simpo", "tdpo1", "tdpo2", "fpo")
# Frontier sweeps per objective: the experiment configs (their hydra.sweeper.params).
FRONTIER = {
    "fpo": ["frontier_fpo"],
    "dpo": ["frontier_dpo"],
    "simpo": ["frontier_simpo", "frontier_simpo_gamma"],
    "tdpo2": ["frontier_tdpo2"],
    "tdpo1": ["frontier_tdpo1"],
}
# Selection rule, fixed before any comparison run: the highest validation judge score
# (VADER) among grid points whose validation KL(policy || reference) is at most this many
# nats per 24-token completion; when none is, the point with the lowest validation KL.
KL_BUDGET = 3.0
SELECT_SCORE = "val/sampled/policy_judge_mean"
SELECT_KL = "val/sampled/kl"
FPO_CACHE = "${paths.cache_dir}/reference/${model.name}/${hydra:runtime.choices.data}/fpo"


def sweep_dir(overrides: list[str]) -> Path:
    """Where ``fpo-train -m <overrides>`` keeps its jobs (`fpo.sweep`)."""
    named = [o.split("=", 1)[1] for o in overrides if o.startswith("sweep.name=")]
    return SWEEPS / (named[0] if named else derive_sweep_name(overrides))


def frontier_commands() -> dict[str, list[str]]:
    """``{label: overrides}`` of the frontier sweeps."""
    return {
        name: [f"experiment=comparison/{name}"]
        for experiments in FRONTIER.values()
        for name in experiments
    }


def expected_jobs(experiment: str) -> int:
    """How many jobs ``experiment=comparison/<experiment>`` sweeps: the product of its own
    ``hydra.sweeper.params`` value lists (each frontier file states all of its params)."""
    path = ROOT / "configs" / "experiment" / "comparison" / f"{experiment}.yaml"
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    return math.prod(len(str(values).split(",")) for values in params.values())


def finished_jobs(overrides: list[str]) -> list[dict]:
    """The finished jobs of a sweep: their job_status.json plus ``experiment``."""
    jobs = []
    for path in sorted(sweep_dir(overrides).glob("*/job_status.json")):
        status = json.loads(path.read_text())
        if status.get("status") == "finished":
            jobs.append(status)
    return jobs


def choose(candidates: list[dict]) -> tuple[dict, str]:
    """The selection rule (see KL_BUDGET) over ``{"metrics": {...}}`` job records."""
    within = [c for c in candidates if c["metrics"][SELECT_KL] <= KL_BUDGET]
    if within:
        best = max(within, key=lambda c: c["metrics"][SELECT_SCORE])
        return best, f"highest validation judge score with validation KL <= {KL_BUDGET}"
    best = min(candidates, key=lambda c: c["metrics"][SELECT_KL])
    return best, f"no grid point has validation KL <= {KL_BUDGET}: the lowest validation KL"


def objective_overrides(job: dict) -> list[str]:
    """The swept ``objective.*`` overrides of a frontier job."""
    return [o for o in job["overrides"] if o.startswith("objective.")]


def select() -> dict[str, dict]:
    """Choose each objective's point on its frontier (validation only); write selection.json.
    Objectives whose frontier is not complete yet are left out."""
    selection = {}
    for objective, experiments in FRONTIER.items():
        candidates, complete = [], True
        for experiment in experiments:
            command = [f"experiment=comparison/{experiment}"]
            jobs = finished_jobs(command)
            complete &= len(jobs) == expected_jobs(experiment)
            candidates += [{**job, "experiment": experiment} for job in jobs]
        if not complete or not candidates:
            print(f"select: {objective}'s frontier is not finished yet; skipped")
            continue
        best, reason = choose(candidates)
        selection[objective] = {
            "experiment": best["experiment"],
            "overrides": objective_overrides(best),
            "rule": reason,
            "validation": {k: best["metrics"][k] for k in (SELECT_SCORE, SELECT_KL)},
            "candidates": [
                {
                    "experiment": c["experiment"],
                    "overrides": objective_overrides(c),
                    **{k: c["metrics"][k] for k in (SELECT_SCORE, SELECT_KL)},
                }
                for c in candidates
            ],
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return selection


def load_selection() -> dict[str, dict]:
    path = RESULTS / "selection.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def seed_commands(selection: dict[str, dict]) -> dict[str, list[str]]:
    """Seeds 1 and 2 at each chosen point, in the frontier experiment of that point (the
    same config as its seed-0 grid run, so fpo-compare groups the three)."""
    return {
        f"seeds_{objective}": [
            f"experiment=comparison/{chosen['experiment']}",
            *chosen["overrides"],
            "seed=1,2",
            f"sweep.name=seeds_{objective}",
        ]
        for objective, chosen in selection.items()
    }


def ablation_commands(selection: dict[str, dict]) -> dict[str, list[str]]:
    """FPO's ablations at FPO's chosen beta (needs FPO, DPO and SimPO selected).

    alpha is in squared feature units (1e-4 for the shipped layer-17 SAE, the embedded
    default); DPO's margin is a sum over ~24 response tokens where FPO's and SimPO's are
    per-token means, so the DPO+features run scales alpha by 24 to weigh the term alike.
    ``normalize=true`` divides D by the reference's pooled feature energy over the top-k
    union (~3e5 for this SAE), so alpha 30 there is about alpha 1e-4 raw.

    In order of the issue's list (the scale-free term's runs last): a sitting that ends
    mid-way has run what the ablation table needs most.
    """
    if not {"fpo", "dpo", "simpo"} <= set(selection):
        return {}
    fpo = ["experiment=comparison/frontier_fpo", *selection["fpo"]["overrides"]]
    features = "objective.constraints.features"
    cached = f"reference.path={FPO_CACHE}"  # top-50 features + log-probs serve DPO and SimPO
    commands = {
        "ablation_alpha0": [*fpo, f"{features}.alpha=0"],
        "ablation_stopgrad_off": [*fpo, f"{features}.stop_gradient=false"],
        "ablation_k": [*fpo, "reference=online", f"{features}.k=16,128"],
        "ablation_dpo_features": [
            f"experiment=comparison/{selection['dpo']['experiment']}",
            *selection["dpo"]["overrides"],
            cached,
            f"{features}.alpha=2.4e-3",
            f"{features}.k=50",
        ],
        "ablation_simpo_features": [
            f"experiment=comparison/{selection['simpo']['experiment']}",
            *selection["simpo"]["overrides"],
            cached,
            f"{features}.alpha=1e-4",
            f"{features}.k=50",
        ],
        "ablation_layer11": [*fpo, "reference=online", "sae=gemma3_270m_l11"],
        "ablation_normalized": [*fpo, f"{features}.normalize=true", f"{features}.alpha=10,30"],
        "ablation_layer11_normalized": [
            *fpo,
            "reference=online",
            "sae=gemma3_270m_l11",
            f"{features}.normalize=true",
            f"{features}.alpha=30",
        ],
    }
    return {name: [*overrides, f"sweep.name={name}"] for name, overrides in commands.items()}


def run(command: list[str], dry_run: bool) -> int:
    print("$", " ".join(command), flush=True)
    if dry_run:
        return 0
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def run_sweeps(commands: dict[str, list[str]], dry_run: bool) -> None:
    for label, overrides in commands.items():
        code = run([str(BIN / "fpo-train"), "-m", *overrides], dry_run)
        if code:
            print(f"{label}: exit {code} (failed jobs are in {sweep_dir(overrides)})", flush=True)


def all_sweeps() -> dict[str, Path]:
    """``{label: sweep folder}`` of every stage's sweeps that exist."""
    selection = load_selection()
    commands = {
        **frontier_commands(),
        **seed_commands(selection),
        **ablation_commands(selection),
    }
    found = {label: sweep_dir(overrides) for label, overrides in commands.items()}
    return {label: path for label, path in found.items() if path.is_dir()}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=,.+-]+", "_", text).strip("_")


RUN_COLUMNS = [
    "run",
    "objective",
    "config",
    "seed",
    "judge_score",
    "judge_score_stderr",
    "reference_judge_score",
    "win_rate",
    "win_rate_stderr",
    "kl",
    "kl_stderr",
    "eval:judges/afinn/policy_judge_mean",
    "eval:judges/afinn/reference_judge_mean",
    "eval:judges/afinn/win_rate",
    "entropy",
    "preference_accuracy",
    "eval:implicit_reward_accuracy",
    "feature_drift",
    "eval:validation/policy_judge_mean",
    "eval:validation/kl",
    "wall_seconds",
    "fit_cpu_seconds",
    "peak_memory_gb",
    "tokens_per_sec",
]


#: The chosen points' table (docs/results/chosen.md): (column, heading, format).
CHOSEN_COLUMNS = [
    ("judge_score", "test VADER", "{:.3f}"),
    ("kl", "test KL", "{:.2f}"),
    ("win_rate", "win rate", "{:.3f}"),
    ("eval:judges/afinn/policy_judge_mean", "AFINN", "{:.2f}"),
    ("preference_accuracy", "held-out pref. acc.", "{:.3f}"),
    ("feature_drift", "feature drift", "{:,.0f}"),
    ("wall_seconds", "wall s", "{:.0f}"),
    ("peak_memory_gb", "peak GB", "{:.2f}"),
]


def is_chosen(run, chosen: dict) -> bool:
    """Whether ``run`` is at ``chosen``'s point (its experiment and objective overrides)."""
    wanted = dict(o.split("=", 1) for o in chosen["overrides"])
    wanted["experiment"] = f"comparison/{chosen['experiment']}"
    return all(run.overrides.get(key) == value for key, value in wanted.items())


def chosen_table(runs: list, selection: dict[str, dict]) -> str:
    """Markdown: each objective's chosen point, mean ± standard error over its seeds (test
    prompts), with the seeds it has so far."""
    head = ["objective", "point", "seeds", *(title for _, title, _ in CHOSEN_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for objective, chosen in selection.items():
        rows = [row for run in runs if is_chosen(run, chosen) for row in run_rows([run])]
        rows = [row for row in rows if row.get("judge_score") is not None]
        if not rows:
            continue
        cells = [objective, " ".join(chosen["overrides"]), ",".join(str(r["seed"]) for r in rows)]
        for column, _, fmt in CHOSEN_COLUMNS:
            mean, stderr = mean_stderr([r[column] for r in rows if r.get(column) is not None])
            text = "" if mean is None else fmt.format(mean)
            cells.append(text + (f" ± {fmt.format(stderr)}" if stderr is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def export() -> None:
    """Tables, plots, generations and runs.csv from whatever has finished."""
    sweeps = all_sweeps()
    main = [p for label, p in sweeps.items() if not label.startswith("ablation_")]
    if not main:
        print("export: no sweep has run yet")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = compare(main, RESULTS)
    print(f"export: {report['runs']} runs in {report['configurations']} configurations")
    ablations = [p for label, p in sweeps.items() if label.startswith("ablation_")]
    fpo_frontier = [p for label, p in sweeps.items() if label in ("frontier_fpo", "seeds_fpo")]
    if ablations:
        report = compare([*fpo_frontier, *ablations], RESULTS / "ablations")
        print(f"export: ablations {report['runs']} runs in {report['configurations']} configs")
    rows = []
    generations = RESULTS / "generations"
    generations.mkdir(exist_ok=True)
    for run in load_runs(list(sweeps.values())):
        source = run.path / "evaluation" / "generations.jsonl"
        if not source.is_file():
            continue
        # a path-valued override (reference.path=...) nests the run's folder in its sweep's
        where = run.path.resolve()
        label, path = next((k, p) for k, p in sweeps.items() if p.resolve() in where.parents)
        name = _slug(f"{label}__{where.relative_to(path.resolve())}")
        with source.open() as handle, (generations / f"{name}.jsonl").open("w") as out:
            for line in handle:
                row = json.loads(line)
                keep = {k: row[k] for k in ("prompt", "policy", "reference")}
                out.write(json.dumps(keep, ensure_ascii=False) + "\n")
        (row,) = run_rows([run])
        rows.append({**row, "run": name})
    write_csv(sorted(rows, key=lambda r: r["run"]), RESULTS / "runs.csv", RUN_COLUMNS)
    print(f"export: {len(rows)} runs' generations in {generations} and {RESULTS / 'runs.csv'}")
    selection = load_selection()
    if selection:
        table = chosen_table(load_runs(main), selection)
        (RESULTS / "chosen.md").write_text(
            "# The chosen points over seeds (test prompts)\n\n"
            "Mean ± standard error over the seeds listed (sample std / sqrt(n)); seed 0 is "
            "the frontier run. Chosen on validation (selection.json).\n\n" + table
        )
        print(f"export: the chosen points over seeds in {RESULTS / 'chosen.md'}")


def main() -> None:
    """``fpo-study``; a user error (e.g. a folder with no runs) as one paragraph, exit 2."""
    with user_errors():
        run_study()


def run_study() -> None:
    from fpo.study import matched_kl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    stages = ["cache", "frontier", "select", "seeds", "ablations", "export"]
    protocols = "comparison (default): protocol 1; matched_kl: protocol 2 (fpo.study.matched_kl)"
    parser.add_argument("--protocol", choices=["comparison", "matched_kl"], help=protocols)
    parser.add_argument("--stage", choices=[*stages, *matched_kl.STAGES, "all"], default="all")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args()
    if args.protocol == "matched_kl":
        if args.stage not in (*matched_kl.STAGES, "all"):
            parser.error(f"--protocol matched_kl has the stages {', '.join(matched_kl.STAGES)}")
        matched_kl.main(args.stage, args.dry_run)
        return
    if args.stage not in (*stages, "all"):
        parser.error(f"--protocol comparison has the stages {', '.join(stages)}")
    todo = stages if args.stage == "all" else [args.stage]
    if "cache" in todo:
        for objective in ("dpo", "fpo"):
            cache = ["experiment=comparison/sentiment", f"objective={objective}"]
            run([str(BIN / "fpo-cache"), *cache], args.dry_run)
    if "frontier" in todo:
        run_sweeps(frontier_commands(), args.dry_run)
    if "select" in todo and not args.dry_run:
        for objective, chosen in select().items():
            print(f"select: {objective}: {chosen['experiment']} {chosen['overrides']}")
    if "seeds" in todo:
        run_sweeps(seed_commands(load_selection()), args.dry_run)
    if "ablations" in todo:
        run_sweeps(ablation_commands(load_selection()), args.dry_run)
    if "export" in todo and not args.dry_run:
        export()


if __name__ == "__main__":
    main()
