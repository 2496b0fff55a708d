"""Preference rows: loading sources and parsing rows into validated pairs.

Two row formats are understood:

* ``ultrafeedback`` -- the schema of ``HuggingFaceH4/ultrafeedback_binarized``: ``chosen`` and
  ``rejected`` are lists of ``{"role", "content"}`` messages (the prompt turns, then the
  assistant answer). The prompt is the *common prefix* of the two lists; the response is the
  one assistant message after it. ``prompt``, ``prompt_id``, ``messages`` and the scores are
  not needed.
* ``plain`` -- ``prompt``, ``chosen`` and ``rejected`` are strings; the prompt becomes a single
  user message.

Every pair gets a stable ``example_id``: the first 16 hex characters of the sha256 of the
parsed prompt messages and both responses, so it survives shuffling, filtering and
re-encoding of the source file.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fpo.errors import UserError
from fpo.hashing import hash_json

FORMATS = ("auto", "ultrafeedback", "plain")
NEWLINE = b"\n"
LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

#: A chat message as the chat templates expect it.
Message = dict[str, str]


def short_hash(obj: Any, length: int = 16) -> str:
    """First ``length`` hex chars of `fpo.hashing.hash_json` of ``obj``."""
    return hash_json(obj)[:length]


class BadRow(ValueError):
    """A row that cannot become a preference pair; ``example_id`` is set when computable."""

    def __init__(self, problem: str, example_id: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.example_id = example_id


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


# --------------------------------------------------------------------------- row parsing


def detect_format(first_row: Mapping[str, Any], source: str) -> str:
    """``ultrafeedback`` when the first row's ``chosen`` is a list, ``plain`` when a string."""
    chosen = first_row.get("chosen")
    if isinstance(chosen, list):
        return "ultrafeedback"
    if isinstance(chosen, str):
        return "plain"
    raise UserError(
        f"{source}: cannot detect the row format from the first row (its 'chosen' is "
        f"{type(chosen).__name__}, expected a string or a list of messages); "
        "set data.format to 'ultrafeedback' or 'plain'."
    )


def parse_row(row: Mapping[str, Any], fmt: str) -> PreferencePair:
    """Parse and validate one row of format ``fmt``; raise :class:`BadRow` naming the problem."""
    if fmt == "ultrafeedback":
        pair = _parse_ultrafeedback(row)
    elif fmt == "plain":
        pair = _parse_plain(row)
    else:
        raise ValueError(f"unknown row format {fmt!r}")
    _validate_responses(pair)
    return pair


def _require(row: Mapping[str, Any], key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise BadRow(f"missing or null key '{key}'")
    return value


def _check_text(value: str, key: str) -> str:
    """``value`` must encode as UTF-8 (a JSON ``\\ud800`` escape decodes to a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRow(f"'{key}' is not valid UTF-8 text ({err.reason} at {err.start})") from None
    return value


def _parse_plain(row: Mapping[str, Any]) -> PreferencePair:
    prompt, chosen, rejected = (_require(row, key) for key in ("prompt", "chosen", "rejected"))
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise BadRow(f"'{key}' is {type(value).__name__}, expected a string")
        _check_text(value, key)
    return PreferencePair((("user", prompt),), chosen, rejected)


def _messages(value: Any, key: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{key}' must be a non-empty list of messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise BadRow(f"'{key}'[{i}] is {type(message).__name__}, expected a role/content dict")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRow(f"'{key}'[{i}] needs string 'role' and 'content'")
        _check_text(role, f"{key}[{i}].role")
        _check_text(content, f"{key}[{i}].content")
        messages.append((role, content))
    return messages


def _parse_ultrafeedback(row: Mapping[str, Any]) -> PreferencePair:
    chosen = _messages(_require(row, "chosen"), "chosen")
    rejected = _messages(_require(row, "rejected"), "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise BadRow("'chosen' and 'rejected' share no prompt messages")
    if n == len(chosen) == len(rejected):
        same = PreferencePair(tuple(chosen[:-1]), chosen[-1][1], chosen[-1][1])
        raise BadRow("chosen == rejected", same.example_id)
    responses = {}
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        rest = messages[n:]
        if len(rest) != 1 or rest[0][0] != "assistant":
            raise BadRow(
                f"'{key}' must end with exactly one assistant message after the common prompt, "
                f"found {len(rest)} message(s) with roles {[role for role, _ in rest]}"
            )
        responses[key] = rest[0][1]
    return PreferencePair(tuple(chosen[:n]), responses["chosen"], responses["rejected"])


def _validate_responses(pair: PreferencePair) -> None:
    for key in ("chosen", "rejected"):
        if not getattr(pair, key).strip():
            raise BadRow(f"'{key}' response is empty", pair.example_id)
    if pair.chosen == pair.rejected:
        raise BadRow("chosen == rejected", pair.example_id)


def describe_bad_row(
    source: str, index: int, row: Mapping[str, Any], error: BadRow, fmt: str
) -> str:
    """``"<source> row <i> (example_id <id|unknown>[, prompt_id <p>]): <problem> [<fmt> row]"``."""
    ids = [f"example_id {error.example_id or 'unknown'}"]
    if isinstance(row.get("prompt_id"), str):
        ids.append(f"prompt_id {row['prompt_id']}")
    return f"{source} row {index} ({', '.join(ids)}): {error.problem} [{fmt} row]"


# --------------------------------------------------------------------------- sources


def load_rows(source: Any, split: str, config_key: str) -> tuple[Sequence[Mapping[str, Any]], str]:
    """Load a preference source; return ``(rows, name)`` where ``name`` is used in messages.

    ``source`` is one of: a local ``.json``/``.jsonl``/``.parquet`` file (its single split is
    used, ``split`` is ignored); a folder written by ``datasets.save_to_disk`` (a
    ``DatasetDict`` is indexed by ``split``); a Hugging Face hub dataset name (loaded with
    ``split``, needs network or the HF cache); or, programmatically, a ``datasets.Dataset``
    or a list of row dicts. A missing local path raises :class:`UserError` naming
    ``config_key``.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return source, f"<in-memory dataset for {config_key}>"
    if isinstance(source, list | tuple):
        return list(source), f"<in-memory rows for {config_key}>"
    path = os.path.expanduser(str(source))
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        return _load_from_disk(path, split, config_key), path
    if ext in LOCAL_EXTENSIONS or os.path.isabs(path) or path.startswith("."):
        if not os.path.isfile(path):
            raise UserError(f"{config_key}: file not found: {path}")
        if ext not in LOCAL_EXTENSIONS:
            raise UserError(
                f"{config_key}: {path} has extension {ext!r}; expected one of "
                f"{sorted(LOCAL_EXTENSIONS)} or a folder written by datasets.save_to_disk"
            )
        return _load_file(path, LOCAL_EXTENSIONS[ext], config_key), path
    return _load_hub(path, split, config_key), f"{path}[{split}]"


def check_utf8(path: str, config_key: str) -> None:
    """Refuse a text file that is not valid UTF-8, naming the byte offset and line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as f:
        for chunk in [*iter(lambda: f.read(1 << 20), b""), b""]:
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                at = max(err.start, 0)
                where = f"byte {offset + at}, line {line + chunk[:at].count(NEWLINE)}"
                raise UserError(
                    f"{config_key}: {path} is not valid UTF-8 ({where}: {err.reason}); "
                    "re-encode it as UTF-8."
                ) from None
            offset, line = offset + len(chunk), line + chunk.count(NEWLINE)


def _load_file(path: str, builder: str, config_key: str) -> Sequence[Mapping[str, Any]]:
    import datasets

    if builder == "json":
        check_utf8(path, config_key)
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as err:  # arrow schema errors, malformed JSON, ...
        raise UserError(f"{config_key}: could not read {path} as {builder}: {err}") from err


def _load_from_disk(path: str, split: str, config_key: str) -> Sequence[Mapping[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as err:
        raise UserError(
            f"{config_key}: {path} is a folder but not one written by datasets.save_to_disk: {err}"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(
                f"{config_key}: {path} has no split {split!r} (splits: {sorted(loaded)}); "
                "set the matching data.*_split"
            )
        return loaded[split]
    return loaded


def _load_hub(name: str, split: str, config_key: str) -> Sequence[Mapping[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        raise UserError(
            f"{config_key}: {name!r} is not a local file or folder and loading it from the "
            f"Hugging Face hub (split {split!r}) failed: {err}"
        ) from err
