"""Judges: win rate arithmetic, the sentiment judges, a local reward model, the LLM judge.

The LLM judge talks only to a stub server started here on 127.0.0.1 (port 0).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from hydra.utils import instantiate
from transformers import LlamaConfig, LlamaForSequenceClassification

from fpo.errors import UserError
from fpo.evaluation.judges import (
    AfinnJudge,
    LLMPairwiseJudge,
    RewardModelJudge,
    VaderJudge,
    is_pairwise,
    pairwise_outcomes,
    summarize_outcomes,
    win_rate,
)
from fpo.evaluation.llm_judge import DEFAULT_TEMPLATE, parse_answer
from fpo.models.tiny import build_tiny_tokenizer


class TableJudge:
    """Pointwise judge whose score is looked up in a table."""

    name = "table"

    def __init__(self, table):
        self.table = table

    def score(self, prompts, completions):
        return [self.table[c] for c in completions]


class FixedPairwise:
    name = "fixed"

    def __init__(self, outcomes):
        self.outcomes = outcomes

    def compare(self, prompts, first, second):
        return list(self.outcomes)


# --------------------------------------------------------------------------- win rate


def test_pointwise_win_rate_counts_ties_half():
    judge = TableJudge({"w": 2.0, "l": 0.0, "t": 1.0})
    prompts = ["p"] * 4
    policy, reference = ["w", "t", "l", "t"], ["l", "t", "w", "l"]
    assert pairwise_outcomes(judge, prompts, policy, reference) == [1.0, 0.5, 0.0, 1.0]
    mean, stderr = win_rate(judge, prompts, policy, reference)
    assert mean == pytest.approx(2.5 / 4)
    values = [1.0, 0.5, 0.0, 1.0]
    std = math.sqrt(sum((v - 0.625) ** 2 for v in values) / 3)
    assert stderr == pytest.approx(std / 2)


def test_failed_items_are_kept_out_of_the_mean():
    judge = FixedPairwise([1.0, None, 0.0, 1.0, None])
    assert is_pairwise(judge) and not is_pairwise(TableJudge({}))
    summary = summarize_outcomes(pairwise_outcomes(judge, ["p"] * 5, ["a"] * 5, ["b"] * 5))
    assert summary["n"] == 3 and summary["failed"] == 2
    assert summary["mean"] == pytest.approx(2 / 3)
    mean, _ = win_rate(judge, ["p"] * 5, ["a"] * 5, ["b"] * 5)
    assert mean == pytest.approx(2 / 3)


def test_one_item_has_no_stderr_and_all_failed_is_a_user_error():
    assert summarize_outcomes([1.0])["stderr"] is None
    with pytest.raises(UserError, match="'fixed' failed on all 2 items"):
        win_rate(FixedPairwise([None, None]), ["p"] * 2, ["a"] * 2, ["b"] * 2)


# --------------------------------------------------------------------------- sentiment


def test_sentiment_judge_scores_the_completion_with_vader():
    judge = VaderJudge()
    completions = ["a wonderful, moving film", "dull and awful"]
    assert judge.score(["terrible prompt", "great prompt"], completions) == judge.score_texts(
        completions
    )
    assert judge.name == "vader-compound"


def test_afinn_judge_is_a_different_lexicon_than_vader():
    judge = AfinnJudge()
    good, bad = judge.score(["p", "p"], ["a wonderful film", "an awful film"])
    assert good > 0 > bad
    # VADER's negation rule flips "not bad" positive; AFINN has no such rule.
    assert VaderJudge().score(["p"], ["not bad"])[0] > 0
    assert judge.score(["p"], ["not bad"])[0] < 0
    per_word = AfinnJudge(per_word=True).score(["p"], ["good good good good"])[0]
    assert per_word == pytest.approx(judge.score(["p"], ["good good good good"])[0] / 4)


def test_judges_follow_the_protocols():
    from fpo.evaluation.judges import Judge, PairwiseJudge

    assert isinstance(AfinnJudge(), Judge) and isinstance(VaderJudge(), Judge)
    llm_judge = LLMPairwiseJudge("http://127.0.0.1:1/v1", "m")
    assert isinstance(llm_judge, PairwiseJudge) and is_pairwise(llm_judge)
    # A pointwise judge's win rate: "great" beats "awful", a tie counts half.
    assert win_rate(AfinnJudge(), ["p", "p"], ["great", "fine"], ["awful", "fine"])[0] == 0.75


def test_judges_instantiate_from_hydra_target():
    judge = instantiate({"_target_": "fpo.evaluation.judges.AfinnJudge", "per_word": True})
    assert isinstance(judge, AfinnJudge) and judge.per_word
    vader = instantiate({"_target_": "fpo.evaluation.judges.VaderJudge"})
    assert vader.score(["p"], ["great"])[0] > 0


# --------------------------------------------------------------------------- reward model


def save_reward_model(folder, num_labels=1, chat_template=False, id2label=None):
    tokenizer = build_tiny_tokenizer(chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        **({"id2label": id2label} if id2label else {}),
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TEXTS = (["Tell me", "Say", "Hi"], [" a very long happy story indeed", " no", " there, friend"])


def test_reward_model_scores_do_not_depend_on_padding(tmp_path):
    folder = save_reward_model(tmp_path / "rm")
    one = RewardModelJudge(folder, batch_size=1).score(*TEXTS)
    batched = RewardModelJudge(folder, batch_size=3).score(*TEXTS)
    assert batched == pytest.approx(one, abs=1e-5)
    judge = RewardModelJudge(folder)
    ids = judge.tokenizer("Say no", return_tensors="pt")
    assert one[1] == pytest.approx(judge.model(**ids).logits[0, 0].item(), abs=1e-5)


def test_reward_model_truncation_keeps_the_completion(tmp_path):
    judge = RewardModelJudge(save_reward_model(tmp_path / "rm"), max_length=16)
    prompt = "A long shared prompt that is much longer than sixteen tokens. "
    first, second = judge.score([prompt, prompt], ["wonderful", "dreadful"])
    assert first != pytest.approx(second, abs=1e-6)


def test_reward_model_two_labels_give_positive_probability(tmp_path):
    folder = save_reward_model(
        tmp_path / "clf", num_labels=2, id2label={0: "POSITIVE", 1: "NEGATIVE"}
    )
    judge = RewardModelJudge(folder)
    scores = judge.score(*TEXTS)
    ids = judge.tokenizer("Hi there, friend", return_tensors="pt")
    expected = judge.model(**ids).logits.softmax(-1)[0, 0].item()  # label 0 is POSITIVE
    assert scores[2] == pytest.approx(expected, abs=1e-5)
    assert all(0.0 < s < 1.0 for s in scores)
    assert judge.positive_threshold == 0.5  # a probability; a one-label head's logit: 0


def test_reward_model_uses_the_chat_template_without_a_second_bos(tmp_path):
    judge = RewardModelJudge(save_reward_model(tmp_path / "chat", chat_template=True))
    text = judge._text("Say", " no")
    assert text.startswith("<bos><start_of_turn>user\nSay") and " no<end_of_turn>" in text
    ids = judge.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    assert judge.score(["Say"], [" no"])[0] == pytest.approx(
        judge.model(**ids).logits[0, 0].item(), abs=1e-5
    )


def test_reward_model_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match=r"no config\.json"):
        RewardModelJudge(tmp_path / "missing")
    with pytest.raises(UserError, match="3 labels"):
        RewardModelJudge(save_reward_model(tmp_path / "three", num_labels=3))


# --------------------------------------------------------------------------- LLM judge

TEMPLATE = "{prompt}|||{a}|||{b}"


class StubJudgeServer:
    """An OpenAI-style chat endpoint: prefers the response containing GOOD.

    A prompt containing SLEEP makes it sleep ``sleep_s`` first, GARBAGE makes it ramble,
    FLAKY fails once with 503, and a request without the expected key gets 401.
    """

    def __init__(self, sleep_s=1.0, key=None):
        self.requests, self.flaky_seen, self.sleep_s, self.key = [], set(), sleep_s, key
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                if stub.key and self.headers.get("Authorization") != f"Bearer {stub.key}":
                    return self.reply(401, {"error": "bad key"})
                prompt, a, b = body["messages"][0]["content"].split("|||")
                if "FLAKY" in prompt and prompt not in stub.flaky_seen:
                    stub.flaky_seen.add(prompt)
                    return self.reply(503, {"error": "busy"})
                if "SLEEP" in prompt:
                    time.sleep(stub.sleep_s)
                answer = "A" if "GOOD" in a else "B" if "GOOD" in b else "tie"
                if "GARBAGE" in prompt:
                    answer = "Both responses have merit."
                self.reply(200, {"choices": [{"message": {"content": f" {answer}\n"}}]})

            def reply(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (timeout test)
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    server = StubJudgeServer()
    yield server
    server.close()


def llm(url, **kwargs):
    options = {"template": TEMPLATE, "timeout_s": 5.0, "max_retries": 0, "retry_wait_s": 0}
    return LLMPairwiseJudge(url, "stub-model", **{**options, **kwargs})


def test_llm_judge_undoes_the_order_randomisation(stub):
    judge = llm(stub.url, seed=3)
    n = 12
    first = ["GOOD" if i % 3 == 0 else "meh" for i in range(n)]
    second = ["GOOD" if i % 3 == 1 else "meh" for i in range(n)]
    results = judge.compare([f"p{i}" for i in range(n)], first, second)
    assert results == [{0: 1.0, 1: 0.0, 2: 0.5}[i % 3] for i in range(n)]
    # Both orders were shown, as the seed says, and the request is a chat completion.
    swaps = [judge.swapped(i) for i in range(n)]
    assert 0 < sum(swaps) < n
    shown_first = {b["messages"][0]["content"].split("|||")[0]: b for _, _, b in stub.requests}
    for i in range(n):
        a = shown_first[f"p{i}"]["messages"][0]["content"].split("|||")[1]
        assert a == (second[i] if swaps[i] else first[i])
    path, _, body = stub.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "stub-model"
    assert judge.failures == []


def test_llm_judge_keeps_other_results_after_a_malformed_answer_and_a_timeout():
    server = StubJudgeServer(sleep_s=1.5)
    try:
        judge = llm(server.url, timeout_s=0.4)
        prompts = ["p0", "GARBAGE p1", "p2", "SLEEP p3"]
        results = judge.compare(prompts, ["GOOD", "GOOD", "x", "GOOD"], ["x", "x", "GOOD", "x"])
    finally:
        server.close()
    assert results == [1.0, None, 0.0, None]
    assert len(judge.failures) == 2
    assert "item 1" in judge.failures[0] and "malformed answer" in judge.failures[0]
    assert "item 3" in judge.failures[1] and "timeout_s=0.4" in judge.failures[1]
    assert all(server.url in message for message in judge.failures)
    summary = summarize_outcomes(results)
    assert (summary["mean"], summary["n"], summary["failed"]) == (0.5, 2, 2)


def test_llm_judge_raise_mode_names_item_and_endpoint(stub):
    judge = llm(stub.url, on_error="raise")
    with pytest.raises(UserError, match=r"127\.0\.0\.1.*item 1: malformed answer"):
        judge.compare(["p0", "GARBAGE"], ["GOOD", "GOOD"], ["x", "x"])


def test_llm_judge_retries_server_errors(stub):
    assert llm(stub.url, max_retries=1).compare(["FLAKY"], ["GOOD"], ["x"]) == [1.0]
    failed = llm(stub.url, max_retries=0)
    assert failed.compare(["FLAKY again"], ["GOOD"], ["x"]) == [None]
    assert "HTTP 503" in failed.failures[0]


def test_llm_judge_key_from_environment(monkeypatch):
    server = StubJudgeServer(key="s3cret")
    try:
        with pytest.raises(UserError, match="FPO_TEST_KEY"):
            llm(server.url, api_key_env="FPO_TEST_KEY")
        monkeypatch.setenv("FPO_TEST_KEY", "wrong")
        with pytest.raises(UserError, match="HTTP 401"):
            llm(server.url, api_key_env="FPO_TEST_KEY").compare(["p"], ["GOOD"], ["x"])
        monkeypatch.setenv("FPO_TEST_KEY", "s3cret")
        judge = llm(server.url, api_key_env="FPO_TEST_KEY")
        assert judge.compare(["p"], ["x"], ["GOOD"]) == [0.0]
    finally:
        server.close()


def test_parse_answer_and_default_template():
    assert [parse_answer(t) for t in ["A", " b.", "**Tie**", "Response A", "'B'"]] == [
        "a",
        "b",
        "tie",
        "a",
        "b",
    ]
    assert parse_answer("A is better than B") is None and parse_answer("") is None
    text = DEFAULT_TEMPLATE.format(prompt="PROMPT", a="FIRST", b="SECOND")
    assert text.index("PROMPT") < text.index("FIRST") < text.index("SECOND")
    with pytest.raises(UserError, match=r"\{b\}"):
        LLMPairwiseJudge("http://127.0.0.1:1/v1", "m", template="{prompt} {a}")


# --------------------------------------------------------------------------- instruct LM judge


def test_instruct_lm_judge_reads_answer_probabilities_off_the_next_token(
    tiny_model, tiny_tokenizer
):
    """P(first answer) from one unpadded forward equals the batched, left-padded one; the
    score is P(positive) * P(film review)."""
    from fpo.evaluation.instruct_judge import (
        SENTIMENT_ANSWERS,
        SENTIMENT_QUESTION,
        TOPIC_ANSWERS,
        TOPIC_QUESTION,
        InstructLMJudge,
    )

    judge = InstructLMJudge(model=tiny_model, tokenizer=tiny_tokenizer, batch_size=2)
    texts = ["short", "a much longer text that needs no padding at all"]

    def by_hand(question, answers, text):
        ids = torch.tensor([judge._prompt_ids(question, text)])
        with torch.no_grad():
            log_probs = tiny_model(input_ids=ids).logits[0, -1].log_softmax(-1)
        first, second = (
            log_probs[judge._first_ids(spellings)].logsumexp(-1) for spellings in answers
        )
        return torch.sigmoid(first - second).item()

    sentiment = judge.answer_probability(SENTIMENT_QUESTION, SENTIMENT_ANSWERS, texts)
    topic = judge.answer_probability(TOPIC_QUESTION, TOPIC_ANSWERS, texts)
    for text, s, t in zip(texts, sentiment, topic, strict=True):
        assert s == pytest.approx(by_hand(SENTIMENT_QUESTION, SENTIMENT_ANSWERS, text), abs=1e-5)
        assert t == pytest.approx(by_hand(TOPIC_QUESTION, TOPIC_ANSWERS, text), abs=1e-5)
    products = [s * t for s, t in zip(sentiment, topic, strict=True)]
    assert judge.score(["", ""], texts) == pytest.approx(products)
    alone = InstructLMJudge(model=tiny_model, tokenizer=tiny_tokenizer, ask_topic=False)
    assert alone.score_texts(texts) == pytest.approx(sentiment, abs=1e-6)
    assert judge.positive_threshold == 0.5 and is_pairwise(judge) is False


def test_instruct_lm_judge_names_a_missing_package():
    from fpo.evaluation.instruct_judge import InstructLMJudge

    with pytest.raises(UserError, match="'no_such_gguf_package' is not installed"):
        InstructLMJudge(package="no_such_gguf_package")
