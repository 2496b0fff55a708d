"""What both frameworks' workers share: device handling, memory, timing, batch sizes."""

from __future__ import annotations

import resource
import time

import torch


def sync(device: str) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def peak_memory(device: str) -> int:
    """Peak bytes: ``torch.cuda.max_memory_allocated`` on GPU, peak RSS on CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stopwatch:
    """Wall-clock time of optimizer steps: ``start()`` / ``stop()`` around each one; and the
    process's CPU time over each (``cpu_times``: all threads, barely moved by other jobs on a
    shared machine, unlike wall time)."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self.cpu_times, self._started = device, [], [], None

    def start(self) -> None:
        sync(self.device)
        self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        sync(self.device)
        wall, cpu = self._started
        self.times.append(time.perf_counter() - wall)
        self.cpu_times.append(time.process_time() - cpu)


def batch_work(rows: list[dict]) -> dict[str, int]:
    """Real tokens (no pad) and response tokens of a group of rows (both sides)."""
    tokens = positions = 0
    for row in rows:
        for side in ("chosen", "rejected"):
            tokens += len(row["prompt_ids"]) + len(row[f"{side}_ids"])
            positions += len(row[f"{side}_ids"])
    return {"tokens": tokens, "positions": positions}


def padded_tokens(rows: list[dict]) -> int:
    """Token slots of the right-padded ``[2B, T]`` batch both frameworks build."""
    longest = max(
        len(r["prompt_ids"]) + len(r[f"{s}_ids"]) for r in rows for s in ("chosen", "rejected")
    )
    return 2 * len(rows) * longest


def matmul_peak(device: str, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of a square matrix multiply on ``device`` (the MFU denominator)."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            a @ b
        sync(device)
        count += 10
    return 2 * n**3 * count / (time.perf_counter() - started)


def objective_preset(name: str) -> dict:
    """``configs/objective/<name>.yaml`` as a plain dict (the hyper-parameters TRL gets too)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    preset = OmegaConf.to_container(OmegaConf.load(root / "configs" / "objective" / f"{name}.yaml"))
    preset.pop("defaults", None)
    return preset
