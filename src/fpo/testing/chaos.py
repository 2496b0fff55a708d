"""Chaos test: a sweep (and a cache build) SIGKILLed at random moments, restarted with the
same command each time, must end exactly where an uninterrupted run ends.

    python -m fpo.testing.chaos --runs 5 --seed 0            # sweep and cache, 5 kills each
    python -m fpo.testing.chaos --only cache --runs 3 --seed 7 --work /tmp/chaos

The sweep is ``fpo-train -m experiment=smoke objective=dpo,fpo seed=0,1 evaluation=smoke``
(the tiny model, four jobs, ``last.ckpt`` every 2 steps). Its kills aim at four phases:

- ``checkpoint``: at a ``last.ckpt`` write (written and fsynced, not yet renamed in place),
- ``summary``: at a ``sweep_summary.json`` write (same),
  both with the rename fault of `fpo.testing.faults`, the N-th such write drawn at random;
- ``training``: a random delay after a job's run folder appears;
- ``evaluation``: a random delay after a job saved its policy (evaluation comes next).

What each kill hit is read from the files (the running job, whether it had saved its policy,
its ``metrics.json``) and reported. After the kills the command runs to the end once more;
then ``sweep_summary.json``, every job's ``metrics.json`` and ``evaluation/summary.json``
must equal the uninterrupted run's, ignoring wall-clock and memory numbers and the
bookkeeping of the restarts (attempts, resumed_from). ``fpo-cache experiment=smoke
objective=fpo`` is killed the same way (at a shard or manifest write, or after a random
delay) and its final shards and manifests must be byte-identical to an uninterrupted build's.

Every kill moment is drawn from ``random.Random(seed)`` and listed in the report; a failure
prints it with the first difference. Exit status 1 when a result differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fpo.testing.runner import ROOT, command_env

SWEEP_ARGS = (
    "-m",
    "experiment=smoke",
    "objective=dpo,fpo",
    "seed=0,1",
    "evaluation=smoke",
    "callbacks.last_checkpoint.every_n_train_steps=2",
)
CACHE_ARGS = ("experiment=smoke", "objective=fpo", "cache.shard_size=2", "cache.batch_size=2")
SWEEP_PHASES = ("training", "checkpoint", "evaluation", "summary")
CACHE_PHASES = ("shard write", "manifest write", "computing")
#: Keys (at any depth) whose values are wall-clock, memory or restart bookkeeping.
VOLATILE = (
    "seconds", "memory", "load_average", "per_sec", "time", "attempts", "resumed_from", "sweep_dir"
)  # fmt: skip
TIMEOUT = 600


@dataclass
class Kill:
    """One planned kill and what it hit."""

    phase: str
    fault: str | None = None  # ``N:NAME`` for `fpo.testing.faults`, else a timed kill
    delay: float = 0.0  # seconds after the trigger file appears (timed kills)
    hit: str = ""  # what the files show after the kill

    def __str__(self) -> str:
        how = f"at rename {self.fault}" if self.fault else f"{self.delay:.2f}s after the trigger"
        return f"{self.phase} ({how}): {self.hit}"


@dataclass
class Report:
    what: str
    seed: int
    kills: list[Kill] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    litter: list[str] = field(default_factory=list)  # temp files of killed writes, left over

    def __str__(self) -> str:
        lines = [f"chaos {self.what}, seed {self.seed}: {len(self.kills)} kills"]
        lines += [f"  kill {i + 1}: {kill}" for i, kill in enumerate(self.kills)]
        lines.append("  result: " + ("equal to the uninterrupted run" if self.ok else "DIFFERS"))
        lines += [f"    {d}" for d in self.differences[:20]]
        if self.litter:
            lines.append(f"  temp files of killed writes left after the restarts: {self.litter}")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return not self.differences


# ----------------------------------------------------------------------------- processes
def _start(module: str, args: list[str], fault: str | None) -> subprocess.Popen:
    prefix = ["fpo.testing.faults", fault, module] if fault else [module]
    return subprocess.Popen(
        [sys.executable, "-m", *prefix, *args],
        cwd=ROOT,
        env=command_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # killed as a group: Hydra's jobs run in this process
    )


def _run(module: str, args: list[str], kill: Kill | None, trigger=None) -> int:
    """Run ``module args``: with a fault, until it dies; timed, SIGKILL ``kill.delay``
    seconds after ``trigger()`` first returns true; otherwise to the end. Returns the status."""
    process = _start(module, args, kill.fault if kill else None)
    deadline = time.monotonic() + TIMEOUT
    try:
        if kill is not None and kill.fault is None:
            while process.poll() is None and not trigger():
                time.sleep(0.01)
            end = time.monotonic() + kill.delay
            while process.poll() is None and time.monotonic() < end:
                time.sleep(0.01)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if kill is None and process.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} exited {process.returncode}:\n{stderr}")
    return process.returncode


# ----------------------------------------------------------------------------- comparison
def stable(value: object) -> object:
    """``value`` without the keys in :data:`VOLATILE`, at any depth."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not any(w in k for w in VOLATILE)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def differences(expected: object, actual: object, where: str) -> list[str]:
    """Where ``actual`` differs from ``expected`` (dotted paths, at most a few)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for key in sorted(expected.keys() | actual.keys()):
            if key not in actual or key not in expected:
                side = "missing" if key not in actual else "unexpected"
                out.append(f"{where}.{key}: {side}")
            else:
                out += differences(expected[key], actual[key], f"{where}.{key}")
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [
            d
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for d in differences(e, a, f"{where}[{i}]")
        ]
    return [] if expected == actual else [f"{where}: {expected!r} (uninterrupted) != {actual!r}"]


def _json(path: Path, log_dir: Path | None = None) -> object:
    """``path``'s JSON (``log_dir`` written as ``<log_dir>``: the two runs' folders differ)."""
    try:
        text = path.read_text()
        return json.loads(text.replace(str(log_dir), "<log_dir>") if log_dir else text)
    except (OSError, ValueError) as error:
        return f"<unreadable: {error}>"


def sweep_results(log_dir: Path) -> dict[str, object]:
    """``{file (relative to the sweep folder): stable content}`` of a finished sweep."""
    (sweep_dir,) = (log_dir / "smoke" / "multiruns").iterdir()
    files = [sweep_dir / "sweep_summary.json"]
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        files += [job / "metrics.json", job / "evaluation" / "summary.json"]
    return {str(f.relative_to(sweep_dir)): stable(_json(f, log_dir)) for f in files}


def _is_temp(path: Path) -> bool:
    """A killed atomic write's temp file (`fpo.atomic`: ``.NAME.tmp-HOST-PID``)."""
    return path.name.startswith(".") and ".tmp-" in path.name


def litter(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp-*"))


def cache_files(cache_dir: Path) -> dict[str, bytes]:
    """Every file of the reference caches below ``cache_dir`` (shards and manifests), temp
    files of killed writes aside (reported as `Report.litter`)."""
    root = cache_dir / "reference"
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _is_temp(p))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


# ----------------------------------------------------------------------------- the sweep
def _running_job(log_dir: Path) -> Path | None:
    for path in sorted(log_dir.glob("smoke/multiruns/*/*/job_status.json")):
        status = _json(path)
        if isinstance(status, dict) and status.get("status") == "running":
            return path.parent
    return None


def sweep_hit(log_dir: Path) -> str:
    """What the files show of the moment a sweep was killed."""
    statuses = [_json(p) for p in sorted(log_dir.glob("smoke/multiruns/*/*/job_status.json"))]
    done = sum(isinstance(s, dict) and s.get("status") == "finished" for s in statuses)
    job = _running_job(log_dir)
    if job is None:
        return f"{done} jobs finished, none running (between jobs or in the summary)"
    ckpt = job / "checkpoints" / "last.ckpt"
    if (job / "metrics.json").exists():
        stage = "after metrics.json (status/summary not yet written)"
    elif (job / "policy" / "model.safetensors").exists():
        stage = "evaluation (policy saved, no metrics.json)"
    elif ckpt.exists():
        stage = "training (a last.ckpt exists)"
    else:
        stage = "training or start-up (no last.ckpt yet)"
    temps = [p.name for p in job.rglob(".*tmp*")]
    return f"{done} jobs finished; job {job.name.split('_')[0]}: {stage}" + (
        f"; temp files {temps}" if temps else ""
    )


def _sweep_trigger(log_dir: Path, phase: str):
    if phase == "evaluation":
        return lambda: any(
            (j / "policy" / "model.safetensors").exists() and not (j / "metrics.json").exists()
            for j in log_dir.glob("smoke/multiruns/*/*")
        )
    return lambda: _running_job(log_dir) is not None


def plan(
    rng: random.Random, phases: tuple[str, ...], runs: int, faults: dict[str, str]
) -> list[Kill]:
    """``runs`` kills cycling through ``phases`` in a seeded order; a phase in ``faults``
    (``{phase: file name}``) is a rename fault at a random N (1-3), the others timed."""
    order = list(phases)
    rng.shuffle(order)
    kills = []
    for i in range(runs):
        phase = order[i % len(order)]
        if phase in faults:
            kills.append(Kill(phase, fault=f"{rng.randint(1, 3)}:{faults[phase]}"))
        else:
            kills.append(Kill(phase, delay=round(rng.uniform(0.0, 2.5), 2)))
    return kills


def chaos_sweep(work: Path, runs: int, seed: int) -> Report:
    report = Report("sweep (fpo-train -m)", seed)
    reference, chaotic = work / "uninterrupted", work / "killed"
    _run("fpo.commands.train", [*SWEEP_ARGS, f"paths.log_dir={reference}"], None)
    args = [*SWEEP_ARGS, f"paths.log_dir={chaotic}"]
    faults = {"checkpoint": "last.ckpt", "summary": "sweep_summary.json"}
    for kill in plan(random.Random(seed), SWEEP_PHASES, runs, faults):
        status = _run("fpo.commands.train", args, kill, _sweep_trigger(chaotic, kill.phase))
        kill.hit = (
            sweep_hit(chaotic) if status == -signal.SIGKILL else f"not killed: exited {status}"
        )
        report.kills.append(kill)
    _run("fpo.commands.train", args, None)
    expected, actual = sweep_results(reference), sweep_results(chaotic)
    report.differences = differences(expected, actual, "sweep")
    report.litter = litter(chaotic)
    return report


# ----------------------------------------------------------------------------- the cache
def cache_hit(cache_dir: Path) -> str:
    shards = sorted(p.name for p in cache_dir.glob("reference/**/shards/*.arrow"))
    temps = sorted(p.name for p in cache_dir.glob("reference/**/.*tmp*"))
    manifests = sorted(p.parent.name for p in cache_dir.glob("reference/**/manifest.json"))
    return f"{len(shards)} shards, manifests of {manifests or 'none'}, temp files {temps or 'none'}"


def chaos_cache(work: Path, runs: int, seed: int) -> Report:
    report = Report("cache (fpo-cache)", seed)

    def args(where: Path) -> list[str]:
        return [
            *CACHE_ARGS,
            f"paths.log_dir={where / 'logs'}",
            f"paths.cache_dir={where / 'cache'}",
        ]

    reference, chaotic = work / "cache_uninterrupted", work / "cache_killed"
    _run("fpo.commands.cache", args(reference), None)
    faults = {"manifest write": "manifest.json"}
    rng = random.Random(seed)
    for kill in plan(rng, CACHE_PHASES, runs, faults):
        if kill.phase == "shard write":  # any rename but a manifest: the shards
            kill.fault = str(rng.randint(1, 6))
        status = _run("fpo.commands.cache", args(chaotic), kill, lambda: True)
        killed = status == -signal.SIGKILL
        kill.hit = cache_hit(chaotic / "cache") if killed else f"not killed: exited {status}"
        report.kills.append(kill)
    _run("fpo.commands.cache", args(chaotic), None)
    expected, actual = cache_files(reference / "cache"), cache_files(chaotic / "cache")
    report.litter = litter(chaotic / "cache")
    for name in sorted(expected.keys() | actual.keys()):
        if expected.get(name) != actual.get(name):
            state = (
                "missing"
                if name not in actual
                else "unexpected"
                if name not in expected
                else "bytes differ"
            )
            report.differences.append(f"cache {name}: {state}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="kills per command (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--only", choices=("sweep", "cache"), help="one command only")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temp one)")
    options = parser.parse_args(argv)
    work = options.work or Path(tempfile.mkdtemp(prefix="fpo-chaos-"))
    reports = []
    if options.only in (None, "sweep"):
        reports.append(chaos_sweep(work, options.runs, options.seed))
    if options.only in (None, "cache"):
        reports.append(chaos_cache(work, options.runs, options.seed))
    print("\n".join(str(r) for r in reports) + f"\n(runs under {work})")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
