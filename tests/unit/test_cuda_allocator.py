"""Every entry point starts the CUDA allocator with expandable segments unless the user chose
(fpo.commands.common: a variable-length DPO run on the Gemma-2-2B shape ran out of an H100's
memory to fragmentation without them)."""

from __future__ import annotations

import pytest

from fpo.commands.common import CUDA_ALLOCATOR, run_hydra


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def seen_by_the_task() -> dict[str, str | None]:
    import os

    seen = {}
    run_hydra(lambda: seen.update({n: os.environ.get(n) for n in ("PYTORCH_CUDA_ALLOC_CONF",)}))
    return seen


def test_entry_points_default_to_expandable_segments(clean_env):
    assert seen_by_the_task() == {"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOCATOR}
    assert "expandable_segments:True" in CUDA_ALLOCATOR


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_a_users_allocator_setting_is_kept(clean_env, name):
    clean_env.setenv(name, "max_split_size_mb:128")
    seen = seen_by_the_task()
    expected = "max_split_size_mb:128" if name == "PYTORCH_CUDA_ALLOC_CONF" else None
    assert seen == {"PYTORCH_CUDA_ALLOC_CONF": expected}
