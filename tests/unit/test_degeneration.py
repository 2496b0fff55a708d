"""Degeneration metrics on hand-counted examples."""

from __future__ import annotations

import pytest

from fpo.evaluation.degeneration import (
    degeneration_metrics,
    distinct_n,
    has_triple_repeat,
    is_on_topic,
    title_words,
    words,
)

PROMPT = "I watched The Glass Harbor last night and"


def test_words_are_lowercase_with_inner_apostrophes():
    assert words("Don't STOP: the film's 2nd act -- wow!!") == [
        "don't", "stop", "the", "film's", "2nd", "act", "wow",
    ]  # fmt: skip
    assert words("  ...  ") == []


def test_distinct_n_pools_ngrams_but_not_across_texts():
    tokenized = [["a", "b", "a"], ["a", "b"]]
    assert distinct_n(tokenized, 1) == 2 / 5  # a b a a b -> {a, b}
    # bigrams: (a b) (b a) | (a b); none crosses from "a" (end of text 1) to "a"
    assert distinct_n(tokenized, 2) == 2 / 3
    assert distinct_n([["a"]], 2) == 0.0


def test_triple_repeat_needs_three_in_a_row():
    assert has_triple_repeat(words("so so so good"))
    assert not has_triple_repeat(words("so so good so"))


def test_title_words_are_capitalised_words_after_the():
    assert title_words(PROMPT) == {"glass", "harbor"}
    assert title_words("The director of The Iron Line made a film") == {"iron", "line"}
    assert title_words("The film is") == frozenset()


def test_on_topic_needs_a_film_or_title_word_and_no_ad_word():
    assert is_on_topic(PROMPT, " the acting was flat")
    assert is_on_topic(PROMPT, " Glass Harbor stayed with me for days")  # a title word
    assert not is_on_topic(PROMPT, " it was wonderful fun and beautiful!")  # neither
    assert not is_on_topic(PROMPT, " the film was great and the hotel staff were kind")  # ad
    assert not is_on_topic(PROMPT, "")


def test_degeneration_metrics_of_a_gamed_and_a_plain_completion():
    completions = [
        " terrific! wonderful fun, beautiful beautiful beautiful!",
        " the plot drags and the ending is flat",
    ]
    metrics = degeneration_metrics([PROMPT, PROMPT], completions)
    # words: 6 (terrific wonderful fun beautiful x3) + 8; positive: the first 6 only
    assert metrics["mean_words"] == 7.0
    assert metrics["distinct_1"] == pytest.approx(11 / 14)  # beautiful x2 and "the" x1 repeat
    assert metrics["distinct_2"] == pytest.approx(11 / 12)  # (beautiful beautiful) twice
    assert metrics["repeat_3_rate"] == 0.5
    assert metrics["positive_word_density"] == pytest.approx(6 / 14)
    assert metrics["positive_stack_rate"] == 0.5
    assert metrics["on_topic_rate"] == 0.5
    with pytest.raises(ValueError, match="2 prompts but 1"):
        degeneration_metrics([PROMPT, PROMPT], completions[:1])
