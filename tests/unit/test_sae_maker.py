"""fpo.sae_maker: the whole collect -> train -> evaluate -> save pipeline on a tiny model,
its offline corpus (`fpo.sae_maker.corpus`) and its command ``fpo-make-sae``
(`fpo.sae_maker.cli`)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from sae_lens import SAE

from fpo.errors import UserError
from fpo.sae_maker import (
    cli,
    collect_activations,
    corpus,
    evaluate_sae,
    hook_name_for_layer,
    render_card,
    save_sae,
    train_sae,
)
from fpo.sae_maker.activations import layer_output, token_windows
from fpo.sae_maker.io import round_to_storage
from fpo.sae_maker.trainer import epoch_batches

build_corpus, is_prose, split_texts = corpus.build_corpus, corpus.is_prose, corpus.split_texts
preference_texts, strip_roff = corpus.preference_texts, corpus.strip_roff
main, run = cli.main, cli.run

TEXTS = [
    "The film was wonderful and the actors were great.",
    "A dull, slow plot; I left before the end.",
    "Short one.",
    "Reading manuals is how one learns the options of a command line tool.",
] * 6


def test_collect_counts_exclude_bos_and_pad(tiny_model, tiny_tokenizer):
    # byte-level tokenizer: one token per byte; texts joined by "\n\n" (2 tokens) and
    # packed into windows of 15 text tokens + BOS (seq_len 16); the last window is padded
    n_stream = sum(len(t.encode()) for t in TEXTS) + 2 * (len(TEXTS) - 1)
    acts = collect_activations(tiny_model, tiny_tokenizer, TEXTS, 1, 10**6, seq_len=16)
    assert n_stream % 15 != 0  # so the last batch really has pad positions
    assert acts.shape == (n_stream, 32)
    with_bos = collect_activations(
        tiny_model, tiny_tokenizer, TEXTS, 1, 10**6, seq_len=16, exclude_bos=False
    )
    assert with_bos.shape[0] == n_stream + -(-n_stream // 15)  # one BOS per window
    capped = collect_activations(tiny_model, tiny_tokenizer, TEXTS, 1, 100, seq_len=16)
    assert torch.equal(capped, acts[:100])


def test_token_windows_pack_texts(tiny_tokenizer):
    windows = list(token_windows(tiny_tokenizer, ["abc", "de"], seq_len=4))

    def ids(text: str) -> list[int]:
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    assert windows == [[1, *ids("abc")], [1, *ids("\n\nd")], [1, *ids("e")]]


def test_collected_rows_are_the_layer_outputs_of_each_window(tiny_model, tiny_tokenizer):
    texts = ["hello world", "a longer second text, padded against the first window"]
    acts = collect_activations(tiny_model, tiny_tokenizer, texts, 0, 1000, seq_len=40)
    expected = []
    for window in token_windows(tiny_tokenizer, texts, seq_len=40):  # one at a time: no pad
        hidden = tiny_model(torch.tensor([window]), output_hidden_states=True).hidden_states
        expected.append(hidden[1][0, 1:])  # hidden_states[1] = output of layers[0]; no BOS
    assert len(expected) == 2 and expected[1].shape[0] < 39  # the second window is padded
    assert torch.allclose(acts, torch.cat(expected), atol=1e-5)
    assert tiny_model.training  # the caller's mode is restored


def test_last_layer_is_taken_before_the_final_norm(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer("hello world", return_tensors="pt")
    final = tiny_model(**ids, output_hidden_states=True).hidden_states[-1]  # after the norm
    raw = layer_output(tiny_model, 1, ids["input_ids"], ids["attention_mask"])
    assert torch.allclose(tiny_model.model.norm(raw), final, atol=1e-5)
    assert not torch.allclose(raw, final, atol=1e-2)


def test_bad_layer_is_a_user_error(tiny_model, tiny_tokenizer):
    with pytest.raises(UserError, match=r"needs decoder layer 5, but .* has 2 layers"):
        collect_activations(tiny_model, tiny_tokenizer, TEXTS, 5, 10, seq_len=16)


def test_epoch_batches_cover_each_row_once_per_epoch():
    acts = torch.arange(10.0).unsqueeze(1)
    batches = list(epoch_batches(acts, batch_size=3, epochs=2, seed=0))
    assert len(batches) == 6 and all(b.shape == (3, 1) for b in batches)
    first_epoch = torch.cat(batches[:3]).flatten()
    assert len(set(first_epoch.tolist())) == 9  # 9 distinct rows, the 10th dropped


def test_evaluate_sae_hand_computed():
    sae = SAE.from_dict(
        {"architecture": "topk", "d_in": 2, "d_sae": 2, "k": 1, "apply_b_dec_to_input": False}
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.W_dec.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    # top-1 keeps the larger coordinate: recon [[2, 0], [0, 3]], squared error 1
    # mean [1, 2]; total variance = (1+1) + (1+1) = 4 -> VE = 1 - 1/4
    metrics = evaluate_sae(sae, x)
    assert metrics["variance_explained"] == pytest.approx(0.75)
    assert metrics["l0"] == 1.0
    assert metrics["dead_fraction"] == 0.0
    assert metrics["mse"] == pytest.approx(1 / 4)


def test_pipeline_trains_saves_and_loads(tiny_model, tiny_tokenizer, tmp_path):
    acts = collect_activations(tiny_model, tiny_tokenizer, TEXTS * 4, 1, 4000, seq_len=32)
    meta = {"hook_name": hook_name_for_layer(1), "model_name": "tiny"}
    untrained = train_sae(acts, d_sae=64, k=4, epochs=1, lr=1e-9, batch_size=256, metadata=meta)
    sae = train_sae(acts, d_sae=64, k=4, epochs=10, lr=3e-3, batch_size=256, seed=0, metadata=meta)
    before, after = evaluate_sae(untrained, acts), evaluate_sae(sae, acts)
    assert after["variance_explained"] > before["variance_explained"] + 0.2
    assert after["variance_explained"] > 0.7
    assert after["l0"] <= 4.0

    card = {"title": "tiny", "variance_explained": after["variance_explained"], "command": "x"}
    folder = save_sae(sae, tmp_path / "sae", card, storage_dtype="float16")
    loaded = SAE.load_from_disk(folder)
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert loaded.W_enc.dtype == torch.float32
    assert loaded.cfg.normalize_activations == "none"  # scaling folded into the weights
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "topk"
    reloaded = evaluate_sae(loaded, acts)["variance_explained"]
    assert reloaded == pytest.approx(after["variance_explained"], abs=1e-3)  # fp16 storage
    rounded = round_to_storage(sae, "float16")  # the in-memory twin of the stored weights
    assert torch.equal(rounded.W_enc, loaded.W_enc) and torch.equal(rounded.b_dec, loaded.b_dec)
    assert "| variance_explained |" in (folder / "SAE_CARD.md").read_text()


def test_render_card_table_and_command():
    text = render_card({"title": "T", "k": 32, "ve": 0.812345, "command": "python -m x"})
    assert text.splitlines()[0] == "# T"
    assert "| k | 32 |" in text and "| ve | 0.8123 |" in text
    assert "```bash\npython -m x\n```" in text


def test_corpus_helpers():
    # a (10), b (3), b exhausted, a (20), a (30) -> 33 >= 25 characters
    texts, taken = build_corpus({"a": ["x" * 10] * 5, "b": ["y" * 3]}, max_chars=25)
    assert sorted(texts) == ["x" * 10, "x" * 10, "x" * 10, "y" * 3]
    assert taken == {"a": 30, "b": 3}
    # the source with fewer characters goes next: one long text does not crowd out b
    texts, taken = build_corpus({"a": ["x" * 50, "x"], "b": ["y" * 5] * 20}, max_chars=100)
    assert taken == {"a": 50, "b": 50}
    assert is_prose("word " * 20) and not is_prose("0x1f " * 20) and not is_prose("short")
    train, held = split_texts([str(i) for i in range(20)], heldout_every=10)
    assert held == ["9", "19"] and len(train) == 18 and not set(train) & set(held)
    roff = ".SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\nmore"
    assert strip_roff(roff) == "\nls - list directory contents\n\nmore"


def test_preference_texts_join_prompt_and_each_response(fixtures_dir):
    texts = preference_texts(os.path.join(fixtures_dir, "plain_pairs.jsonl"))
    assert texts[:2] == [
        "This movie was a delight from start to finish, warm and funny.",
        "This movie was a boring mess that I regret watching.",
    ]


def test_cli_runs_end_to_end_on_the_tiny_model(tmp_path, fixtures_dir, capsys):
    prefs = os.path.join(fixtures_dir, "plain_pairs.jsonl")
    argv = ["--model", "tiny", "--layer", "1", "--d-sae", "64", "--k", "4", "--tokens", "3000",
            "--heldout-tokens", "500", "--epochs", "2", "--batch-size", "256",
            "--preference-file", prefs, "--out", str(tmp_path / "sae")]  # fmt: skip
    card = run(argv)
    assert SAE.load_from_disk(tmp_path / "sae").cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert card["unique training tokens"] == 3000 and card["held-out tokens"] == 500
    assert card["training tokens seen (with epochs)"] == 2 * (3000 // 256) * 256
    assert card["corpus characters per source"][f"preferences ({prefs})"] > 0
    assert card["command"] == "fpo-make-sae " + " ".join(argv)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:-4], "--preference-file", str(tmp_path / "missing.jsonl"), "--out", "x"])
    assert exit_info.value.code == 2
    assert "missing.jsonl does not exist (--preference-file)" in capsys.readouterr().err


def test_cli_activation_cache_is_reused_only_for_the_same_collection(tmp_path):
    cache = str(tmp_path / "acts.pt")
    argv = ["--model", "tiny", "--layer", "1", "--d-sae", "64", "--k", "4", "--tokens", "2000",
            "--heldout-tokens", "300", "--epochs", "1", "--batch-size", "256",
            "--activation-cache", cache, "--out", str(tmp_path / "a")]  # fmt: skip
    first = run(argv)
    stored = torch.load(cache)
    assert stored["train"].shape == (2000, 32) and stored["heldout"].shape == (300, 32)
    second = run([*argv[:5], "32", *argv[6:-1], str(tmp_path / "b")])  # another d_sae
    assert second["d_sae"] == 32
    assert second["activation collection time (s)"] == first["activation collection time (s)"]
    with pytest.raises(UserError, match="was made with"):
        run([*argv[:9], "1000", *argv[10:]])  # other --tokens: other activations
