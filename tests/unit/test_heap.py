"""`fpo.heap.release_free_heap`: the pages malloc holds freed leave the resident set."""

from __future__ import annotations

import ctypes
import sys

import pytest

from fpo.heap import release_free_heap

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's"
)

BLOCK = 64 * 1024  # below glibc's initial mmap threshold (128 KiB): served from the heap


def _rss() -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024


def test_freed_heap_blocks_leave_the_resident_set():
    """Every other 64 KiB block freed: malloc keeps them (they cannot merge into the heap's
    top), so the resident set does not shrink until the heap is trimmed."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(2048)]  # 128 MiB
    try:
        for block in blocks:
            ctypes.memset(block, 1, BLOCK)  # resident
        for block in blocks[::2]:
            libc.free(block)
        held = _rss()
        assert release_free_heap()
        released = held - _rss()
        assert released > 0.75 * 1024 * BLOCK  # of the 64 MiB freed
    finally:
        for block in blocks[1::2]:
            libc.free(block)


def test_the_release_can_be_turned_off(monkeypatch):
    import fpo.heap

    calls = []
    monkeypatch.setattr(fpo.heap, "c_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    assert release_free_heap() is True and calls == [0]
    monkeypatch.setenv("FPO_RELEASE_FREE_HEAP", "0")
    assert release_free_heap() is False and calls == [0]


def test_without_malloc_trim_nothing_is_released(monkeypatch):
    """A C library without ``malloc_trim`` (musl, macOS) or no ``CDLL(None)`` (Windows)."""
    import fpo.heap

    def no_c_library(name):
        raise TypeError("expected a library name")

    fpo.heap.c_malloc_trim.cache_clear()
    monkeypatch.setattr(fpo.heap.ctypes, "CDLL", no_c_library)
    try:
        assert release_free_heap() is False
    finally:
        fpo.heap.c_malloc_trim.cache_clear()
