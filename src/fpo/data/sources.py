"""Opening a preference source as a ``datasets.Dataset`` of rows, ready for ``Dataset.map``.

A source is one of:

* a local ``.jsonl``/``.json`` file: read here, line by line (a ``.json`` file that starts
  with ``[`` is one JSON array). A line that is not valid UTF-8 or not valid JSON is a bad row
  like any other (reported with its line number), not a refusal of the file;
* a local ``.parquet`` file (``datasets.load_dataset("parquet")``);
* a folder written by ``datasets.save_to_disk`` (a ``DatasetDict`` is indexed by ``split``);
* a Hugging Face hub dataset name: ``datasets.load_dataset(name, subset, split=split,
  **load_kwargs)`` (needs network or the HF cache);
* programmatically, a ``datasets.Dataset`` or a list of row dicts.

JSON rows (files and lists) travel as JSON text in one column (:data:`JSON_COLUMN`, with
:data:`LINE_COLUMN` and :data:`READ_PROBLEM_COLUMN`): a column of strings holds rows of any
shape, which Arrow's typed columns would refuse or coerce. ``Source.identity`` names the
content (a digest of the bytes read, or the dataset's fingerprint) for the tokenized cache;
``None`` for in-memory sources, which are not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from fpo.errors import UserError

LOCAL_EXTENSIONS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
JSON_COLUMN = "_fpo_json"
LINE_COLUMN = "_fpo_line"
READ_PROBLEM_COLUMN = "_fpo_read_problem"


@dataclass(frozen=True)
class Source:
    """Rows of one split: ``rows`` (native columns, or the JSON-text columns), a ``name`` for
    messages, the content ``identity`` (``None``: not cached) and whether rows have lines."""

    rows: Any  # datasets.Dataset
    name: str
    identity: str | None
    line_based: bool = False

    @property
    def is_json(self) -> bool:
        return JSON_COLUMN in self.rows.column_names


def open_source(
    source: Any,
    split: str,
    config_key: str,
    max_samples: int | None = None,
    subset: str | None = None,
    load_kwargs: dict[str, Any] | None = None,
) -> Source:
    """Open ``source`` (module docstring), keeping its first ``max_samples`` rows.

    A missing local path raises :class:`UserError` naming ``config_key``; so does a hub
    dataset that cannot be loaded.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return Source(_head(source, max_samples), f"<in-memory dataset for {config_key}>", None)
    if isinstance(source, list | tuple):
        rows = list(source)[:max_samples] if max_samples is not None else list(source)
        return Source(_json_rows(*_dump_rows(rows)), f"<in-memory rows for {config_key}>", None)
    path = os.path.expanduser(str(source))
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        loaded = _head(_load_from_disk(path, split, config_key), max_samples)
        return Source(loaded, path, _identity(loaded, max_samples))
    if ext in LOCAL_EXTENSIONS or os.path.isabs(path) or path.startswith("."):
        if not os.path.isfile(path):
            raise UserError(f"{config_key}: file not found: {path}")
        if ext not in LOCAL_EXTENSIONS:
            raise UserError(
                f"{config_key}: {path} has extension {ext!r}; expected one of "
                f"{sorted(LOCAL_EXTENSIONS)} or a folder written by datasets.save_to_disk"
            )
        if LOCAL_EXTENSIONS[ext] == "json":
            texts, lines, problems, digest = read_json_file(path, max_samples, config_key)
            return Source(_json_rows(texts, lines, problems), path, digest, lines[:1] != [None])
        loaded = _head(_load_parquet(path, config_key), max_samples)
        return Source(loaded, path, _identity(loaded, max_samples))
    loaded = _head(_load_hub(path, split, subset, load_kwargs or {}, config_key), max_samples)
    name = f"{path}[{subset + ', ' if subset else ''}{split}]"
    return Source(loaded, name, _identity(loaded, max_samples))


def read_json_file(
    path: str, max_samples: int | None, config_key: str
) -> tuple[list[str | None], list[int | None], list[str | None], str]:
    """``(texts, lines, problems, digest)`` of a JSON Lines file (or a JSON array).

    For each non-blank line: its text, its 1-based line number and, when it is not valid
    UTF-8, the problem (text ``None``); JSON is parsed later, per row. A JSON array file gives
    one text per element and no line numbers; it is one document, so an undecodable array is
    a :class:`UserError` naming the file. ``digest`` covers the bytes read.
    """
    digest = hashlib.sha256()
    texts: list[str | None] = []
    lines: list[int | None] = []
    problems: list[str | None] = []
    with open(path, "rb") as f:
        head = f.read(4096).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
        f.seek(0)
        if head.startswith(b"["):
            data = f.read()
            digest.update(data)
            rows = _parse_json_array(data, path, config_key)[:max_samples]
            texts, _, problems = _dump_rows(rows)
            return texts, [None] * len(texts), problems, digest.hexdigest()
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            if not raw.strip():
                continue
            try:
                texts.append(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
                problems.append(None)
            except UnicodeDecodeError as err:
                texts.append(None)
                problems.append(f"not valid UTF-8 (byte {err.start} of the line: {err.reason})")
            lines.append(number)
            if max_samples is not None and len(texts) >= max_samples:
                break
    return texts, lines, problems, digest.hexdigest()


def _parse_json_array(data: bytes, path: str, config_key: str) -> list[Any]:
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise UserError(
            f"{config_key}: {path} is not valid UTF-8 (byte {err.start}: {err.reason}); "
            "re-encode it as UTF-8 (or write it as JSON Lines, where a bad line is only skipped)"
        ) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{config_key}: {path} is not valid JSON ({err})") from None
    if not isinstance(rows, list):
        raise UserError(f"{config_key}: {path} holds a JSON {type(rows).__name__}, not a list")
    return rows


def _dump_rows(rows: list[Any]) -> tuple[list[str | None], list[None], list[str | None]]:
    """Rows as JSON text (lone surrogates escaped); a row JSON cannot hold becomes a problem."""
    texts: list[str | None] = []
    problems: list[str | None] = []
    for row in rows:
        try:
            texts.append(json.dumps(row, ensure_ascii=True))
            problems.append(None)
        except (TypeError, ValueError) as err:
            texts.append(None)
            problems.append(f"the row is not JSON data ({err})")
    return texts, [None] * len(rows), problems


def _json_rows(texts: list, lines: list, problems: list) -> Any:
    import datasets

    features = datasets.Features(
        {
            JSON_COLUMN: datasets.Value("string"),
            LINE_COLUMN: datasets.Value("int64"),
            READ_PROBLEM_COLUMN: datasets.Value("string"),
        }
    )
    columns = {JSON_COLUMN: texts, LINE_COLUMN: lines, READ_PROBLEM_COLUMN: problems}
    return datasets.Dataset.from_dict(columns, features=features)


def _head(dataset: Any, max_samples: int | None) -> Any:
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))


def _identity(dataset: Any, max_samples: int | None) -> str | None:
    """The fingerprint of a dataset backed by files (``None`` for an in-memory one)."""
    return f"{dataset._fingerprint}:{max_samples}" if dataset.cache_files else None


def _load_parquet(path: str, config_key: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=path, split="train")
    except Exception as err:  # arrow schema errors, truncated files, ...
        raise UserError(f"{config_key}: could not read {path} as parquet: {err}") from err


def _load_from_disk(path: str, split: str, config_key: str) -> Any:
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


def _load_hub(
    name: str, split: str, subset: str | None, load_kwargs: dict[str, Any], config_key: str
) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split, **load_kwargs)
    except Exception as err:
        what = f"subset {subset!r}, split {split!r}" if subset else f"split {split!r}"
        raise UserError(
            f"{config_key}: {name!r} is not a local file or folder and loading it from the "
            f"Hugging Face hub ({what}) failed: {err}"
        ) from err
