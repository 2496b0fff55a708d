"""The second test set: prompts from templates and titles that train never used.

The in-distribution test prompts share most templates and many titles with train; these
come from `fpo.review_data.prompts.HELDOUT_TEMPLATES` and ``HELDOUT_SLOTS`` (new templates,
new invented titles, the same neutral genre/person/day/venue/character words), so no
prompt of train, test or validation can have their template or title. Prompts only (no
preference pairs): the evaluation samples its own completions
(``evaluation.ood_test.prompts_file``). Rows: ``{"prompt_id": "new-00000", "prompt": ...}``.

CLI::

    python -m fpo.review_data.new_templates --out data/sentiment/test_new_templates.jsonl \
        --prompts 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fpo.commands.common import user_errors
from fpo.review_data.prompts import HELDOUT_SLOTS, HELDOUT_TEMPLATES, make_prompts


def new_template_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt rows drawn from the held-out templates and titles (seeded)."""
    prompts = make_prompts(n, seed, HELDOUT_TEMPLATES, HELDOUT_SLOTS)
    return [{"prompt_id": f"new-{i:05d}", "prompt": prompt} for i, prompt in enumerate(prompts)]


def run(argv: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m fpo.review_data.new_templates")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = new_template_rows(args.prompts, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"{len(rows)} prompts -> {args.out}")
    return args.out


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: a `UserError` prints its message and exits with status 2."""
    with user_errors():
        run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
