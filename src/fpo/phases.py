"""Named phases of a training step, announced to whoever measures them.

Three phases are marked where they are defined: ``reference`` (the online reference's
statistics, `fpo.reference.base.OnlineReference.stats`), ``trunk`` (one decoder trunk
forward, `fpo.forward.forward_response_positions`) and ``LM head`` (the chunked LM head,
`fpo.logprobs.response_token_stats`). A phase inside another one is part of the outer one
and not announced: the reference's own trunk and LM head are its ``reference`` phase, so a
``trunk`` announced during a training step is the policy's.

A measuring tool (``benchmarks/memory_phases.py`` records the resident memory at each phase
boundary) calls `add_listener`; without a listener, which is always the case in training, a
marked function costs one check of an empty list.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

#: ``listener(when, name)``: ``when`` is ``"before"`` or ``"after"``, ``name`` the phase's.
Listener = Callable[[str, str], None]
P = ParamSpec("P")
R = TypeVar("R")

_listeners: list[Listener] = []
_depth = 0  # phases entered and not yet left


def add_listener(listener: Listener) -> None:
    """Call ``listener`` before and after every outermost phase from now on."""
    _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    """Stop calling ``listener`` (added by `add_listener`)."""
    _listeners.remove(listener)


def _announce(when: str, name: str) -> None:
    for listener in list(_listeners):
        listener(when, name)


def phase(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: a call of the function is the phase ``name`` (announced when outermost).

    "after" is announced when the call returns; a call that raises announces nothing more.
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def marked(*args: P.args, **kwargs: P.kwargs) -> R:
            global _depth
            if not _listeners:
                return function(*args, **kwargs)
            outermost = _depth == 0
            if outermost:
                _announce("before", name)
            _depth += 1
            try:
                out = function(*args, **kwargs)
            finally:
                _depth -= 1
            if outermost:
                _announce("after", name)
            return out

        return marked

    return decorate
