"""Per-run peak memory: the jobs of a multirun share a process, so each run resets it."""

from __future__ import annotations

import sys

import pytest

from fpo.testing import run_python

# In a fresh process: one that already holds freed memory (the test session) can reuse it
# without its resident size, hence its peak, moving.
SCRIPT = """
import numpy as np
from fpo.commands.train import peak_memory_gb, reset_peak_memory
reset_peak_memory()
big = np.ones(512 * 2**20 // 8)  # 0.5 GiB touched
first = peak_memory_gb()
del big
reset_peak_memory()
print(first, peak_memory_gb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_later_run_does_not_inherit_an_earlier_peak():
    result = run_python("-c", SCRIPT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = map(float, result.stdout.split())
    assert first - second > 0.4, (first, second)
