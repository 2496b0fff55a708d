"""Where in a training step the peak RSS is reached (CPU): one benchmark configuration in
this process, with the resident set size and its high-water mark (``ru_maxrss``) printed
at each phase boundary (ours: the reference, the policy's trunk and its LM head, announced
by `fpo.phases`; backward and optimizer step for both frameworks). The phase whose end
raises the high-water mark holds the peak. ``free heap`` is what glibc's malloc holds freed
but not handed back (``mallinfo2``'s free bytes): tensors under its mmap threshold (which
grows to 32 MiB as big blocks are freed) come from its heap, so activations freed in
backward stay resident and count in the RSS (``MALLOC_MMAP_THRESHOLD_=65536`` in the
environment hands them back at once, at the cost of a page fault per page of every new
tensor). Ours returns them once per backward, before the tied LM head's ``[V, H]`` gradient
(`fpo.heap`); ``--keep-heap`` turns that off (``FPO_RELEASE_FREE_HEAP=0``), to measure what
it saves and what it costs (the step times are printed; run both on a quiet machine).

    python -m benchmarks.memory_phases --config "DPO online" --rows fixed
    python -m benchmarks.memory_phases --config "TRL DPO online" --rows fixed

It prepares its rows like ``benchmarks/run.py`` (gemma-3-270m's CPU settings of
``benchmarks/config.yaml``, one warm-up and two measured steps).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import tempfile

import torch

from benchmarks.run import CONFIG, load_config, model_specs, worker

GIB = 2**30
MARKS: list[tuple[str, float, float, float]] = []
#: The opaque phases running now: calls inside one are part of it, not marked.
OPAQUE: list[str] = []


#: glibc's ``struct mallinfo2``, in order (all ``size_t``).
MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS.split()]


def free_heap() -> float:
    """Bytes glibc's malloc holds freed (``mallinfo2().fordblks``); NaN without glibc 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return float("nan")
    mallinfo2.restype = _Mallinfo2
    return float(mallinfo2().fordblks)


def mark(name: str) -> None:
    with open("/proc/self/status") as status:
        rss = int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    MARKS.append((name, rss / GIB, peak / GIB, free_heap() / GIB))


def wrap(owner, name: str, label: str, opaque: bool = False) -> None:
    """Mark before and after ``owner.name(...)``, unless inside an opaque phase; the calls
    inside an ``opaque`` one are not marked (the reference's trunk and LM head)."""
    original = getattr(owner, name)

    def marked(*args, **kwargs):
        if OPAQUE:
            return original(*args, **kwargs)
        mark(f"before {label}")
        if opaque:
            OPAQUE.append(label)
        try:
            out = original(*args, **kwargs)
        finally:
            if opaque:
                OPAQUE.pop()
        mark(f"after {label}")
        return out

    setattr(owner, name, marked)


def instrument(framework: str) -> None:
    """Mark torch's backward and optimizer steps (both frameworks) and, for ours, the phases
    `fpo.phases` announces (its ``trunk`` in a training step is the policy's)."""
    wrap(torch.Tensor, "backward", "backward")
    for optimizer in (torch.optim.AdamW, torch.optim.Adam):
        wrap(optimizer, "step", "optimizer step (includes its closure)")
    if framework == "ours":
        from fpo.phases import add_listener

        add_listener(lambda when, name: mark(f"{when} {name}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="DPO online", help="an ours/trl entry of config.yaml")
    parser.add_argument("--rows", default="fixed", choices=["fixed", "spread"])
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--steps", type=int, help="measured steps (default: config.yaml's)")
    parser.add_argument(
        "--keep-heap", action="store_true", help="ours without the heap release in backward"
    )
    args = parser.parse_args()
    if args.keep_heap:
        os.environ["FPO_RELEASE_FREE_HEAP"] = "0"
    framework = "trl" if args.config.startswith("TRL") else "ours"
    with tempfile.TemporaryDirectory(prefix="fpo-memory-") as workdir:
        sets = [f"cpu.{args.model}.steps={args.steps}"] if args.steps else []
        spec = model_specs(load_config(CONFIG, sets), "cpu", args.model, workdir)
        spec |= {"row_set": args.rows, "cache": framework == "ours" and "cached" in args.config}
        worker("prepare", spec)
        spec |= {"framework": framework, "config": args.config, "gradient_checkpointing": False}
        instrument(framework)
        mark("start")
        out = worker("train", spec)
    print(f"{'phase':45s} {'RSS GiB':>8s} {'peak GiB':>9s} {'free heap GiB':>14s}")
    for name, rss, peak, heap in MARKS:
        print(f"{name:45s} {rss:8.3f} {peak:9.3f} {heap:14.3f}")
    print(f"peak RSS {out['peak_memory'] / GIB:.3f} GiB (imports {out['base_rss'] / GIB:.3f})")
    times = ", ".join(f"{t:.3f}" for t in out["step_times"])
    cpu = ", ".join(f"{t:.3f}" for t in out.get("step_cpu_times", []))
    print(f"step times (s): {times}; process CPU per step (s): {cpu}")


if __name__ == "__main__":
    main()
