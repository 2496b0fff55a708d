"""``fpo-cache``: run the reference model once over the data and store what training needs.

    fpo-cache experiment=smoke objective=fpo          # build (or resume) the cache
    fpo-train experiment=smoke objective=fpo reference=cached
    fpo-cache --info PATH                             # fingerprint, pairs, k, bytes/pair

``configs/cache.yaml`` composes ``train.yaml`` with ``reference=cached``, so the same
overrides name the same cache in both commands. Under DDP
(``trainer.accelerator=cpu trainer.devices=2 trainer.strategy=ddp`` on the CPU) each
rank writes its own shards.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from fpo.builder import build_run_parts
from fpo.commands.common import CONFIG_DIR, run_hydra, user_errors
from fpo.errors import UserError
from fpo.folders import ensure_writable
from fpo.reference.build import build_reference_cache
from fpo.reference.store import MANIFEST, cache_info, format_cache_info
from fpo.run_lock import folder_lock

log = logging.getLogger("fpo.cache")
INFO_FLAG = "--info"


def info_text(path: str | os.PathLike) -> str:
    """:func:`format_cache_info` of a cache folder, or of each split folder under it."""
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).exists() and not (path / "shards").is_dir():
        splits = sorted(p for p in path.iterdir() if (p / "shards").is_dir())
        if splits:
            return "\n\n".join(format_cache_info(cache_info(p)) for p in splits)
    return format_cache_info(cache_info(path))


def build(cfg: DictConfig) -> tuple[Path, dict[str, dict]]:
    """Build the reference cache of every split; ``(root folder, per-split results)``."""
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_float32_matmul_precision("high")
    with user_errors():
        root, results = build(cfg)
        if rank_zero_only.rank == 0:
            print(report(root, results), flush=True)


def main() -> None:
    """``fpo-cache --info PATH`` (handled before Hydra parses argv), else a Hydra run."""
    if len(sys.argv) > 1 and sys.argv[1].split("=")[0] == INFO_FLAG:
        paths = [sys.argv[1].split("=", 1)[1]] if "=" in sys.argv[1] else sys.argv[2:]
        with user_errors():
            if len(paths) != 1:
                raise UserError("usage: fpo-cache --info PATH")
            print(info_text(paths[0]))
        return
    run_hydra(hydra_main)


if __name__ == "__main__":
    main()
