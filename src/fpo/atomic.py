"""Atomic file writes: a kill or a full disk never leaves a half-written file under the
final name (the previous file, if any, is kept)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fpo.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_error(path: Path, error: OSError) -> UserError:
    """A one-paragraph message for a failed write (a full disk named as such)."""
    what = "the disk is full" if error.errno in DISK_FULL else (error.strerror or str(error))
    return UserError(
        f"could not write {path}: {what}. Nothing was written in its place (a previous file "
        "of that name is kept). Free space or point paths.log_dir / paths.cache_dir "
        "elsewhere, then rerun the same command (plus ckpt_path=last to resume training)."
    )


def atomic_save_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, fsync, then rename it to ``path``.

    On any error the temp file is removed and ``path`` is untouched; an ``OSError`` (a full
    disk, permissions) becomes a :class:`UserError` naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise disk_error(path, err) from err
        raise
