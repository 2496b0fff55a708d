"""Finding and reading run folders: config, overrides, final metrics, curves, evaluation.

A *run folder* is one with ``.hydra/config.yaml`` (``fpo-train`` writes it): a single run
``logs/<task>/runs/<time>/`` or a multirun job ``logs/<task>/multiruns/<sweep>/<n>_<overrides>/``.
Everything else in it is optional and read defensively: ``metrics.json`` (final metrics),
``csv/version_*/metrics.csv`` (per-step CSV logger) and ``evaluation/summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fpo.errors import UserError

CONFIG = Path(".hydra") / "config.yaml"
OVERRIDES = Path(".hydra") / "overrides.yaml"
METRICS = "metrics.json"
SUMMARY = Path("evaluation") / "summary.json"

# Overrides that never make two runs different configurations (``sweep.*`` names and
# steers the resumable sweep: seeds run later under another sweep name are the same point).
_NOT_CONFIGURATION = re.compile(r"^(seed|objective|objective\..*|hydra\..*|paths\..*|sweep\..*)$")


@dataclass
class Run:
    """One run folder, read. Missing files give empty values; ``problems`` says why."""

    path: Path
    name: str
    config: dict[str, Any]
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    curves: Path | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def objective(self) -> str | None:
        """``objective.name`` of the composed config."""
        objective = self.config.get("objective")
        return str(objective.get("name")) if isinstance(objective, dict) else None

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Every scalar set under ``objective`` (but its name), flattened: ``objective.beta``,
        ``objective.constraints.features.alpha``... Unset (null) values are left out."""
        flat = flatten(self.config.get("objective") or {}, "objective")
        flat.pop("objective.name", None)
        return {key: value for key, value in flat.items() if value is not None}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; keys starting with ``_`` are skipped and lists
    of scalars become strings."""
    if not isinstance(tree, dict):
        if isinstance(tree, list):
            tree = ",".join(str(item) for item in tree)
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if str(key).startswith("_"):
            continue
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def as_number(value: Any) -> float | None:
    """A finite float, or ``None`` for anything else (missing, text, NaN, inf, bools)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _natural_key(path: Path) -> list[Any]:
    """Sort ``2_x`` before ``10_x``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(directory: str | os.PathLike) -> list[Path]:
    """Run folders at or under ``directory`` (naturally sorted); `UserError` if none."""
    root = Path(directory)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder: give run or multirun folders under logs/.")
    if (root / CONFIG).is_file():
        return [root]
    runs = sorted({p.parent.parent for p in root.rglob("config.yaml") if p.parent.name == ".hydra"})
    if not runs:
        raise UserError(
            f"{root} holds no runs: no folder under it has .hydra/config.yaml. Give the folder "
            "of a run (logs/<task>/runs/<time>) or of a multirun (logs/<task>/multiruns/<sweep>)."
        )
    return sorted(runs, key=_natural_key)


def read_json(path: Path, problems: list[str]) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when it is missing, or unreadable (then a line
    in ``problems`` says so)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.append(f"{path}: unreadable ({error}); left out")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object; left out")
        return {}
    return data


def _read_overrides(path: Path) -> dict[str, str]:
    """``key=value`` lines of Hydra's ``overrides.yaml`` (``+``/``++``/``~`` stripped)."""
    if not path.is_file():
        return {}
    items = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    pairs = (str(item).lstrip("+~").split("=", 1) for item in items)
    return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}


def _curves_file(run: Path) -> Path | None:
    """The newest ``<logger>/version_<n>/metrics.csv`` of the CSV logger, if any."""
    found = list(run.glob("*/version_*/metrics.csv"))
    return max(found, key=lambda p: _natural_key(p.parent)) if found else None


def _resolve_objective(config: dict[str, Any]) -> dict[str, Any]:
    """The saved config with its ``objective`` block resolved against the whole config
    (``.hydra/config.yaml`` keeps interpolations: FPO's ``alpha: ${sae.feature_alpha}``, or
    ``${oc.select:fpo_alpha,0.5}`` in runs saved before the alpha moved to the SAE config);
    unchanged when it cannot be resolved outside Hydra."""
    if not isinstance(config.get("objective"), dict):
        return config
    try:
        objective = OmegaConf.to_container(OmegaConf.create(config).objective, resolve=True)
    except OmegaConfBaseException:
        return config
    return {**config, "objective": objective}


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """Read one run folder (see the module docstring)."""
    folder = Path(path)
    try:
        config = _resolve_objective(
            yaml.safe_load((folder / CONFIG).read_text(encoding="utf-8")) or {}
        )
        overrides = _read_overrides(folder / OVERRIDES)
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{folder / '.hydra'}: cannot read the run's config ({error}).") from None
    run = Run(path=folder, name=name or folder.name, config=config, overrides=overrides)
    run.metrics = read_json(folder / METRICS, run.problems)
    if not run.metrics:
        run.problems.append(f"{folder}: no {METRICS} (unfinished or failed run?)")
    run.evaluation = read_json(folder / SUMMARY, run.problems)
    run.curves = _curves_file(folder)
    if "train/tokens_per_sec" not in run.metrics and run.curves is not None:
        run.metrics["train/tokens_per_sec"] = _tokens_per_sec(run.curves)
    return run


def _tokens_per_sec(curves: Path) -> float | None:
    """Whole-run training throughput from Lightning's ThroughputMonitor columns of the CSV
    log: the last ``train/lengths`` (tokens so far) over its ``train/time`` (seconds)."""
    last = None
    with open(curves, newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            if record.get("train/lengths") and record.get("train/time"):
                last = record
    if last is None or float(last["train/time"]) <= 0:
        return None
    return float(last["train/lengths"]) / float(last["train/time"])


def distinct_names(paths: Sequence[Path], names: Sequence[str]) -> list[str]:
    """``names``, with each name that several runs share replaced by the shortest tail of its
    run's path that no other run of that name has (run folders given one by one can all be
    called ``run``: ``<series>/objective.beta=0.1/run``, ``<series>/objective.beta=1/run``
    become ``objective.beta=0.1/run`` and ``objective.beta=1/run``)."""
    result = list(names)
    for name in set(names):
        clash = [i for i, n in enumerate(names) if n == name]
        if len(clash) < 2:
            continue
        parts = {i: Path(paths[i]).resolve().parts for i in clash}
        for depth in range(2, max(len(p) for p in parts.values()) + 1):
            tails = {i: "/".join(parts[i][-depth:]) for i in clash}
            if len(set(tails.values())) == len(clash):
                break
        for i in clash:
            result[i] = tails[i]
    return result


def load_runs(directories: Sequence[str | os.PathLike] | Iterable[str]) -> list[Run]:
    """Every run under ``directories``; names are paths relative to the folder given
    (prefixed by that folder's name when several are given; a name that several runs would
    share is lengthened until it is not, `distinct_names`)."""
    directories = [Path(d) for d in directories]
    paths, names = [], []
    for directory in directories:
        for path in find_runs(directory):
            relative = path.relative_to(directory).as_posix()
            name = directory.resolve().name if relative == "." else relative
            if len(directories) > 1 and relative != ".":
                name = f"{directory.resolve().name}/{relative}"
            paths.append(path)
            names.append(name)
    return [load_run(p, n) for p, n in zip(paths, distinct_names(paths, names), strict=True)]


def newest_sweep(logs: str | os.PathLike) -> Path:
    """The multirun folder under ``logs`` (``<task>/multiruns/<name>``) written last: by the
    latest modification time of the folder or a file directly in it (the sweep summary is
    rewritten after every job). Sweep names come from the overrides, so the alphabetically
    last is not the newest. `UserError` when there is none."""
    sweeps = [p for p in Path(logs).glob("*/multiruns/*") if p.is_dir()]
    if not sweeps:
        raise UserError(f"{logs}: no sweep folder (<task>/multiruns/<name>) under it.")
    return max(sweeps, key=lambda p: max(q.stat().st_mtime for q in (p, *p.iterdir())))


def differing_overrides(runs: Sequence[Run]) -> list[str]:
    """Override keys (not seed, objective or hydra) whose values differ between runs."""
    keys = sorted({key for run in runs for key in run.overrides})
    keys = [key for key in keys if not _NOT_CONFIGURATION.match(key)]
    return [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]
