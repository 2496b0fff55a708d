"""What every command-line entry point shares: user errors as one paragraph, exit 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException

from fpo.errors import UserError

log = logging.getLogger("fpo")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` into a one-paragraph message on stderr and exit status 2.

    Bugs (any other exception) keep their traceback.
    """
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
