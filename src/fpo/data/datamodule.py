"""`PreferenceDataModule`: preference pairs from files, folders or the hub, as batches.

Pipeline per split (:mod:`fpo.data.pipeline`): open the source (:mod:`fpo.data.sources`) ->
per row, with ``datasets.Dataset.map`` (cached, ``num_proc`` workers): map the columns, parse
and validate (bad rows skipped and counted, or a :class:`UserError`), template, tokenize and
truncate (pairs with an empty response after truncation dropped and counted) ->
:class:`PreferenceDataset` -> :class:`PreferenceCollator`.

``stats[split]`` (``split`` in ``train``/``val``) counts ``rows`` read (after
``max_*_samples``, which keeps the first N rows), ``bad_rows``,
``dropped_empty_after_truncation``, ``kept`` (= rows - bad_rows - dropped) and
``special_token_text`` (valid rows holding special-token strings as text).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch import LightningDataModule
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from fpo.data.collate import PreferenceCollator
from fpo.data.formats import FORMATS, Columns, short_hash
from fpo.data.pipeline import BAD_ROW_POLICIES, BuiltSplit, SplitSpec, build_split
from fpo.data.resumable import ResumableDataLoader
from fpo.data.sampler import GlobalBatchSampler
from fpo.data.special_text import POLICIES as SPECIAL_TEXT_POLICIES
from fpo.data.tokenize import (
    TemplateSettings,
    TokenizedPair,
    Truncation,
    check_plain_template,
    resolve_chat_template,
    tokenizer_fingerprint,
)
from fpo.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["BuiltSplit", "PreferenceDataModule", "PreferenceDataset", "SplitSpec", "build_split"]


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


class PreferenceDataModule(LightningDataModule):
    """Preference pairs -> batches of chosen+rejected rows (``fpo.data.collate``).

    All arguments are plain values (Hydra-friendly) except ``tokenizer``, which may also be
    given later with :meth:`set_tokenizer`. ``format`` is ``auto|ultrafeedback|hh_rlhf|plain``
    (auto: from the first row; :mod:`fpo.data.formats`); ``columns`` maps prompt/chosen/
    rejected to the row's keys; ``chat_template`` is ``auto|true|false``; ``plain_template`` is
    a ``str.format`` pattern with ``{prompt}``; ``on_bad_row`` is ``skip|fail``;
    ``special_token_text`` is ``literal|control`` (:mod:`fpo.data.special_text`). Sources:
    :mod:`fpo.data.sources` (``subset`` and ``load_kwargs`` go to ``datasets.load_dataset``
    for hub names). ``num_proc`` tokenizes in that many processes; ``cache_dir`` keeps the
    tokenized splits of file and hub sources (``None``: not kept).
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
        subset: str | None = None,
        load_kwargs: Mapping[str, Any] | None = None,
        columns: Mapping[str, str] | None = None,
        special_token_text: str = "literal",
        num_proc: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise UserError(f"data.format={format!r}: expected one of {', '.join(FORMATS)}")
        if special_token_text not in SPECIAL_TEXT_POLICIES:
            raise UserError(
                f"data.special_token_text={special_token_text!r}: expected literal or control"
            )
        if on_bad_row not in BAD_ROW_POLICIES:
            raise UserError(f"data.on_bad_row={on_bad_row!r}: expected skip or fail")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if int(value) < 1:
                raise UserError(f"data.{key}={value}: must be >= 1")
        check_plain_template(plain_template)
        sources = {"train_source": train_source, "val_source": val_source}
        in_memory = [key for key, value in sources.items() if not isinstance(value, str | None)]
        # Plain values: checkpoints hold these and are loaded weights-only (no DictConfig).
        load_kwargs, columns = (
            OmegaConf.to_container(v) if isinstance(v, DictConfig) else v
            for v in (load_kwargs, columns)
        )
        self.save_hyperparameters(ignore=["tokenizer", *in_memory])
        hub = {"subset": subset, "load_kwargs": dict(load_kwargs or {})}
        self.specs = {
            "train": SplitSpec(
                train_source, train_split, max_train_samples, "data.train_source", **hub
            )
        }
        if val_source is not None:
            self.specs["val"] = SplitSpec(
                val_source, val_split, max_val_samples, "data.val_source", **hub
            )
        self.format = format
        self.columns = Columns.from_config(columns)
        self.special_token_text = special_token_text
        self.num_proc = int(num_proc) if num_proc else None
        self.cache_dir = str(cache_dir) if cache_dir else None
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
            special_token_text=self.special_token_text,
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
                columns=self.columns,
                num_proc=self.num_proc,
                cache_dir=self.cache_dir,
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
