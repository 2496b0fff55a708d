"""Per-run peak memory: the jobs of a multirun share a process, so each run resets it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fpo.train import peak_memory_gb, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_later_run_does_not_inherit_an_earlier_peak():
    reset_peak_memory()
    big = np.ones(512 * 2**20 // 8)  # 0.5 GiB touched
    first = peak_memory_gb()
    del big
    reset_peak_memory()
    second = peak_memory_gb()
    assert first - second > 0.4, (first, second)
