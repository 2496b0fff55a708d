"""fpo.phases: outermost phases are announced to listeners, nested ones are not, and nothing
is announced without a listener."""

from __future__ import annotations

import pytest

from fpo import phases


@phases.phase("inner")
def inner(x: int) -> int:
    return x + 1


@phases.phase("outer")
def outer(x: int) -> int:
    return inner(x) * 2


@phases.phase("failing")
def failing() -> None:
    raise RuntimeError("boom")


@pytest.fixture
def heard():
    events: list[str] = []

    def listener(when: str, name: str) -> None:
        events.append(f"{when} {name}")

    phases.add_listener(listener)
    yield events
    phases.remove_listener(listener)


def test_outermost_phases_are_announced_around_the_call(heard):
    assert outer(1) == 4 and inner(1) == 2
    assert heard == ["before outer", "after outer", "before inner", "after inner"]


def test_a_call_that_raises_announces_no_after_and_leaves_the_nesting_clean(heard):
    with pytest.raises(RuntimeError, match="boom"):
        failing()
    inner(0)
    assert heard == ["before failing", "before inner", "after inner"]


def test_without_a_listener_nothing_is_heard():
    heard: list[str] = []
    listener = lambda when, name: heard.append(name)  # noqa: E731
    phases.add_listener(listener)
    phases.remove_listener(listener)
    assert outer(1) == 4 and heard == []
