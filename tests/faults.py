"""Fault injection for the reliability tests (importable in `fpo-train` subprocesses that
have tests/ on PYTHONPATH): ``+callbacks.kill._target_=faults.SigkillAfterStep``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class SigkillAfterStep(Callback):
    """SIGKILL this process right after optimizer step ``step`` (before any checkpoint of
    that step: Lightning runs checkpoint callbacks last), as a crash or an OOM kill would."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


ROOT = Path(__file__).resolve().parents[1]


def run_cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` from the repository root, as a user runs it; PYTHONPATH is
    inherited (a worktree first) with tests/ added, so ``faults`` callbacks import."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "FPO_ROOT": str(ROOT),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sigkill_at_atomic_replace(n: int) -> None:
    """SIGKILL this process at the ``n``-th atomic rename (``fpo.atomic``): that file's temp
    copy is fully written and fsynced, but never renamed into place."""
    import fpo.atomic

    real_replace, calls = fpo.atomic.os.replace, [0]

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)

    fpo.atomic.os = _Os()


if __name__ == "__main__":
    # python -m faults N fpo.commands.cache|fpo.commands.train HYDRA_ARGS...: killed at the N-th atomic rename
    import runpy

    sigkill_at_atomic_replace(int(sys.argv[1]))
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
