"""The sentiment judge: VADER's compound score, the reward of the controlled-sentiment task.

VADER (Hutto & Gilbert, 2014) is a rule-based analyser: lexicon valences, adjusted for
negation, intensifiers, punctuation and capitals, summed to ``s`` and squashed to
``compound = s / sqrt(s^2 + 15)`` in ``[-1, 1]``. It stands in for the DPO paper's
IMDb-trained sentiment classifier: it needs no weights and no network.

What is judged is the *completion only*, not ``prompt + completion``: the prompts are
neutral by construction (every prompt scores 0), the completion is the part the policy
controls, and VADER's compound is not additive, so prompt words would only blur the
comparison between two completions of the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


class SentimentJudge:
    """``score(texts) -> [compound in [-1, 1]]``; higher means more positive."""

    name = "vader-compound"

    def __init__(self) -> None:
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, texts: Sequence[str]) -> list[float]:
        """VADER compound score of each text (0.0 for empty or neutral text)."""
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in texts]

    __call__ = score
