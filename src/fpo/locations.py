"""Where the files the configs name live, in a checkout and in an installed wheel.

The repository keeps ``configs/``, ``data/``, ``assets/`` and ``tests/fixtures/`` at its
root. A wheel ships a copy of them inside the package, in ``fpo/shipped/`` with the same
layout (``setup.py`` maps them there): all of ``configs/`` and ``data/``, the fixture rows
the smoke configs read, and the SAE of the main job (``assets/sae/gemma3-270m-layer17``).
:func:`files_root` is the one place that decides which copy a process reads: the package's
``shipped/`` folder when it is there (a wheel), else the checkout this module sits in (an
editable install, or ``PYTHONPATH=src``). Configs reach it as ``${paths.files_dir}``, through
the ``fpo.files_dir`` resolver registered on import. Outputs never go there: they go under
``paths.root_dir`` (the current folder, or ``FPO_ROOT``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from omegaconf import OmegaConf

#: The copy inside an installed wheel.
SHIPPED = Path(__file__).resolve().parent / "shipped"
#: The repository root, when this module runs from a checkout's ``src/fpo/``.
CHECKOUT = Path(__file__).resolve().parents[2]


@cache
def files_root() -> Path:
    """The folder holding ``configs/``, ``data/``, ``assets/`` and ``tests/fixtures/``.

    Raises `FileNotFoundError` naming both places when neither has ``configs/train.yaml``
    (a wheel built without its shipped files).
    """
    for root in (SHIPPED, CHECKOUT):
        if (root / "configs" / "train.yaml").is_file():
            return root
    raise FileNotFoundError(
        f"the fpo configs are in neither {SHIPPED / 'configs'} (an installed wheel) nor "
        f"{CHECKOUT / 'configs'} (a checkout): this install is broken; reinstall the package."
    )


#: The name configs use: ``files_dir: ${fpo.files_dir:}`` in configs/paths/default.yaml.
RESOLVER = "fpo.files_dir"
OmegaConf.register_new_resolver(RESOLVER, lambda: str(files_root()), replace=True)
