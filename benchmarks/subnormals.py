"""What subnormal floats cost a CPU matmul, and what flushing them saves (docs/benchmarks.md,
"Subnormal floats on the CPU").

    python -m benchmarks.subnormals --repeat 3

Each cell is the best of ``--repeat`` fresh processes, each timing 20 products of a
``(512, 640)`` input by a ``(640, 2048)`` float32 weight (the shape of a saturated pair's
gradient meeting a layer of gemma-3-270m): the input normal (``randn * 1e-3``) or subnormal
(``randn * 1e-39``, what a pair whose ``sigmoid(-beta * margin)`` underflows sends back
through every layer), with the flags off (torch's default) or set by
`fpo.subnormals.flush_subnormals` before any tensor work (what ``fpo-train`` does).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

TIMING = """
import sys, time, torch
threads, flush, scale = int(sys.argv[1]), sys.argv[2] == "on", float(sys.argv[3])
if flush:
    from fpo.subnormals import flush_subnormals
    assert flush_subnormals()
torch.set_num_threads(threads)
generator = torch.Generator().manual_seed(0)
x = torch.randn(512, 640, generator=generator) * scale
w = torch.randn(640, 2048, generator=generator)
start = time.perf_counter()
for _ in range(20):
    x @ w
print(time.perf_counter() - start)
"""

CASES = [("normal", "1e-3"), ("subnormal", "1e-39")]


def seconds(threads: int, flush: str, scale: str, repeat: int) -> float:
    runs = [
        subprocess.run(
            [sys.executable, "-c", TIMING, str(threads), flush, scale],
            capture_output=True, text=True, check=True,
        ).stdout
        for _ in range(repeat)
    ]  # fmt: skip
    return min(float(out) for out in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated (1,2)")
    args = parser.parse_args()
    print("| threads | input | flags off (torch's default) | flushed |")
    print("|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        for label, scale in CASES:
            off, on = (seconds(threads, flush, scale, args.repeat) for flush in ("off", "on"))
            print(f"| {threads} | {label} | {off:.3f} s | {on:.3f} s |")


if __name__ == "__main__":
    main()
