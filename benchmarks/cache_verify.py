"""Benchmark: what verifying the reference cache's checksums costs when it is opened.

Builds synthetic caches with the real writer (random values; the layout, hence the bytes,
of a real cache with the same pairs, ``k`` and dtype), then times, per cache, opening
every split (``ReferenceCache.open``: size, footer, schema, rows, index, and the sha256 of
every shard) against the same open with the checksums left out of the manifest (the shards
are then not verified), and ``fpo-cache --verify``. Median of ``--repeats`` runs each.

    OMP_NUM_THREADS=1 python -m benchmarks.cache_verify
    OMP_NUM_THREADS=1 python -m benchmarks.cache_verify --pairs 61135:1000

The default is the main job's cache (experiment=sentiment_gemma3: 373 train and 58 val
pairs, FPO's k=50, float32 values).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fpo.commands.cache import verify
from fpo.logprobs import SequenceLogps
from fpo.reference import SIDES, cache_rows
from fpo.reference.base import ReferenceStats
from fpo.reference.build import ReferenceCacheWriter
from fpo.reference.store import ReferenceCache


def build_split(path: Path, pairs: int, k: int, values_dtype: str, batch: int = 8) -> None:
    """A finished cache of ``pairs`` random pairs at ``path`` (shards of 1024 pairs)."""
    gen = torch.Generator().manual_seed(0)
    writer = ReferenceCacheWriter(path, {"data": "synthetic"}, k=k, values_dtype=values_dtype)
    for start in range(0, pairs, batch):
        n = min(batch, pairs - start)
        rows = 2 * n  # chosen then rejected, as the cache build gets them
        total = -torch.rand(rows, generator=gen) * 50
        stats = ReferenceStats(
            SequenceLogps(total, total / 24, torch.randint(1, 64, (rows,), generator=gen)),
            torch.randint(0, 16384, (rows, k), generator=gen),
            torch.rand(rows, k, generator=gen) * 5,
        )
        layout = cache_rows(stats)
        sides = [{name: value.numpy() for name, value in layout[side].items()} for side in SIDES]
        ids = [f"{start + i:016x}" for i in range(n)]
        writer.add(ids, *sides)
    writer.close()
    writer.finalize()


def strip_checksums(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop("sha256", None)
    (path / "manifest.json").write_text(json.dumps(manifest))


def median_ms(action, repeats: int) -> float:
    """Median wall time of ``action()`` in ms, after one untimed warm-up call."""
    action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def measure(splits: dict[str, int], k: int, values_dtype: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"verified": Path(tmp, "verified"), "unverified": Path(tmp, "unverified")}
        for name, root in roots.items():
            for split, pairs in splits.items():
                build_split(root / split, pairs, k, values_dtype)
                if name == "unverified":
                    strip_checksums(root / split)
        size = sum(f.stat().st_size for f in roots["verified"].rglob("*.arrow"))

        def open_all(root: Path):
            return lambda: [ReferenceCache.open(root / split) for split in splits]

        def verify_all():
            with contextlib.redirect_stdout(io.StringIO()):
                assert verify(roots["verified"])

        return {
            "bytes": size,
            "open_verified_ms": median_ms(open_all(roots["verified"]), repeats),
            "open_unverified_ms": median_ms(open_all(roots["unverified"]), repeats),
            "verify_ms": median_ms(verify_all, repeats),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="373:58", help="train:val pairs (default: 373:58)")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--values-dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("fpo.cache").setLevel(logging.ERROR)  # "no checksums", once per open
    train, val = (int(n) for n in args.pairs.split(":"))
    result = measure({"train": train, "val": val}, args.k, args.values_dtype, args.repeats)
    print(
        f"{train}+{val} pairs, k={args.k}, {args.values_dtype}: {result['bytes'] / 1e6:.2f} MB; "
        f"open with sha256 {result['open_verified_ms']:.2f} ms, without "
        f"{result['open_unverified_ms']:.2f} ms; fpo-cache --verify {result['verify_ms']:.2f} ms "
        f"(median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
