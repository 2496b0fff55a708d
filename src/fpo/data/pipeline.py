"""One split from source to tokenized pairs, with ``datasets.Dataset.map`` (cached, parallel).

Per row (:class:`RowProcessor`, the mapped function): decode the JSON text of a file or list
row -> map the columns and parse the format (:func:`fpo.data.formats.parse_row`) -> template,
tokenize and truncate (:func:`fpo.data.tokenize.tokenize_pair`). Its output row says what
happened: ``status`` ``kept`` (with the ids), ``dropped`` (a response empty after
truncation) or ``bad`` (with the report line: source, row, line, example id, problem).

:func:`build_split` then applies ``data.on_bad_row`` (skip: log and count; fail: the first
bad row is a :class:`UserError`), refuses a JSON Lines file most of whose lines are not
UTF-8 JSON, and counts (``stats``): ``rows`` read (after ``max_*_samples``, the first N
rows), ``bad_rows``, ``dropped_empty_after_truncation``, ``kept`` (= rows - bad_rows -
dropped) and ``special_token_text`` (valid rows whose text holds special-token strings).

The mapped output is cached under ``cache_dir`` as ``<key>.arrow``, the key hashing the
source's content, the format and column map, the tokenizer, template and truncation
settings, this package's row-processing code and the library versions; in-memory sources
are not cached.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from fpo.data.formats import DEFAULT_COLUMNS, Columns, detect_format, short_hash
from fpo.data.row import BAD, DROPPED, KEPT, RowProcessor, output_features
from fpo.data.sources import JSON_COLUMN, READ_PROBLEM_COLUMN, Source, open_source
from fpo.data.tokenize import TemplateSettings, TokenizedPair, Truncation, tokenizer_fingerprint
from fpo.errors import UserError

log = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("skip", "fail")
MAX_LOGGED_BAD_ROWS = 20
PROGRESS_BAR_ROWS = 10_000
CODE_FILES = ("formats.py", "hh_rlhf.py", "row.py", "sources.py", "special_text.py", "tokenize.py")


@dataclass(frozen=True)
class SplitSpec:
    """Where one split comes from: the source, its split name, a row limit, its config key,
    and for hub datasets the subset (config name) and extra ``load_dataset`` arguments."""

    source: Any
    split: str
    max_samples: int | None
    config_key: str
    subset: str | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuiltSplit:
    """A built split: its dataset, ``stats``, data fingerprint and every bad-row report line."""

    dataset: Any  # fpo.data.datamodule.PreferenceDataset
    stats: dict[str, int]
    data_fingerprint: str
    bad_rows: list[str] = field(default_factory=list)


def build_split(
    spec: SplitSpec,
    fmt: str,
    tokenizer: Any,
    settings: TemplateSettings,
    limits: Truncation,
    on_bad_row: str,
    columns: Columns = DEFAULT_COLUMNS,
    num_proc: int | None = None,
    cache_dir: str | None = None,
) -> BuiltSplit:
    """Load, parse, tokenize and truncate one split (module docstring).

    The data fingerprint hashes the sorted example ids of all valid rows (before truncation,
    which the truncation fingerprint covers), so it ignores row order.
    """
    from fpo.data.datamodule import PreferenceDataset

    source = open_source(
        spec.source, spec.split, spec.config_key, spec.max_samples, spec.subset, spec.load_kwargs
    )
    if len(source.rows) == 0:
        raise UserError(f"{spec.config_key}: {source.name} has no rows")
    row_format = fmt
    if fmt == "auto":  # from the first row that decodes (none: every row is bad anyway)
        first = _first_row(source)
        row_format = "plain" if first is None else detect_format(first, source.name, columns)
    processor = RowProcessor(tokenizer, row_format, columns, settings, limits, source.name)
    out = _map(source, processor, num_proc, cache_dir)
    status = out["status"]
    stats = {
        "rows": len(status),
        "kept": status.count(KEPT),
        "dropped_empty_after_truncation": status.count(DROPPED),
        "bad_rows": status.count(BAD),
        "special_token_text": sum(out["special_text"]),
    }
    bad = [problem for problem, s in zip(out["problem"], status, strict=True) if s == BAD]
    undecodable = [p for p, u in zip(out["problem"], out["undecodable"], strict=True) if u]
    if source.line_based and len(undecodable) * 2 > len(status):
        raise UserError(
            f"{spec.config_key}: {source.name}: {len(undecodable)} of {len(status)} lines are "
            f"not valid UTF-8 JSON, so this is not a JSON Lines file of preference rows "
            f"(first: {undecodable[0]})"
        )
    _report_bad_rows(bad, on_bad_row)
    if stats["special_token_text"]:
        log.warning(
            "%s (%s): %d row(s) hold special-token strings as text (e.g. %r); %s",
            spec.config_key,
            source.name,
            stats["special_token_text"],
            next(s for s in out["special_example"] if s),
            "encoded as plain text"
            if settings.special_token_text == "literal"
            else "encoded as control tokens (data.special_token_text=control)",
        )
    pairs = [_pair(out, i) for i, s in enumerate(status) if s == KEPT]
    if stats["bad_rows"] or stats["dropped_empty_after_truncation"]:
        log.warning("%s (%s): %s", spec.config_key, source.name, stats)
    if not pairs:
        raise UserError(f"{spec.config_key}: no usable preference pairs in {source.name}: {stats}")
    valid_ids = [i for i, s in zip(out["example_id"], status, strict=True) if s != BAD]
    return BuiltSplit(PreferenceDataset(pairs), stats, short_hash(sorted(valid_ids)), bad)


def _first_row(source: Source) -> Any:
    """The first row that decodes to an object (for ``format=auto``); ``None`` if none does."""
    if not source.is_json:
        return source.rows[0]
    for row in source.rows:
        if row[READ_PROBLEM_COLUMN] is None:
            try:
                value = json.loads(row[JSON_COLUMN])
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _map(
    source: Source, processor: RowProcessor, num_proc: int | None, cache_dir: str | None
) -> dict[str, list]:
    """Run ``processor`` over the rows with ``Dataset.map``; the output columns as lists."""
    key = short_hash(
        [
            source.identity,
            processor.fmt,
            vars(processor.columns),
            tokenizer_fingerprint(processor.tokenizer),
            vars(processor.settings),
            vars(processor.limits),
            source.name,
            _code_digest(),
        ]
    )
    cache_file = None
    if cache_dir is not None and source.identity is not None:
        cache_dir = os.path.expanduser(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"{key}.arrow")
    with _progress_bar(len(source.rows) >= PROGRESS_BAR_ROWS):
        mapped = source.rows.map(
            processor,
            with_indices=True,
            remove_columns=source.rows.column_names,
            features=output_features(),
            num_proc=num_proc if num_proc and num_proc > 1 else None,
            cache_file_name=cache_file,
            load_from_cache_file=cache_file is not None,
            new_fingerprint=key,
            desc=f"tokenizing {os.path.basename(source.name)}",
        )
    return mapped.to_dict()


@contextmanager
def _progress_bar(show: bool) -> Iterator[None]:
    """``datasets``' progress bar only where it tells something (large splits)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    if was_enabled and not show:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not show:
            ds_logging.enable_progress_bar()


@cache
def _code_digest() -> str:
    """A digest of the row-processing code and the libraries that tokenize."""
    import datasets
    import tokenizers
    import transformers

    here = Path(__file__).parent
    code = [(here / name).read_text() for name in CODE_FILES]
    versions = [transformers.__version__, tokenizers.__version__, datasets.__version__]
    return short_hash([code, versions])


def _report_bad_rows(bad: list[str], policy: str) -> None:
    """Log the first bad rows (``skip``), or raise on the first one (``fail``)."""
    if bad and policy == "fail":
        raise UserError(f"{bad[0]} (data.on_bad_row=fail)")
    for message in bad[:MAX_LOGGED_BAD_ROWS]:
        log.warning("skipping bad row: %s", message)
    if len(bad) > MAX_LOGGED_BAD_ROWS:
        log.warning("... and %d more bad rows", len(bad) - MAX_LOGGED_BAD_ROWS)


def _pair(out: dict[str, list], i: int) -> TokenizedPair:
    messages = tuple((m["role"], m["content"]) for m in out["prompt_messages"][i])
    ids = (np.asarray(out[f"{k}_ids"][i], dtype=np.int32) for k in ("prompt", "chosen", "rejected"))
    return TokenizedPair(out["example_id"][i], out["prompt"][i], messages, *ids)
