"""Preference rows: the column map and parsing rows into validated pairs.

Three row formats are understood (``data.format``; ``auto`` picks one from the first row):

* ``ultrafeedback`` -- message lists, the schema of ``HuggingFaceH4/ultrafeedback_binarized``:
  ``chosen`` and ``rejected`` are lists of ``{"role", "content"}`` messages (the prompt turns,
  then the assistant answer). The prompt is the *common prefix* of the two lists; the response
  is the one assistant message after it. When the ``prompt`` column is itself a message list
  (TRL's conversational schema) it is put before ``chosen`` and ``rejected`` (unless they
  already start with it), which may then also be plain answer strings.
* ``hh_rlhf`` -- ``Anthropic/hh-rlhf``: ``chosen`` and ``rejected`` are whole transcripts
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (:mod:`fpo.data.hh_rlhf`).
* ``plain`` -- ``prompt``, ``chosen`` and ``rejected`` are strings; the prompt becomes a single
  user message.

The column names are ``data.columns`` (:class:`Columns`): a dataset whose answers are in
``better``/``worse`` needs ``columns: {chosen: better, rejected: worse}``, not code.

Every pair gets a stable ``example_id``: the first 16 hex characters of the sha256 of the
parsed prompt messages and both responses, so it survives shuffling, filtering and
re-encoding of the source file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fpo.errors import UserError
from fpo.hashing import hash_json

FORMATS = ("auto", "ultrafeedback", "hh_rlhf", "plain")
MAX_LISTED_KEYS = 12

#: A chat message as the chat templates expect it.
Message = dict[str, str]


def short_hash(obj: Any, length: int = 16) -> str:
    """First ``length`` hex chars of `fpo.hashing.hash_json` of ``obj``."""
    return hash_json(obj)[:length]


class BadRow(ValueError):
    """A row that cannot become a preference pair; ``example_id`` is set when computable.

    ``schema`` marks a row whose keys or types do not fit the format (rather than a row of
    the right shape with bad content): its report lists the row's keys and, when another
    format fits, suggests it.
    """

    def __init__(self, problem: str, example_id: str | None = None, schema: bool = False) -> None:
        super().__init__(problem)
        self.problem = problem
        self.example_id = example_id
        self.schema = schema


@dataclass(frozen=True)
class Columns:
    """Which row keys hold the prompt, the chosen and the rejected answer (``data.columns``)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | None) -> Columns:
        """``data.columns`` (a mapping of some of prompt/chosen/rejected to key names)."""
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise UserError(f"data.columns={value!r}: expected a mapping like {{prompt: question}}")
        known = [f.name for f in fields(cls)]
        for key, name in value.items():
            if key not in known:
                raise UserError(f"data.columns.{key}: unknown; expected some of {known}")
            if not isinstance(name, str) or not name:
                raise UserError(f"data.columns.{key}={name!r}: expected a column name")
        return cls(**dict(value))


DEFAULT_COLUMNS = Columns()


@dataclass(frozen=True)
class PreferencePair:
    """One parsed, validated pair: prompt turns (role/content) and two response texts."""

    prompt_messages: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str

    @property
    def example_id(self) -> str:
        """16 hex chars of sha256 over ``[prompt_messages, chosen, rejected]``."""
        return short_hash([[list(m) for m in self.prompt_messages], self.chosen, self.rejected])

    @property
    def messages(self) -> list[Message]:
        """The prompt turns as chat-template messages."""
        return [{"role": role, "content": content} for role, content in self.prompt_messages]

    @property
    def prompt_text(self) -> str:
        """The prompt before templating: the user text for one turn, else ``role: content`` lines.

        This is what the plain template's ``{prompt}`` receives and what generation-based
        evaluation without a chat template starts from.
        """
        if len(self.prompt_messages) == 1:
            return self.prompt_messages[0][1]
        return "\n\n".join(f"{role}: {content}" for role, content in self.prompt_messages)

    @property
    def texts(self) -> list[str]:
        """Every text of the pair as written: prompt contents and both responses."""
        return [content for _, content in self.prompt_messages] + [self.chosen, self.rejected]


# --------------------------------------------------------------------------- row parsing


def row_format(row: Mapping[str, Any], columns: Columns = DEFAULT_COLUMNS) -> str | None:
    """The format whose shape ``row`` has (message lists, a transcript, strings), else ``None``."""
    from fpo.data.hh_rlhf import looks_like_transcript

    chosen, prompt = row.get(columns.chosen), row.get(columns.prompt)
    if isinstance(chosen, list) or isinstance(prompt, list):
        return "ultrafeedback"
    if isinstance(chosen, str):
        return "hh_rlhf" if prompt is None and looks_like_transcript(chosen) else "plain"
    return None


def detect_format(first_row: Any, source: str, columns: Columns = DEFAULT_COLUMNS) -> str:
    """The format of the first row (:func:`row_format`); a :class:`UserError` if none fits."""
    fmt = row_format(first_row, columns) if isinstance(first_row, Mapping) else None
    if fmt is None:
        chosen = first_row.get(columns.chosen) if isinstance(first_row, Mapping) else None
        raise UserError(
            f"{source}: cannot detect the row format from the first row (its "
            f"{columns.chosen!r} is {type(chosen).__name__}, expected a string or a list of "
            f"messages; {row_keys(first_row)}); set data.format to one of "
            f"{', '.join(FORMATS[1:])}, or name the columns with data.columns."
        )
    return fmt


def parse_row(
    row: Mapping[str, Any], fmt: str, columns: Columns = DEFAULT_COLUMNS
) -> PreferencePair:
    """Parse and validate one row of format ``fmt``; raise :class:`BadRow` naming the problem."""
    if not isinstance(row, Mapping):
        raise BadRow(f"the row is a JSON {type(row).__name__}, expected an object", schema=True)
    if fmt == "ultrafeedback":
        pair = _parse_messages(row, columns)
    elif fmt == "plain":
        pair = _parse_plain(row, columns)
    elif fmt == "hh_rlhf":
        from fpo.data.hh_rlhf import parse_transcripts

        pair = parse_transcripts(row, columns)
    else:
        raise ValueError(f"unknown row format {fmt!r}")
    _validate_responses(pair)
    return pair


def require(row: Mapping[str, Any], key: str) -> Any:
    """``row[key]``; a schema :class:`BadRow` when missing or null."""
    value = row.get(key)
    if value is None:
        raise BadRow(f"missing or null key '{key}'", schema=True)
    return value


def check_text(value: Any, key: str) -> str:
    """``value`` must be a string that encodes as UTF-8 (a JSON ``\\ud800`` escape decodes to a
    lone surrogate, which does not)."""
    if not isinstance(value, str):
        raise BadRow(f"'{key}' is {type(value).__name__}, expected a string", schema=True)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRow(f"'{key}' is not valid UTF-8 text ({err.reason} at {err.start})") from None
    return value


def _parse_plain(row: Mapping[str, Any], columns: Columns) -> PreferencePair:
    keys = (columns.prompt, columns.chosen, columns.rejected)
    prompt, chosen, rejected = (require(row, key) for key in keys)
    for key, value in zip(keys, (prompt, chosen, rejected), strict=True):
        check_text(value, key)
    return PreferencePair((("user", prompt),), chosen, rejected)


def _messages(value: Any, key: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRow(
            f"'{key}' must be a non-empty list of messages, got {type(value).__name__}",
            schema=True,
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise BadRow(
                f"'{key}'[{i}] is {type(message).__name__}, expected a role/content dict",
                schema=True,
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRow(f"'{key}'[{i}] needs string 'role' and 'content'", schema=True)
        check_text(role, f"{key}[{i}].role")
        check_text(content, f"{key}[{i}].content")
        messages.append((role, content))
    return messages


def _conversation(row: Mapping[str, Any], key: str, prompt: list[tuple[str, str]]) -> list:
    """``row[key]`` as messages, after the explicit ``prompt`` messages (if any)."""
    value = require(row, key)
    if prompt and isinstance(value, str):
        return [*prompt, ("assistant", check_text(value, key))]
    messages = _messages(value, key)
    return messages if messages[: len(prompt)] == prompt else [*prompt, *messages]


def _parse_messages(row: Mapping[str, Any], columns: Columns) -> PreferencePair:
    explicit = row.get(columns.prompt)
    prompt = _messages(explicit, columns.prompt) if isinstance(explicit, list) else []
    chosen = _conversation(row, columns.chosen, prompt)
    rejected = _conversation(row, columns.rejected, prompt)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise BadRow(f"'{columns.chosen}' and '{columns.rejected}' share no prompt messages")
    if n == len(chosen) == len(rejected):
        same = PreferencePair(tuple(chosen[:-1]), chosen[-1][1], chosen[-1][1])
        raise BadRow("chosen == rejected", same.example_id)
    responses = {}
    for key, messages in ((columns.chosen, chosen), (columns.rejected, rejected)):
        rest = messages[n:]
        if len(rest) != 1 or rest[0][0] != "assistant":
            raise BadRow(
                f"'{key}' must end with exactly one assistant message after the common prompt, "
                f"found {len(rest)} message(s) with roles {[role for role, _ in rest]}"
            )
        responses[key] = rest[0][1]
    return PreferencePair(tuple(chosen[:n]), responses[columns.chosen], responses[columns.rejected])


def _validate_responses(pair: PreferencePair) -> None:
    for key in ("chosen", "rejected"):
        if not getattr(pair, key).strip():
            raise BadRow(f"'{key}' response is empty", pair.example_id)
    if pair.chosen == pair.rejected:
        raise BadRow("chosen == rejected", pair.example_id)


# --------------------------------------------------------------------------- reports


def row_keys(row: Any) -> str:
    """``"row keys: ['a', 'b']"`` (at most :data:`MAX_LISTED_KEYS`), for schema reports."""
    if not isinstance(row, Mapping):
        return f"the row is a {type(row).__name__}"
    keys = sorted(map(str, row))
    more = f" and {len(keys) - MAX_LISTED_KEYS} more" if len(keys) > MAX_LISTED_KEYS else ""
    return f"row keys: {keys[:MAX_LISTED_KEYS]}{more}"


def fitting_format(row: Any, fmt: str, columns: Columns) -> str | None:
    """Another format that parses ``row`` without error, else ``None``."""
    other = row_format(row, columns) if isinstance(row, Mapping) else None
    if other is None or other == fmt:
        return None
    try:
        parse_row(row, other, columns)
    except BadRow:
        return None
    return other


def describe_bad_row(
    source: str,
    index: int,
    row: Any,
    error: BadRow,
    fmt: str,
    line: int | None = None,
    columns: Columns = DEFAULT_COLUMNS,
) -> str:
    """``"<source> row <i> ([line <n>, ]example_id <id|unknown>[, prompt_id <p>]): <problem>
    [<fmt> row]"``; a schema problem adds the row's keys and the format that fits, if any."""
    ids = [] if line is None else [f"line {line}"]
    ids.append(f"example_id {error.example_id or 'unknown'}")
    if isinstance(row, Mapping) and isinstance(row.get("prompt_id"), str):
        ids.append(f"prompt_id {row['prompt_id']}")
    message = f"{source} row {index} ({', '.join(ids)}): {error.problem} [{fmt} row]"
    if error.schema:
        fits = fitting_format(row, fmt, columns)
        hint = f"; it fits data.format={fits} (or use data.format=auto)" if fits else ""
        message += f" ({row_keys(row)}{hint})"
    # a message must be storable as UTF-8 even when the row's keys or ids hold lone surrogates
    return message.encode("utf-8", "backslashreplace").decode("utf-8")
