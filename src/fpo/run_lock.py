"""One process per folder: an exclusive lock on a run folder or a cache being built.

:func:`folder_lock` takes ``fcntl.flock`` on ``<folder>/.lock`` and writes its pid there. A
second process asking for the same folder is refused (`UserError`, exit 2) naming the
first one's pid. The kernel drops the lock when its process dies, however it dies, so a
lock file left by a dead process is simply taken over (with a log note naming the pid).
Only the first rank of a multi-process run locks: the other ranks write into the folder
rank 0 holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from fpo.errors import UserError
from fpo.folders import ensure_writable

log = logging.getLogger("fpo.run_lock")

LOCK_NAME = ".lock"


def is_first_rank() -> bool:
    """Rank 0 of a launch (SLURM task, torchrun rank, Lightning's local rank), or no launch."""
    return all(os.environ.get(name, "0") == "0" for name in ("SLURM_PROCID", "RANK", "LOCAL_RANK"))


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, key: str) -> Iterator[Path]:
    """Hold ``<folder>/.lock`` for the ``with`` body (no-op on ranks other than the first).

    ``key`` is the setting that chose ``folder``, named when it cannot be written.
    """
    folder = Path(folder)
    if not is_first_rank():
        yield folder
        return
    ensure_writable(folder, key)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            raise UserError(
                f"{folder} is in use by another process (pid {holder or 'unknown'}, lock file "
                f"{path}): two processes writing one folder would mix their files. Wait for it "
                f"to end, stop it, or choose another folder ({key})."
            ) from None
        previous = _read_pid(fd)
        if previous is not None and previous != os.getpid():
            log.warning("%s: took over the lock left by pid %d, which ended", folder, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield folder
        finally:
            os.ftruncate(fd, 0)  # released: no pid left to report as stale
    finally:
        os.close(fd)  # closing drops the flock
