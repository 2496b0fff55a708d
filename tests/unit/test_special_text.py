"""Special-token strings written in row text stay text (``data.special_token_text=literal``).

Tiny tokenizer: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<start_of_turn>`` 3, ``<end_of_turn>`` 4;
a printable ASCII character other than space has id ``ord(c) - 28``.
"""

from __future__ import annotations

import logging

import pytest

from fpo.data import PreferenceDataModule
from fpo.data.special_text import SpecialText, encode_literal
from fpo.errors import UserError
from fpo.models.tiny import build_tiny_tokenizer

BOS, EOS, START, END = 1, 2, 3, 4
CONTROL = {0, BOS, EOS, START, END}


def asc(text: str) -> list[int]:
    assert all(33 <= ord(c) <= 126 for c in text)
    return [ord(c) - 28 for c in text]


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def first_item(rows, tok=None, **kwargs) -> tuple[dict, PreferenceDataModule]:
    dm = PreferenceDataModule(rows, tokenizer=tok or build_tiny_tokenizer(), **kwargs)
    dm.setup()
    return dm.train_dataset[0], dm


def test_response_special_strings_are_text_and_counted(caplog):
    rows = [
        {"prompt": "Hi", "chosen": "Ok<eos>", "rejected": "No"},
        {"prompt": "A", "chosen": "B", "rejected": "C"},
    ]
    tok = build_tiny_tokenizer(chat_template=False)
    with caplog.at_level(logging.WARNING, logger="fpo.data"):
        item, dm = first_item(rows, tok)
    assert item["chosen_input_ids"] == [BOS, *asc("HiOk<eos>"), EOS]
    assert dm.stats["train"]["special_token_text"] == 1
    assert any("1 row(s) hold special-token strings" in r.getMessage() for r in caplog.records)

    control, dm = first_item(rows, tok, special_token_text="control")
    assert control["chosen_input_ids"] == [BOS, *asc("HiOk"), EOS, EOS]  # the old behaviour
    assert dm.stats["train"]["special_token_text"] == 1


def test_chat_template_markers_stay_control_tokens_and_content_markers_become_text():
    tok = build_tiny_tokenizer()
    rows = [{"prompt": "Hi<end_of_turn><start_of_turn>model", "chosen": "Yes", "rejected": "No"}]
    item, _ = first_item(rows, tok)
    content = [*asc("Hi<end_of_turn><start_of_turn>model")]
    prompt = [BOS, START, *enc(tok, "user\n"), *content, END, *enc(tok, "\n"), START]
    prompt += enc(tok, "model\n")
    assert item["prompt_input_ids"] == prompt
    assert item["chosen_input_ids"] == [*prompt, *asc("Yes"), EOS]
    assert item["prompt"] == rows[0]["prompt"]  # the text itself is kept as written

    control, _ = first_item(rows, tok, special_token_text="control")
    assert control["prompt_input_ids"].count(END) == 2  # the content's marker became one


def test_a_bos_string_at_the_start_of_a_plain_prompt_is_not_merged_with_bos():
    rows = [{"prompt": "<bos>Hi", "chosen": "Yes", "rejected": "No"}]
    tok = build_tiny_tokenizer(chat_template=False)
    item, _ = first_item(rows, tok, plain_template="Q:{prompt}")
    assert item["prompt_input_ids"] == [BOS, *asc("Q:<bos>Hi")]
    item, _ = first_item(rows, tok)
    assert item["prompt_input_ids"] == [BOS, *asc("<bos>Hi")]
    control, _ = first_item(rows, tok, special_token_text="control")
    assert control["prompt_input_ids"] == [BOS, *asc("Hi")]  # was silently collapsed


def special_ids(item: dict) -> list[int]:
    return [i for i in item["chosen_input_ids"] + item["rejected_input_ids"] if i in CONTROL]


UF_SPECIAL = {
    "chosen": [
        {"role": "user", "content": "Say <eos>"},
        {"role": "assistant", "content": "<eos><bos>"},
    ],
    "rejected": [{"role": "user", "content": "Say <eos>"}, {"role": "assistant", "content": "no"}],
}
HH_SPECIAL = {
    "chosen": "\n\nHuman: Say <end_of_turn>\n\nAssistant: <end_of_turn>",
    "rejected": "\n\nHuman: Say <end_of_turn>\n\nAssistant: no",
}
PLAIN_SPECIAL = {"prompt": "Say <pad>", "chosen": "<pad><start_of_turn>", "rejected": "no"}


@pytest.mark.parametrize("row", [UF_SPECIAL, HH_SPECIAL, PLAIN_SPECIAL])
@pytest.mark.parametrize("chat", [True, False])
def test_every_schema_keeps_special_strings_as_text(row, chat):
    """Literal ids carry only the template's control tokens: those of the same row with the
    special strings written as ``X``."""
    tok = build_tiny_tokenizer(chat_template=chat)
    item, dm = first_item([row], tok)
    assert dm.stats["train"]["special_token_text"] == 1
    plain_row = {
        key: value.replace("<", "X") if isinstance(value, str) else [
            {**m, "content": m["content"].replace("<", "X")} for m in value
        ]
        for key, value in row.items()
    }  # fmt: skip
    reference, dm = first_item([plain_row], tok)
    assert dm.stats["train"]["special_token_text"] == 0
    assert special_ids(item) == special_ids(reference)
    assert [len(item[k]) for k in item if k.endswith("_ids")] == [
        len(reference[k]) for k in reference if k.endswith("_ids")
    ]
    control, _ = first_item([row], tok, special_token_text="control")
    assert special_ids(control) != special_ids(reference)


def test_matching_is_leftmost_longest_and_shields_avoid_the_texts_characters():
    finder = SpecialText(["<a>", "<a><b>", "<b>"])
    assert finder.occurrences("x<a><b><b>y<a>") == [(1, "<a><b>"), (7, "<b>"), (11, "<a>")]
    assert finder.shield(["plain"]) is None
    taken = chr(0xF0000)
    shield = finder.shield([f"{taken}<b>"])
    assert shield.strings["<b>"] != taken
    assert SpecialText([]).occurrences("<a>") == []


def test_a_tokenizer_that_cannot_split_special_tokens_is_refused():
    class Ignores:
        all_special_ids = (2,)
        unk_token_id = None

        def __call__(self, text, add_special_tokens, split_special_tokens):
            return {"input_ids": [2]}

    with pytest.raises(UserError, match=r"data\.special_token_text=control"):
        encode_literal(Ignores(), "<eos>")


def test_policy_is_checked_and_part_of_the_template_fingerprint():
    rows = [{"prompt": "Hi", "chosen": "Yes", "rejected": "No"}]
    with pytest.raises(UserError, match=r"data\.special_token_text"):
        PreferenceDataModule(rows, special_token_text="drop")
    literal = first_item(rows)[1].fingerprint_components()
    control = first_item(rows, special_token_text="control")[1].fingerprint_components()
    assert [k for k in literal if literal[k] != control[k]] == ["template"]
