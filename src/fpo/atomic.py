"""Atomic file writes: a kill or a full disk never leaves a half-written file under the
final name (the previous file, if any, is kept).

A write goes to ``.NAME.tmp-HOST-PID`` beside ``NAME``. A process killed between writing
it and renaming it leaves that temp file; the first write of a later process into the same
folder removes the temp files there of processes of this host that no longer run
(:func:`remove_stale_temp_files`). A live writer's file (another DDP rank's shard) and one of
another host (a shared disk) are never touched.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fpo.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
TEMP_MARK = ".tmp-"
log = logging.getLogger("fpo.atomic")
#: Folders this process has already cleaned (once per process and folder).
_cleaned: set[Path] = set()


def temp_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it: ``.NAME.tmp-HOST-PID``."""
    return path.with_name(f".{path.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}")


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(name: str, host: str) -> bool:
    """Whether ``name`` is a temp file of a process of ``host`` that no longer runs (a
    ``.NAME.tmp-PID`` of fpo versions before the host was in the name counts as ``host``)."""
    if not name.startswith(".") or TEMP_MARK not in name:
        return False
    owner = name.rsplit(TEMP_MARK, 1)[1]
    writer_host, _, pid = owner.rpartition("-")
    if not pid.isdigit() or writer_host not in ("", host):
        return False
    return int(pid) != os.getpid() and not _pid_runs(int(pid))


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files in ``folder`` left by killed writes of this host (their
    process no longer runs); returns them."""
    folder, host = Path(folder), socket.gethostname()
    removed = []
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False) and _stale(entry.name, host):
            Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    if removed:
        names = ", ".join(p.name for p in removed)
        log.info("removed temp files of killed writes in %s: %s", folder, names)
    return removed


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
    disk, permissions) becomes a :class:`UserError` naming the file. The first write of this
    process into a folder first removes the temp files killed writes left there.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent.resolve() not in _cleaned:
            remove_stale_temp_files(path.parent)
            _cleaned.add(path.parent.resolve())
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
