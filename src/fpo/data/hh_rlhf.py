"""The ``hh_rlhf`` row format: two whole transcripts that differ in their last answer.

``Anthropic/hh-rlhf`` rows hold ``chosen`` and ``rejected`` as full conversations::

    "\\n\\nHuman: What is a good name for a cat?\\n\\nAssistant: How about Mittens?"

The prompt is their common prefix up to and including its last ``"\\n\\nAssistant:"``; each
response is the rest of its transcript, stripped of surrounding whitespace. The prompt is split
into turns at ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"`` (a transcript may also start with a bare
``"Human:"``); ``Human`` becomes the ``user`` role and ``Assistant`` the ``assistant`` role, each
turn's text stripped. The final, empty ``Assistant:`` turn is the generation prompt and is not
a message: the chat template (or ``data.plain_template``) renders it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from fpo.data.formats import BadRow, Columns, PreferencePair, check_text, require

ASSISTANT_MARK = "\n\nAssistant:"
TURN = re.compile(r"(?:^\s*|\n\n)(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


def looks_like_transcript(text: str) -> bool:
    """Whether ``text`` is a Human/Assistant transcript (it has an ``Assistant:`` turn)."""
    return ASSISTANT_MARK in text and "Human:" in text


def split_turns(prompt: str) -> list[tuple[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c"`` -> ``[(user, a), (assistant, b),
    (user, c)]``; :class:`BadRow` for text before the first turn or a prompt with no Human turn."""
    parts = TURN.split(prompt)
    if parts[0].strip():
        raise BadRow(f"the transcript has text before its first 'Human:' turn: {parts[0][:40]!r}")
    pairs = zip(parts[1::2], parts[2::2], strict=True)
    turns = [(ROLES[role], text.strip()) for role, text in pairs]
    if not any(role == "user" for role, _ in turns):
        raise BadRow("the shared conversation has no 'Human:' turn")
    return turns


def parse_transcripts(row: Mapping[str, Any], columns: Columns) -> PreferencePair:
    """A pair from two transcripts (module docstring); :class:`BadRow` names the problem."""
    chosen = check_text(require(row, columns.chosen), columns.chosen)
    rejected = check_text(require(row, columns.rejected), columns.rejected)
    shared = os.path.commonprefix([chosen, rejected])  # noqa: RUF071 (strings, not paths)
    cut = shared.rfind(ASSISTANT_MARK)
    if cut < 0:
        raise BadRow(
            f"'{columns.chosen}' and '{columns.rejected}' do not share a conversation that ends "
            "in '\\n\\nAssistant:' (is this a Human/Assistant transcript? else set data.format)",
            schema=not looks_like_transcript(chosen),
        )
    prompt = chosen[: cut + len(ASSISTANT_MARK)]
    turns = split_turns(prompt[: -len(ASSISTANT_MARK)])
    return PreferencePair(
        tuple(turns), chosen[len(prompt) :].strip(), rejected[len(prompt) :].strip()
    )
