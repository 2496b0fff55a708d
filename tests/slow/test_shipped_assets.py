"""The embedded default's shipped SAE on the real google/gemma-3-270m (CPU, ~25 s + load).

Checks the SAE folder ``assets/sae/gemma3-270m-layer17`` against its own ``SAE_CARD.md``:
it loads with sae-lens, fits the model's residual stream at layer 17, reconstructs held-out
text as well as the card says, and serves a reference-cache build whose values equal the
online reference's.

Two held-out samples, both collected with the card's settings (layer 17, windows of 128,
BOS excluded, fp32 model) and scored by the card's `evaluate_sae`:

- the card's own: every 10th text of the corpus mixed from ``data/sentiment/train.jsonl``,
  ``/usr/share/doc``, man pages and the stdlib's docstrings, rebuilt by the card's command.
  The last three sources depend on the machine's packages and Python build, so the test
  first checks that the rebuilt corpus is the card's (its characters per source).
- a portable one, the same on every machine and never in the SAE's corpus: the preference
  *test* split (the corpus used the train split) and docstrings of the pinned ``torch``
  package (the corpus used the stdlib's). Its expected value was measured (`PORTABLE_VE`),
  since it is not the card's sample.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from sae_lens import SAE

from fpo.builder import online_reference
from fpo.data import PreferenceDataModule
from fpo.logprobs import response_positions
from fpo.models.gemma3_gguf import load_gemma3_270m
from fpo.reference.build import build_reference_cache
from fpo.reference.settings import CacheSettings
from fpo.reference.store import ReferenceCache
from fpo.sae import check_sae_fits_model, load_sae, resolve_hook_module, sae_hook_name
from fpo.sae_maker import cli, corpus
from fpo.sae_maker.activations import collect_activations
from fpo.sae_maker.trainer import evaluate_sae
from fpo.testing import compose_train, preset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


SAE_DIR = ROOT / "assets" / "sae" / "gemma3-270m-layer17"
HOOK = "blocks.17.hook_resid_post"
HIDDEN_SIZE = 640  # gemma-3-270m
MAX_FOLDER_BYTES = 16_000_000  # "small enough to ship": at most 16 MB
HELDOUT_TOKENS = 4_000
VE_TOLERANCE = 0.02
# Measured on `portable_heldout_texts(seed=0)` (test_portable_heldout_sample's docstring).
PORTABLE_VE = 0.767
CACHE_PAIRS = 4


# ---------------------------------------------------------------------------- the card
def card_fields() -> dict[str, str]:
    """The ``| field | value |`` rows of ``SAE_CARD.md`` (header and rule rows left out)."""
    rows = re.findall(r"^\|\s*(.+?)\s*\|\s*(.+?)\s*\|$", (SAE_DIR / "SAE_CARD.md").read_text(),
                      flags=re.MULTILINE)  # fmt: skip
    return {key: value for key, value in rows if key != "field" and not set(key) <= {"-"}}


def card_command() -> argparse.Namespace:
    """The options of the card's ``fpo-make-sae ...`` command, as the command
    parses them (relative paths resolved against the repository)."""
    text = (SAE_DIR / "SAE_CARD.md").read_text()
    line = re.search(r"^fpo-make-sae (.+)$", text, flags=re.MULTILINE).group(1)
    args = cli.parse_args(shlex.split(line))
    args.preference_file = ROOT / args.preference_file
    return args


def test_card_fields_parse():
    fields = card_fields()
    assert fields["hook_name"] == HOOK and fields["architecture"] == "topk (k=64)"
    assert 0.5 < float(fields["variance_explained (held-out)"]) < 1.0
    args = card_command()
    assert (args.layer, args.k, args.seq_len) == (17, int(fields["k"]), 128)
    assert args.preference_file.is_file()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gemma():
    """google/gemma-3-270m in fp32, from the converted folder in ``$FPO_CACHE_DIR`` or
    ``~/.cache/fpo`` (converted from the PyPI GGUF on first use)."""
    return load_gemma3_270m()


@pytest.fixture(scope="module")
def sae():
    return load_sae(path=str(SAE_DIR))


# -------------------------------------------------------------------- 1. the folder
def test_folder_is_a_small_sae_lens_folder():
    files = {p.name: p.stat().st_size for p in SAE_DIR.iterdir()}
    assert {"cfg.json", "sae_weights.safetensors", "SAE_CARD.md"} <= set(files)
    assert sum(files.values()) <= MAX_FOLDER_BYTES, files


def test_loads_frozen_with_sae_lens_and_agrees_with_its_card(sae):
    plain = SAE.load_from_disk(SAE_DIR)
    assert type(plain) is type(sae) and plain.cfg.architecture() == "topk"
    state, plain_state = sae.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[name], plain_state[name]) for name in state)
    # frozen: eval mode, nothing trains
    assert not sae.training
    assert not any(p.requires_grad for p in sae.parameters())
    assert all(p.dtype == torch.float32 for p in sae.parameters())

    fields = card_fields()
    cfg = sae.cfg
    assert cfg.d_in == HIDDEN_SIZE == int(fields["d_in"])
    assert (cfg.d_sae, cfg.k) == (int(fields["d_sae"]), int(fields["k"]))
    assert sae_hook_name(sae) == HOOK == fields["hook_name"]
    assert cfg.metadata.model_name == fields["model"] == "google/gemma-3-270m"
    assert sae.W_enc.shape == (cfg.d_in, cfg.d_sae) and sae.W_dec.shape == (cfg.d_sae, cfg.d_in)


def test_fits_the_real_model_at_layer_17(gemma, sae):
    model, _ = gemma
    assert model.config.hidden_size == HIDDEN_SIZE
    check_sae_fits_model(sae, model)  # raises UserError on a mismatch
    assert resolve_hook_module(model, sae_hook_name(sae)) is model.model.layers[17]


# ---------------------------------------------------------- 2. held-out reconstruction
def heldout_report(gemma, sae, texts: list[str]) -> dict[str, float]:
    """`evaluate_sae` on the first `HELDOUT_TOKENS` activations of `texts`, collected with
    the card's settings (its layer and window, BOS excluded, fp32 model)."""
    model, tokenizer = gemma
    args = card_command()
    activations = collect_activations(
        model.float(),  # the card's held-out activations are fp32
        tokenizer,
        texts,
        hook_layer=args.layer,
        max_tokens=HELDOUT_TOKENS,
        seq_len=args.seq_len,
        exclude_bos=True,
    )
    assert activations.shape == (HELDOUT_TOKENS, HIDDEN_SIZE)
    report = evaluate_sae(sae, activations)
    print(f"held-out sample: {report}")
    return report


def card_heldout_texts() -> tuple[list[str], dict[str, int]]:
    """The card's held-out texts, rebuilt the way `cli.activations_for` builds them (same
    sources, character budget, seed and split), and the characters taken per source."""
    args = card_command()
    budget = int(max(args.tokens * 10 / 9, args.heldout_tokens * 10) * cli.CHARS_PER_TOKEN * 1.3)
    texts, taken = corpus.build_corpus(cli.corpus_sources(args.preference_file), budget, args.seed)
    return corpus.split_texts(texts)[1], taken


def portable_heldout_texts(seed: int) -> list[str]:
    """Texts no machine's SAE corpus contains (module docstring), balanced by `build_corpus`:
    ``prompt + chosen`` / ``prompt + rejected`` of the preference test split and prose
    paragraphs of torch's docstrings, shuffled with the card's seed."""
    sources = {
        "preference test split": corpus.preference_texts(ROOT / "data/sentiment/test.jsonl"),
        "torch docstrings": corpus.docstring_texts(Path(torch.__file__).parent),
    }
    budget = int(HELDOUT_TOKENS * cli.CHARS_PER_TOKEN * 1.3)  # the card's 30% slack
    texts, taken = corpus.build_corpus(sources, budget, seed)
    assert min(taken.values()) > 0.4 * budget, taken  # both sources fill their half
    return texts


def test_card_heldout_sample_reaches_the_card(gemma, sae):
    """The card's own held-out sample (its first HELDOUT_TOKENS tokens) on this machine."""
    texts, taken = card_heldout_texts()
    card = card_fields()
    card_taken = ast.literal_eval(card["corpus characters per source"])
    taken = {name.replace(f"{ROOT}/", ""): chars for name, chars in taken.items()}
    assert taken == card_taken, (
        f"this machine's corpus {taken} is not the card's {card_taken}: its /usr/share/doc, man "
        "pages or Python stdlib differ, so the card's held-out sample cannot be rebuilt here "
        "(test_portable_heldout_sample checks text that is the same on every machine)"
    )
    report = heldout_report(gemma, sae, texts)
    card_ve = float(card["variance_explained (held-out)"])
    assert report["variance_explained"] >= card_ve - VE_TOLERANCE, (report, card_ve)
    assert report["l0"] == sae.cfg.k == int(card["L0 (held-out)"])


def test_portable_heldout_sample(gemma, sae):
    """Text that is held out on every machine; its expected value was measured, not the card's.

    Unseen text scores lower than the card's held-out documents, which come from the same
    sources as the training documents: PORTABLE_VE was measured with seeds 0, 1, 2 (0.767,
    0.770, 0.768); each source alone gives ~0.74.
    """
    report = heldout_report(gemma, sae, portable_heldout_texts(card_command().seed))
    assert report["variance_explained"] >= PORTABLE_VE - VE_TOLERANCE, report
    assert report["l0"] == sae.cfg.k


# ------------------------------------------------------------------ 3. reference cache
def sentiment_datamodule(tokenizer) -> PreferenceDataModule:
    """The first pairs of the sentiment train split with ``configs/data/sentiment.yaml``'s
    template and truncation settings."""
    config = compose_train("data=sentiment").data
    keep = ("format", "chat_template", "plain_template", "append_eos", "max_length",
            "max_prompt_length", "on_bad_row")  # fmt: skip
    return PreferenceDataModule(
        train_source=str(ROOT / "data/sentiment/train.jsonl"),
        tokenizer=tokenizer,
        max_train_samples=CACHE_PAIRS,
        batch_size=CACHE_PAIRS,
        shuffle=False,
        **{key: config[key] for key in keep},
    )


def predict_trainer(callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        callbacks=callbacks,
    )


def test_reference_cache_of_sentiment_pairs_equals_the_online_reference(gemma, sae, tmp_path):
    model, tokenizer = gemma
    fpo_k = OmegaConf.load(ROOT / "configs/objective/fpo.yaml").constraints.features.k
    k = min(int(fpo_k), int(sae.cfg.d_sae))
    settings = CacheSettings(tmp_path, k, "float32", sae_hook_name(sae), "32-true", "fpo-cache")
    datamodule = sentiment_datamodule(tokenizer)
    objective = preset("fpo", f"objective.constraints.features.k={k}")
    online = online_reference(
        model, objective, sae=sae, hook_name=sae_hook_name(sae), logits_chunk_size=256
    )
    results = build_reference_cache(
        predict_trainer, online, datamodule, settings, batch_size=CACHE_PAIRS
    )
    assert list(results) == ["train"] and results["train"]["computed"] == CACHE_PAIRS
    cache = ReferenceCache.open(settings.split_path("train"))
    assert len(cache) == CACHE_PAIRS and cache.k == k == 50

    # Each pair alone (no padding), against the cache's values computed in one padded batch.
    dataset = datamodule.dataset("train", wrapped=False)
    for index in range(CACHE_PAIRS):
        batch = datamodule.collator([dataset[index]])
        labels = batch["labels"]
        stats = online.stats(batch, response_positions(labels), features=True, token_kl=False)
        cached = cache.get(batch["example_id"][0])
        for row, side in enumerate(("chosen", "rejected")):
            n_tokens = int((labels[row, 1:] != -100).sum())
            assert cached[f"ref_{side}_n_tokens"] == n_tokens == int(stats.logps.n_tokens[row])
            sum_lp, avg_lp = stats.logps.sum[row].item(), stats.logps.avg[row].item()
            assert -15 * n_tokens < sum_lp < 0 and avg_lp == pytest.approx(sum_lp / n_tokens)
            assert cached[f"ref_{side}_sum_logps"] == pytest.approx(sum_lp, abs=1e-4)
            assert cached[f"ref_{side}_avg_logps"] == pytest.approx(avg_lp, abs=1e-4)
            indices = torch.as_tensor(cached[f"ref_{side}_topk_indices"])
            assert torch.equal(indices, stats.topk_indices[row])
            torch.testing.assert_close(
                torch.as_tensor(cached[f"ref_{side}_topk_values"]),
                stats.topk_values[row],
                rtol=1e-4,
                atol=1e-4,
            )
