"""Reference cache values are verified: a sha256 per shard in the manifest, checked on open
and by ``fpo-cache --verify`` (``fpo.cache_checksums``)."""

from __future__ import annotations

import json
import logging
import re
import sys

import numpy as np
import pyarrow as pa
import pytest

import fpo.commands.cache
from fpo.errors import UserError
from fpo.hashing import file_sha256
from fpo.reference.build import ReferenceCacheWriter
from fpo.reference.store import ReferenceCache, completed_ids

K, N = 4, 10
REBUILD = "fpo-cache data=tiny cache.path=X cache.overwrite=true"
SHARD = "rank0-00001.arrow"  # of three: rows 0-3, 4-7, 8-9


def make_rows(n: int = N) -> tuple[list[str], dict, dict]:
    """ids and the per-side fields of ``n`` pairs (``[n]`` and ``[n, K]`` arrays)."""
    rng = np.random.default_rng(0)

    def side() -> dict[str, np.ndarray]:
        return {
            "sum_logps": -rng.uniform(1, 50, n).astype(np.float32),
            "avg_logps": -rng.uniform(0, 5, n).astype(np.float32),
            "n_tokens": rng.integers(1, 20, n),
            "topk_indices": rng.integers(0, 100, (n, K)),
            "topk_values": rng.uniform(0, 5, (n, K)).astype(np.float32),
        }

    return [f"ex{i:03d}" for i in range(n)], side(), side()


def take(fields: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {name: value[rows] for name, value in fields.items()}


def writer(path) -> ReferenceCacheWriter:
    return ReferenceCacheWriter(path, {"data": "d"}, k=K, values_dtype="float32", shard_size=3)


def build(path, rows) -> None:
    """Write ``rows`` in batches of 4 (a shard each, the last one 2 rows); finalize."""
    ids, chosen, rejected = rows
    out = writer(path)
    for start in range(0, len(ids), 4):
        part = slice(start, start + 4)
        out.add(ids[part], take(chosen, part), take(rejected, part))
    out.close()
    out.finalize(ids)


def contents(path, ids) -> dict[str, dict]:
    cache = ReferenceCache.open(path)
    return {i: {key: np.asarray(v).tolist() for key, v in cache.get(i).items()} for i in ids}


def change_one_value(shard, column: str = "chosen_sum_logps", row: int = 1) -> None:
    """Rewrite the shard with one float changed (same schema, same size, a valid Arrow file):
    what a damaged disk, a bad copy or a hand edit can leave."""
    table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
    values = table.column(column).to_pylist()
    values[row] += 1.0
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(values, pa.float32()))
    size = shard.stat().st_size
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as ipc:
        ipc.write_table(table)
    shard.write_bytes(sink.getvalue().to_pybytes())
    assert shard.stat().st_size == size  # the size check alone cannot see it


def run_verify(path, monkeypatch, capsys) -> tuple[int, str]:
    """``fpo-cache --verify PATH``: (exit status, stdout)."""
    monkeypatch.setattr(sys, "argv", ["fpo-cache", "--verify", str(path)])
    try:
        fpo.commands.cache.main()
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().out


def test_each_shard_checksum_is_recorded_and_a_clean_cache_verifies(tmp_path, monkeypatch, capsys):
    build(tmp_path, make_rows())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3
    for entry in manifest["shards"]:
        assert entry["sha256"] == file_sha256(tmp_path / entry["file"])
    ReferenceCache.open(tmp_path)
    status, out = run_verify(tmp_path, monkeypatch, capsys)
    assert status == 0 and f"{tmp_path}: verified, 3 shards, 10 pairs" in out, out


def test_a_changed_value_is_refused_naming_the_shard_and_the_rebuild_command(
    tmp_path, monkeypatch, capsys
):
    build(tmp_path, make_rows())
    shard = tmp_path / "shards" / SHARD
    change_one_value(shard)
    problem = r"has other contents than when the cache was built \(sha256 .*\): a value"
    with pytest.raises(UserError, match=rf"damaged: shard {shard} {problem}.*{REBUILD}$"):
        ReferenceCache.open(tmp_path, rebuild_command=REBUILD)

    status, out = run_verify(tmp_path, monkeypatch, capsys)
    assert status == 2 and "DAMAGED (1 of 3 shards)" in out and f"shard {shard} has other" in out
    assert out.count("has other contents") == 1, out  # the other shards are fine


def test_verify_reports_every_split_of_a_root_folder(tmp_path, monkeypatch, capsys):
    for split in ("train", "val"):
        build(tmp_path / split, make_rows())
    change_one_value(tmp_path / "val" / "shards" / SHARD)
    status, out = run_verify(tmp_path, monkeypatch, capsys)
    assert status == 2
    assert f"{tmp_path / 'train'}: verified" in out and f"{tmp_path / 'val'}: DAMAGED" in out


def test_a_cache_without_checksums_opens_unverified_and_does_not_verify(
    tmp_path, monkeypatch, capsys, caplog
):
    """Caches finalized before checksums were recorded still serve training (with a log
    line saying so); ``--verify`` reports them as unverified, exit 2."""
    rows = make_rows()
    build(tmp_path, rows)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["sha256"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="fpo.cache"):
        assert len(ReferenceCache.open(tmp_path)) == len(rows[0])
    assert "has no checksums" in caplog.text and "not verified" in caplog.text
    status, out = run_verify(tmp_path, monkeypatch, capsys)
    assert status == 2 and "UNVERIFIED" in out and "cache.overwrite=true" in out


def test_a_resumed_build_recomputes_a_changed_shard_instead_of_blessing_it(tmp_path):
    """Running the build again over a finished cache with a changed shard: the shard is
    removed and its pairs computed again (finalize must not record the changed bytes)."""
    rows = make_rows()
    ids, chosen, rejected = rows
    build(tmp_path / "clean", rows)
    path = tmp_path / "changed"
    build(path, rows)
    change_one_value(path / "shards" / SHARD)

    resumed = writer(path)
    assert not (path / "shards" / SHARD).exists()
    done = completed_ids(path)
    todo = [i for i, example_id in enumerate(ids) if example_id not in done]
    assert todo == [4, 5, 6, 7]
    resumed.add([ids[i] for i in todo], take(chosen, todo), take(rejected, todo))
    resumed.close()
    resumed.finalize(ids)
    assert contents(path, ids) == contents(tmp_path / "clean", ids)


def test_the_verify_flag_needs_one_path(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fpo-cache", "--verify"])
    with pytest.raises(SystemExit) as exit_:
        fpo.commands.cache.main()
    assert exit_.value.code == 2
    assert re.search(r"usage: fpo-cache --verify PATH", capsys.readouterr().err)
