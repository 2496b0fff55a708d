"""Subnormal floats flushed to zero on the CPU, on every thread of torch's pool.

A float32 under 1.2e-38 in magnitude is *subnormal*, and x86 CPUs do arithmetic on such
numbers in microcode, about 100-200x slower (a matmul whose input is subnormal: 0.20 s
normal, 34 s subnormal, 0.18 s flushed, on this project's 2-core machine). Preference
losses produce them: when ``sigmoid(-beta * margin)`` underflows (DPO at beta 10 on a pair
it already ranks by 9 nats gives 8.2e-40), that pair's whole backward pass runs on
subnormals, and a run trained 2-4x slower than the same run at a small beta. Flushing them
to zero (the CPU's FTZ and DAZ flags, `torch.set_flush_denormal`) changes nothing that can
reach a weight: a gradient under 1.2e-38 moves no float32 parameter through AdamW (its
update is ``lr * m / (sqrt(v) + eps)`` with ``eps`` 1e-8) and vanishes when added to any
normal gradient; a DPO run at beta 10 on gemma-3-270m trained both ways gave byte-identical
generations and metrics in a third of the CPU time (docs/benchmarks.md). GPUs are
unaffected either way.

The flags are per thread, and torch's intra-op threads copy them from the main thread when
they start, on its first parallel operation. So :func:`flush_subnormals` must run before
the first tensor work of the process; it checks every thread and says when one was missed.
"""

from __future__ import annotations

import logging

log = logging.getLogger("fpo")

#: Elements in the probe: enough for torch to split an elementwise op over every thread
#: (its grain size is 32768 elements).
PROBE_SIZE = 1 << 20


def every_thread_flushes() -> bool:
    """Whether multiplying subnormals by 1 gives zeros on every intra-op thread (the probe
    is the smallest subnormal float32, made from its bit pattern so that no float
    conversion flushes it before the test)."""
    import torch

    probe = torch.ones(PROBE_SIZE, dtype=torch.int32).view(torch.float32)  # 1.4e-45 each
    return int((probe * 1.0).count_nonzero()) == 0


def flush_subnormals() -> bool:
    """Turn on flush-to-zero for this process's CPU threads; returns whether every thread
    flushes. Logs a warning, naming the cause, when the CPU lacks the flags or when some
    thread of torch's pool had started before this call."""
    import torch

    if not torch.set_flush_denormal(True):
        log.warning("this CPU cannot flush subnormal floats to zero; runs may slow down")
        return False
    if every_thread_flushes():
        return True
    log.warning(
        "subnormal floats are flushed on some CPU threads only: torch's thread pool started "
        "before fpo.subnormals.flush_subnormals() ran (call it before any tensor work)"
    )
    return False
