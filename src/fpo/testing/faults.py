"""Fault injection for the reliability tests: a process killed with SIGKILL, as a crash or an
OOM kill would, at a chosen point.

- In a training run: ``+callbacks.kill._target_=fpo.testing.faults.SigkillAfterStep
  +callbacks.kill.step=N``.
- A signal (SIGTERM, SIGINT) after step N: ``+callbacks.stop._target_=
  fpo.testing.faults.SignalAfterStep +callbacks.stop.step=N +callbacks.stop.name=SIGINT``
  (every DDP rank; ``+callbacks.stop.rank=R``: only rank R); during the first validation
  after step N: ``fpo.testing.faults.SignalInValidation``, same keys but ``rank``.
- At the N-th atomic rename (`fpo.atomic`) of any command:
  ``python -m fpo.testing.faults N fpo.commands.cache HYDRA_ARGS...``; ``N:NAME`` counts only
  the renames onto files named NAME (``2:last.ckpt``: the second checkpoint write).
"""

from __future__ import annotations

import os
import signal
import sys

from lightning.pytorch.callbacks import Callback


class SigkillAfterStep(Callback):
    """SIGKILL this process right after optimizer step ``step`` (before any checkpoint of
    that step: Lightning runs checkpoint callbacks last)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAfterStep(Callback):
    """Send this process the signal ``name`` (``SIGTERM``, ``SIGINT``) right after optimizer
    step ``step``, as a scheduler or a Ctrl-C would (a run resumed after that step gets
    none); under DDP in every rank, or only in global rank ``rank``."""

    def __init__(self, step: int, name: str = "SIGTERM", rank: int | None = None) -> None:
        self.step, self.signum, self.sent = int(step), signal.Signals[name], False
        self.rank = None if rank is None else int(rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class SignalInValidation(Callback):
    """Send this process the signal ``name`` during the first validation after optimizer
    step ``step`` (at its first batch's end)."""

    def __init__(self, step: int, name: str = "SIGTERM") -> None:
        self.step, self.signum, self.sent = int(step), signal.Signals[name], False

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step >= self.step and not self.sent and not trainer.sanity_checking:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def sigkill_at_atomic_replace(n: int, name: str | None = None) -> None:
    """SIGKILL this process at the ``n``-th atomic rename (``fpo.atomic``), of any file or
    only of files named ``name``: that file's temp copy is fully written and fsynced, but
    never renamed into place."""
    import fpo.atomic

    real_replace, calls = fpo.atomic.os.replace, [0]

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            calls[0] += name is None or os.path.basename(dst) == name
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)

    fpo.atomic.os = _Os()


if __name__ == "__main__":
    # python -m fpo.testing.faults N[:NAME] MODULE ARGS...: killed at the N-th atomic rename
    import runpy

    count, _, file_name = sys.argv[1].partition(":")
    sigkill_at_atomic_replace(int(count), file_name or None)
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
