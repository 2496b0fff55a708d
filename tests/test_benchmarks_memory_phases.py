"""benchmarks/memory_phases.py on the tiny model: every phase of our step is marked, in order,
and the peak is reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", ["DPO online", "TRL SimPO"])
def test_phases_are_marked_in_order(config):
    pytest.importorskip("trl")
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    script = ROOT / "benchmarks" / "memory_phases.py"
    args = [sys.executable, str(script), "--model", "tiny", "--config", config]
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True).stdout
    phases = [line.rsplit(maxsplit=2)[0] for line in out.splitlines()[1:-1]]
    if config == "DPO online":  # the reference before the policy, then the LM head
        step = ["before reference", "after reference", "before policy trunk",
                "after policy trunk", "before LM head", "after LM head"]  # fmt: skip
        assert phases[phases.index("before reference") :][:6] == step
    assert phases.count("before backward") == 8 + 3  # tiny: 3 warm-up + 8 measured steps
    assert out.splitlines()[-1].startswith("peak RSS ")
