"""What the test suite shares, importable like the rest of the package (no ``sys.path``
edits, no test-folder modules): config composition (`fpo.testing.config`), one runner for
command lines in a fresh process (`fpo.testing.runner`) and fault injection for the
reliability tests (`fpo.testing.faults`, imported on its own: it is a Hydra callback target).

The runner needs a source checkout: it runs commands from the repository root, the folder
of ``configs/``. Nothing else in the package imports this one.
"""

from fpo.testing.config import PRESETS, QUIET_TRAINER, compose_train, fixture_datamodule, preset
from fpo.testing.runner import ROOT, command_env, run_module, run_python

__all__ = [
    "PRESETS",
    "QUIET_TRAINER",
    "ROOT",
    "command_env",
    "compose_train",
    "fixture_datamodule",
    "preset",
    "run_module",
    "run_python",
]
