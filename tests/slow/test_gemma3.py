"""The embedded default model, google/gemma-3-270m from the PyPI GGUF (CPU, about a minute).

One conversion into a temporary cache (the real path: assemble, de-quantise, save, rename)
serves every test of the module; nothing reaches the hub.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fpo.errors import UserError
from fpo.generation import sample_completion_ids
from fpo.models import gemma3_gguf
from fpo.models.gemma3_gguf import FP32_SUBDIR, ensure_fp32_folder, fp32_folder, load_gemma3_270m

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fpo-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # ~1 GB of fp32 weights


@pytest.fixture(scope="module")
def gemma(cache_dir):
    model, tokenizer = load_gemma3_270m(cache_dir=str(cache_dir))
    return model, tokenizer


def test_conversion_leaves_one_plain_fp32_folder(gemma, cache_dir):
    folder = cache_dir / FP32_SUBDIR
    names = {p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")}
    assert names == {FP32_SUBDIR}  # no temp dir, no assembled GGUF left behind
    assert not list(cache_dir.rglob("*.gguf"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    model, _ = gemma
    assert getattr(model, "hf_quantizer", None) is None


def test_architecture_and_trainable_parameters(gemma):
    model, _ = gemma
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (640, 18, 262144)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 268_098_176
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)


def test_tokenizer_adds_bos_and_round_trips(gemma):
    _, tokenizer = gemma
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    # the quirk: the flag reads False, yet BOS is prepended
    assert not getattr(tokenizer, "add_bos_token", False)
    for text in ["The capital of France is", "Two  spaces,\nnew line and ünïcode ✓"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == 2 and ids.count(2) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_greedy_text_is_sensible(gemma):
    model, tokenizer = gemma
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top5 = model(**ids).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(int(i)) for i in top5]
    prompts = ["The capital of France is the city of", "One, two, three, four,"]
    greedy = sample_completion_ids(model, tokenizer, prompts, 1, 6, temperature=0)
    texts = [tokenizer.decode(rows[0], skip_special_tokens=True) for rows in greedy]
    assert texts[0].startswith(" Paris")
    assert texts[1].startswith(" five, six")


def test_one_optimizer_step_changes_parameters(gemma):
    model, tokenizer = gemma
    model.train()
    ids = tokenizer("The film was", return_tensors="pt")["input_ids"]
    watched = {
        "embed": model.model.embed_tokens.weight,
        "last_mlp": model.model.layers[17].mlp.down_proj.weight,
    }
    before = {name: p.detach().clone() for name, p in watched.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and 0 < loss.item() < 15
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in watched.values())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for name, p in watched.items():
        assert not torch.equal(p.detach(), before[name]), name
        p.data.copy_(before[name])  # leave the shared model as loaded
    model.eval()


def test_cache_folder_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("FPO_CACHE_DIR", str(tmp_path / "env"))
    assert fp32_folder() == tmp_path / "env" / FP32_SUBDIR
    calls = []

    def fake_convert(folder):
        calls.append(folder)
        folder.mkdir(parents=True)
        for name in gemma3_gguf._REQUIRED_FILES:
            (folder / name).write_text("{}")
        return folder

    monkeypatch.setattr(gemma3_gguf, "convert_gguf_to_fp32", fake_convert)
    folder = ensure_fp32_folder(tmp_path / "c")
    assert ensure_fp32_folder(tmp_path / "c") == folder and calls == [folder]  # converted once
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="not a complete"):
        ensure_fp32_folder(tmp_path / "c")
