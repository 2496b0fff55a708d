"""One process per run folder or cache being built: a second one is refused naming the
first's pid (exit 2); a lock left by a dead process is taken over with a note; another
folder is not blocked."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from fpo.errors import UserError
from fpo.run_lock import LOCK_NAME, folder_lock
from fpo.testing import run_module


def test_a_second_holder_is_refused_naming_the_pid_and_another_folder_is_not(tmp_path):
    with folder_lock(tmp_path / "a", "paths.output_dir"):
        assert (tmp_path / "a" / LOCK_NAME).read_text().strip() == str(os.getpid())
        refused = pytest.raises(UserError, match=rf"in use by another process \(pid {os.getpid()}")
        with refused, folder_lock(tmp_path / "a", "paths.output_dir"):
            pass
        with folder_lock(tmp_path / "b", "paths.output_dir"):
            pass
    with folder_lock(tmp_path / "a", "paths.output_dir"):  # released at exit
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path, caplog):
    code = "import os; print(os.getpid())"
    dead = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(f"{pid}\n")
    with caplog.at_level(logging.WARNING, logger="fpo.run_lock"), folder_lock(tmp_path, "k"):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert f"took over the lock left by pid {pid}" in caplog.text


def test_fpo_train_in_a_folder_another_process_holds_is_refused(tmp_path):
    run = tmp_path / "run"
    with folder_lock(run, "paths.output_dir"):
        second = run_module("fpo.commands.train", "experiment=smoke", f"hydra.run.dir={run}")
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"{run} is in use by another process (pid {os.getpid()}" in second.stderr
    assert "Traceback" not in second.stderr
    assert not (run / "checkpoints").exists()


def test_fpo_cache_on_a_cache_another_process_builds_is_refused(tmp_path):
    root = tmp_path / "reference" / "tiny" / "ultrafeedback_fixture" / "fpo"  # the cache root
    with folder_lock(root, "paths.cache_dir"):
        second = run_module(
            "fpo.commands.cache",
            "experiment=smoke",
            "objective=fpo",
            f"paths.cache_dir={tmp_path}",
            f"paths.log_dir={tmp_path / 'logs'}",
        )
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"{root} is in use by another process (pid {os.getpid()}" in second.stderr
    assert not list(root.glob("*/shards/*"))
