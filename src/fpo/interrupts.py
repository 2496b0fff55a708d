"""A run stopped by a signal: save, say how to resume, exit non-zero.

SIGTERM (a scheduler's pre-emption) only notes the signal
(`fpo.stop_together.StopTogether`); at the end of the optimizer step every process (every
DDP rank) learns whether any of them got one, and if so all set Lightning's
``trainer.received_sigterm`` after the same step: `fpo.checkpoints.LastCheckpoint` saves
``last.ckpt`` there, where it saves every N steps anyway, and Lightning's loops raise
``SIGTERMException`` on every rank. SIGINT (Ctrl-C) during :func:`stop_on_signals` takes the
same path (this process sends itself SIGTERM), so a first Ctrl-C never cuts a step in half;
a second one stops at once. Either way :class:`Interrupted` leaves the command with status
128 + the signal number (143 for SIGTERM, 130 for SIGINT), never 0, on every rank: ``&&``
chains and schedulers see that the run did not finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fpo.interrupts")


class Interrupted(SystemExit):
    """The run was stopped by ``signum``; exit status ``128 + signum``. ``ranks``: the exit
    status of each DDP rank this process launched (rank -> status; negative: killed)."""

    def __init__(self, signum: int, ranks: dict[int, int] | None = None) -> None:
        super().__init__(128 + signum)
        self.signum, self.ranks = signum, dict(ranks or {})


@dataclass
class Stop:
    """The signal that stopped the run (``None`` while none came)."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals(trainer) -> Iterator[Stop]:
    """Around ``trainer.fit``: turn SIGINT into a graceful stop, and the end Lightning gives
    a stop (``SIGTERMException``, or the exit 1 of a second Ctrl-C) into :class:`Interrupted`.
    A signal that came after the last training step (during the last validation) stops the
    command when ``fit`` returns (``last.ckpt`` then holds the finished training).
    """
    # Here, not at the top: fpo-train --help and config errors need no Lightning.
    from lightning.pytorch.callbacks import Checkpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from fpo.stop_together import StopTogether

    stop, together = Stop(), StopTogether()
    callbacks = trainer.callbacks  # before the checkpoint callbacks (Lightning's order)
    checkpoints = [i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)]
    callbacks.insert(min(checkpoints, default=len(callbacks)), together)
    main = threading.current_thread() is threading.main_thread()

    def on_sigint(signum, frame) -> None:
        if stop.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        stop.signum = signal.SIGINT
        print(
            "\nCtrl-C: stopping after this optimizer step and saving last.ckpt "
            "(Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)  # StopTogether (in fit) does the rest

    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        yield stop
    except SIGTERMException:
        ranks = together.wait_for_children()
        raise Interrupted(stop.signum or signal.SIGTERM, ranks) from None
    except SystemExit as exit_:
        if stop.signum is None or isinstance(exit_, Interrupted):
            raise
        raise Interrupted(stop.signum, together.wait_for_children()) from None
    else:
        if together.signalled:
            raise Interrupted(stop.signum or signal.SIGTERM)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that started this process, with ``ckpt_path=last`` in place of any
    ``ckpt_path=``; ``python -m <module>`` when it was started as a file."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0])
    if program.suffix == ".py":
        module = ".".join(program.with_suffix("").parts[-3:])  # fpo/commands/train.py
        head = ["python", "-m", module]
    else:
        head = [program.name]
    args = [a for a in argv[1:] if a.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
    return shlex.join([*head, *args, "ckpt_path=last"])


def report(signum: int, last_ckpt: Path, multirun: bool, ranks: dict[int, int]) -> None:
    """Say on stderr what was saved, how the other ranks (``ranks``: rank -> exit status)
    ended, and how to go on."""
    name = signal.Signals(signum).name
    saved = (
        f"the training state is in {last_ckpt}"
        if last_ckpt.is_file()
        else "no last.ckpt was saved (callbacks without last_checkpoint): a rerun starts afresh"
    )
    if multirun:
        how = "Rerun the same multirun command: finished jobs are skipped, this one resumes."
    else:
        how = f"Resume with:\n  {resume_command()}"
    others = "".join(f" Rank {r} exited with status {s}." for r, s in sorted(ranks.items()))
    print(f"\ninterrupted by {name}: {saved}.{others} {how}\n", file=sys.stderr, flush=True)
