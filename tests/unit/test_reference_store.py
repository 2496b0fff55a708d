"""Offline reference cache storage: round trip, join by id, refusal, integrity, resume, DDP."""

from __future__ import annotations

import copy
import pickle
import random

import numpy as np
import pytest
import torch

from fpo.errors import UserError
from fpo.reference.fingerprint import (
    compare_fingerprints,
    hash_json,
    hash_state_dict,
    library_versions,
)
from fpo.reference.store import (
    CachedReferenceDataset,
    ReferenceCache,
    ReferenceCacheWriter,
    cache_info,
    finalize,
    format_cache_info,
)

K = 4
N = 10
COMPONENTS = {
    "data": "d" * 64,
    "tokenizer": "tok",
    "template": "tpl",
    "truncation": "max_length=64",
    "reference_weights": "a" * 64,
    "sae_weights": "b" * 64,
    "sae_hook": "blocks.1.hook_resid_post",
    "k": str(K),
    "dtype": "float32",
    "versions": "c" * 64,
}
REBUILD = "fpo-cache data=tiny cache.path=X"


def make_rows(n: int = N, k: int = K, seed: int = 0):
    """ids ex000.., and per side the five fields with hand-checkable dtypes."""
    rng = np.random.default_rng(seed)

    def side() -> dict[str, np.ndarray]:
        n_tokens = rng.integers(1, 20, n)
        sum_logps = -rng.uniform(1, 50, n).astype(np.float32)
        fields = {
            "sum_logps": sum_logps,
            "avg_logps": (sum_logps / n_tokens).astype(np.float32),
            "n_tokens": n_tokens,
        }
        if k:
            fields["topk_indices"] = rng.integers(0, 100, (n, k))
            fields["topk_values"] = rng.uniform(0, 5, (n, k)).astype(np.float32)
        return fields

    return [f"ex{i:03d}" for i in range(n)], side(), side()


def take(fields: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {name: value[rows] for name, value in fields.items()}


def build(path, rows, *, batch=4, rank=0, world_size=1, fin=True, **kwargs):
    """Write ``rows`` (ids, chosen, rejected) in batches of ``batch``; close; finalize."""
    ids, chosen, rejected = rows
    kwargs = {"components": COMPONENTS, "k": K, "values_dtype": "float32", **kwargs}
    writer = ReferenceCacheWriter(path, rank=rank, world_size=world_size, shard_size=3, **kwargs)
    for start in range(0, len(ids), batch):
        sl = slice(start, start + batch)
        writer.add(ids[sl], take(chosen, sl), take(rejected, sl))
    writer.close()
    if fin:
        finalize(path, world_size)
    return writer


def contents(path) -> dict[str, dict]:
    cache = ReferenceCache.open(path)
    rows = {i: cache.get(i) for i in cache.ids()}
    return {i: {key: np.asarray(v).tolist() for key, v in row.items()} for i, row in rows.items()}


def expected_row(rows, i: int) -> dict[str, object]:
    _, chosen, rejected = rows
    out = {}
    for side, fields in (("chosen", chosen), ("rejected", rejected)):
        for name, value in fields.items():
            out[f"ref_{side}_{name}"] = value[i]
    return out


# ------------------------------------------------------------------------------ round trip
def test_round_trip_float32_is_exact(tmp_path):
    rows = make_rows()
    ids, chosen, rejected = rows
    torch_rejected = {name: torch.from_numpy(value) for name, value in rejected.items()}
    build(tmp_path, (ids, chosen, torch_rejected))
    cache = ReferenceCache.open(tmp_path)
    assert len(cache) == N and cache.k == K and "ex003" in cache and "ex999" not in cache
    assert cache.manifest["num_pairs"] == N and len(cache.manifest["shards"]) == 4  # 3+3+3+1
    for i, example_id in enumerate(ids):
        got = cache.get(example_id)
        for key, value in expected_row(rows, i).items():
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        assert got["ref_chosen_topk_indices"].dtype == np.int64
        assert got["ref_chosen_topk_values"].dtype == np.float32
        assert got["ref_chosen_topk_values"].shape == (K,)
        assert isinstance(got["ref_chosen_n_tokens"], int)


def test_round_trip_float16_within_half_precision(tmp_path):
    rows = make_rows()
    build(tmp_path, rows, values_dtype="float16")
    cache = ReferenceCache.open(tmp_path)
    assert cache.manifest["values_dtype"] == "float16"
    for i, example_id in enumerate(rows[0]):
        got = cache.get(example_id)["ref_rejected_topk_values"]
        exact = rows[2]["topk_values"][i]
        np.testing.assert_array_equal(got, exact.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(got, exact, rtol=2**-11)
        assert cache.get(example_id)["ref_rejected_sum_logps"] == rows[2]["sum_logps"][i]


def test_dpo_only_cache_has_empty_topk(tmp_path):
    rows = make_rows(k=0)
    build(tmp_path, rows, k=0)
    got = ReferenceCache.open(tmp_path).get("ex002")
    assert got["ref_chosen_topk_indices"].shape == (0,)
    assert got["ref_rejected_topk_values"].shape == (0,)
    assert got["ref_chosen_avg_logps"] == rows[1]["avg_logps"][2]


# ------------------------------------------------------------------------------ join by id
def test_dataset_joins_by_id_after_shuffle_and_filter(tmp_path):
    rows = make_rows()
    build(tmp_path, rows)
    examples = [{"example_id": i, "prompt": f"prompt of {i}"} for i in rows[0]]
    random.Random(0).shuffle(examples)
    kept = [e for e in examples if e["example_id"] not in ("ex001", "ex007")]
    dataset = CachedReferenceDataset(kept, ReferenceCache.open(tmp_path))
    assert len(dataset) == N - 2
    for item in dataset:
        i = int(item["example_id"][2:])
        assert item["prompt"] == f"prompt of ex{i:03d}"
        assert item["ref_chosen_sum_logps"] == rows[1]["sum_logps"][i]
        np.testing.assert_array_equal(item["ref_rejected_topk_indices"], rows[2]["topk_indices"][i])


def test_unknown_id_is_refused_naming_it(tmp_path):
    build(tmp_path, make_rows())
    dataset = CachedReferenceDataset([{"example_id": "other-42"}], ReferenceCache.open(tmp_path))
    with pytest.raises(UserError, match=r"'other-42'.*built for other data"):
        dataset[0]


def test_cache_survives_pickling_for_dataloader_workers(tmp_path):
    rows = make_rows()
    build(tmp_path, rows)
    cache = ReferenceCache.open(tmp_path)
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 1000  # the path, not the data
    got = clone.get("ex005")["ref_chosen_topk_values"]
    np.testing.assert_array_equal(got, rows[1]["topk_values"][5])


# ----------------------------------------------------------------------- fingerprint checks
@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_each_changed_component_is_refused_by_name(tmp_path, name):
    build(tmp_path, make_rows())
    expected = {**COMPONENTS, name: "changed"}
    with pytest.raises(UserError) as err:
        ReferenceCache.open(tmp_path, expected_components=expected, rebuild_command=REBUILD)
    message = str(err.value)
    assert f"  {name}: expected changed, found {COMPONENTS[name][:12]}" in message
    assert REBUILD in message
    differing = [line.split(":")[0].strip() for line in message.splitlines() if line[:2] == "  "]
    assert differing == [name]
    ReferenceCache.open(tmp_path, expected_components=COMPONENTS)  # the matching one loads


@pytest.mark.parametrize("name", ["data", "sae_weights"])
def test_writer_refuses_partial_state_with_other_components(tmp_path, name):
    ids, chosen, rejected = make_rows()
    build(tmp_path, (ids[:4], take(chosen, slice(4)), take(rejected, slice(4))), fin=False)
    with pytest.raises(UserError, match=rf"(?s)Refusing.*  {name}: expected changed"):
        ReferenceCacheWriter(tmp_path, {**COMPONENTS, name: "changed"}, K, "float32")
    with pytest.raises(UserError, match=r"  values_dtype: expected float16, found float32"):
        ReferenceCacheWriter(tmp_path, COMPONENTS, K, "float16")
    changed = {**COMPONENTS, name: "changed"}
    writer = ReferenceCacheWriter(tmp_path, changed, K, "float32", overwrite=True)
    assert writer.done_ids() == set()


def test_missing_folder_and_missing_manifest_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*fpo-cache data=tiny"):
        ReferenceCache.open(tmp_path / "nowhere", rebuild_command=REBUILD)
    build(tmp_path, make_rows(), fin=False)  # every rank closed, killed before finalize
    with pytest.raises(UserError, match=r"incomplete: it has no manifest.json.*fpo-cache"):
        ReferenceCache.open(tmp_path, rebuild_command=REBUILD)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_is_refused_naming_the_file(tmp_path, damage):
    build(tmp_path, make_rows())
    shard = tmp_path / "shards" / "rank0-00001.arrow"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[:-10])
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    with pytest.raises(UserError, match=r"damaged: shard .*rank0-00001\.arrow"):
        ReferenceCache.open(tmp_path)


# --------------------------------------------------------------------------- resume, ranks
def test_interrupted_build_resumes_to_same_content(tmp_path):
    rows = make_rows()
    ids, chosen, rejected = rows
    build(tmp_path / "full", rows)

    path = tmp_path / "resumed"
    writer = ReferenceCacheWriter(path, COMPONENTS, K, "float32", shard_size=3)
    writer.add(ids[:7], take(chosen, slice(7)), take(rejected, slice(7)))
    del writer  # killed: two shards on disk, one buffered row lost, no part-manifest
    (path / "shards" / ".rank0-00002.arrow.tmp-999").write_bytes(b"half a shard")

    writer = ReferenceCacheWriter(path, COMPONENTS, K, "float32", shard_size=3)
    assert writer.done_ids() == set(ids[:6])
    writer.add(ids, chosen, rejected)  # already-written ids are dropped
    writer.close()
    manifest = finalize(path, 1)
    assert manifest["num_rows"] == N and manifest["num_pairs"] == N
    assert not list((path / "shards").glob(".*tmp*"))
    assert contents(path) == contents(tmp_path / "full")


def test_exception_inside_with_keeps_rows_but_leaves_rank_unfinished(tmp_path):
    ids, chosen, rejected = make_rows()
    writer = ReferenceCacheWriter(tmp_path, COMPONENTS, K, "float32", shard_size=3)
    with pytest.raises(RuntimeError, match="predict failed"), writer:
        writer.add(ids[:4], take(chosen, slice(4)), take(rejected, slice(4)))
        raise RuntimeError("predict failed")
    assert not (tmp_path / "parts" / "rank0.json").exists()
    with pytest.raises(UserError, match="rank 0 has not finished"):
        finalize(tmp_path, 1)
    assert ReferenceCacheWriter(tmp_path, COMPONENTS, K, "float32").done_ids() == set(ids[:4])


def test_two_ranks_equal_one_rank(tmp_path):
    rows = make_rows()
    ids, chosen, rejected = rows
    build(tmp_path / "single", rows)
    path = tmp_path / "ddp"
    for rank in (0, 1):
        mine = [i for i in range(N) if i % 2 == rank]
        part = ([ids[i] for i in mine], take(chosen, mine), take(rejected, mine))
        build(path, part, rank=rank, world_size=2, fin=False)
        if rank == 0:
            with pytest.raises(UserError, match="rank 1 has not finished"):
                finalize(path, 2)
    assert finalize(path, 2)["num_pairs"] == N
    names = sorted(p.name for p in (path / "shards").iterdir())
    assert names == [f"rank{r}-0000{n}.arrow" for r in (0, 1) for n in (0, 1)]  # 5 rows each
    assert contents(path) == contents(tmp_path / "single")


def test_duplicate_ids_equal_values_fine_different_values_refused(tmp_path):
    ids, chosen, rejected = make_rows()
    first = ([ids[0], ids[1]], take(chosen, [0, 1]), take(rejected, [0, 1]))
    build(tmp_path / "eq", first, rank=0, world_size=2, fin=False)
    build(tmp_path / "eq", first, rank=1, world_size=2)  # a DistributedSampler repeat
    assert len(ReferenceCache.open(tmp_path / "eq")) == 2
    other = take(chosen, [0, 1])
    other["sum_logps"] = other["sum_logps"] - 1.0
    build(tmp_path / "ne", first, rank=0, world_size=2, fin=False)
    build(tmp_path / "ne", (first[0], other, first[2]), rank=1, world_size=2)
    with pytest.raises(UserError, match=r"'ex000' is stored twice with different values"):
        ReferenceCache.open(tmp_path / "ne")


def test_invalid_rows_are_rejected(tmp_path):
    ids, chosen, rejected = make_rows(n=2)
    bad = {**chosen, "avg_logps": np.array([np.nan, -1.0], np.float32)}
    writer = ReferenceCacheWriter(tmp_path / "a", COMPONENTS, K, "float16")
    with pytest.raises(ValueError, match="chosen_avg_logps invalid for example id 'ex000'"):
        writer.add(ids, bad, rejected)
    huge = {**rejected, "topk_values": np.full((2, K), 1e6, np.float32)}
    with pytest.raises(UserError, match="'ex000' are not finite as float16"):
        writer.add(ids, chosen, huge)


# ------------------------------------------------------------------------------- cache_info
def test_cache_info_numbers(tmp_path):
    build(tmp_path, make_rows())
    info = cache_info(tmp_path)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "shards").glob("*.arrow"))
    assert info["complete"] and info["num_pairs"] == N and info["num_shards"] == 4
    assert info["k"] == K and info["values_dtype"] == "float32"
    assert info["total_bytes"] == on_disk
    assert info["bytes_per_pair"] == pytest.approx(on_disk / N)
    assert info["components"] == COMPONENTS and info["versions"] == library_versions()
    assert info["build_seconds"] >= 0 and info["created"].startswith("20")
    text = format_cache_info(info)
    assert f"pairs {N}," in text and "sae_hook" in text and f"{on_disk} bytes" in text


def test_cache_info_of_an_interrupted_build(tmp_path):
    ids, chosen, rejected = make_rows()
    writer = ReferenceCacheWriter(tmp_path, COMPONENTS, K, "float32", shard_size=3)
    writer.add(ids, chosen, rejected)
    info = cache_info(tmp_path)
    assert not info["complete"] and info["num_rows"] == 9 and info["num_shards"] == 3
    assert "INCOMPLETE" in format_cache_info(info)


# ------------------------------------------------------------------------------ fingerprint
def test_hash_state_dict_stable_and_sensitive():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    digest = hash_state_dict(model)
    assert digest == hash_state_dict(copy.deepcopy(model))
    assert digest == hash_state_dict(dict(reversed(list(model.state_dict().items()))))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[1].weight[1, 2] += 1e-6
    assert hash_state_dict(changed) != digest
    assert hash_state_dict(model.double()) != digest
    state = {"w": torch.ones(2, 3)}
    assert hash_state_dict(state) != hash_state_dict({"v": torch.ones(2, 3)})
    assert hash_state_dict(state) != hash_state_dict({"w": torch.ones(3, 2)})
    assert hash_state_dict({"w": torch.ones(2, dtype=torch.bfloat16)}) != hash_state_dict(
        {"w": torch.ones(2, dtype=torch.float16)}
    )


def test_hash_json_and_compare_fingerprints():
    assert hash_json({"a": 1, "b": [1, 2]}) == hash_json({"b": [1, 2], "a": 1})
    assert hash_json({"a": 1}) != hash_json({"a": 2})
    found = {**COMPONENTS, "data": "x", "extra": "y"}
    del found["sae_hook"]
    assert compare_fingerprints(COMPONENTS, found) == ["data", "sae_hook", "extra"]
    assert compare_fingerprints(COMPONENTS, dict(COMPONENTS)) == []
    assert set(library_versions()) == {"torch", "transformers", "sae-lens"}
    assert library_versions()["torch"].startswith(torch.__version__.split("+")[0])
