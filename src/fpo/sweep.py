"""Sweeps that survive failures and interruptions.

A Hydra multirun (``fpo-train -m ...``) gets, from this module:

- **A deterministic folder.** :class:`SweepCallback` (a Hydra callback, ``configs/hydra``)
  sets ``hydra.sweep.dir`` to ``<log_dir>/<task_name>/multiruns/<name>`` where ``<name>`` is
  ``sweep.name`` or, when that is null, a readable slug of the command's overrides plus a
  hash of them (:func:`derive_sweep_name`). Running the same command again therefore
  finds the same folder. ``hydra.*`` overrides (launcher, sweeper settings),
  ``paths.log_dir``/``paths.root_dir`` and ``sweep.*`` do not enter the name.
- **Per-job status.** :func:`sweep_job` is the context each job runs in (``fpo-train``
  enters it, then trains): ``<job dir>/job_status.json`` says ``running``, ``finished``
  (with the optimized metric and final metrics), ``interrupted`` (SIGTERM or SIGINT: the
  sweep stops, exit 143/130, and resumes the job) or ``failed`` (with the error). A failing
  job (bad config, non-finite loss or metric, out of memory, any exception) is recorded
  and returns NaN, so the launcher goes on with the other jobs and Optuna marks the trial
  failed.
- **Skip and resume.** With ``sweep.resume=true`` (default) a job whose status is
  ``finished`` is skipped (its recorded metric is returned) and a job that was interrupted
  resumes from ``<job dir>/checkpoints/last.ckpt`` when the run has the ``last_checkpoint``
  callback (``callbacks`` ``default`` and ``throughput`` include it). A job that failed runs again
  from the start (its last checkpoint may hold the cause, e.g. non-finite weights).
- **A summary.** ``<sweep dir>/sweep_summary.json`` and ``.md`` list every job's status,
  metric, folder and error; rewritten after each job and at the end. When any job failed,
  the sweep exits with status 1 after all jobs ran.

Outside multirun mode :func:`sweep_job` records nothing and lets errors through.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from fpo.atomic import atomic_save_bytes
from fpo.errors import UserError
from fpo.folders import ensure_writable, refuse
from fpo.interrupts import Interrupted

log = logging.getLogger("fpo.sweep")

STATUS_FILE = "job_status.json"
SUMMARY_NAME = "sweep_summary"
# Overrides that do not change what a sweep computes, hence not its folder name.
NAME_EXCLUDED = ("paths.log_dir", "paths.root_dir")
NAME_EXCLUDED_PREFIXES = ("sweep.", "hydra.")
SUMMARY_METRICS = ("train/loss", "val/loss", "val/rewards/accuracies", "val/rewards/margins")


# ----------------------------------------------------------------------------- the folder
def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def derive_sweep_name(task_overrides: list[str]) -> str:
    """``<slug>-<hash8>`` of the overrides that define the sweep (order matters: it sets
    the job numbers)."""
    kept = [
        o
        for o in task_overrides
        if _override_key(o) not in NAME_EXCLUDED
        and not _override_key(o).startswith(NAME_EXCLUDED_PREFIXES)
    ]
    digest = hashlib.sha1("\n".join(kept).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9=,.+-]+", "_", "_".join(kept)).strip("_")[:60].rstrip("_")
    return f"{slug}-{digest}" if slug else f"sweep-{digest}"


class SweepFailed(SystemExit):
    """Exit status 1 at the end of a sweep in which some job failed (not a config error)."""


class SweepCallback(Callback):
    """Hydra callback: deterministic sweep folder at the start, summary and exit status at
    the end (see the module docstring)."""

    def __init__(self, exit_on_failure: bool = True) -> None:
        self.exit_on_failure = exit_on_failure

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra_overrides = list(config.hydra.overrides.hydra)
        if any(_override_key(o) == "hydra.sweep.dir" for o in hydra_overrides):
            sweep_dir = Path(str(config.hydra.sweep.dir))  # the user's choice wins
        else:
            name = config.get("sweep", {}).get("name") or derive_sweep_name(
                list(config.hydra.overrides.task)
            )
            # An interpolation, so that each job resolves it with its own values; as a hydra
            # override, because jobs recompose their config from the master's overrides.
            value = "${paths.log_dir}/${task_name}/multiruns/" + name
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.sweep.dir = value
                quoted = value.replace("\\", "\\\\").replace("'", "\\'")
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{quoted}'")
            sweep_dir = Path(str(config.hydra.sweep.dir))
        try:  # the Optuna study's SQLite file lives here
            ensure_writable(sweep_dir, "paths.log_dir or hydra.sweep.dir", track=True)
        except UserError as error:
            refuse(error)
        log.info("sweep folder: %s (run the same command again to resume it)", sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = write_summary(sweep_dir, final=True)
        counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items())
        log.info("sweep summary (%s): %s", counts, sweep_dir / f"{SUMMARY_NAME}.md")
        failed = [job for job in summary["jobs"] if job["status"] != "finished"]
        if failed and self.exit_on_failure:
            lines = [f"  {job['dir']}: {job['status']}: {job.get('error') or ''}" for job in failed]
            print(
                f"\nerror: {len(failed)} of {len(summary['jobs'])} sweep jobs did not finish"
                f" (details in {sweep_dir / (SUMMARY_NAME + '.md')}):\n" + "\n".join(lines),
                file=sys.stderr,
                flush=True,
            )
            raise SweepFailed(1)


# ----------------------------------------------------------------------------- one job
def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def read_status(job_dir: Path) -> dict | None:
    try:
        return json.loads((job_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    atomic_save_bytes(path, lambda f: f.write(text))


def _finite(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and math.isfinite(value))


@dataclass(frozen=True)
class JobSettings:
    """What the bookkeeping reads of one job's config.

    job_dir: the job's output folder (``paths.output_dir``).
    optimized_metric: the metric the job returns (``optimized_metric``), for messages.
    resume: skip a finished job, resume an interrupted one (``sweep.resume``).
    keep_last_checkpoint: keep a finished job's ``last.ckpt`` (``sweep.keep_last_checkpoint``).
    ckpt_path_given: the job names its own ``ckpt_path`` (then it is not replaced).
    has_last_checkpoint: the run has the ``last_checkpoint`` callback, which resume needs.
    """

    job_dir: Path
    optimized_metric: str | None = None
    resume: bool = True
    keep_last_checkpoint: bool = True
    ckpt_path_given: bool = False
    has_last_checkpoint: bool = False


@dataclass
class Job:
    """One job as :func:`sweep_job` found it; the caller sets ``value``.

    skip: the job finished in an earlier run of the sweep (``value`` is its metric).
    resume_from: the ``last.ckpt`` an interrupted job resumes from (``None``: start fresh).
    value: the job's optimized metric (NaN when it failed).
    """

    skip: bool = False
    resume_from: Path | None = None
    value: float | None = None


@contextmanager
def sweep_job(settings: JobSettings) -> Iterator[Job]:
    """Around one job: in multirun mode record its status, say whether to skip or resume it,
    and never let it raise (a failure is recorded and the value becomes NaN).

    The caller runs the job in the ``with`` body unless ``job.skip``, resuming from
    ``job.resume_from`` if set, and puts its optimized metric in ``job.value``; the job
    writes ``<job dir>/metrics.json``. Outside multirun mode nothing is recorded.
    """
    if not in_multirun():
        yield Job()
        return
    hydra_cfg = HydraConfig.get()
    job_dir = settings.job_dir
    sweep_dir = Path(hydra_cfg.sweep.dir)
    previous = read_status(job_dir) or {}
    if settings.resume and previous.get("status") == "finished":
        log.info("job %s finished in an earlier run of this sweep: skipped", job_dir.name)
        yield Job(skip=True, value=previous.get("value"))
        return

    status: dict[str, Any] = {
        "status": "running",
        "num": hydra_cfg.job.num,
        "dir": str(job_dir),
        "overrides": list(hydra_cfg.overrides.task),
        "optimized_metric": settings.optimized_metric,
        "attempts": int(previous.get("attempts", 0)) + 1,
        "started": time.time(),
        "resumed_from": None,
    }
    job = Job()
    last = job_dir / "checkpoints" / "last.ckpt"
    interrupted = previous.get("status") in ("running", "interrupted")
    if settings.resume and interrupted and not settings.ckpt_path_given:
        if last.exists():
            job.resume_from = last
            status["resumed_from"] = str(last)
            log.info("job %s was interrupted: resuming from %s", job_dir.name, last)
        elif not settings.has_last_checkpoint:
            log.info("job %s reruns from the start (no last_checkpoint callback)", job_dir.name)
    # Under SLURM with one task per GPU (hydra/launcher=slurm) every rank runs this job;
    # rank 0 keeps the books.
    writer = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))) == 0
    if writer:
        job_dir.mkdir(parents=True, exist_ok=True)
        _write_json(job_dir / STATUS_FILE, status)

    try:
        with _single_run_command_for_ddp(job_dir, status["overrides"]):
            yield job
        metrics = _read_metrics(job_dir)
        bad = {k: v for k, v in metrics.items() if not _finite(v)}
        if not _finite(job.value) or bad:
            raise FloatingPointError(
                f"non-finite result: {settings.optimized_metric}={job.value}"
                + (f"; metrics {sorted(bad)}" if bad else "")
            )
        status.update(status="finished", value=job.value, metrics=metrics)
        if writer and not settings.keep_last_checkpoint:
            last.unlink(missing_ok=True)  # only needed to resume an unfinished job
    except Interrupted:  # SIGTERM/SIGINT: resumable, and the whole sweep stops
        status.update(status="interrupted", metrics=_read_metrics(job_dir))
        status["seconds"] = time.time() - status["started"]
        if writer:
            _write_json(job_dir / STATUS_FILE, status)
            write_summary(sweep_dir)
        raise
    except Exception as error:  # recorded; the sweep goes on
        cause = error.__cause__ if isinstance(error, InstantiationException) else None
        shown = cause if isinstance(cause, UserError) else error
        status.update(
            status="failed",
            error=f"{type(shown).__name__}: {shown}",
            traceback=traceback.format_exc(limit=-8),
            metrics=_read_metrics(job_dir),
        )
        log.error("job %s failed: %s: %s", job_dir.name, type(error).__name__, error)
        job.value = float("nan")
        gc.collect()
        _empty_cuda_cache()
    status["seconds"] = time.time() - status["started"]
    if writer:
        _write_json(job_dir / STATUS_FILE, status)
        write_summary(sweep_dir)


@contextmanager
def _single_run_command_for_ddp(job_dir: Path, overrides: list[str]) -> Iterator[None]:
    """Let Lightning's DDP launcher start the other ranks of *this job*.

    It re-executes ``sys.argv`` (here: the whole ``-m`` sweep) with
    ``hydra.run.dir=<HydraConfig run.dir>``; during the job both name the job instead. The
    environment and the process group are restored afterwards so that the next job of the
    sweep starts its own ranks.
    """
    argv, environ, hydra_cfg = list(sys.argv), dict(os.environ), HydraConfig.get()
    run_dir = hydra_cfg.run.dir
    sys.argv = [argv[0], *overrides]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = str(job_dir)
    try:
        yield
    finally:
        sys.argv = argv
        # Lightning's launcher sets LOCAL_RANK, WORLD_SIZE, MASTER_PORT...: a next job that
        # found LOCAL_RANK would take its ranks for started elsewhere and spawn none.
        os.environ.clear()
        os.environ.update(environ)
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = run_dir
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _read_metrics(job_dir: Path) -> dict:
    try:
        return json.loads((job_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the summary
def collect_jobs(sweep_dir: Path, *, final: bool = False) -> list[dict]:
    """Every job folder below ``sweep_dir`` with a status file, by job number.

    With ``final`` (the sweep has ended) a job still ``running`` was interrupted in an
    earlier run and is reported as ``interrupted``.
    """
    jobs = []
    for path in sorted(sweep_dir.rglob(STATUS_FILE)):
        status = read_status(path.parent)
        if status is None:
            continue
        job = {
            "dir": str(path.parent.relative_to(sweep_dir)),
            "num": status.get("num"),
            "status": status.get("status"),
            "value": status.get("value"),
            "overrides": status.get("overrides", []),
            "metrics": {k: v for k, v in (status.get("metrics") or {}).items()},
            "error": status.get("error"),
            "resumed_from": status.get("resumed_from"),
            "attempts": status.get("attempts"),
            "seconds": status.get("seconds"),
        }
        if final and job["status"] == "running":
            job["status"] = "interrupted"
        jobs.append(job)
    return sorted(jobs, key=lambda j: (j["num"] is None, j["num"] or 0, j["dir"]))


def write_summary(sweep_dir: Path, *, final: bool = False) -> dict:
    """Write ``sweep_summary.json`` and ``sweep_summary.md``; returns the summary."""
    jobs = collect_jobs(sweep_dir, final=final)
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    summary = {"sweep_dir": str(sweep_dir), "counts": counts, "jobs": jobs, "final": final}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_json(sweep_dir / f"{SUMMARY_NAME}.json", summary)
    tmp = sweep_dir / f".{SUMMARY_NAME}.md.{os.getpid()}.tmp"
    tmp.write_text(summary_markdown(summary))
    os.replace(tmp, sweep_dir / f"{SUMMARY_NAME}.md")
    return summary


def summary_markdown(summary: dict) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    header = ["job", "status", "optimized", *SUMMARY_METRICS, "error"]
    rows = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for job in summary["jobs"]:
        error = (job.get("error") or "").splitlines()[0][:120] if job.get("error") else ""
        cells = [
            f"`{job['dir']}`",
            job["status"] + (" (resumed)" if job.get("resumed_from") else ""),
            fmt(job.get("value")),
            *(fmt(job["metrics"].get(name)) for name in SUMMARY_METRICS),
            error.replace("|", "\\|"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items()) or "no jobs"
    return f"# Sweep `{summary['sweep_dir']}`\n\n{counts}.\n\n" + "\n".join(rows) + "\n"
