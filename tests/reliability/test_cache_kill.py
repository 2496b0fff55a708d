"""``fpo-cache`` killed with SIGKILL mid-build (a shard written but not yet renamed into
place) and run again finishes, its cache equals an uninterrupted build's, and the killed
write's temp file is gone (the rerun removes temp files of writers that no longer run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fpo.reference.store import ReferenceCache, completed_ids
from fpo.testing import run_module

ARGS = ("experiment=smoke", "objective=fpo", "cache.shard_size=2", "cache.batch_size=2")


def rows(root: Path) -> dict[str, dict]:
    out = {}
    for split in ("train", "val"):
        cache = ReferenceCache.open(root / split)
        for example_id in sorted(cache._index):
            row = cache.get(example_id)
            out[f"{split}/{example_id}"] = {k: np.asarray(v).tolist() for k, v in row.items()}
    return out


def test_sigkilled_cache_build_resumes_to_the_uninterrupted_cache(tmp_path):
    def cache(where: Path, *extra: str, module=("fpo.commands.cache",)):
        paths = (f"paths.log_dir={where / 'logs'}", f"paths.cache_dir={where / 'cache'}")
        return run_module(*module, *ARGS, *paths, *extra)

    full = cache(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    root = tmp_path / "killed" / "cache" / "reference" / "tiny" / "ultrafeedback_fixture" / "fpo"

    # 8 train pairs in shards of 2: killed before renaming the second shard into place
    killed = cache(tmp_path / "killed", module=("fpo.testing.faults", "2", "fpo.commands.cache"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    shards = root / "train" / "shards"
    assert [p.name for p in shards.glob("rank*.arrow")] == ["rank0-00000.arrow"]
    assert list(shards.glob(".rank0-00001.arrow.tmp-*")), "the killed write left its temp file"
    assert len(completed_ids(root / "train")) == 2
    assert not (root / "train" / "manifest.json").exists()

    resumed = cache(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train: 8 pairs (6 computed now)" in resumed.stdout, resumed.stdout
    assert not list(shards.glob(".*.tmp-*")), "the rerun left the killed write's temp file"
    assert rows(root) == rows(tmp_path / "full" / root.relative_to(tmp_path / "killed"))
