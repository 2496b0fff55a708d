"""What every command-line entry point shares: user errors as one paragraph, exit 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import InstantiationException

from fpo.errors import UserError

log = logging.getLogger("fpo")
_task_started = False


def run_hydra(hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function; a config Hydra cannot compose is a user error, exit 2.

    Hydra reports an unknown key, group option or bad value as one paragraph (no traceback)
    and exits with status 1, before the task starts. Mapped to 2 here, like every other
    user error; an exit 1 after a task started (a run's own failure) keeps its status.
    """
    try:
        hydra_main()
    except SystemExit as exit_:
        # Subclasses (fpo.sweep.SweepFailed) are the runs' own statuses.
        if type(exit_) is SystemExit and exit_.code == 1 and not _task_started:
            raise SystemExit(2) from None
        raise


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` into a one-paragraph message on stderr and exit status 2.

    Bugs (any other exception) keep their traceback.
    """
    global _task_started
    _task_started = True
    try:
        yield
    except (UserError, InstantiationException) as error:
        # Hydra's instantiate wraps a UserError raised by a config's target.
        cause = error if isinstance(error, UserError) else error.__cause__
        if not isinstance(cause, UserError):
            raise
        # Not re-wrapped: a message may end with a command to copy and paste.
        print(f"\nerror: {cause}\n", file=sys.stderr, flush=True)
        sys.exit(2)
