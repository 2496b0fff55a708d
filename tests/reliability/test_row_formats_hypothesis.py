"""Property-based tests over the row schemas of ``fpo.data.formats`` (hypothesis).

Whatever a row holds, ``parse_row`` returns a valid pair or raises ``BadRow`` (never another
exception); the data module turns a bad row into a ``UserError`` naming file and row
(``on_bad_row=fail``) or skips and counts it (``skip``); every pair it keeps fits
``max_length`` with a non-empty response.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpo.data import PreferenceDataModule
from fpo.data.formats import BadRow, PreferencePair, parse_row
from fpo.errors import UserError
from fpo.models.tiny import build_tiny_tokenizer

FAST = settings(max_examples=150, deadline=None)
# any text: lone surrogates (what a JSON "\ud800" escape decodes to) included
TEXT = st.text(st.characters(codec=None, categories=None), max_size=40)
NONEMPTY = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
ROLES = st.sampled_from(["user", "assistant", "system"])


def message(role=ROLES, content=TEXT):
    return st.fixed_dictionaries({"role": role, "content": content})


def plain_rows():
    """Rows near the plain schema: each key missing, of any JSON type, or any string."""
    value = st.one_of(TEXT, JSON, st.binary(max_size=8))
    return st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "extra"]), value)


def ultrafeedback_rows():
    """Rows near the UltraFeedback schema: message lists with any shape and content."""
    turns = st.lists(message(), max_size=4)
    anything = st.one_of(turns, JSON, st.lists(JSON, max_size=2))
    return st.dictionaries(st.sampled_from(["chosen", "rejected", "prompt", "messages"]), anything)


def assert_valid(pair: PreferencePair) -> None:
    for text in (pair.chosen, pair.rejected, *(c for _, c in pair.prompt_messages)):
        assert isinstance(text, str)
        text.encode("utf-8")  # hashable and tokenizable
    assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
    assert len(pair.example_id) == 16


@FAST
@given(row=plain_rows())
def test_any_plain_row_parses_or_is_a_bad_row(row):
    try:
        pair = parse_row(row, "plain")
    except BadRow as err:
        assert err.problem
        return
    assert_valid(pair)


@FAST
@given(row=ultrafeedback_rows())
def test_any_ultrafeedback_row_parses_or_is_a_bad_row(row):
    try:
        pair = parse_row(row, "ultrafeedback")
    except BadRow as err:
        assert err.problem
        return
    assert_valid(pair)


@FAST
@given(
    prompt=NONEMPTY,
    chosen=NONEMPTY,
    rejected=NONEMPTY,
    drop=st.sampled_from(["prompt", "chosen", "rejected"]),
)
def test_plain_missing_key_empty_and_identical_responses(prompt, chosen, rejected, drop):
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    with pytest.raises(BadRow, match=f"missing or null key '{drop}'"):
        parse_row({k: v for k, v in row.items() if k != drop}, "plain")
    with pytest.raises(BadRow, match="'chosen' response is empty"):
        parse_row({**row, "chosen": " \n"}, "plain")
    with pytest.raises(BadRow, match="chosen == rejected"):
        parse_row({**row, "rejected": chosen}, "plain")
    with pytest.raises(BadRow, match="expected a string"):
        parse_row({**row, drop: [prompt]}, "plain")
    with pytest.raises(BadRow, match="not valid UTF-8"):
        parse_row({**row, drop: prompt + "\udcff"}, "plain")  # surrogateescape'd byte 0xff
    if chosen != rejected:
        assert_valid(parse_row(row, "plain"))


@FAST
@given(
    first=st.lists(message(content=NONEMPTY), min_size=1, max_size=3),
    other=st.lists(message(content=NONEMPTY), min_size=1, max_size=3),
    chosen=NONEMPTY,
    rejected=NONEMPTY,
)
def test_ultrafeedback_prompts_must_be_shared(first, other, chosen, rejected):
    answer = [{"role": "assistant", "content": chosen}]
    worse = [{"role": "assistant", "content": rejected}]
    row = {"chosen": first + answer, "rejected": first + worse}
    if chosen == rejected:
        with pytest.raises(BadRow, match="chosen == rejected"):
            parse_row(row, "ultrafeedback")
        return
    pair = parse_row(row, "ultrafeedback")
    assert pair.prompt_messages == tuple((m["role"], m["content"]) for m in first)
    if other[0] != first[0]:  # no common prefix
        with pytest.raises(BadRow, match="share no prompt messages"):
            parse_row({"chosen": first + answer, "rejected": other + worse}, "ultrafeedback")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.one_of(
            plain_rows(),
            st.fixed_dictionaries({"prompt": NONEMPTY, "chosen": NONEMPTY, "rejected": NONEMPTY}),
            st.fixed_dictionaries(
                {
                    "prompt": st.text(min_size=500, max_size=3000),
                    "chosen": NONEMPTY,
                    "rejected": NONEMPTY,
                }
            ),
        ),
        min_size=1,
        max_size=6,
    ),
    policy=st.sampled_from(["skip", "fail"]),
)
def test_data_module_skips_counts_or_refuses_and_kept_pairs_fit(tmp_path_factory, rows, policy):
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        for row in rows:
            f.write(json.dumps(row, default=lambda b: b.hex()) + "\n")
    bad = 0
    for row in rows:
        try:
            parse_row(json.loads(json.dumps(row, default=lambda b: b.hex())), "plain")
        except BadRow:
            bad += 1
    tokenizer = build_tiny_tokenizer(chat_template=False)
    try:
        dm = PreferenceDataModule(
            str(path),
            tokenizer=tokenizer,
            format="plain",
            on_bad_row=policy,
            max_length=64,
            max_prompt_length=32,
        )
        dm.setup("fit")
    except UserError as err:
        message = str(err)
        assert str(path) in message or "data.train_source" in message
        assert (
            (policy == "fail" and bad)
            or "no usable preference pairs" in message
            or "could not read" in message
        )
        return
    stats = dm.stats["train"]
    assert stats["bad_rows"] == bad
    assert policy == "skip" or bad == 0
    assert (
        stats["kept"] + stats["bad_rows"] + stats["dropped_empty_after_truncation"] == stats["rows"]
    )
    for item in (dm.train_dataset[i] for i in range(len(dm.train_dataset))):
        for side in ("chosen", "rejected"):
            assert len(item[f"{side}_input_ids"]) <= 64
            assert any(label != -100 for label in item[f"{side}_labels"])


GOOD_LINE = b'{"prompt": "p", "chosen": "x", "rejected": "y"}\n'


def test_an_undecodable_line_is_a_bad_row_with_its_line_number(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer(chat_template=False)
    path = tmp_path / "one_bad_line.jsonl"
    lines = [
        GOOD_LINE,
        b'{"prompt": "a\xff\xfe", "chosen": "x", "rejected": "y"}\n',  # not UTF-8
        b"\n",  # blank: not a row
        b'{"prompt": "p", "chosen": "x", \n',  # not JSON
        GOOD_LINE,
    ]
    path.write_bytes(b"".join(lines))
    with caplog.at_level("WARNING", logger="fpo.data"):
        dm = PreferenceDataModule(str(path), tokenizer=tokenizer)
        dm.setup("fit")
    assert dm.stats["train"]["rows"] == 4
    assert dm.stats["train"]["bad_rows"] == 2 and dm.stats["train"]["kept"] == 2
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{path} row 1 (line 2, example_id unknown): not valid UTF-8 (byte 13 of" in warnings
    assert f"{path} row 2 (line 4, example_id unknown): not valid JSON (" in warnings
    with pytest.raises(UserError, match=r"row 1 \(line 2.*data\.on_bad_row=fail"):
        PreferenceDataModule(str(path), tokenizer=tokenizer, on_bad_row="fail").setup("fit")


def test_a_file_of_mostly_undecodable_lines_and_an_empty_file_are_refused(tmp_path):
    tokenizer = build_tiny_tokenizer(chat_template=False)
    mostly = tmp_path / "mostly_broken.jsonl"
    mostly.write_bytes(GOOD_LINE + b"\xff\xfe not text\n" + b"[1, 2\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"prompt": "a\xff\xfe", "chosen": "x", "rejected": "y"}\n')
    cases = (
        (mostly, "2 of 3 lines are not valid UTF-8 JSON, so this is not a JSON Lines file"),
        (mostly, "(first: " + str(mostly) + " row 1 (line 2, example_id unknown): not valid UTF-8"),
        (broken, "1 of 1 lines are not valid UTF-8 JSON"),
        (empty, "has no rows"),
    )
    for path, expected in cases:
        with pytest.raises(UserError) as err:
            PreferenceDataModule(str(path), tokenizer=tokenizer).setup("fit")
        assert str(path) in str(err.value) and expected in str(err.value)


SPECIALS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]
# text mixing special-token strings, their fragments and any characters
MIXED = st.lists(
    st.sampled_from([*SPECIALS, "<", "eos>", "<end_of"]) | st.text(max_size=5), max_size=6
).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=MIXED, chosen=MIXED, rejected=MIXED, chat=st.booleans())
def test_any_text_is_kept_as_written(prompt, chosen, rejected, chat):
    """Literal ids decode back to the row's text, and the only control tokens are the
    template's own (BOS, turn markers) and the appended EOS."""
    chosen, rejected = chosen + "a", rejected + "b"  # non-empty and different
    tokenizer = build_tiny_tokenizer(chat_template=chat)
    row = {"prompt": prompt or "p", "chosen": chosen, "rejected": rejected}
    dm = PreferenceDataModule([row], tokenizer=tokenizer, max_length=4096, max_prompt_length=4096)
    dm.setup()
    item = dm.train_dataset[0]
    prompt_ids = item["prompt_input_ids"]
    answer = item["chosen_input_ids"][len(prompt_ids) :]
    assert tokenizer.decode(answer[:-1]) == chosen and answer[-1] == tokenizer.eos_token_id
    rendered = (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        if chat
        else "<bos>" + row["prompt"]
    )
    assert tokenizer.decode(prompt_ids) == rendered
    controls = [i for i in prompt_ids + answer[:-1] if i < len(SPECIALS)]
    # the template's: <bos> <start_of_turn> <end_of_turn> <start_of_turn>, or <bos>
    assert controls == ([1, 3, 4, 3] if chat else [1])
