"""Folders a command writes to, checked before any work: one paragraph naming the folder and
the config key that chose it, never a traceback.

:func:`ensure_writable` creates a folder and writes a probe file in it.
:class:`WritableRunFolder` (a Hydra callback, ``configs/hydra``) checks the run folder
(``hydra.run.dir``) before Hydra itself creates it, which it would do with a traceback.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fpo.errors import UserError

#: The topmost folders `ensure_writable` created with ``track=True`` in this process.
_tracked: list[Path] = []


def ensure_writable(folder: str | os.PathLike, key: str, *, track: bool = False) -> Path:
    """Create ``folder`` (and its parents) and check a file can be written in it.

    ``key`` names the setting that chose the folder (``paths.log_dir``, ``out_dir`` ...).
    Raises `UserError` naming both when the folder cannot be created or written. With
    ``track``, the topmost folder it creates is remembered for `discard_unused_folders`.
    """
    path = Path(folder).expanduser()
    if track:
        new = [p for p in (path, *path.parents) if not p.exists()]
        _tracked.extend(new[-1:])
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise UserError(
            f"cannot write to the folder {path} (set by {key}): {type(err).__name__}: "
            f"{err.strerror or err}. Choose a folder this user can create and write, e.g. "
            f"{key}=<a writable path>."
        ) from err
    return path


def discard_unused_folders(ignored: tuple[str, ...] = ("multirun.yaml",)) -> None:
    """Remove each tracked folder again when no file in it but ``ignored`` ones was
    written (a sweep whose config did not compose: Hydra wrote only its multirun.yaml)."""
    while _tracked:
        top = _tracked.pop()
        files = [p for p in top.rglob("*") if p.is_file()] if top.is_dir() else []
        if all(p.name in ignored for p in files):
            shutil.rmtree(top, ignore_errors=True)


def run_dir_key(config: DictConfig) -> str:
    """The setting that chose ``hydra.run.dir``: the override if given, else the log folder."""
    given = any(o.split("=", 1)[0] == "hydra.run.dir" for o in config.hydra.overrides.hydra)
    return "hydra.run.dir" if given else "paths.log_dir"


def refuse(error: UserError) -> None:
    """Print ``error`` as one paragraph and exit with status 2 (as `user_errors` does)."""
    print(f"\nerror: {error}\n", file=sys.stderr, flush=True)
    raise SystemExit(2)


class WritableRunFolder(Callback):
    """Hydra callback: refuse an unwritable run folder before Hydra creates it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            ensure_writable(str(config.hydra.run.dir), run_dir_key(config))
        except UserError as error:
            refuse(error)
