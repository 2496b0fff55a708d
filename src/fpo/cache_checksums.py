"""Checksums of the reference cache's shard files (``fpo.reference``).

When a build finalizes, the manifest records each shard's sha256 beside its rows and bytes
(:func:`shard_entry`); opening a shard compares its bytes to that record
(:func:`checksum_problem`), so a value changed inside a shard (same size, readable Arrow) is
refused like a truncated one, naming the file and the rebuild command. A cache finalized
before checksums were recorded still opens, with one log line saying its values are not
verified (:func:`note_unverified`); ``fpo-cache --verify`` reports it as unverified.

The checksum is taken at finalize, from the files then on disk: a shard changed between its
write and the end of the build (an interrupted build resumed much later) is not caught. A
build resumed over a finished cache removes shards that no longer match their record
(:func:`remove_changed_shards`), so their pairs are computed again instead of blessed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fpo.hashing import file_sha256

log = logging.getLogger("fpo.cache")
#: A manifest shard entry's checksum key.
CHECKSUM = "sha256"


def shard_entry(root: Path, file: Path, rows: int) -> dict[str, Any]:
    """The manifest entry of the shard ``file`` of the cache folder ``root``: its path
    relative to ``root``, rows, bytes and sha256."""
    size = file.stat().st_size
    return {
        "file": str(file.relative_to(root)),
        "rows": rows,
        "bytes": size,
        CHECKSUM: file_sha256(file),
    }


def checksum_problem(file: Path, entry: Mapping[str, Any]) -> str | None:
    """Why ``file`` does not match its manifest ``entry`` (``None``: it matches, or the
    entry records no checksum)."""
    recorded = entry.get(CHECKSUM)
    if recorded is None or (found := file_sha256(file)) == recorded:
        return None
    return (
        f"has other contents than when the cache was built (sha256 {found[:12]}..., the "
        f"manifest records {recorded[:12]}...): a value inside it was changed"
    )


def unverified(entries: Iterable[Mapping[str, Any]]) -> bool:
    """Whether some manifest entry records no checksum (a cache of an earlier fpo)."""
    return any(CHECKSUM not in entry for entry in entries)


def note_unverified(path: Path, manifest: Mapping[str, Any]) -> None:
    """Log that the cache at ``path`` has no checksums, if so."""
    if unverified(manifest["shards"]):
        log.warning(
            "reference cache %s has no checksums (built before fpo recorded them): its shard "
            "sizes and layout are checked, its values are not verified; rebuild it "
            "(fpo-cache ... cache.overwrite=true) to have them verified",
            path,
        )


def remove_changed_shards(root: Path, manifest: Mapping[str, Any], mine) -> None:
    """Delete the shards of ``root`` whose bytes differ from ``manifest``'s record, among
    those ``mine(file_name)`` selects (a rank's share), so a resumed build recomputes them."""
    for entry in manifest["shards"]:
        file = root / entry["file"]
        if mine(file.name) and file.is_file() and (problem := checksum_problem(file, entry)):
            log.warning(
                "reference cache shard %s %s; removed, its pairs are computed again", file, problem
            )
            file.unlink()
