"""A folder a command cannot create or write (under a regular file, or in /proc): one
paragraph naming the folder and the config key, exit 2, never a traceback. Tests run as
root, which chmod does not stop, hence a path under a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fpo.testing import run_module


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    ("module", "key", "extra"),
    [
        ("fpo.commands.train", "paths.log_dir", ()),
        ("fpo.commands.train", "paths.log_dir", ("-m",)),
        ("fpo.commands.train", "hydra.run.dir", ()),
        ("fpo.commands.cache", "paths.cache_dir", ("objective=fpo",)),
        ("fpo.commands.eval", "out_dir", ("evaluation=smoke",)),
    ],
)
def test_an_unwritable_folder_is_refused_naming_it_and_its_key(a_file, module, key, extra):
    result = run_module(module, *extra, "experiment=smoke", f"{key}={a_file}/x")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"cannot write to the folder {a_file}/x" in result.stderr
    assert f"(set by {key}" in result.stderr


def test_a_log_dir_in_proc_is_refused():
    result = run_module("fpo.commands.train", "experiment=smoke", "paths.log_dir=/proc/nope")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot write to the folder /proc/nope/" in result.stderr
    assert "Traceback" not in result.stderr
