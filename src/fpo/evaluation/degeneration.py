"""Degeneration metrics of a set of completions: is the text still varied, on topic, prose?

A policy pushed far from its reference can please a lexicon judge by stacking positive
adjectives ("terrific! It was wonderful fun and beautiful!") or by drifting into ad copy
for a hotel or a venue. These numbers make that visible next to the judge scores.

Tokenisation (every metric): the completion is lowercased and its words are the matches
of `WORD` (letters and digits, with inner apostrophes: ``don't``, ``film's``); punctuation
and whitespace are dropped. Over ``N`` completions:

- ``distinct_1`` / ``distinct_2``: unique n-grams / total n-grams, n = 1, 2, pooled over
  all completions (n-grams do not cross completions); 0.0 when there is no n-gram.
- ``mean_words``: mean number of words per completion.
- ``repeat_3_rate``: share of completions where one word occurs three times in a row
  ("so so so", "beautiful beautiful beautiful").
- ``positive_word_density``: positive words / all words, pooled; a word is positive when
  VADER's lexicon gives it a valence > 0 (0.0 when there are no words).
- ``positive_stack_rate``: share of completions with `STACK_SIZE` (4) or more positive
  words.
- ``on_topic_rate``: share of completions that are *on topic*: the completion (i) contains
  a word of the prompt's film title or a word of `FILM_WORDS`, and (ii) contains no word of
  `AD_WORDS` (hotel, venue, shopping and sales vocabulary). The film title's words are the
  capitalised words that follow a capitalised "The" in the prompt (`title_words`; "I
  watched The Glass Harbor and" -> {glass, harbor}); a prompt without one contributes
  none. An empty completion is off topic.

Every metric is a plain function of the texts (and prompts), so it can be recomputed from
``generations.jsonl``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
TITLE = re.compile(r"\bThe((?: [A-Z][a-z]+)+)")
STACK_SIZE = 4

FILM_WORDS = frozenset(
    (
        "film", "films", "filmmaker", "filmmakers", "filmed", "movie", "movies", "cinema",
        "cinematic", "cinematography", "director", "directors", "directed", "directing",
        "direction", "actor", "actors", "actress", "actresses", "acting", "acted", "cast",
        "casting", "performance", "performances", "plot", "plots", "story", "stories",
        "storyline", "script", "screenplay", "scene", "scenes", "character", "characters",
        "dialogue", "ending", "sequel", "prequel", "soundtrack", "screen", "camera", "editing",
        "documentary", "genre", "role", "roles", "watch", "watched", "watching", "viewer",
        "viewers", "audience", "audiences", "narrative", "twist", "drama", "comedy", "thriller",
        "horror", "animation", "animated", "trailer", "premiere", "hollywood", "runtime",
        "pacing", "protagonist", "villain", "hero",
    )
)  # fmt: skip
AD_WORDS = frozenset(
    (
        "hotel", "hotels", "resort", "resorts", "spa", "suite", "suites", "rooms", "booking",
        "bookings", "reservation", "reservations", "amenities", "guests", "breakfast", "buffet",
        "restaurant", "restaurants", "menu", "dining", "venue", "venues", "wedding", "weddings",
        "parking", "shop", "shopping", "store", "stores", "discount", "discounts", "deal",
        "deals", "price", "prices", "pricing", "purchase", "shipping", "customer", "customers",
        "product", "products", "brand", "sale", "checkout", "accommodation", "accommodations",
        "staff",
    )
)  # fmt: skip


def words(text: str) -> list[str]:
    """The lowercase words of ``text`` (module docstring)."""
    return WORD.findall(text.lower())


def title_words(prompt: str) -> frozenset[str]:
    """Lowercase words of the film titles in ``prompt``: capitalised words after "The"."""
    return frozenset(w.lower() for match in TITLE.findall(prompt) for w in match.split())


@functools.cache
def _vader_lexicon() -> dict[str, float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer().lexicon


def is_positive_word(word: str) -> bool:
    """Whether VADER's lexicon gives ``word`` (lowercase) a positive valence."""
    return _vader_lexicon().get(word, 0.0) > 0


def distinct_n(tokenized: Sequence[Sequence[str]], n: int) -> float:
    """Unique n-grams / total n-grams over all texts (0.0 when there is none)."""
    grams = [tuple(ws[i : i + n]) for ws in tokenized for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_triple_repeat(ws: Sequence[str]) -> bool:
    """Whether one word occurs three times in a row."""
    return any(ws[i] == ws[i + 1] == ws[i + 2] for i in range(len(ws) - 2))


def is_on_topic(prompt: str, completion: str) -> bool:
    """The module docstring's rule: a title or film word, and no ad-copy word."""
    found = set(words(completion))
    return bool(found & (FILM_WORDS | title_words(prompt))) and not found & AD_WORDS


def degeneration_metrics(prompts: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
    """The module docstring's metrics of ``completions`` (one prompt per completion)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not completions:
        raise ValueError("degeneration_metrics: no completions")
    tokenized = [words(text) for text in completions]
    positives = [sum(map(is_positive_word, ws)) for ws in tokenized]
    total_words = sum(len(ws) for ws in tokenized)
    count = len(completions)
    return {
        "distinct_1": distinct_n(tokenized, 1),
        "distinct_2": distinct_n(tokenized, 2),
        "mean_words": total_words / count,
        "repeat_3_rate": sum(map(has_triple_repeat, tokenized)) / count,
        "positive_word_density": sum(positives) / total_words if total_words else 0.0,
        "positive_stack_rate": sum(p >= STACK_SIZE for p in positives) / count,
        "on_topic_rate": sum(map(is_on_topic, prompts, completions)) / count,
    }
