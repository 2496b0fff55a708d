"""benchmarks/device.sh's one-call GPU plan names only configurations the benchmark has,
among them TRL with Liger's kernels (use_liger_kernel=True) and ours with packing."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from benchmarks.trl_side import TRL

ROOT = Path(__file__).resolve().parents[1]


def _plan() -> dict[str, list[str]]:
    """``plan.<rows>.<ours|trl>`` lists of device.sh's default ``--set`` arguments."""
    script = (ROOT / "benchmarks/device.sh").read_text()
    return {
        key: [name.strip() for name in names.split(",")]
        for key, names in re.findall(r"'plan\.(\w+\.(?:ours|trl))=\[([^\]]*)\]'", script)
    }


def test_the_device_plan_names_only_known_configurations():
    plan = _plan()
    ours = set(yaml.safe_load((ROOT / "benchmarks/config.yaml").read_text())["ours"])
    assert set(plan) == {"spread.ours", "spread.trl", "fixed.ours", "fixed.trl"}
    for key, names in plan.items():
        known = set(TRL) if key.endswith("trl") else ours
        assert set(names) <= known, (key, set(names) - known)


def test_the_device_plan_has_liger_and_packing_rows():
    plan = _plan()
    assert TRL["TRL DPO online (liger)"] == ("dpo", {"use_liger_kernel": True})
    assert "TRL DPO online (liger)" in plan["spread.trl"]
    assert "TRL DPO online (liger)" in plan["fixed.trl"]
    assert "SimPO (packed)" in plan["spread.ours"]
    wheels = (ROOT / "benchmarks/device_wheels.sh").read_text()
    assert "liger-kernel==" in wheels  # carried to the device machine
