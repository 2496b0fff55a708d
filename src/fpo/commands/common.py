"""What every command-line entry point shares: user errors as one paragraph (exit 2), the
config folder, the CUDA allocator default, torch's process settings and the known warnings
silenced."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

import fpo.hydra_compat  # noqa: F401  (a faster config composition)
from fpo.errors import UserError
from fpo.extras import check_overrides
from fpo.locations import files_root

log = logging.getLogger("fpo")

#: The project's Hydra config folder: ``configs/`` of the checkout, or its copy shipped in
#: an installed wheel (`fpo.locations`).
CONFIG_DIR = str(files_root() / "configs")
_task_started = False
_own_full_error = False


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


def start_torch() -> None:
    """Torch's process settings for a command that computes, before its first tensor work:
    no tokenizer threads beside torch's, TF32 matmuls where the GPU has them, and subnormal
    floats flushed to zero on every CPU thread (`fpo.subnormals`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from fpo.subnormals import flush_subnormals

    torch.set_float32_matmul_precision("high")
    if flush_subnormals():
        log.info("subnormal floats flushed to zero on all %d CPU threads", torch.get_num_threads())


#: Warnings known to say nothing about the run, silenced by message and category in every
#: Hydra command (all other warnings are shown): (message regex, category).
KNOWN_WARNINGS = (
    # Lightning (a PossibleUserWarning): the frozen reference and SAE stay in eval mode.
    (r"Found \d+ module\(s\) in eval mode", UserWarning),
    # torch deprecates LeafSpec, which Lightning's fetching of batches still uses.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
#: Lightning's advertisements ("💡 Tip: ... install litlogger / litmodels"), which it logs
#: at every fit with no option to turn them off; dropped from these loggers.
LIGHTNING_TIP = "💡 Tip:"
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(LIGHTNING_TIP)


def quiet_known_noise() -> None:
    """Silence `KNOWN_WARNINGS` and Lightning's tips; nothing else."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _not_a_tip not in logger.filters:
            logger.addFilter(_not_a_tip)


def run_hydra(hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function; a config Hydra cannot compose is a user error, exit 2.

    A config that does not compose is reported as one paragraph (no traceback), with the
    closest real names for a misspelt group, option or key (`fpo.commands.config_errors`),
    and exits with status 2 before the task starts, like every other user error; a sweep
    folder that this command created and no job used is removed again. Hydra's own report
    is bypassed until the task starts (``HYDRA_FULL_ERROR`` set meanwhile); an exit 1 after
    a task started (a run's own failure) keeps its status. The CUDA allocator gets
    :func:`default_cuda_allocator` first, known noise is silenced (`quiet_known_noise`), and
    an override that needs an optional extra which is not installed is refused naming it
    (`fpo.extras`).
    """
    global _own_full_error
    default_cuda_allocator()
    quiet_known_noise()
    _own_full_error = "HYDRA_FULL_ERROR" not in os.environ
    if _own_full_error:  # composition errors reach the except below as exceptions
        os.environ["HYDRA_FULL_ERROR"] = "1"
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
    except (HydraException, OmegaConfBaseException) as error:
        if _task_started or not _own_full_error:
            raise
        from fpo.commands.config_errors import explain
        from fpo.folders import discard_unused_folders

        discard_unused_folders()  # a sweep folder made before its jobs' configs failed
        message = explain(error, sys.argv[1:], CONFIG_DIR) or "\n".join(
            str(e) for e in (error, error.__cause__) if e is not None
        )
        print(f"\nerror: {message}\n", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if _own_full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` into a one-paragraph message on stderr and exit status 2.

    Bugs (any other exception) keep their traceback.
    """
    global _task_started
    _task_started = True
    if _own_full_error:  # the task's own errors: Hydra's report again
        os.environ.pop("HYDRA_FULL_ERROR", None)
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
