"""One way to run a command line in a fresh process, as a user runs it from the repository
root: ``python -m fpo.commands.train ...``, ``python -m benchmarks.memory_phases ...``.

The child inherits the environment (``PYTHONPATH`` included, so a worktree's ``src`` comes
first) plus what every test run needs: offline, W&B disabled, one OpenMP thread, and
``FPO_ROOT`` (where the configs resolve ``paths.root_dir``). ``env`` adds to or overrides
that, e.g. ``{"WANDB_MODE": "offline"}``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from fpo.commands.common import CONFIG_DIR

#: The repository root (the folder of ``configs/``).
ROOT = Path(CONFIG_DIR).parent


def command_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the test settings, then ``env``, on top."""
    return {
        **os.environ,
        "FPO_ROOT": str(ROOT),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }


def run_python(
    *args: str, timeout: float = 600, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python ARGS`` (this interpreter) in :data:`ROOT` with :func:`command_env`; stdout
    and stderr captured as text. A run past ``timeout`` seconds raises `TimeoutExpired`."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=command_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_module(
    module: str, *args: str, timeout: float = 600, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS``, as :func:`run_python` runs it."""
    return run_python("-m", module, *args, timeout=timeout, env=env)
