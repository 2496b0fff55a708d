"""Special-token strings written as text (``"<eos>"``, ``"<end_of_turn>"``, ``"<|im_end|>"``).

A tokenizer turns such a string into its control token wherever it appears, also inside a
prompt or an answer. Row text is data, so with ``data.special_token_text=literal`` (the
default) these strings are encoded as the plain text they are written as:

* a response is tokenized with ``split_special_tokens=True``;
* in a prompt, each occurrence is first replaced by a private-use character (a *shield*), the
  chat template or ``data.plain_template`` renders the prompt, and the rendered text is
  tokenized piece by piece: the template's own text as usual (its turn markers and BOS stay
  control tokens), each shielded string with ``split_special_tokens=True``.

Rows without such strings are tokenized exactly as before. With ``control`` the strings become
control tokens (the tokenizer's own behaviour). Either way the data module counts the rows.

Matching is leftmost-longest, like the tokenizer's own added-vocabulary matcher; it scans for
the strings' first characters and looks the candidates up by length, so thousands of special
tokens (Gemma's) cost little.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fpo.errors import UserError

POLICIES = ("literal", "control")
FIRST_SHIELD = 0xF0000  # Supplementary Private Use Area-A


def special_strings(tokenizer: Any) -> list[str]:
    """The strings ``tokenizer`` encodes as special tokens: its named special tokens and every
    added token marked special."""
    strings = set(getattr(tokenizer, "all_special_tokens", []))
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            strings.add(str(token.content))
    return sorted(s for s in strings if s)


@dataclass(frozen=True)
class Shield:
    """The special strings of one pair, each mapped to a private-use character."""

    strings: dict[str, str]  # special string -> its shield character
    finder: SpecialText

    def protect(self, text: str) -> str:
        """``text`` with each special string replaced by its shield character."""
        pieces, start = [], 0
        for at, string in self.finder.occurrences(text):
            pieces += [text[start:at], self.strings[string]]
            start = at + len(string)
        return "".join([*pieces, text[start:]])

    def encode(self, tokenizer: Any, rendered: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``rendered`` (a shielded prompt after templating): the text between
        shields tokenized as usual (``add_special_tokens`` for the first piece), each shielded
        string as plain text."""
        originals = {char: string for string, char in self.strings.items()}
        pattern = "([" + "".join(originals) + "])"
        ids: list[int] = []
        for i, piece in enumerate(re.split(pattern, rendered)):
            if i % 2:
                ids += encode_literal(tokenizer, originals[piece])
            elif piece or i == 0:
                add = add_special_tokens and i == 0
                ids += tokenizer(piece, add_special_tokens=add)["input_ids"]
        return ids


class SpecialText:
    """Finds a tokenizer's special-token strings in text and shields them."""

    def __init__(self, strings: Iterable[str]) -> None:
        self.strings = frozenset(strings)
        self.lengths = sorted({len(s) for s in self.strings}, reverse=True)
        firsts = sorted({s[0] for s in self.strings})
        self.starts = re.compile("[" + "".join(map(re.escape, firsts)) + "]") if firsts else None

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialText:
        return cls(special_strings(tokenizer))

    def occurrences(self, text: str) -> list[tuple[int, str]]:
        """``(position, string)`` of each special string in ``text``, leftmost-longest."""
        found: list[tuple[int, str]] = []
        end = 0
        for match in self.starts.finditer(text) if self.starts else ():
            at = match.start()
            if at < end:
                continue
            for length in self.lengths:
                if text[at : at + length] in self.strings:
                    found.append((at, text[at : at + length]))
                    end = at + length
                    break
        return found

    def shield(self, texts: Iterable[str]) -> Shield | None:
        """A :class:`Shield` for the special strings in ``texts``; ``None`` when there are none.

        Shield characters are private-use characters that none of ``texts`` contains.
        """
        texts = list(texts)
        found = sorted({s for text in texts for _, s in self.occurrences(text)})
        if not found:
            return None
        taken = {c for text in texts for c in text if ord(c) >= FIRST_SHIELD}
        free = (chr(c) for c in range(FIRST_SHIELD, 0x110000) if chr(c) not in taken)
        return Shield(dict(zip(found, free, strict=False)), self)


def encode_literal(tokenizer: Any, text: str) -> list[int]:
    """``text`` tokenized as plain text (``split_special_tokens=True``), no BOS/EOS added.

    A tokenizer that ignores ``split_special_tokens`` is a :class:`UserError`: the text would
    silently stay a control token.
    """
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    unknown = getattr(tokenizer, "unk_token_id", None)
    if any(i in special_ids and i != unknown for i in ids):
        raise UserError(
            f"this tokenizer ({type(tokenizer).__name__}) cannot encode special-token text "
            f"such as {text[:40]!r} as plain text (split_special_tokens has no effect); set "
            "data.special_token_text=control to keep such strings as control tokens"
        )
    return ids
