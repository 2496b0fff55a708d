"""benchmarks/memory_phases.py on the tiny model: every phase of our step is marked, in order,
and the peak is reported."""

from __future__ import annotations

import pytest

from fpo.testing import run_module


@pytest.mark.parametrize("config", ["DPO online", "TRL SimPO"])
def test_phases_are_marked_in_order(config):
    pytest.importorskip("trl")
    args = ("--model", "tiny", "--config", config)
    done = run_module("benchmarks.memory_phases", *args, env={"TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    phases = [line.rsplit(maxsplit=3)[0] for line in out.splitlines()[1:-2]]
    if config == "DPO online":  # the reference before the policy, then the LM head
        step = ["before reference", "after reference", "before trunk", "after trunk",
                "before LM head", "after LM head"]  # fmt: skip
        assert phases[phases.index("before reference") :][:6] == step
        assert phases.count("before trunk") == 8 + 3  # the reference's own trunk is not marked
    assert phases.count("before backward") == 8 + 3  # tiny: 3 warm-up + 8 measured steps
    assert out.splitlines()[-2].startswith("peak RSS ")
    assert out.splitlines()[-1].startswith("step times (s): ")
