"""``fpo-make-sae``: collect activations, train a TopK (or JumpReLU) SAE, evaluate, save.

It trains on an offline English corpus scraped from this machine (`fpo.sae_maker.corpus`)
with the library parts in `fpo.sae_maker`. Run it from the repository root; the exact
command that made each shipped SAE is recorded in its ``SAE_CARD.md``::

    fpo-make-sae --layer 17 --d-sae 2048 --k 64 --tokens 150000 \\
        --heldout-tokens 15000 --epochs 8 --preference-file data/sentiment/train.jsonl \\
        --storage-dtype float32 --out assets/sae/gemma3-270m-layer17 --seed 0

``--site mlp_out`` trains on what layer L's MLP adds to the residual stream
(``blocks.L.hook_mlp_out``; Gemma 2/3: after ``post_feedforward_layernorm``) instead of the
residual stream after the layer (``blocks.L.hook_resid_post``, the default).

Steps: load the model -> build an offline English corpus (preference rows + local docs)
-> hold out every 10th document -> collect hook activations once (train and held-out)
-> train with sae-lens's `SAETrainer` -> evaluate on the held-out activations -> save the
folder (sae-lens format + card).
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fpo.atomic import atomic_save_bytes
from fpo.commands.common import user_errors
from fpo.errors import UserError
from fpo.hook_sites import SAE_SITES, hook_name_for_layer
from fpo.sae_maker import ARCHITECTURES, corpus

# torch, sae-lens and the pipeline's modules are imported where they are used, so that
# --help and a bad option answer at once.

CHARS_PER_TOKEN = 4.7  # measured on this corpus with the Gemma-3 tokenizer
# What each --site hooks, for the card (L = --layer).
SITE_DESCRIPTIONS = {
    "resid_post": (
        "residual stream",
        "the output of `model.model.layers[{L}]`, before the final norm",
    ),
    "mlp_out": (
        "MLP output",
        "what layer {L}'s MLP adds to the residual stream: the output of "
        "`model.model.layers[{L}].post_feedforward_layernorm` (Gemma 2/3; `mlp` for a model "
        "without a post-MLP norm), TransformerLens's `hook_mlp_out`",
    ),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(prog="fpo-make-sae", description=__doc__)
    p.add_argument("--model", default="gemma3-270m", help="gemma3-270m | tiny | HF name/folder")
    p.add_argument("--layer", type=int, default=17, help="decoder layer that is hooked")
    p.add_argument(
        "--site",
        choices=SAE_SITES,
        default="resid_post",
        help="hook site in that layer: resid_post (the layer's output, residual stream) or "
        "mlp_out (the MLP's contribution to the residual stream)",
    )
    p.add_argument("--d-sae", type=int, default=4096, help="number of SAE latents")
    p.add_argument(
        "--k", type=int, default=32, help="active latents per token (TopK); JumpReLU: target L0"
    )
    p.add_argument("--architecture", choices=ARCHITECTURES, default="topk", help="SAE kind")
    p.add_argument("--tokens", type=int, default=300_000, help="unique training tokens")
    p.add_argument("--heldout-tokens", type=int, default=30_000, help="evaluation tokens")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training tokens")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per optimizer step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window, BOS included")
    p.add_argument(
        "--dead-window-tokens",
        type=int,
        default=100_000,
        help="tokens without firing before a latent counts as dead (aux loss)",
    )
    p.add_argument(
        "--preference-file",
        type=Path,
        default=None,
        help="JSONL prompt/chosen/rejected rows to mix in, e.g. data/sentiment/train.jsonl",
    )
    p.add_argument(
        "--collect-dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="model dtype while collecting the TRAINING activations (bf16: ~4x faster on "
        "AMX CPUs); the held-out activations always use the model's float32",
    )
    p.add_argument("--autocast", action="store_true", help="bf16 autocast in SAE training")
    p.add_argument(
        "--storage-dtype",
        choices=["float32", "float16"],
        default="float16",
        help="dtype of the saved weights (loads back as float32)",
    )
    p.add_argument(
        "--activation-cache",
        type=Path,
        default=None,
        help="save/reuse the collected activations here (a .pt file)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_model(name: str) -> tuple[Any, Any, str]:
    """``(model, tokenizer, model_name)`` for ``--model``."""
    if name == "gemma3-270m":
        from fpo.models.gemma3_gguf import MODEL_ID, load_gemma3_270m

        return (*load_gemma3_270m(), MODEL_ID)
    if name == "tiny":
        from fpo.models.tiny import build_tiny_model, build_tiny_tokenizer

        return build_tiny_model(), build_tiny_tokenizer(), "tiny-random-gemma3"
    from fpo.models.hf import load_hf_causal_lm

    return (*load_hf_causal_lm(name), name)


def corpus_sources(preference_file: Path | None) -> dict[str, Any]:
    """The offline text sources: the preference rows (when given) and local English text."""
    sources: dict[str, Any] = {}
    if preference_file is not None:
        sources[f"preferences ({preference_file})"] = corpus.preference_texts(preference_file)
    sources["/usr/share/doc"] = corpus.doc_texts()
    sources["man pages"] = corpus.man_texts()
    sources["python docstrings"] = corpus.docstring_texts()
    return sources


def activations_for(args: argparse.Namespace, model, tokenizer) -> tuple[dict[str, Any], float]:
    """Train / held-out activations and the seconds their collection took.

    With ``--activation-cache``, a cache made with the same collection options is reused
    (the card then reports the original collection time); a different one is refused. The
    key names the site only when it is not ``resid_post``, so caches made before ``--site``
    existed stay valid.
    """
    key = {
        k: str(getattr(args, k))
        for k in (
            "model",
            "layer",
            "tokens",
            "heldout_tokens",
            "seq_len",
            "preference_file",
            "seed",
            "collect_dtype",
        )
    }
    if args.site != "resid_post":
        key["site"] = args.site
    import torch

    from fpo.sae_maker.activations import collect_activations

    cache = args.activation_cache
    if cache is not None and cache.is_file():
        stored = torch.load(cache, weights_only=True)
        if stored["key"] != key:
            raise UserError(
                f"--activation-cache {cache} was made with {stored['key']}, "
                f"not {key}; delete it or pick another path"
            )
        print(f"reusing activations from {cache}", flush=True)
        return stored, stored["collect_seconds"]
    start = time.perf_counter()
    # every 10th text is held out: the corpus must cover 10/9 x train and 10 x held-out
    budget = int(max(args.tokens * 10 / 9, args.heldout_tokens * 10) * CHARS_PER_TOKEN * 1.3)
    texts, taken = corpus.build_corpus(corpus_sources(args.preference_file), budget, args.seed)
    train_texts, heldout_texts = corpus.split_texts(texts)
    print(f"corpus: {len(texts)} texts, chars per source {taken}", flush=True)
    common = {
        "hook_layer": args.layer,
        "site": args.site,
        "seq_len": args.seq_len,
        "exclude_bos": True,
    }
    heldout = collect_activations(
        model, tokenizer, heldout_texts, max_tokens=args.heldout_tokens, **common
    )
    model.to(getattr(torch, args.collect_dtype))  # after the float32 held-out pass
    train = collect_activations(
        model, tokenizer, train_texts, max_tokens=args.tokens, log_every=50, **common
    )
    seconds = time.perf_counter() - start
    data = {"key": key, "corpus_chars": taken, "train": train, "heldout": heldout}
    if cache is not None:
        atomic_save_bytes(cache, lambda f: torch.save({**data, "collect_seconds": seconds}, f))
    return data, seconds


def file_sha256(path: Path | None) -> str:
    """Hex sha256 of a file's bytes, or ``"-"`` for no file."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else "-"


def build_card(args, argv, model_name, sae, data, metrics, times) -> dict[str, Any]:
    """The fields of ``SAE_CARD.md``."""
    import sae_lens
    import torch

    itemsize = torch.empty(0, dtype=getattr(torch, args.storage_dtype)).element_size()
    weights_bytes = sum(p.numel() for p in sae.state_dict().values()) * itemsize
    n_train, d_in = data["train"].shape
    batch = min(args.batch_size, n_train)
    held, train = metrics["heldout"], metrics["train"]
    hook_name = hook_name_for_layer(args.layer, args.site)
    site, what = (text.format(L=args.layer) for text in SITE_DESCRIPTIONS[args.site])
    kind = {"topk": "TopK", "jumprelu": "JumpReLU"}[args.architecture]
    return {
        "title": f"{kind} SAE: {model_name}, layer {args.layer} {site}",
        "description": (
            f"Trained with sae-lens {sae_lens.__version__} (`SAETrainer`, {kind}) on activations "
            f"of `{hook_name}` = {what}. BOS and pad positions excluded; `b_dec` "
            "initialised to the mean activation. Load with "
            "`sae_lens.SAE.load_from_disk(folder)`. Metrics are on held-out documents. "
            "`--activation-cache` only reuses activations collected by the same options; "
            "without the file the command collects them again."
        ),
        "model": model_name,
        "hook_name": hook_name,
        "architecture": f"topk (k={args.k})"
        if args.architecture == "topk"
        else f"jumprelu (quadratic L0 loss, target L0 {args.k})",
        "d_in": d_in,
        "d_sae": args.d_sae,
        "k" if args.architecture == "topk" else "target L0": args.k,
        "variance_explained (held-out)": held["variance_explained"],
        "L0 (held-out)": held["l0"],
        "dead fraction (held-out, never fires)": held["dead_fraction"],
        "variance_explained (train sample)": train["variance_explained"],
        "held-out tokens": int(held["n_tokens"]),
        "unique training tokens": n_train,
        "epochs": args.epochs,
        "training tokens seen (with epochs)": args.epochs * (n_train // batch) * batch,
        "optimizer": f"Adam lr={args.lr}, batch {args.batch_size}, linear decay over last 20%",
        "window length (BOS included)": args.seq_len,
        "activation dtype (train / held-out)": f"{args.collect_dtype} / float32",
        "corpus characters per source": data["corpus_chars"],
        "preference file sha256": file_sha256(args.preference_file),
        "activation collection time (s)": round(times["collect"], 1),
        "SAE training time (s)": round(times["train"], 1),
        "weights storage dtype": args.storage_dtype,
        "weights size (MB)": round(weights_bytes / 1e6, 2),
        "seed": args.seed,
        "torch / sae-lens": f"{torch.__version__} / {sae_lens.__version__}",
        "command": "fpo-make-sae " + shlex.join(argv),
    }


def run(argv: list[str]) -> dict[str, Any]:
    """The whole pipeline; returns the card fields."""
    args = parse_args(argv)
    import torch

    from fpo.sae_maker.io import folder_size_bytes, round_to_storage, save_sae
    from fpo.sae_maker.trainer import evaluate_sae, train_sae

    torch.manual_seed(args.seed)
    model, tokenizer, model_name = load_model(args.model)
    data, collect_s = activations_for(args, model, tokenizer)
    print(
        f"activations: train {tuple(data['train'].shape)}, held-out "
        f"{tuple(data['heldout'].shape)} ({collect_s:.0f} s)",
        flush=True,
    )
    start = time.perf_counter()
    metadata = {
        "model_name": model_name,
        "hook_name": hook_name_for_layer(args.layer, args.site),
        "context_size": args.seq_len,
        "prepend_bos": True,
    }
    sae = train_sae(
        data["train"],
        d_sae=args.d_sae,
        k=args.k,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        metadata=metadata,
        dead_window_tokens=args.dead_window_tokens,
        architecture=args.architecture,
    )
    train_s = time.perf_counter() - start
    round_to_storage(sae, args.storage_dtype)  # evaluate the weights that get shipped
    n_eval = data["heldout"].shape[0]
    metrics = {
        "heldout": evaluate_sae(sae, data["heldout"]),
        "train": evaluate_sae(sae, data["train"][:n_eval]),
    }
    times = {"collect": collect_s, "train": train_s}
    card = build_card(args, argv, model_name, sae, data, metrics, times)
    save_sae(sae, args.out, card, storage_dtype=args.storage_dtype)
    print(
        f"saved {args.out}: {folder_size_bytes(args.out)} bytes; held-out VE "
        f"{metrics['heldout']['variance_explained']:.4f}, L0 {metrics['heldout']['l0']:.1f}, "
        f"dead {metrics['heldout']['dead_fraction']:.3f}",
        flush=True,
    )
    return card


def main(argv: list[str] | None = None) -> None:
    """Entry point: a `UserError` prints its message and exits with status 2."""
    with user_errors():
        run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
