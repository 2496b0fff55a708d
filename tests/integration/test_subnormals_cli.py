"""Every command that computes flushes subnormal floats on all its CPU threads, before its
first tensor work (`fpo.commands.common.start_torch`)."""

from __future__ import annotations

import pytest

from fpo.testing import run_module

FLUSHED = "subnormal floats flushed to zero on all"


@pytest.mark.parametrize(
    ("module", "overrides"),
    [
        ("fpo.commands.train", ("experiment=smoke", "objective=dpo")),
        ("fpo.commands.cache", ("experiment=smoke", "objective=dpo")),
        ("fpo.commands.eval", ("experiment=smoke", "evaluation=smoke")),
    ],
)
def test_the_command_flushes_subnormals_on_every_thread(tmp_path, module, overrides):
    result = run_module(
        module, *overrides, f"paths.log_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert FLUSHED in output, output[-3000:]
    assert "flushed on some CPU threads only" not in output, output[-3000:]
