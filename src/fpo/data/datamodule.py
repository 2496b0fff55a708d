"""`PreferenceDataModule`: preference pairs from files, folders or the hub, as batches.

Pipeline per split: load rows (:func:`fpo.data.formats.load_rows`) -> parse and validate
each row (bad rows skipped and counted, or a :class:`UserError`) -> template, tokenize and
truncate (:func:`fpo.data.tokenize.tokenize_pair`; pairs with an empty response after
truncation dropped and counted) -> :class:`PreferenceDataset` -> :class:`PreferenceCollator`.

``stats[split]`` (``split`` in ``train``/``val``) counts ``rows`` read (after
``max_*_samples``, which keeps the first N rows), ``bad_rows``,
``dropped_empty_after_truncation`` and ``kept`` (= rows - bad_rows - dropped).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from fpo.data.collate import PreferenceCollator
from fpo.data.formats import (
    FORMATS,
    BadRow,
    describe_bad_row,
    detect_format,
    load_rows,
    parse_row,
    short_hash,
)
from fpo.data.resumable import ResumableDataLoader
from fpo.data.sampler import GlobalBatchSampler
from fpo.data.tokenize import (
    TemplateSettings,
    TokenizedPair,
    Truncation,
    check_plain_template,
    resolve_chat_template,
    tokenize_pair,
    tokenizer_fingerprint,
)
from fpo.errors import UserError

log = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("skip", "fail")
MAX_LOGGED_BAD_ROWS = 20


class PreferenceDataset(Dataset):
    """Tokenized pairs; ``dataset[i]`` is :meth:`TokenizedPair.to_item` (lists of ints)."""

    def __init__(self, pairs: list[TokenizedPair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.pairs[index].to_item()

    @property
    def example_ids(self) -> list[str]:
        return [pair.example_id for pair in self.pairs]


@dataclass(frozen=True)
class SplitSpec:
    """Where one split comes from: the source, its split name, a row limit, its config key."""

    source: Any
    split: str
    max_samples: int | None
    config_key: str


@dataclass
class BuiltSplit:
    dataset: PreferenceDataset
    stats: dict[str, int]
    data_fingerprint: str


def build_split(
    spec: SplitSpec,
    fmt: str,
    tokenizer: Any,
    settings: TemplateSettings,
    limits: Truncation,
    on_bad_row: str,
) -> BuiltSplit:
    """Load, parse, tokenize and truncate one split (module docstring).

    The data fingerprint hashes the sorted example ids of all valid rows (before truncation,
    which the truncation fingerprint covers), so it ignores row order.
    """
    rows, name = load_rows(spec.source, spec.split, spec.config_key)
    rows = list(itertools.islice(rows, spec.max_samples)) if spec.max_samples is not None else rows
    if len(rows) == 0:
        raise UserError(f"{spec.config_key}: {name} has no rows")
    row_format = detect_format(rows[0], name) if fmt == "auto" else fmt
    stats = {"rows": 0, "kept": 0, "dropped_empty_after_truncation": 0, "bad_rows": 0}
    pairs, valid_ids = [], []
    for index, row in enumerate(rows):
        stats["rows"] += 1
        try:
            pair = parse_row(row, row_format)
        except BadRow as err:
            message = describe_bad_row(name, index, row, err, row_format)
            if on_bad_row == "fail":
                raise UserError(f"{message} (data.on_bad_row=fail)") from err
            stats["bad_rows"] += 1
            if stats["bad_rows"] <= MAX_LOGGED_BAD_ROWS:
                log.warning("skipping bad row: %s", message)
            continue
        valid_ids.append(pair.example_id)
        tokenized = tokenize_pair(tokenizer, pair, settings, limits)
        if tokenized is None:
            stats["dropped_empty_after_truncation"] += 1
            continue
        pairs.append(tokenized)
    stats["kept"] = len(pairs)
    if stats["bad_rows"] or stats["dropped_empty_after_truncation"]:
        log.warning("%s (%s): %s", spec.config_key, name, stats)
    if not pairs:
        raise UserError(f"{spec.config_key}: no usable preference pairs in {name}: {stats}")
    return BuiltSplit(PreferenceDataset(pairs), stats, short_hash(sorted(valid_ids)))


class PreferenceDataModule(LightningDataModule):
    """Preference pairs -> batches of chosen+rejected rows (``fpo.data.collate``).

    All arguments are plain values (Hydra-friendly) except ``tokenizer``, which may also be
    given later with :meth:`set_tokenizer`. ``format`` is ``auto|ultrafeedback|plain`` (auto:
    from the first row); ``chat_template`` is ``auto|true|false``; ``plain_template`` is a
    ``str.format`` pattern with ``{prompt}``; ``on_bad_row`` is ``skip|fail``. Sources: see
    :func:`fpo.data.formats.load_rows`.
    """

    def __init__(
        self,
        train_source: Any,
        val_source: Any = None,
        tokenizer: Any = None,
        train_split: str = "train",
        val_split: str = "train",
        format: str = "auto",
        chat_template: Any = "auto",
        plain_template: str = "{prompt}",
        max_length: int = 512,
        max_prompt_length: int = 256,
        append_eos: bool = True,
        on_bad_row: str = "skip",
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise UserError(f"data.format={format!r}: expected one of {', '.join(FORMATS)}")
        if on_bad_row not in BAD_ROW_POLICIES:
            raise UserError(f"data.on_bad_row={on_bad_row!r}: expected skip or fail")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if int(value) < 1:
                raise UserError(f"data.{key}={value}: must be >= 1")
        check_plain_template(plain_template)
        sources = {"train_source": train_source, "val_source": val_source}
        in_memory = [key for key, value in sources.items() if not isinstance(value, str | None)]
        self.save_hyperparameters(ignore=["tokenizer", *in_memory])
        self.specs = {
            "train": SplitSpec(train_source, train_split, max_train_samples, "data.train_source")
        }
        if val_source is not None:
            self.specs["val"] = SplitSpec(val_source, val_split, max_val_samples, "data.val_source")
        self.format = format
        self.chat_template = chat_template
        self.plain_template = plain_template
        self.append_eos = bool(append_eos)
        self.truncation = Truncation(int(max_length), int(max_prompt_length))
        self.on_bad_row = on_bad_row
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.tokenizer: Any = None
        self.stats: dict[str, dict[str, int]] = {}
        self._built: dict[str, BuiltSplit] = {}
        self._wrap: Callable[[str, Dataset], Dataset] | None = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    # ------------------------------------------------------------------ tokenizer, settings

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Use ``tokenizer`` (forgets splits built with a previous one)."""
        if self.append_eos and tokenizer.eos_token_id is None:
            raise UserError("data.append_eos=true but the tokenizer has no eos_token")
        self.template_settings = TemplateSettings(
            use_chat_template=resolve_chat_template(self.chat_template, tokenizer),
            plain_template=self.plain_template,
            append_eos=self.append_eos,
        )
        self.tokenizer = tokenizer
        self._built.clear()
        self.stats.clear()

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its EOS id (pads are masked, any id works)."""
        tok = self._require_tokenizer()
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @property
    def collator(self) -> PreferenceCollator:
        return PreferenceCollator(self.pad_token_id)

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError("PreferenceDataModule needs a tokenizer: call set_tokenizer(tok)")
        return self.tokenizer

    # ------------------------------------------------------------------ splits

    def _split(self, split: str) -> BuiltSplit:
        if split not in self.specs:
            raise KeyError(f"no {split!r} split configured (have {sorted(self.specs)})")
        if split not in self._built:
            built = build_split(
                self.specs[split],
                self.format,
                self._require_tokenizer(),
                self.template_settings,
                self.truncation,
                self.on_bad_row,
            )
            self._built[split] = built
            self.stats[split] = built.stats
        return self._built[split]

    def setup(self, stage: str | None = None) -> None:
        """Build (once) the train split and, when ``val_source`` is set, the val split."""
        for split in self.specs:
            self._split(split)

    @property
    def splits(self) -> tuple[str, ...]:
        """The configured splits: ``("train",)`` or ``("train", "val")``."""
        return tuple(self.specs)

    def set_dataset_wrapper(self, wrap: Callable[[str, Dataset], Dataset] | None) -> None:
        """Serve ``wrap(split, dataset)`` instead of each split's dataset (``None``: plain).

        Used by ``reference=cached`` to join every item to the reference cache by id.
        """
        self._wrap = wrap

    def dataset(self, split: str, wrapped: bool = True) -> Dataset:
        """The dataset of ``split`` as the loaders serve it (``wrapped=False``: the plain
        :class:`PreferenceDataset`)."""
        plain = self._split(split).dataset
        return self._wrap(split, plain) if wrapped and self._wrap is not None else plain

    @property
    def train_dataset(self) -> Dataset:
        return self.dataset("train")

    @property
    def val_dataset(self) -> Dataset:
        return self.dataset("val")

    def fingerprint_components(self, split: str = "train") -> dict[str, str]:
        """Short hashes of what determines the tokenized ``split``, one per component.

        ``data``: sorted example ids of the valid rows; ``tokenizer``: vocab, pipeline,
        special tokens and chat template; ``template``: chat-template use, plain template,
        ``append_eos``; ``truncation``: ``max_length`` and ``max_prompt_length``.
        """
        built = self._split(split)
        return {
            "data": built.data_fingerprint,
            "tokenizer": tokenizer_fingerprint(self._require_tokenizer()),
            "template": short_hash(vars(self.template_settings)),
            "truncation": short_hash(vars(self.truncation)),
        }

    # ------------------------------------------------------------------ loaders

    def _loader(
        self,
        dataset: PreferenceDataset,
        batch_size: int,
        shuffle: bool,
        pad: bool = False,
        loader_class: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        # One global order for any number of devices, epoch e's drawn from seed + e
        # (fpo.data.sampler); training pads so that every rank runs the same number of steps.
        seed = self.seed if shuffle else None
        sampler = GlobalBatchSampler(dataset, batch_size, seed=seed, pad=pad)
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Train pairs; epoch ``e`` in the order drawn from ``seed + e`` (when ``shuffle``).

        A :class:`~fpo.data.resumable.ResumableDataLoader`: its position is saved in the
        checkpoint, so a run resumed mid-epoch serves the rest of that epoch.
        """
        return self._loader(
            self.train_dataset,
            self.batch_size,
            self.shuffle,
            pad=True,
            loader_class=ResumableDataLoader,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Val pairs in file order; ``[]`` (no validation) without ``val_source``."""
        if "val" not in self.specs:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)
