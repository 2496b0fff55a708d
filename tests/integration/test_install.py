"""A non-editable install works from any folder: the wheel built from this checkout,
installed into a fresh virtual environment, runs the smoke job from an empty folder with its
outputs there, and the shipped configs' data and SAE paths resolve to files in the wheel.

Offline and about a minute: the wheel is built with this environment's setuptools
(``pip wheel --no-deps --no-build-isolation --no-index``) from a copy of the checkout, and
the new environment has no pip and no packages of its own: a ``.pth`` file puts this
environment's site-packages after its own (``.pth`` files there are not run, so this
checkout's editable install stays out), and pip installs the wheel into it with
``--no-deps``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from fpo.testing import ROOT

#: Top-level entries of the checkout the wheel's build does not read (hidden ones neither):
#: docs, benchmarks, run outputs and earlier builds.
NOT_BUILT = {"logs", "docs", "benchmarks", "notebooks", "build", "dist", "wandb", "outputs",
             "multirun", "lightning_logs"}  # fmt: skip
#: What the main job (experiment=sentiment_gemma3) reads from the package's files.
MAIN_JOB_FILES = ("data.train_source", "data.val_source", "evaluation.prompts_file")


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``ARGS`` in ``cwd``, as a user's shell runs it: no PYTHONPATH or FPO_ROOT of the test
    run (they would put this checkout's sources first), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FPO_ROOT")}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built from a copy (the build writes build/ and egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    source.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in NOT_BUILT or entry.name.startswith("."):
            continue
        copy = shutil.copytree if entry.is_dir() else shutil.copy2
        copy(entry, source / entry.name, **({"ignore": ignore} if entry.is_dir() else {}))
    pip = [sys.executable, "-m", "pip"]
    done = run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "-w", tmp / "dist", source, cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = (tmp / "dist").glob("fpo_template-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; its ``bin/`` folder."""
    home = tmp_path_factory.mktemp("venv") / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    done = run(base, "-m", "venv", "--without-pip", home, cwd=home.parent)
    assert done.returncode == 0, done.stderr
    python = home / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
               cwd=home).stdout.strip()  # fmt: skip
    Path(site, "parent_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
               "--no-index", wheel, cwd=home.parent)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return home / "bin"


def test_the_wheel_ships_configs_data_fixtures_and_the_main_sae(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = "fpo/shipped/"
    for path in (
        "configs/train.yaml",
        "configs/experiment/sentiment_gemma3.yaml",
        "configs/hydra/launcher/slurm.yaml",
        "data/sentiment/train.jsonl",
        "data/judge_check/check_set.jsonl",
        "tests/fixtures/ultrafeedback_binarized.jsonl",
        "assets/sae/gemma3-270m-layer17/sae_weights.safetensors",
    ):
        assert shipped + path in names, path
    # the other SAEs (23 MB) stay in a checkout; a developer's local config never ships
    assert not any(n.startswith(shipped + "assets/sae/gemma3-270m-layer5/") for n in names)
    assert not any(n.startswith(shipped + "configs/local/") for n in names)


def test_the_smoke_job_runs_from_another_folder(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    done = run(venv / "fpo-train", "experiment=smoke", cwd=work)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (metrics,) = work.glob("logs/smoke/runs/*/metrics.json")  # outputs under the folder
    assert "train/loss" in json.loads(metrics.read_text())
    package = next(venv.parent.glob("lib/python*/site-packages/fpo"))
    assert not list(package.rglob("logs")), "an output went into the installed package"


def test_the_main_jobs_files_resolve_to_the_installed_package(venv, tmp_path):
    """``fpo-train --cfg job --resolve experiment=sentiment_gemma3`` from an empty folder:
    its data, evaluation prompts and SAE are files of the installed package; its logs go
    under the current folder."""
    done = run(venv / "fpo-train", "--cfg", "job", "--resolve", "experiment=sentiment_gemma3",
               cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = yaml.safe_load(done.stdout)
    package = next(venv.parent.glob("lib/python*/site-packages/fpo")).resolve()
    for key in (*MAIN_JOB_FILES, "sae.loader.path"):
        value = cfg
        for part in key.split("."):
            value = value[part]
        path = tmp_path / value  # a relative value is relative to the command's folder
        assert path.exists(), f"{key}: {value}"
        assert path.resolve().is_relative_to(package / "shipped"), f"{key}: {value}"
    assert cfg["paths"]["log_dir"] == "./logs"
