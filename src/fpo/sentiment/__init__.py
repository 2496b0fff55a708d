"""Controlled sentiment generation (the DPO paper's IMDb experiment, rebuilt offline).

Neutral review-style prompts (`prompts`), completions sampled from the reference model and
scored by a VADER judge (`judge`), best vs worst completion as a preference pair (`build`).
"""

from fpo.sentiment.judge import SentimentJudge
from fpo.sentiment.prompts import make_prompt_splits, make_prompts

__all__ = ["SentimentJudge", "make_prompt_splits", "make_prompts"]
