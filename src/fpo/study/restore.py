"""Protocol 2 on a fresh machine: rebuild the study's records under ``logs/`` from its
committed export, so that ``fpo-study --protocol matched_kl`` goes on where the last export
stopped instead of starting again.

``logs/`` is not committed (checkpoints, caches, run folders stay on the machine that made
them); the export is (``docs/results/matched_kl/``). It holds what the later stages read:
each objective's calibration report (which knob values the seeds run) and, for every
finished seed run, its row of ``runs.csv`` and every sample of both test sets. From them
:func:`restore` writes what is missing:

- ``calibration.{json,md}`` into each objective's calibration series folder;
- per exported seed run, its job folder in its seed sweep: ``.hydra/config.yaml`` and
  ``overrides.yaml`` (the config ``fpo-train`` composes from the job's overrides, read off
  its folder name), ``metrics.json`` (the numbers of its ``runs.csv`` row under the metric
  names they were read from, plus :data:`RESTORED`), ``evaluation/[ood_test/]
  generations.jsonl`` (the exported samples, as written), ``evaluation/[ood_test/]
  summary.json`` (the degeneration metrics recomputed from those samples: they are plain
  functions of the prompts and texts) and ``job_status.json`` (finished: the seed sweep
  skips the job).

``compare`` then reads a restored run like any other (per-sample KL and scores from the
generations, degeneration from the summaries, cost and the run table's columns from the
metrics), and ``export`` keeps its committed ``runs.csv`` row as it is.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import fpo.objective  # noqa: F401  (registers objective/schema, which the presets extend)
from fpo.commands.common import CONFIG_DIR
from fpo.compare.table import EVAL_METRICS, EXTRA, TRAIN_METRICS
from fpo.errors import UserError
from fpo.evaluation.degeneration import degeneration_metrics
from fpo.evaluation.report import read_generations
from fpo.sweep import STATUS_FILE

RESTORED = "run/restored_from"  # metrics.json key: the export the run folder was rebuilt from
CPU_COUNT = ("cpu_count", "run/cpu_count")  # a runs.csv column beyond TRAIN_METRICS
# the study's test sets: export folder -> evaluation/<subfolder> (None: evaluation/ itself,
# the main test set), also fpo-compare's --split
TEST_SETS = {"test": None, "ood_test": "ood_test"}


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    """The committed ``runs.csv`` rows by run name (``<sweep>__<job>``); ``{}`` without one."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


def job_overrides(job: str) -> tuple[int, list[str]]:
    """A job folder's number and overrides: ``3_optimizer.lr=2e-06,seed=4`` ->
    ``(3, ["optimizer.lr=2e-06", "seed=4"])`` (``hydra.sweep.subdir``: the job number, then
    ``override_dirname``; one knob value per job, so no value holds a comma)."""
    number, _, names = job.partition("_")
    if not number.isdigit() or "=" not in names:
        raise UserError(f"runs.csv: {job!r} is not a seed sweep's job folder (<n>_<overrides>).")
    return int(number), names.split(",")


def composed_config(overrides: list[str]) -> str:
    """``.hydra/config.yaml`` as ``fpo-train OVERRIDES`` writes it: the composed config
    without its ``hydra`` block, interpolations unresolved."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_yaml(compose("train", overrides=overrides))


def metrics_of(row: dict[str, str], source: str) -> dict[str, float | str]:
    """The row's numbers under the metric names `fpo.compare.run_rows` reads them from
    (``fit_cpu_seconds`` -> ``run/fit_cpu_seconds``; evaluation columns as ``metrics.json``'s
    ``eval/<summary key>``: ``kl`` -> ``eval/kl``, ``eval:judges/afinn/win_rate`` ->
    ``eval/judges/afinn/win_rate``), empty cells left out, and :data:`RESTORED`."""
    names = {**TRAIN_METRICS, CPU_COUNT[0]: CPU_COUNT[1]}
    for column, (key, stderr_key) in EVAL_METRICS.items():
        names |= {column: f"eval/{key}", f"{column}_stderr": f"eval/{stderr_key}"}
    names |= {
        column: "eval/" + column.removeprefix(EXTRA) for column in row if column.startswith(EXTRA)
    }
    found = {key: float(row[column]) for column, key in names.items() if row.get(column)}
    return {**found, RESTORED: source}


def summary_of(samples: list[dict], source: str) -> dict:
    """A test set's ``summary.json`` rebuilt from its samples: the degeneration metrics of
    the policy's and the reference's completions (as the evaluation computes them)."""
    prompts = [sample["prompt"] for sample in samples]
    return {
        "restored_from": source,
        "num_completions": len(samples),
        "degeneration": {
            side: degeneration_metrics(prompts, [sample[side] for sample in samples])
            for side in ("policy", "reference")
        },
    }


def restore_run(job_dir: Path, experiment: list[str], row: dict[str, str], export: Path) -> None:
    """Write one exported seed run's job folder (module docstring); ``restored_from`` names
    the export by its last three path parts (``docs/results/matched_kl``), not this
    machine's path."""
    name = row["run"]
    number, overrides = job_overrides(job_dir.name)
    overrides = [*experiment, *overrides]
    job_dir.mkdir(parents=True, exist_ok=True)
    hydra = job_dir / ".hydra"
    hydra.mkdir(exist_ok=True)
    (hydra / "config.yaml").write_text(composed_config(overrides), encoding="utf-8")
    (hydra / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides), encoding="utf-8")
    source = "/".join(export.resolve().parts[-3:])
    for folder, subfolder in TEST_SETS.items():
        exported = export / "generations" / folder / f"{name}.jsonl"
        if not exported.is_file():
            raise UserError(f"{exported}: missing; runs.csv lists {name} as exported.")
        target = job_dir / "evaluation" / (subfolder or "")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exported, target / "generations.jsonl")
        summary = summary_of(read_generations(exported), source)
        (target / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    # metrics.json last: compare and export count a run folder with it as finished
    metrics = metrics_of(row, source)
    (job_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    status = {"num": number, "status": "finished", "overrides": overrides, "metrics": metrics}
    (job_dir / STATUS_FILE).write_text(json.dumps(status, indent=2))


def restore_calibrations(calibrations: dict[str, tuple[Path, Path]]) -> int:
    """Copy each exported calibration report into its series folder where it is missing.

    ``calibrations``: objective -> (its exported ``calibration/<objective>`` folder, its
    calibration series folder under ``logs/``). Returns how many were restored."""
    restored = 0
    for exported, series in calibrations.values():
        missing = not (series / "calibration.json").is_file()
        if missing and (exported / "calibration.json").is_file():
            series.mkdir(parents=True, exist_ok=True)
            for name in ("calibration.json", "calibration.md"):
                shutil.copyfile(exported / name, series / name)
            restored += 1
    return restored


def restore_seed_runs(sweeps: dict[str, tuple[Path, list[str]]], export: Path) -> int:
    """Rebuild every seed run of ``export``'s ``runs.csv`` whose folder holds no
    ``metrics.json`` (`restore_run`).

    ``sweeps``: a seed sweep's folder name -> (its folder under ``logs/``, the
    ``experiment=...`` override of its objective), for every calibrated objective. Returns
    how many were restored."""
    restored = 0
    for name, row in read_rows(export / "runs.csv").items():
        sweep, _, job = name.partition("__")
        if sweep not in sweeps:
            raise UserError(f"{export / 'runs.csv'}: {name} is in no seed sweep of the study.")
        folder, experiment = sweeps[sweep]
        if not (folder / job / "metrics.json").is_file():
            restore_run(folder / job, experiment, row, export)
            restored += 1
    return restored
