"""Every DDP rank stops after the same optimizer step, whichever ranks got SIGTERM
(`fpo.interrupts.stop_on_signals` adds :class:`StopTogether` to the trainer)."""

from __future__ import annotations

import logging
import subprocess

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

log = logging.getLogger("fpo.interrupts")


class StopTogether(Callback):
    """Every rank stops after the same optimizer step, whichever ranks got SIGTERM.

    Lightning's (2.6) SIGTERM handler broadcasts from rank 0 inside the handler and forwards
    the signal to the ranks it launched: under DDP that collective ran in the middle of
    others (twice on rank 1, which got the signal twice) and two gloo ranks waited for each
    other forever. Here the handler only notes the signal. At the end of each optimizer step
    the ranks reduce the note (any rank); all of them then set ``received_sigterm`` at once.

    The launching rank also takes its child ranks from Lightning's launcher at that moment:
    Lightning's observer thread SIGKILLs the launching process as soon as a child exits
    non-zero, so rank 0 would die (137) before it reported; :meth:`wait_for_children` waits
    for them instead (and kills one that does not end within ``timeout`` seconds).
    """

    def __init__(self, timeout: float = 120.0) -> None:
        self.signalled, self.timeout = False, float(timeout)
        self.children: list[subprocess.Popen] = []
        self._step: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning registers its handler right after on_fit_start, from this attribute
        # (private in Lightning 2.6; tests/reliability/test_ddp_interrupts.py pins it).
        trainer._signal_connector._sigterm_notifier_fn = self._note
        self.signalled, self._step = False, None

    def _note(self, signum, frame) -> None:
        self.signalled = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # inside a gradient accumulation: no optimizer step ended
        self._step = trainer.global_step
        if trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            log.info(rank_prefixed_message("stopping after this step", trainer.global_rank))
            self.signalled = True
            procs = getattr(trainer.strategy.launcher, "procs", None)
            if procs:  # the same list Lightning's observer thread watches
                self.children, procs[:] = list(procs), []
            trainer._signal_connector.received_sigterm = True

    def wait_for_children(self) -> dict[int, int]:
        """The exit status of each child rank (rank -> status), once all have ended."""
        statuses = {}
        for rank, proc in enumerate(self.children, start=1):
            try:
                statuses[rank] = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                log.error("rank %d did not stop within %.0f s: killed", rank, self.timeout)
                proc.kill()
                statuses[rank] = proc.wait()
        return statuses
