"""What every command-line entry point shares: user errors as one paragraph, exit 2."""

from __future__ import annotations

import logging
import sys
import textwrap
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
        message = textwrap.fill(str(error), width=100)
        print(f"\nerror: {message}\n", file=sys.stderr, flush=True)
        sys.exit(2)
