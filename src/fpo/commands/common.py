"""What every command-line entry point shares: user errors as one paragraph (exit 2), the
config folder and the CUDA allocator default."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import InstantiationException

import fpo.hydra_compat  # noqa: F401  (a faster config composition)
from fpo.errors import UserError
from fpo.extras import check_overrides
from fpo.locations import files_root

log = logging.getLogger("fpo")

#: The project's Hydra config folder: ``configs/`` of the checkout, or its copy shipped in
#: an installed wheel (`fpo.locations`).
CONFIG_DIR = str(files_root() / "configs")
_task_started = False


#: The CUDA caching allocator's setting every entry point starts with unless the user set
#: one: expandable segments let freed blocks of one size serve requests of another, which
#: variable-length batches need. Without it DPO on the Gemma-2-2B shape (online reference,
#: no checkpointing, UltraFeedback-like lengths) ran out of an H100's 80 GB with 4.4 GiB
#: reserved but unallocated; with it the same run peaked at 74 GiB (docs/benchmarks.md).
CUDA_ALLOCATOR = "expandable_segments:True"


def default_cuda_allocator() -> None:
    """Set :data:`CUDA_ALLOCATOR` unless ``PYTORCH_CUDA_ALLOC_CONF`` or its newer name
    ``PYTORCH_ALLOC_CONF`` is set. Read when CUDA first allocates, so call it before that."""
    if not any(os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOCATOR


def run_hydra(hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function; a config Hydra cannot compose is a user error, exit 2.

    Hydra reports an unknown key, group option or bad value as one paragraph (no traceback)
    and exits with status 1, before the task starts. Mapped to 2 here, like every other
    user error; an exit 1 after a task started (a run's own failure) keeps its status.
    The CUDA allocator gets :func:`default_cuda_allocator` first, and an override that
    needs an optional extra which is not installed is refused naming it (`fpo.extras`).
    """
    default_cuda_allocator()
    try:
        check_overrides(sys.argv[1:])
    except UserError as error:
        print_user_error(error)
        raise SystemExit(2) from None
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
        print_user_error(cause)
        sys.exit(2)


def print_user_error(error: UserError) -> None:
    """``error`` as one paragraph on stderr."""
    # Not re-wrapped: a message may end with a command to copy and paste.
    print(f"\nerror: {error}\n", file=sys.stderr, flush=True)
