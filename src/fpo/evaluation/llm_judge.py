"""A pairwise judge over an OpenAI-compatible ``/v1/chat/completions`` endpoint.

The judge model sees the prompt and two completions labelled A and B and answers "A", "B"
or "tie". Which completion is shown as A is drawn per item from ``seed`` (a fair coin), so
a judge that prefers a position contributes ties on average instead of a bias; the answer
is mapped back to ``P(first better)`` in {0, 0.5, 1}.

Failures: a timeout or a server error (5xx, 429) is retried ``max_retries`` times. An item
that still fails, or whose answer is not "A"/"B"/"tie", is recorded as ``None`` and named in
``failures`` (``on_error="skip"``, the default), or raises a `UserError` naming the item and
the endpoint (``on_error="raise"``). Any other 4xx answer (a wrong key or model name) is a
`UserError` at once: every item would fail the same way.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from fpo.errors import UserError

log = logging.getLogger("fpo.evaluation")

DEFAULT_TEMPLATE = (
    "You compare two responses to the same prompt and say which one is better.\n\n"
    "Prompt:\n{prompt}\n\n"
    "Response A:\n{a}\n\n"
    "Response B:\n{b}\n\n"
    "Which response is better? Answer with exactly one word: A, B or tie."
)

_ANSWER = re.compile(r"^\W*(?:response\s+)?(a|b|tie)\W*$", re.IGNORECASE)


class _ItemFailure(Exception):
    """One item could not be judged (after retries); the message says why."""


def parse_answer(text: str) -> str | None:
    """``"a"``, ``"b"`` or ``"tie"`` from a judge's reply, ``None`` if it is anything else.

    Whitespace, quotes, markdown emphasis and a trailing full stop are allowed around the
    answer, and "Response A" reads as "A"; a sentence around it is not (it is ambiguous).
    """
    match = _ANSWER.match(text.strip())
    return match.group(1).lower() if match else None


class LLMPairwiseJudge:
    """Pairwise judge: ``compare(prompts, first, second) -> [P(first better) or None]``.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions``
            is appended unless already there).
        model: the ``model`` field of each request.
        api_key_env: name of the environment variable holding the bearer token; ``None``
            sends no ``Authorization`` header (local servers).
        timeout_s: seconds to wait for one answer.
        max_retries: further tries after a timeout or server error.
        template: the user message, with ``{prompt}``, ``{a}`` and ``{b}``.
        seed: draws which completion is shown first, per item index.
        on_error: ``"skip"`` (record ``None``, keep the rest) or ``"raise"``.
        max_workers: requests in flight at once.
        retry_wait_s: seconds before the first retry (doubles after each).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        template: str = DEFAULT_TEMPLATE,
        seed: int = 0,
        on_error: str = "skip",
        max_workers: int = 4,
        retry_wait_s: float = 1.0,
        max_tokens: int = 8,
        name: str | None = None,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise UserError(f"LLMPairwiseJudge: on_error={on_error!r}; use 'skip' or 'raise'.")
        missing = [key for key in ("{prompt}", "{a}", "{b}") if key not in template]
        if missing:
            raise UserError(f"LLMPairwiseJudge: the template lacks {', '.join(missing)}.")
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise UserError(
                    f"LLMPairwiseJudge: the environment variable {api_key_env} (api_key_env) "
                    "is not set; set it or use api_key_env=null for a server without keys."
                )
        url = base_url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.template, self.seed = model, template, seed
        self.timeout_s, self.max_retries, self.retry_wait_s = timeout_s, max_retries, retry_wait_s
        self.on_error, self.max_workers, self.max_tokens = on_error, max_workers, max_tokens
        self.name = name or f"llm:{model}"
        self.failures: list[str] = []

    def swapped(self, index: int) -> bool:
        """Whether item ``index`` shows the *second* completion as response A."""
        return random.Random(self.seed * 1_000_003 + index).random() < 0.5

    def _request(self, content: str) -> str:
        """The reply text for one user message; raises `_ItemFailure` after retries."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        reason = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_wait_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                if error.code < 500 and error.code != 429:
                    raise UserError(
                        f"LLM judge endpoint {self.url} answered HTTP {error.code} "
                        f"({error.reason}): check base_url, model={self.model!r} and the key."
                    ) from error
                reason = f"HTTP {error.code} ({error.reason})"
                continue
            except TimeoutError:
                reason = f"no answer within timeout_s={self.timeout_s}"
                continue
            except urllib.error.URLError as error:
                timed_out = isinstance(error.reason, TimeoutError)
                reason = (
                    f"no answer within timeout_s={self.timeout_s}"
                    if timed_out
                    else f"cannot connect ({error.reason})"
                )
                continue
            except (OSError, http.client.HTTPException) as error:
                reason = f"connection failed ({error!r})"
                continue
            except ValueError as error:  # not UTF-8 or not JSON
                raise _ItemFailure(f"the reply is not JSON ({error})") from error
            try:
                return str(payload["choices"][0]["message"]["content"])
            except (KeyError, IndexError, TypeError) as error:
                raise _ItemFailure(
                    f"the reply has no choices[0].message.content: {str(payload)[:200]}"
                ) from error
        tries = self.max_retries + 1
        raise _ItemFailure(f"{reason} ({tries} {'try' if tries == 1 else 'tries'})")

    def _judge_item(
        self, index: int, prompt: str, first: str, second: str
    ) -> tuple[float | None, str | None]:
        """``(P(first better), None)``, or ``(None, why)`` for a failed item."""
        swap = self.swapped(index)
        a, b = (second, first) if swap else (first, second)
        content = self.template.format(prompt=prompt, a=a, b=b)
        try:
            reply = self._request(content)
            answer = parse_answer(reply)
            if answer is None:
                raise _ItemFailure(f"malformed answer {reply[:200]!r} (expected A, B or tie)")
        except _ItemFailure as failure:
            message = f"LLM judge {self.url}: item {index}: {failure}"
            if self.on_error == "raise":
                raise UserError(message + " (on_error='raise').") from None
            log.warning("%s; item left out", message)
            return None, message
        if answer == "tie":
            return 0.5, None
        first_won = (answer == "a") != swap
        return (1.0 if first_won else 0.0), None

    def compare(
        self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]
    ) -> list[float | None]:
        """P(first better) per item in {0, 0.5, 1}; ``None`` for an item that failed.

        ``self.failures`` lists this call's failed items, one message each.
        """
        if not len(prompts) == len(first) == len(second):
            raise ValueError(f"{len(prompts)} prompts, {len(first)} and {len(second)} answers")
        items = list(zip(range(len(prompts)), prompts, first, second, strict=True))
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            judged = list(pool.map(lambda item: self._judge_item(*item), items))
        self.failures = [message for _, message in judged if message is not None]
        return [value for value, _ in judged]
