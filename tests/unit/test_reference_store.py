"""Offline reference cache storage: round trip, join by id, refusal, integrity, resume, ranks."""

from __future__ import annotations

import copy
import json
import pickle
import random

import numpy as np
import pytest
import torch

from fpo.errors import UserError
from fpo.hashing import hash_state_dict, model_config_hash, sae_config_hash
from fpo.models.tiny import build_tiny_model
from fpo.reference.build import ReferenceCacheWriter
from fpo.reference.settings import differences, library_versions
from fpo.reference.store import (
    CachedReferenceDataset,
    ReferenceCache,
    cache_info,
    completed_ids,
    format_cache_info,
)
from fpo.sae import build_random_sae

K = 4
N = 10
COMPONENTS = {
    "data": "d" * 64,
    "tokenizer": "tok",
    "template": "tpl",
    "truncation": "max_length=64",
    "reference_weights": "a" * 64,
    "reference_config": "e" * 64,
    "sae_weights": "b" * 64,
    "sae_config": "f" * 64,
    "sae_hook": "blocks.1.hook_resid_post",
    "k": str(K),
    "dtype": "float32",
    "precision": "32-true",
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


def writer(path, rank=0, world_size=1, **kwargs) -> ReferenceCacheWriter:
    kwargs = {
        "components": COMPONENTS,
        "k": K,
        "values_dtype": "float32",
        "shard_size": 3,
        **kwargs,
    }
    return ReferenceCacheWriter(path, rank=rank, world_size=world_size, **kwargs)


def build(path, rows, *, batch=4, fin=True, **kwargs) -> ReferenceCacheWriter:
    """Write ``rows`` (ids, chosen, rejected) in batches of ``batch``; close; finalize."""
    ids, chosen, rejected = rows
    out = writer(path, **kwargs)
    for start in range(0, len(ids), batch):
        sl = slice(start, start + batch)
        out.add(ids[sl], take(chosen, sl), take(rejected, sl))
    out.close()
    if fin:
        out.finalize(ids)
    return out


def contents(path, ids) -> dict[str, dict]:
    cache = ReferenceCache.open(path)
    assert len(cache) == len(ids) and not cache.missing(ids)
    rows = {i: cache.get(i) for i in ids}
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
    assert len(cache) == N and cache.k == K and cache.missing(["ex003", "ex999"]) == ["ex999"]
    assert cache.manifest["num_pairs"] == N and len(cache.manifest["shards"]) == 3  # 4+4+2
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
    assert cache.manifest["components"]["dtype"] == "float16"  # the writer's, not the caller's
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
@pytest.mark.parametrize("name", list(COMPONENTS))
def test_each_changed_component_is_refused_by_name(tmp_path, name):
    build(tmp_path, make_rows())
    expected = {**COMPONENTS, name: "changed"}
    with pytest.raises(UserError) as err:
        ReferenceCache.open(tmp_path, expected_components=expected, rebuild_command=REBUILD)
    message = str(err.value)
    assert f"  {name}: expected changed, found {COMPONENTS[name][:12]}" in message
    assert message.endswith(f"Rebuild it with: {REBUILD}")
    differing = [line.split(":")[0].strip() for line in message.splitlines() if line[:2] == "  "]
    assert differing == [name]
    ReferenceCache.open(tmp_path, expected_components=COMPONENTS)  # the matching one loads


def test_a_run_without_features_reads_the_log_probs_of_a_cache_with_features(tmp_path):
    """FPO at alpha 0 (or DPO) expects no SAE and k 0; a cache built with features holds
    the same log-probs. Everything the log-probs depend on is still checked, and a run
    that needs features still refuses a cache without them."""
    rows = make_rows()
    build(tmp_path, rows)
    no_features = {
        **COMPONENTS,
        "sae_weights": "none",
        "sae_config": "none",
        "sae_hook": "none",
        "k": "0",
    }
    cache = ReferenceCache.open(tmp_path, expected_components=no_features)
    assert cache.get("ex003")["ref_chosen_sum_logps"] == rows[1]["sum_logps"][3]
    with pytest.raises(UserError, match="  reference_weights: expected changed"):
        ReferenceCache.open(
            tmp_path, expected_components={**no_features, "reference_weights": "changed"}
        )
    logps_only = tmp_path / "logps_only"
    build(logps_only, make_rows(k=0), k=0, components=no_features)
    with pytest.raises(UserError, match="  k: expected 4, found 0"):
        ReferenceCache.open(logps_only, expected_components=COMPONENTS)


@pytest.mark.parametrize("name", ["data", "sae_weights"])
def test_writer_refuses_partial_state_with_other_components(tmp_path, name):
    ids, chosen, rejected = make_rows()
    build(tmp_path, (ids[:4], take(chosen, slice(4)), take(rejected, slice(4))), fin=False)
    with pytest.raises(
        UserError, match=rf"(?s)Refusing.*rank0-00000.arrow.*  {name}: expected changed"
    ):
        writer(tmp_path, components={**COMPONENTS, name: "changed"})
    with pytest.raises(UserError, match=r"  dtype: expected float16, found float32"):
        writer(tmp_path, values_dtype="float16")
    changed = writer(tmp_path, components={**COMPONENTS, name: "changed"}, overwrite=True)
    assert not list((tmp_path / "shards").iterdir())
    changed.close()
    assert changed.finalize()["num_pairs"] == 0


def test_missing_folder_and_missing_manifest_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*fpo-cache data=tiny"):
        ReferenceCache.open(tmp_path / "nowhere", rebuild_command=REBUILD)
    build(tmp_path, make_rows(), fin=False)  # every rank closed, killed before finalize
    with pytest.raises(UserError, match=r"incomplete: it has no manifest.json.*fpo-cache"):
        ReferenceCache.open(tmp_path, rebuild_command=REBUILD)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_shard_is_refused_naming_the_file(tmp_path, damage):
    build(tmp_path, make_rows())
    shard = tmp_path / "shards" / "rank0-00001.arrow"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[:-10])
        problem = r"has \d+ bytes where the manifest records \d+ \(truncated\?\)"
    elif damage == "garbage":  # same size, no Arrow footer
        shard.write_bytes(bytes(len(data)))
        problem = "cannot be read"
    else:
        shard.unlink()
        problem = "is missing"
    with pytest.raises(UserError, match=rf"damaged: shard {shard} {problem}.*{REBUILD}"):
        ReferenceCache.open(tmp_path, rebuild_command=REBUILD)


# --------------------------------------------------------------------------- resume, ranks
def test_interrupted_build_resumes_to_same_content(tmp_path):
    rows = make_rows()
    ids, chosen, rejected = rows
    build(tmp_path / "full", rows)

    path = tmp_path / "resumed"
    killed = writer(path)
    killed.add(ids[:4], take(chosen, slice(4)), take(rejected, slice(4)))  # a shard
    killed.add(ids[4:6], take(chosen, slice(4, 6)), take(rejected, slice(4, 6)))  # buffered
    del killed  # killed: one shard on disk, two buffered rows lost, no manifest
    (path / "shards" / ".rank0-00001.arrow.tmp-999").write_bytes(b"half a shard")
    with pytest.raises(UserError, match="incomplete"):
        ReferenceCache.open(path)
    info = cache_info(path)
    assert not info["complete"] and info["num_rows"] == 4 and info["num_shards"] == 1
    assert info["components"]["sae_hook"] == COMPONENTS["sae_hook"]
    assert "INCOMPLETE" in format_cache_info(info)

    resumed = writer(path)
    done = completed_ids(path)
    assert done == set(ids[:4])
    todo = [i for i, example_id in enumerate(ids) if example_id not in done]
    resumed.add([ids[i] for i in todo], take(chosen, todo), take(rejected, todo))
    resumed.close()
    manifest = resumed.finalize(ids)
    assert manifest["num_rows"] == N and manifest["num_pairs"] == N
    assert sorted(p.name for p in (path / "shards").glob("rank*")) == [
        "rank0-00000.arrow",
        "rank0-00001.arrow",
    ]
    assert contents(path, ids) == contents(tmp_path / "full", ids)


def test_abort_keeps_finished_rows_and_leaves_the_cache_incomplete(tmp_path):
    ids, chosen, rejected = make_rows()
    aborted = writer(tmp_path, shard_size=100)
    aborted.add(ids[:4], take(chosen, slice(4)), take(rejected, slice(4)))
    aborted.abort()
    aborted.abort()  # idempotent, never raises
    with pytest.raises(RuntimeError, match="after close"):
        aborted.add(ids[4:], take(chosen, slice(4, N)), take(rejected, slice(4, N)))
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(UserError, match="lacks 6 expected example ids"):
        writer(tmp_path).finalize(ids)
    assert not (tmp_path / "manifest.json").exists()
    assert cache_info(tmp_path)["num_rows"] == 4


def test_two_ranks_equal_one_rank_and_overwrite_clears_every_rank(tmp_path):
    rows = make_rows()
    ids, chosen, rejected = rows
    build(tmp_path / "single", rows)
    path = tmp_path / "ddp"
    writers = [writer(path, rank=rank, world_size=2) for rank in (0, 1)]
    for rank, part in enumerate(writers):
        mine = [i for i in range(N) if i % 2 == rank]
        part.add([ids[i] for i in mine], take(chosen, mine), take(rejected, mine))
        part.close()
    assert writers[0].finalize(ids)["num_pairs"] == N
    names = sorted(p.name for p in (path / "shards").iterdir())
    assert names == ["rank0-00000.arrow", "rank1-00000.arrow"]  # 5 rows each
    assert contents(path, ids) == contents(tmp_path / "single", ids)

    other = {**COMPONENTS, "k": "changed"}
    for rank in (0, 1):
        writer(path, rank=rank, world_size=2, components=other, overwrite=True)
    assert not list((path / "shards").iterdir()) and not (path / "manifest.json").exists()


def test_invalid_rows_are_rejected(tmp_path):
    ids, chosen, rejected = make_rows(n=2)
    out = writer(tmp_path / "a", values_dtype="float16")
    bad = {**chosen, "avg_logps": np.array([np.nan, -1.0], np.float32)}
    with pytest.raises(UserError, match="chosen_avg_logps of example id 'ex000' is not valid"):
        out.add(ids, bad, rejected)
    huge = {**rejected, "topk_values": np.full((2, K), 1e6, np.float32)}
    with pytest.raises(UserError, match=r"rejected_topk_values of example id 'ex000'.*float32"):
        out.add(ids, chosen, huge)
    no_tokens = {**chosen, "n_tokens": np.array([3, 0])}
    with pytest.raises(UserError, match="chosen_n_tokens of example id 'ex001'"):
        out.add(ids, no_tokens, rejected)
    with pytest.raises(ValueError, match=r"chosen_topk_indices has shape \(2, 3\)"):
        out.add(ids, {**chosen, "topk_indices": chosen["topk_indices"][:, :3]}, rejected)


# ------------------------------------------------------------------------------- cache_info
def test_cache_info_numbers(tmp_path):
    build(tmp_path, make_rows())
    info = cache_info(tmp_path)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "shards").glob("*.arrow"))
    assert info["complete"] and info["num_pairs"] == N and info["num_shards"] == 3
    assert info["k"] == K and info["values_dtype"] == "float32"
    assert info["total_bytes"] == on_disk
    assert info["bytes_per_pair"] == pytest.approx(on_disk / N)
    assert info["components"] == COMPONENTS
    assert info["world_size"] == 1 and info["num_rows"] == N
    text = format_cache_info(info)
    assert f"pairs {N}," in text and "sae_hook" in text and f"{on_disk} bytes" in text


def test_manifest_of_an_older_layout_is_refused_not_a_key_error(tmp_path):
    build(tmp_path, make_rows())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["world_size"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"older fpo version.*Rebuild.*fpo-cache.*overwrite=true"):
        cache_info(tmp_path)
    with pytest.raises(UserError, match=rf"older fpo version.*Rebuild it with: {REBUILD}$"):
        ReferenceCache.open(tmp_path, COMPONENTS, rebuild_command=REBUILD)


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


def test_config_hashes_see_what_weights_do_not():
    model = build_tiny_model(seed=0)
    digest = model_config_hash(model)
    assert digest == model_config_hash(build_tiny_model(seed=1))  # weights are not config
    model.config._name_or_path, model.config.use_cache = "/elsewhere", False
    assert model_config_hash(model) == digest  # fields that cannot change values
    model.config.final_logit_softcapping = 30.0
    assert model_config_hash(model) != digest
    eager = build_tiny_model(seed=0)
    eager.set_attn_implementation("eager")
    assert model_config_hash(eager) != digest

    def sae(k=8, **cfg):
        out = build_random_sae(d_in=32, d_sae=64, k=k, hook_name="blocks.1.hook_resid_post")
        for name, value in cfg.items():
            setattr(out.cfg, name, value)
        return out

    digest = sae_config_hash(sae())
    assert hash_state_dict(sae(k=16)) == hash_state_dict(sae())  # TopK k is not in the weights
    assert sae_config_hash(sae(k=16)) != digest
    assert sae_config_hash(sae(normalize_activations="layer_norm")) != digest
    assert sae_config_hash(sae(apply_b_dec_to_input=False)) != digest
    assert sae_config_hash(sae(device="meta")) == digest


def test_differences_name_each_component_in_order():
    found = {**COMPONENTS, "data": "x", "extra": "y"}
    del found["sae_hook"]
    lines = differences(COMPONENTS, found, ignore=("tokenizer",))
    assert [line.split(":")[0].strip() for line in lines] == ["data", "sae_hook", "extra"]
    assert lines[0] == "  data: expected dddddddddddd, found x"
    assert "found <absent>" in lines[1]
    assert differences(COMPONENTS, dict(COMPONENTS)) == []
    assert set(library_versions()) == {"torch", "transformers", "sae-lens"}
    assert library_versions()["torch"].startswith(torch.__version__.split("+")[0])
