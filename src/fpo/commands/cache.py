"""``fpo-cache``: run the reference model once over the data and store what training needs.

    fpo-cache experiment=smoke objective=fpo          # build (or resume) the cache
    fpo-train experiment=smoke objective=fpo reference=cached
    fpo-cache --info PATH                             # fingerprint, pairs, k, bytes/pair
    fpo-cache --verify PATH                           # every shard's checksum; exit 0 or 2

``configs/cache.yaml`` composes ``train.yaml`` with ``reference=cached``, so the same
overrides name the same cache in both commands. Under DDP
(``trainer.accelerator=cpu trainer.devices=2 trainer.strategy=ddp`` on the CPU) each
rank writes its own shards.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

import fpo.objective  # noqa: F401  (registers the objective schema the configs name)
from fpo.cache_checksums import unverified
from fpo.commands.common import CONFIG_DIR, run_hydra, start_torch, user_errors
from fpo.errors import UserError
from fpo.folders import ensure_writable
from fpo.reference.store import (
    MANIFEST,
    cache_info,
    cache_schema,
    format_cache_info,
    open_shard,
    read_manifest,
)
from fpo.run_lock import folder_lock

log = logging.getLogger("fpo.cache")
INFO_FLAG, VERIFY_FLAG = "--info", "--verify"


def cache_folders(path: str | os.PathLike) -> list[Path]:
    """``path`` itself when it is one split's cache, else its split folders (if any)."""
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).exists() and not (path / "shards").is_dir():
        splits = sorted(p for p in path.iterdir() if (p / "shards").is_dir())
        if splits:
            return splits
    return [path]


def info_text(path: str | os.PathLike) -> str:
    """:func:`format_cache_info` of a cache folder, or of each split folder under it."""
    return "\n\n".join(format_cache_info(cache_info(p)) for p in cache_folders(path))


def verify_split(path: Path) -> tuple[bool, str]:
    """Open every shard of one split's cache, checking its size, sha256, footer, schema and
    rows against the manifest: ``(verified, report)``. A cache without checksums (built
    before fpo recorded them) is not verified."""
    if not (path / MANIFEST).is_file():
        return False, format_cache_info(cache_info(path))  # INCOMPLETE (no folder: UserError)
    started, manifest = time.perf_counter(), read_manifest(path)
    schema = cache_schema(manifest["k"], manifest["values_dtype"])
    damaged = []
    for entry in manifest["shards"]:
        try:
            open_shard(path / entry["file"], entry, schema)
        except UserError as err:
            damaged.append(f"  {err}")
    shards, ms = len(manifest["shards"]), (time.perf_counter() - started) * 1e3
    if damaged:
        head = f"reference cache {path}: DAMAGED ({len(damaged)} of {shards} shards)"
        return False, "\n".join([head, *damaged])
    if unverified(manifest["shards"]):
        return False, (
            f"reference cache {path}: UNVERIFIED: its manifest records no checksums (built "
            "before fpo recorded them); sizes and layout are intact. Rebuild it with the "
            "fpo-cache command that built it, plus cache.overwrite=true, to verify it."
        )
    return True, (
        f"reference cache {path}: verified, {shards} shards, {manifest['num_pairs']} pairs, "
        f"{manifest['total_bytes']} bytes, sha256 of every shard as recorded ({ms:.1f} ms)"
    )


def verify(path: str | os.PathLike) -> bool:
    """``fpo-cache --verify PATH``: print a report per split; whether all are verified."""
    results = [verify_split(folder) for folder in cache_folders(path)]
    print("\n".join(report for _, report in results), flush=True)
    return all(ok for ok, _ in results)


def build(cfg: DictConfig) -> tuple[Path, dict[str, dict]]:
    """Build the reference cache of every split; ``(root folder, per-split results)``."""
    # Here, not at the top: --help, --info and config errors need no model code.
    from fpo.builder import build_run_parts
    from fpo.reference.build import build_reference_cache

    ensure_writable(cfg.paths.cache_dir, "paths.cache_dir")  # before any model loads
    experiment = build_run_parts(cfg)  # refuses objectives the cache cannot serve (TDPO)
    if not experiment.objective.needs.reference:
        raise UserError(
            f"objective={experiment.objective.name} uses no reference model: nothing to cache."
        )
    settings = experiment.cache_settings()

    def make_trainer(callbacks):
        return experiment.build_trainer(
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            use_distributed_sampler=False,
        )

    datamodule = experiment.datamodule
    with folder_lock(settings.root, "paths.cache_dir"):  # one builder per cache
        results = build_reference_cache(
            make_trainer,
            experiment.cache_reference(),
            datamodule,
            settings,
            batch_size=int(cfg.cache.get("batch_size") or datamodule.eval_batch_size),
            shard_size=int(cfg.cache.shard_size),
            overwrite=bool(cfg.cache.overwrite),
        )
    return settings.root, results


def report(root: Path, results: dict[str, dict]) -> str:
    """What was built: per split, pairs, bytes per pair, throughput; then --info."""
    lines = [
        f"{split}: {r['manifest']['num_pairs']} pairs ({r['computed']} computed now), "
        f"{r['manifest']['bytes_per_pair']:.1f} bytes per pair"
        for split, r in results.items()
    ]
    if results:
        computed = sum(r["computed"] for r in results.values())
        seconds = max(next(iter(results.values()))["seconds"], 1e-9)  # one loop for all splits
        lines.append(f"built in {seconds:.1f} s: {computed / seconds:.2f} pairs/s")
    else:
        lines.append("every split was already cached and up to date")
    return "\n".join([f"reference cache {root}", *lines, "", info_text(root)])


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="cache")
def hydra_main(cfg: DictConfig) -> None:
    start_torch()
    from lightning.pytorch.utilities import rank_zero_only

    with user_errors():
        root, results = build(cfg)
        if rank_zero_only.rank == 0:
            print(report(root, results), flush=True)


def main() -> None:
    """``fpo-cache --info PATH`` or ``--verify PATH`` (handled before Hydra parses argv; a
    cache that does not verify exits with status 2), else a Hydra run."""
    flag = sys.argv[1].split("=")[0] if len(sys.argv) > 1 else None
    if flag in (INFO_FLAG, VERIFY_FLAG):
        paths = [sys.argv[1].split("=", 1)[1]] if "=" in sys.argv[1] else sys.argv[2:]
        with user_errors():
            if len(paths) != 1:
                raise UserError(f"usage: fpo-cache {flag} PATH")
            if flag == INFO_FLAG:
                print(info_text(paths[0]))
            elif not verify(paths[0]):
                sys.exit(2)
        return
    run_hydra(hydra_main)


if __name__ == "__main__":
    main()
