"""Subnormal floats flushed to zero on every CPU thread (`fpo.subnormals`).

Each case runs in a fresh interpreter: the flags are per thread, and pytest's own process
started torch's thread pool long ago.
"""

from __future__ import annotations

from fpo.testing import run_python

TWO_THREADS = "import torch; torch.set_num_threads(2)\n"


def python(code: str):
    result = run_python("-c", TWO_THREADS + code)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_before_any_tensor_work_every_thread_flushes():
    result = python(
        "from fpo.subnormals import flush_subnormals\n"
        "print(flush_subnormals())\n"
        "tiny = torch.ones(1 << 20, dtype=torch.int32).view(torch.float32)\n"
        "print(int((tiny * 1.0).count_nonzero()), int((tiny[:1] * 3.0).count_nonzero()))\n"
    )
    assert result.stdout.split() == ["True", "0", "0"], result.stdout


def test_the_probe_sees_subnormals_kept_on_some_thread():
    result = python(
        "from fpo.subnormals import every_thread_flushes\n"
        "print(every_thread_flushes())\n"
        "torch.set_flush_denormal(True)  # the main thread only: the pool has started\n"
        "print(every_thread_flushes())\n"
    )
    assert result.stdout.split() == ["False", "False"], result.stdout


def test_a_pool_started_before_the_call_is_reported():
    result = python(
        "from fpo.subnormals import flush_subnormals\n"
        "(torch.randn(1 << 20) * 2).sum()  # tensor work first: the pool's threads start\n"
        "print(flush_subnormals())\n"
    )
    assert result.stdout.split() == ["False"], result.stdout
    assert "flushed on some CPU threads only" in result.stderr, result.stderr
