"""Controlled sentiment generation (the DPO paper's IMDb experiment, rebuilt offline).

Neutral review-style prompts (`prompts`), completions sampled from the reference model and
scored by VADER (`fpo.evaluation.judges.VaderJudge`), best vs worst completion as a
preference pair (`build`).
"""

from fpo.review_data.prompts import make_prompt_splits, make_prompts

__all__ = ["make_prompt_splits", "make_prompts"]
