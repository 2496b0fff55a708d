"""The per-row function of the data pipeline (``Dataset.map``): one source row in, one
output row (:func:`output_features`) out, saying whether the row was kept, dropped or bad."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fpo.data.formats import BadRow, Columns, describe_bad_row, parse_row
from fpo.data.sources import JSON_COLUMN, LINE_COLUMN, READ_PROBLEM_COLUMN
from fpo.data.special_text import SpecialText
from fpo.data.tokenize import TemplateSettings, Truncation, tokenize_pair

KEPT, DROPPED, BAD = "kept", "dropped", "bad"


def output_features() -> Any:
    """The ``datasets.Features`` of an output row."""
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    return datasets.Features(
        {
            "status": datasets.Value("string"),  # kept | dropped | bad
            "problem": datasets.Value("string"),  # the bad-row report line
            "undecodable": datasets.Value("bool"),  # bad: not UTF-8 JSON at all
            "example_id": datasets.Value("string"),
            "special_text": datasets.Value("bool"),  # holds special-token strings as text
            "special_example": datasets.Value("string"),  # one of them
            "prompt": datasets.Value("string"),
            "prompt_messages": datasets.List(message),
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
        }
    )


@dataclass
class RowProcessor:
    """``processor(row, index) -> output row``; picklable, for ``Dataset.map(num_proc=...)``.

    ``row`` is a native dataset row or a JSON-text row (:mod:`fpo.data.sources`); ``index``
    is its position in the split, the ``row`` of the bad-row report.
    """

    tokenizer: Any
    fmt: str
    columns: Columns
    settings: TemplateSettings
    limits: Truncation
    source_name: str
    specials: SpecialText = field(init=False)

    def __post_init__(self) -> None:
        self.specials = SpecialText.of(self.tokenizer)

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        line = row.get(LINE_COLUMN) if JSON_COLUMN in row else None
        try:
            decoded = self._decode(row)
        except BadRow as err:
            out = self._bad(index, {}, err, line)
            out["undecodable"] = True
            return out
        try:
            pair = parse_row(decoded, self.fmt, self.columns)
        except BadRow as err:
            return self._bad(index, decoded, err, line)
        shield = self.specials.shield(pair.texts)
        literal = shield if self.settings.special_token_text == "literal" else None
        tokenized = tokenize_pair(self.tokenizer, pair, self.settings, self.limits, literal)
        out = _empty(KEPT if tokenized is not None else DROPPED, pair.example_id)
        if shield is not None:
            out["special_text"], out["special_example"] = True, next(iter(shield.strings))
        if tokenized is not None:
            out["prompt"] = tokenized.prompt
            out["prompt_messages"] = pair.messages
            for name in ("prompt", "chosen", "rejected"):
                out[f"{name}_ids"] = getattr(tokenized, f"{name}_ids").tolist()
        return out

    @staticmethod
    def _decode(row: dict[str, Any]) -> Any:
        """The row itself, or the object its JSON text holds; :class:`BadRow` if it has none."""
        if JSON_COLUMN not in row:
            return row
        if row[READ_PROBLEM_COLUMN] is not None:
            raise BadRow(row[READ_PROBLEM_COLUMN])
        try:
            return json.loads(row[JSON_COLUMN])
        except json.JSONDecodeError as err:
            raise BadRow(f"not valid JSON ({err})") from None

    def _bad(self, index: int, row: Any, error: BadRow, line: int | None) -> dict[str, Any]:
        out = _empty(BAD, error.example_id)
        out["problem"] = describe_bad_row(
            self.source_name, index, row, error, self.fmt, line, self.columns
        )
        return out


def _empty(status: str, example_id: str | None) -> dict[str, Any]:
    return {
        "status": status,
        "problem": None,
        "undecodable": False,
        "example_id": example_id,
        "special_text": False,
        "special_example": None,
        "prompt": None,
        "prompt_messages": [],
        "prompt_ids": [],
        "chosen_ids": [],
        "rejected_ids": [],
    }
