"""Build controlled-sentiment preference pairs from a reference model's own samples.

The DPO paper's IMDb recipe, offline: for each prompt x, sample S completions
``y_1..y_S ~ pi_ref(. | x)``, score each with the judge ``r(y)`` (VADER compound of the
completion, see `fpo.evaluation.judges`), and keep the pair

    chosen = argmax_s r(y_s),  rejected = argmin_s r(y_s)   if r(chosen) - r(rejected) >= min_gap

(ties: the first sample wins; empty completions and chosen == rejected text are never
kept). Rows are in the plain preference format the data module reads: ``prompt``,
``chosen``, ``rejected`` plus ``score_chosen``, ``score_rejected``, ``prompt_id``.

CLI (writes ``train.jsonl``, ``test.jsonl``, ``val.jsonl`` (with ``--val-prompts``) and
``DATA_CARD.md`` into ``--out``)::

    python -m fpo.review_data.build --out data/sentiment --train-prompts 500 --test-prompts 100 \
        --num-samples 4 --max-new-tokens 32 --min-gap 0.3 --seed 0

``--splits val`` builds only the named splits (the others' files are left alone) and adds
their section to an existing data card. Prompts of the three splits come from one seeded
draw, cut in the order train, test, val (`fpo.review_data.prompts.make_prompt_splits`), so
they are disjoint and train/test do not change when validation prompts are added.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fpo.commands.common import user_errors
from fpo.errors import UserError
from fpo.evaluation.judges import VaderJudge
from fpo.generation import sample_completion_ids
from fpo.review_data.prompts import make_prompt_splits

# Tokens after which a base model starts a new document: a completion ends there, like EOS.
DOCUMENT_END_TOKENS = ("<end_of_turn>", "<start_of_image>")
TEST_SEED_OFFSET = 1_000_003  # split i (train 0, test 1, val 2) is sampled with seed + i * this
SPLITS = ("train", "test", "val")


@dataclass(frozen=True)
class ScoredPrompt:
    """One prompt's S sampled completions, their judge scores and token counts."""

    prompt_id: str
    prompt: str
    completions: list[str]
    scores: list[float]
    num_tokens: list[int]


def document_end_ids(tokenizer: Any) -> list[int]:
    """Ids of `DOCUMENT_END_TOKENS` the tokenizer has as single tokens (others skipped)."""
    vocab = tokenizer.get_vocab()
    return [vocab[token] for token in DOCUMENT_END_TOKENS if token in vocab]


def sample_and_score(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    judge: VaderJudge | None = None,
    id_prefix: str = "p",
    progress: Callable[[int, int], None] | None = None,
    **sampling: Any,
) -> list[ScoredPrompt]:
    """Sample ``num_samples`` completions per prompt and score them with ``judge``.

    ``sampling`` goes to `fpo.generation.sample_completion_ids` (temperature, top_k, top_p,
    batch_size). Prompt ids are ``f"{id_prefix}{index:05d}"``.
    """
    judge = judge or VaderJudge()
    ids = sample_completion_ids(
        model,
        tokenizer,
        prompts,
        num_samples,
        max_new_tokens,
        seed=seed,
        progress=progress,
        stop_token_ids=document_end_ids(tokenizer),
        **sampling,
    )
    scored = []
    for index, (prompt, rows) in enumerate(zip(prompts, ids, strict=True)):
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        scored.append(
            ScoredPrompt(
                f"{id_prefix}{index:05d}",
                prompt,
                texts,
                judge.score_texts(texts),
                [len(r) for r in rows],
            )
        )
    return scored


def select_pair(scored: ScoredPrompt, min_gap: float) -> dict[str, Any] | None:
    """The (highest, lowest)-score pair of one prompt as a row, or None if it is dropped."""
    candidates = [i for i, text in enumerate(scored.completions) if text.strip()]
    if len(candidates) < 2:
        return None
    best = max(candidates, key=lambda i: scored.scores[i])
    worst = min(candidates, key=lambda i: scored.scores[i])
    gap = scored.scores[best] - scored.scores[worst]
    if gap < min_gap - 1e-9 or scored.completions[best] == scored.completions[worst]:
        return None
    return {
        "prompt_id": scored.prompt_id,
        "prompt": scored.prompt,
        "chosen": scored.completions[best],
        "rejected": scored.completions[worst],
        "score_chosen": scored.scores[best],
        "score_rejected": scored.scores[worst],
    }


def build_sentiment_preferences(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    max_new_tokens: int,
    min_gap: float,
    seed: int,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Preference rows for ``prompts`` (see the module docstring); ``kwargs`` go to
    `sample_and_score` (judge, id_prefix, progress, temperature, top_k, top_p, batch_size)."""
    check_settings(num_samples, min_gap)
    scored = sample_and_score(
        model, tokenizer, prompts, num_samples, max_new_tokens, seed, **kwargs
    )
    return [row for row in (select_pair(s, min_gap) for s in scored) if row is not None]


def check_settings(num_samples: int, min_gap: float) -> None:
    """``num_samples >= 2`` (a pair needs two samples) and ``0 <= min_gap <= 2``."""
    if num_samples < 2:
        raise UserError(f"--num-samples={num_samples}: need at least 2 samples per prompt")
    if not 0 <= min_gap <= 2:
        raise UserError(f"--min-gap={min_gap}: must be in [0, 2] (scores lie in [-1, 1])")


# ----------------------------------------------------------------------------- CLI


def summary(values: Sequence[float]) -> str:
    """``mean ± std [min, median, max]`` of a list, 3 decimals ('-' if empty)."""
    if not values:
        return "-"
    std = statistics.pstdev(values)
    lo, med, hi = min(values), statistics.median(values), max(values)
    return f"{statistics.fmean(values):.3f} ± {std:.3f} [{lo:.3f}, {med:.3f}, {hi:.3f}]"


def split_stats(scored: list[ScoredPrompt], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and score statistics of one split, for the data card."""
    all_scores = [s for sp in scored for s in sp.scores]
    tokens = [n for sp in scored for n in sp.num_tokens]
    return {
        "prompts": len(scored),
        "kept": len(rows),
        "dropped": len(scored) - len(rows),
        "all samples": summary(all_scores),
        "sample tokens": summary([float(n) for n in tokens]),
        "chosen": summary([r["score_chosen"] for r in rows]),
        "rejected": summary([r["score_rejected"] for r in rows]),
        "gap": summary([r["score_chosen"] - r["score_rejected"] for r in rows]),
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines, atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def data_card(args: argparse.Namespace, stats: dict[str, dict[str, Any]], info: dict) -> str:
    """The DATA_CARD.md text: recipe, exact command, settings, counts and statistics."""
    command = "python -m fpo.review_data.build " + shlex.join(info["argv"])
    lines = [
        "# Controlled-sentiment preference pairs (gemma-3-270m samples, VADER judge)",
        "",
        "Rebuilt offline after the DPO paper's IMDb experiment: neutral review-style prompts",
        "(`fpo.review_data.prompts`: invented titles, no VADER-valenced word), completions",
        f"sampled from the reference model, {info['model']}; each completion (without",
        "the prompt) scored by VADER's compound score in [-1, 1] (`fpo.evaluation.judges`);",
        "chosen = the highest-scoring sample of a prompt, rejected = the lowest; the prompt",
        f"is kept when score(chosen) - score(rejected) >= {args.min_gap}. Completions end at",
        f"EOS, at a document-end token ({', '.join(DOCUMENT_END_TOKENS)}) or after",
        f"{args.max_new_tokens} new tokens (then cut mid-sentence, as in the DPO paper).",
        "",
        "Made with:",
        "",
        "```",
        command,
        "```",
        "",
        f"Wall time {info['wall_s'] / 60:.1f} min ({info['tokens_per_s']:.1f} sampled tokens/s,"
        f" {info['threads']} CPU threads).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| model | {info['model']} |",
        f"| dtype while sampling | {args.dtype} |",
        f"| samples per prompt | {args.num_samples} |",
        f"| max new tokens | {args.max_new_tokens} |",
        f"| temperature / top_k / top_p | {args.temperature} / {args.top_k} / {args.top_p} |",
        f"| min gap | {args.min_gap} |",
        f"| seed | prompts: {args.seed}; sampling: train {args.seed}, "
        f"test {args.seed} + {TEST_SEED_OFFSET}, val {args.seed} + 2 x {TEST_SEED_OFFSET} |",
        f"| batch size (sequences) | {args.batch_size} |",
        "| judge | vaderSentiment 3.3.2 compound, completion only |",
        f"| versions | {info['versions']} |",
        "",
        "Rows (JSON lines): `prompt_id`, `prompt`, `chosen`, `rejected`, `score_chosen`,",
        "`score_rejected`. Completions keep their leading space: `prompt + chosen` is the",
        "sampled text. Train, test and validation prompts are disjoint (one draw, cut in",
        "that order).",
        "",
        "Statistics: mean ± std [min, median, max]; `all samples` is every sampled",
        "completion's score (the reference policy's reward).",
        "",
        "| split | " + " | ".join(next(iter(stats.values())).keys()) + " |",
        "|---|" + "---|" * len(next(iter(stats.values()))),
    ]
    lines += [f"| {name} | " + " | ".join(map(str, s.values())) + " |" for name, s in stats.items()]
    return "\n".join(lines) + "\n"


def load_model(name: str, dtype: str, cache_dir: str | None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, description)`` for ``--model`` (gemma3_270m, or tiny for smoke runs)."""
    if name == "gemma3_270m":
        from fpo.models.gemma3_gguf import load_gemma3_270m

        model, tokenizer = load_gemma3_270m(cache_dir=cache_dir, dtype=dtype)
        return model, tokenizer, "google/gemma-3-270m (base; Q4_K_M GGUF de-quantised)"
    if name == "tiny":
        from fpo.models.tiny import build_tiny_model, build_tiny_tokenizer

        return build_tiny_model(dtype=dtype), build_tiny_tokenizer(), "tiny random Gemma-3"
    raise UserError(f"--model={name!r}: expected gemma3_270m or tiny")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fpo.review_data.build", description=__doc__)
    p.add_argument("--out", required=True, help="output folder (train/test.jsonl, DATA_CARD.md)")
    p.add_argument("--train-prompts", type=int, required=True)
    p.add_argument("--test-prompts", type=int, required=True)
    p.add_argument("--val-prompts", type=int, default=0, help="validation prompts (after test)")
    p.add_argument(
        "--splits", default=None, help="comma list of splits to build (default: all non-empty)"
    )
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--min-gap", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--model", default="gemma3_270m", help="gemma3_270m or tiny")
    p.add_argument("--dtype", default="float32", help="bfloat16 is ~2x faster on AMX CPUs")
    p.add_argument("--cache-dir", default=None, help="converted model cache (FPO_CACHE_DIR)")
    return p.parse_args(argv)


def run(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Build both splits and write the three files; return the per-split statistics."""
    import torch
    import transformers

    args = parse_args(argv)
    check_settings(args.num_samples, args.min_gap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, model_desc = load_model(args.model, args.dtype, args.cache_dir)
    drawn = make_prompt_splits(args.train_prompts, args.test_prompts, args.seed, args.val_prompts)
    every = {name: prompts for name, prompts in zip(SPLITS, drawn, strict=False) if prompts}
    wanted = args.splits.split(",") if args.splits else list(every)
    unknown = [name for name in wanted if name not in every]
    if unknown:
        raise UserError(f"--splits: {unknown} not among the non-empty splits {list(every)}")
    splits = {name: every[name] for name in wanted}
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                "batch_size": args.batch_size}  # fmt: skip
    stats, start, n_tokens = {}, time.time(), 0
    for split, prompts in splits.items():
        offset = SPLITS.index(split)

        def progress(done: int, total: int, split: str = split) -> None:
            minutes = (time.time() - start) / 60
            print(f"[{split}] {done}/{total} sequences, {minutes:.1f} min", flush=True)

        scored = sample_and_score(
            model, tokenizer, prompts, args.num_samples, args.max_new_tokens,
            seed=args.seed + offset * TEST_SEED_OFFSET, id_prefix=f"{split}-",
            progress=progress, **sampling,
        )  # fmt: skip
        rows = [r for r in (select_pair(s, args.min_gap) for s in scored) if r is not None]
        write_jsonl(out / f"{split}.jsonl", rows)
        stats[split] = split_stats(scored, rows)
        n_tokens += sum(n for s in scored for n in s.num_tokens)
        print(f"[{split}] {stats[split]}", flush=True)
    wall = time.time() - start
    info = {
        "argv": list(argv), "model": model_desc, "wall_s": wall,
        "tokens_per_s": n_tokens / max(wall, 1e-9), "threads": torch.get_num_threads(),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }  # fmt: skip
    card = out / "DATA_CARD.md"
    if set(splits) == set(every) or not card.is_file():
        card.write_text(data_card(args, stats, info), encoding="utf-8")
    else:
        card.write_text(add_card_section(card.read_text(), args, stats, info), encoding="utf-8")
    return stats


def add_card_section(card: str, args: argparse.Namespace, stats: dict, info: dict) -> str:
    """``card`` with a section for splits built on their own (replacing an older one)."""
    names = ", ".join(stats)
    heading = f"## Added split: {names}"
    command = "python -m fpo.review_data.build " + shlex.join(info["argv"])
    seeds = ", ".join(f"{n} {args.seed} + {SPLITS.index(n)} x {TEST_SEED_OFFSET}" for n in stats)
    columns = list(next(iter(stats.values())).keys())
    section = [
        heading,
        "",
        f"Built later with the same recipe, model and judge (sampling seeds: {seeds}); its",
        "prompts are the tail of the same prompt draw, disjoint from train and test:",
        "",
        "```",
        command,
        "```",
        "",
        f"Wall time {info['wall_s'] / 60:.1f} min ({info['tokens_per_s']:.1f} sampled tokens/s,"
        f" {info['threads']} CPU threads, {args.dtype}).",
        "",
        "| split | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {name} | " + " | ".join(map(str, s.values())) + " |" for name, s in stats.items()),
    ]
    kept = card.split(heading)[0].rstrip("\n")
    return kept + "\n\n" + "\n".join(section) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: a `UserError` prints its message and exits with status 2."""
    with user_errors():
        run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
