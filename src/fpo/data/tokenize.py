"""Templating, tokenization and truncation of parsed preference pairs.

Prompt and responses are tokenized separately and concatenated, so the prompt/response
boundary is exact (labels mask the prompt tokens):

* chat template: prompt text = ``tokenizer.apply_chat_template(prompt_messages,
  add_generation_prompt=True, tokenize=False)``, tokenized *without* special tokens when the
  rendered text already starts with the BOS text (Gemma, Llama-3 templates), else with them;
  a leading double BOS is collapsed in any case.
* plain template: prompt text = ``plain_template.format(prompt=pair.prompt_text)``,
  tokenized with the tokenizer's special tokens (its BOS).
* responses: the assistant text tokenized without special tokens, then, with
  ``append_eos``, ``eos_token_id`` appended. This is the same in both modes: the end-of-turn
  marker a chat template renders after an assistant turn is *not* added, EOS is the one
  stop signal the policy learns, whatever the template.

Special-token strings written in the row's text (``"<eos>"``) are encoded as plain text
(``data.special_token_text=literal``, :mod:`fpo.data.special_text`); rows without them are
tokenized exactly as described above.

Truncation (keep-start), with ``P`` the prompt ids and ``R`` each response's ids::

    P <- P[:max_prompt_length]
    R <- R[:max(0, max_length - |P|)]  # for chosen and rejected alike
    drop the pair if |R_chosen| == 0 or |R_rejected| == 0

so every kept row has ``|P| + |R| <= max_length`` and at least one response token. With
``max_prompt_length >= max_length``, pairs whose prompt alone fills ``max_length`` are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fpo.data.formats import Message, PreferencePair, short_hash
from fpo.data.special_text import Shield, encode_literal
from fpo.errors import UserError
from fpo.logprobs import IGNORE_INDEX

CHAT_TEMPLATE_SETTINGS = {"auto": "auto", "true": True, "false": False}


@dataclass(frozen=True)
class TemplateSettings:
    """How prompts and responses become text: chat template or ``plain_template``, EOS."""

    use_chat_template: bool
    plain_template: str = "{prompt}"
    append_eos: bool = True
    #: ``literal``: special-token strings in row text stay text; ``control``: they become
    #: control tokens (fpo.data.special_text)
    special_token_text: str = "literal"


@dataclass(frozen=True)
class Truncation:
    """Token budgets: ``max_prompt_length`` for the prompt, ``max_length`` for prompt+response."""

    max_length: int
    max_prompt_length: int

    def __post_init__(self) -> None:
        for key in ("max_length", "max_prompt_length"):
            if getattr(self, key) < 1:
                raise UserError(f"data.{key}={getattr(self, key)}: must be >= 1")


def resolve_chat_template(setting: Any, tokenizer: Any) -> bool:
    """Whether to use the tokenizer's chat template: ``auto`` means "if it has one".

    ``setting`` is ``auto``/``true``/``false`` (strings as Hydra passes them, or bools).
    ``true`` with a tokenizer lacking a template is a :class:`UserError`.
    """
    key = str(setting).lower()
    if key not in CHAT_TEMPLATE_SETTINGS:
        raise UserError(f"data.chat_template={setting!r}: expected one of auto, true, false")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    value = CHAT_TEMPLATE_SETTINGS[key]
    if value is True and not has_template:
        raise UserError(
            "data.chat_template=true but the tokenizer has no chat_template; "
            "set data.chat_template=false (uses data.plain_template) or auto"
        )
    return has_template if value == "auto" else value


def check_plain_template(template: str) -> None:
    """``template`` must format with only ``{prompt}`` and must contain it."""
    try:
        rendered = template.format(prompt="\0")
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(
            f"data.plain_template={template!r} is not a valid format string with the single "
            f"field {{prompt}}: {err!r}"
        ) from err
    if "\0" not in rendered:
        raise UserError(f"data.plain_template={template!r} does not contain {{prompt}}")


def _collapse_double_bos(ids: list[int], bos_id: int | None) -> list[int]:
    if bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_id:
        return ids[1:]
    return ids


def encode_prompt(
    tokenizer: Any,
    messages: list[Message],
    text: str,
    settings: TemplateSettings,
    shield: Shield | None = None,
) -> list[int]:
    """Token ids of the templated prompt (with exactly one BOS when the tokenizer uses one).

    With a ``shield`` (the pair's special-token strings, see :mod:`fpo.data.special_text`)
    those strings in ``messages`` and ``text`` are encoded as plain text.
    """
    if shield is not None:
        messages = [{**m, "content": shield.protect(m["content"])} for m in messages]
        text = shield.protect(text)
    if settings.use_chat_template:
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        bos = tokenizer.bos_token
        add_special = not (bos and rendered.startswith(bos))
    else:
        rendered = settings.plain_template.format(prompt=text)
        add_special = True
    if shield is None:
        ids = tokenizer(rendered, add_special_tokens=add_special)["input_ids"]
    else:
        ids = shield.encode(tokenizer, rendered, add_special)
    return _collapse_double_bos(list(ids), tokenizer.bos_token_id)


def encode_response(
    tokenizer: Any, text: str, settings: TemplateSettings, literal: bool = False
) -> list[int]:
    """Token ids of a response: the text without special tokens, plus EOS if ``append_eos``.

    ``literal``: special-token strings in ``text`` are encoded as plain text.
    """
    if literal:
        ids = encode_literal(tokenizer, text)
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if settings.append_eos:
        ids.append(tokenizer.eos_token_id)
    return ids


def truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], limits: Truncation
) -> tuple[list[int], list[int], list[int]] | None:
    """Keep-start truncation (module docstring); ``None`` when a response would be empty."""
    prompt = prompt[: limits.max_prompt_length]
    budget = max(0, limits.max_length - len(prompt))
    chosen, rejected = chosen[:budget], rejected[:budget]
    if not chosen or not rejected:
        return None
    return prompt, chosen, rejected


@dataclass(frozen=True)
class TokenizedPair:
    """A tokenized pair; ids are stored once (prompt shared) as int32 arrays."""

    example_id: str
    prompt: str
    prompt_messages: tuple[tuple[str, str], ...]
    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray

    def to_item(self) -> dict[str, Any]:
        """The dataset item: ``{chosen,rejected}_{input_ids,labels}`` as lists of ints.

        ``input_ids = prompt_ids + response_ids``; ``labels`` equal them with the prompt part
        set to -100. Also ``example_id``, ``prompt`` (text before templating),
        ``prompt_messages`` and ``prompt_input_ids`` (for generation-based evaluation).
        """
        prompt = self.prompt_ids.tolist()
        masked = [IGNORE_INDEX] * len(prompt)
        item: dict[str, Any] = {
            "example_id": self.example_id,
            "prompt": self.prompt,
            "prompt_messages": [{"role": r, "content": c} for r, c in self.prompt_messages],
            "prompt_input_ids": prompt,
        }
        for side, ids in (("chosen", self.chosen_ids), ("rejected", self.rejected_ids)):
            response = ids.tolist()
            item[f"{side}_input_ids"] = prompt + response
            item[f"{side}_labels"] = masked + response
        return item


def tokenize_pair(
    tokenizer: Any,
    pair: PreferencePair,
    settings: TemplateSettings,
    limits: Truncation,
    shield: Shield | None = None,
) -> TokenizedPair | None:
    """Template, tokenize and truncate ``pair``; ``None`` when truncation empties a response.

    ``shield``: the pair's special-token strings (``SpecialText.shield(pair.texts)``), encoded
    as plain text; ``None`` leaves the tokenizer's behaviour (they become control tokens).
    """
    prompt_ids = encode_prompt(tokenizer, pair.messages, pair.prompt_text, settings, shield)
    literal = shield is not None
    chosen_ids = encode_response(tokenizer, pair.chosen, settings, literal)
    rejected_ids = encode_response(tokenizer, pair.rejected, settings, literal)
    kept = truncate(prompt_ids, chosen_ids, rejected_ids, limits)
    if kept is None:
        return None
    prompt_ids, chosen_ids, rejected_ids = (np.asarray(x, dtype=np.int32) for x in kept)
    return TokenizedPair(
        example_id=pair.example_id,
        prompt=pair.prompt_text,
        prompt_messages=pair.prompt_messages,
        prompt_ids=prompt_ids,
        chosen_ids=chosen_ids,
        rejected_ids=rejected_ids,
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16 hex chars over the tokenizer's vocab/merges/pipeline, special tokens, chat template.

    For fast tokenizers the backend's full JSON is hashed, minus its transient padding and
    truncation state (calls with ``padding=True`` change it); otherwise the vocab.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    specials = {
        "tokens": list(tokenizer.all_special_tokens),
        "ids": list(tokenizer.all_special_ids),
        "bos_eos_pad": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }
    return short_hash([spec, specials, getattr(tokenizer, "chat_template", None)])
