"""A train loader that resumes mid-epoch: the data position is part of the checkpoint.

Lightning (2.6) saves ``state_dict()`` of every train loader that has ``state_dict`` and
``load_state_dict`` (its ``_Stateful`` protocol) under ``loops.fit_loop.state_dict.
combined_loader`` and hands it back to the new loader before the resumed epoch starts. Two
pieces make the resumed epoch serve exactly the batches the interrupted one had not served:

* :class:`fpo.data.sampler.GlobalBatchSampler` draws epoch ``e``'s order from ``seed + e``
  alone (Lightning calls ``set_epoch`` every epoch), so a restarted process shuffles epoch
  ``e`` as the first one did, for any number of devices.
* :class:`ResumableDataLoader` counts the batches it served in the current epoch;
  ``load_state_dict`` makes its next pass over the same epoch skip that many.

Skipped batches are drawn and dropped (not re-served), so any sampler and worker count
resumes exactly; the pairs are tokenized in memory, so skipping costs only collation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the current epoch can be saved and restored.

    ``state_dict()`` is ``{"epoch", "batches"}``: the sampler's epoch and the batches served
    in it. After ``load_state_dict``, the next pass whose sampler epoch equals the saved one
    skips the saved number of batches (a pass of another epoch starts from its beginning).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._epoch: int | None = None
        self._resume: dict[str, int] | None = None

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: the body runs at the first batch, after Lightning's set_epoch.
        iterator = super().__iter__()
        self._epoch, self._served = self._sampler_epoch(), 0
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume and resume["epoch"] == self._epoch else 0
        for _ in range(skip):
            next(iterator)
            self._served += 1
        for batch in iterator:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch = self._sampler_epoch() if self._epoch is None else self._epoch
        return {"epoch": epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}
