"""benchmarks/lora.py (issue 21): its configurations build what they name (LoRA with the
policy as its own reference, or against a separate frozen copy), and its section of
docs/benchmarks.md is replaced in place, the rest of the file kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks import lora, ours

from fpo.lora import AdapterFreeReference, is_lora
from fpo.reference.base import OnlineReference


def spec(tmp_path: Path) -> dict:
    return dict(
        model="tiny", device="cpu", seed=0, lr=5e-7, d_sae=64, sae_k=8, workdir=str(tmp_path)
    )


@pytest.mark.parametrize("base", ours.LORA)
def test_lora_configurations_build_the_reference_they_name(tmp_path, base):
    plain = ours.build(spec(tmp_path), base)[1]
    shared = ours.build(spec(tmp_path), base + ours.LORA_SUFFIX)[1]
    copy = ours.build(spec(tmp_path), base + ours.LORA_COPY_SUFFIX)[1]
    assert not is_lora(plain.policy) and type(plain.reference) is OnlineReference
    assert is_lora(shared.policy) and isinstance(shared.reference, AdapterFreeReference)
    assert shared.reference.model is shared.policy
    assert is_lora(copy.policy) and type(copy.reference) is OnlineReference
    assert not is_lora(copy.reference.model)  # a second, plain model: what LoRA saves


def record(runs: list[str]) -> dict:
    spec = dict(
        model="m", batch_pairs=2, accumulation=1, max_prompt=8, max_length=16, row_set="fixed"
    )
    return {
        "command": "OMP_NUM_THREADS=2 python -m benchmarks.lora",
        "date": "2026-12-06T00:00:00",
        "machine": {"host": "h", "cpus": 2, "device": "cpu"},
        "versions": {},
        "spec": spec | {"warmup": 1, "steps": 2, "lr": 5e-7},
        "runs": [
            {
                "config": name,
                "step_times": [2.0, 4.0],
                "step_cpu_times": [9.0, 3.0, 5.0],
                "peak_memory": 3 * 2**30,
                "base_rss": 2**30,
            }
            for name in runs
        ],
    }


def test_the_docs_section_is_replaced_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(lora, "ROOT", tmp_path)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Before\n\nkept\n")
    json_path = tmp_path / "r.json"
    lora.update_docs(docs, lora.section(record(["FPO online"]), json_path))
    docs.write_text(docs.read_text() + "\n## After\n\nkept too\n")
    lora.update_docs(docs, lora.section(record(["TDPO-2 (LoRA)"]), json_path))
    text = docs.read_text()
    assert text.count(lora.START) == 1 and "## Before" in text and "## After" in text
    assert "| TDPO-2 (LoRA) | 3.000 | 2.000 | 4.000 | 3.00 | 2.00 |" in text  # warm-up left out
    assert "FPO online" not in text
