"""What every command-line entry point shares: user errors as one paragraph, exit 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from fpo.errors import UserError

log = logging.getLogger("fpo")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `UserError` into a one-paragraph message on stderr and exit status 2.

    Bugs (any other exception) keep their traceback.
    """
    try:
        yield
    except UserError as error:
        # Not re-wrapped: a message may end with a command to copy and paste.
        print(f"\nerror: {error}\n", file=sys.stderr, flush=True)
        sys.exit(2)
