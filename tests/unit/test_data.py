"""fpo.data: formats, tokenization, truncation, bad rows, sources, collation, fingerprints.

The tiny tokenizer is byte-level: a printable ASCII character other than space has id
``ord(c) - 28`` (5 special tokens, then the sorted ByteLevel alphabet starting at "!"),
BOS is 1 and EOS is 2, so many expectations below are written out by hand.
"""

from __future__ import annotations

import json
import logging
import os

import datasets
import pytest
import torch

from fpo.data import PreferenceCollator, PreferenceDataModule
from fpo.errors import UserError
from fpo.models.tiny import TINY_CHAT_TEMPLATE, build_tiny_tokenizer

BOS, EOS, PAD = 1, 2, 0
M = -100  # masked label


def asc(text: str) -> list[int]:
    """Hand-computed ids of printable ASCII text without spaces."""
    assert all(33 <= ord(c) <= 126 for c in text)
    return [ord(c) - 28 for c in text]


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def make_dm(source, tok, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(train_source=source, tokenizer=tok, **kwargs)
    dm.setup("fit")
    return dm


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def uf_path(fixtures_dir) -> str:
    return os.path.join(fixtures_dir, "ultrafeedback_binarized.jsonl")


@pytest.fixture
def plain_path(fixtures_dir) -> str:
    return os.path.join(fixtures_dir, "plain_pairs.jsonl")


# ----------------------------------------------------------------------------- templates


def test_plain_template_exact_ids_and_batch(tiny_tokenizer):
    rows = [
        {"prompt": "Hi", "chosen": "Yes", "rejected": "No"},
        {"prompt": "Ok?", "chosen": "Y", "rejected": "Nope"},
    ]
    dm = make_dm(rows, tiny_tokenizer, chat_template="false", plain_template="Q:{prompt}=>")
    item = dm.train_dataset[0]
    prompt = [BOS, *asc("Q:Hi=>")]
    assert prompt == [1, 53, 30, 44, 77, 33, 34]
    assert item["chosen_input_ids"] == [*prompt, 61, 73, 87, EOS]
    assert item["chosen_labels"] == [M] * 7 + [61, 73, 87, EOS]
    assert item["rejected_input_ids"] == [*prompt, *asc("No"), EOS]
    assert item["rejected_labels"] == [M] * 7 + [*asc("No"), EOS]
    assert item["prompt"] == "Hi"

    batch = dm.collator([dm.train_dataset[0], dm.train_dataset[1]])
    p1 = [BOS, *asc("Q:Ok?=>")]
    rows_ids = [
        [*prompt, *asc("Yes"), EOS],
        [*p1, *asc("Y"), EOS],
        [*prompt, *asc("No"), EOS],
        [*p1, *asc("Nope"), EOS],
    ]
    width = max(len(r) for r in rows_ids)
    assert width == 13
    expected_ids = [r + [PAD] * (width - len(r)) for r in rows_ids]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["attention_mask"].tolist() == [
        [1] * len(r) + [0] * (width - len(r)) for r in rows_ids
    ]
    prompt_lens = [7, 8, 7, 8]
    assert batch["labels"].tolist() == [
        [M] * n + r[n:] + [M] * (width - len(r)) for n, r in zip(prompt_lens, rows_ids, strict=True)
    ]
    assert batch["example_id"] == [dm.train_dataset[i]["example_id"] for i in range(2)]


def test_chat_template_exact_ids_single_bos(tiny_tokenizer):
    dm = make_dm([{"prompt": "Hi", "chosen": "Yes", "rejected": "No"}], tiny_tokenizer)
    item = dm.train_dataset[0]
    rendered_tail = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    prompt = [BOS, *enc(tiny_tokenizer, rendered_tail)]
    assert prompt[:2] == [BOS, 3]  # <bos> <start_of_turn>: one BOS only
    assert item["chosen_input_ids"] == [*prompt, *asc("Yes"), EOS]
    assert item["chosen_labels"] == [M] * len(prompt) + [*asc("Yes"), EOS]
    assert item["rejected_input_ids"] == [*prompt, *asc("No"), EOS]
    assert item["chosen_input_ids"].count(BOS) == 1
    assert item["prompt_input_ids"] == prompt


def test_no_double_bos_whether_or_not_template_emits_bos():
    with_bos = build_tiny_tokenizer()
    without_bos = build_tiny_tokenizer()
    without_bos.chat_template = TINY_CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    rows = [{"prompt": "Hi", "chosen": "Yes", "rejected": "No"}]
    ids = [
        make_dm(rows, tok).train_dataset[0]["chosen_input_ids"] for tok in (with_bos, without_bos)
    ]
    assert ids[0] == ids[1]
    assert ids[0][0] == BOS and ids[0][1] != BOS


def test_append_eos_false(tiny_tokenizer):
    rows = [{"prompt": "Hi", "chosen": "Yes", "rejected": "No"}]
    item = make_dm(rows, tiny_tokenizer, chat_template=False, append_eos=False).train_dataset[0]
    assert item["chosen_input_ids"] == [BOS, *asc("HiYes")]
    assert item["rejected_labels"] == [M, M, M, *asc("No")]


def test_ultrafeedback_prompt_is_common_prefix_multi_turn(tiny_tokenizer, uf_path):
    rows = read_jsonl(uf_path)
    multi = next(i for i, r in enumerate(rows) if len(r["chosen"]) > 2)
    dm = make_dm(uf_path, tiny_tokenizer)
    item = dm.train_dataset[multi]
    turns = rows[multi]["chosen"][:3]
    assert item["prompt_messages"] == turns
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    prompt_text = tiny_tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, tokenize=False
    )
    prompt = tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert prompt.count(BOS) == 1
    for side in ("chosen", "rejected"):
        answer = enc(tiny_tokenizer, rows[multi][side][-1]["content"])
        assert item[f"{side}_input_ids"] == prompt + answer + [EOS]
        assert item[f"{side}_labels"] == [M] * len(prompt) + answer + [EOS]
    assert dm.stats["train"] == {
        "rows": 8,
        "kept": 8,
        "dropped_empty_after_truncation": 0,
        "bad_rows": 0,
        "special_token_text": 0,
    }


def test_ultrafeedback_without_chat_template_uses_plain_template(uf_path):
    tok = build_tiny_tokenizer(chat_template=False)
    rows = read_jsonl(uf_path)
    item = make_dm(uf_path, tok, plain_template="{prompt}").train_dataset[0]
    prompt = [BOS, *enc(tok, rows[0]["prompt"])]
    assert item["chosen_input_ids"] == prompt + enc(tok, rows[0]["chosen"][1]["content"]) + [EOS]


# ----------------------------------------------------------------------------- truncation


def test_truncation_keep_start_and_drop(tiny_tokenizer):
    rows = [
        {"prompt": "abcdefghij", "chosen": "Yes", "rejected": "Nope!"},
        {"prompt": "abc", "chosen": "A", "rejected": "B"},
    ]
    dm = make_dm(rows, tiny_tokenizer, chat_template=False, max_length=9, max_prompt_length=5)
    first = dm.train_dataset[0]
    prompt = [BOS, *asc("abcd")]  # keep-start: BOS + 4 of 10 prompt tokens
    assert first["chosen_input_ids"] == [*prompt, *asc("Yes"), EOS]  # 4 tokens fit exactly
    assert first["rejected_input_ids"] == [*prompt, *asc("Nope")]  # "!" and EOS cut
    assert first["rejected_labels"] == [M] * 5 + asc("Nope")
    assert dm.stats["train"]["kept"] == 2

    # prompt limit >= max_length: a prompt that fills the budget drops its pair
    dm = make_dm(rows, tiny_tokenizer, chat_template=False, max_length=6, max_prompt_length=8)
    assert dm.stats["train"] == {
        "rows": 2,
        "kept": 1,
        "dropped_empty_after_truncation": 1,
        "bad_rows": 0,
        "special_token_text": 0,
    }
    item = dm.train_dataset[0]
    assert item["chosen_input_ids"] == [BOS, *asc("abc"), *asc("A"), EOS]
    batch = next(iter(dm.train_dataloader()))
    assert ((batch["labels"] != M).sum(dim=1) > 0).all()


def test_everything_dropped_is_an_error(tiny_tokenizer):
    rows = [{"prompt": "abcdefghij", "chosen": "Yes", "rejected": "No"}]
    with pytest.raises(UserError, match="no usable preference pairs"):
        make_dm(rows, tiny_tokenizer, chat_template=False, max_length=4, max_prompt_length=8)


# ----------------------------------------------------------------------------- bad rows

GOOD = {"prompt": "Hi", "chosen": "Yes", "rejected": "No"}
UF_USER = {"role": "user", "content": "Hi"}


def uf_row(chosen, rejected):
    return {"prompt": "Hi", "prompt_id": "pid-7", "chosen": chosen, "rejected": rejected}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


UF_GOOD = uf_row([UF_USER, answer("Yes")], [UF_USER, answer("No")])


BAD_PLAIN = [
    ({"prompt": "Hi", "chosen": "Yes"}, "missing or null key 'rejected'", False),
    ({"prompt": "Hi", "chosen": 5, "rejected": "No"}, "'chosen' is int", False),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "No"}, "'chosen' response is empty", True),
    ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "chosen == rejected", True),
]
BAD_UF = [
    (uf_row("Yes", [UF_USER]), "'chosen' must be a non-empty list", False),
    (uf_row([UF_USER, {"role": "assistant"}], [UF_USER]), "'chosen'[1] needs string", False),
    (
        uf_row([UF_USER, answer("A")], [{"role": "user", "content": "X"}]),
        "share no prompt messages",
        False,
    ),
    (
        uf_row(
            [UF_USER, answer("A")],
            [UF_USER, {"role": "user", "content": "more"}, answer("B")],
        ),
        "exactly one assistant message",
        False,
    ),
    (
        uf_row([UF_USER, answer("A")], [UF_USER, answer("A")]),
        "chosen == rejected",
        True,
    ),
    (
        uf_row([UF_USER, answer("")], [UF_USER, answer("B")]),
        "'chosen' response is empty",
        True,
    ),
]


@pytest.mark.parametrize(
    ("good", "bad", "problem", "has_id"),
    [(GOOD, *case) for case in BAD_PLAIN] + [(UF_GOOD, *case) for case in BAD_UF],
)
def test_bad_row_skip_and_fail(tiny_tokenizer, caplog, good, bad, problem, has_id):
    rows = [good, bad, good]
    fmt = "plain" if isinstance(good["chosen"], str) else "ultrafeedback"
    with caplog.at_level(logging.WARNING, logger="fpo.data"):
        dm = make_dm(rows, tiny_tokenizer, format=fmt)
    assert dm.stats["train"] == {
        "rows": 3,
        "kept": 2,
        "dropped_empty_after_truncation": 0,
        "bad_rows": 1,
        "special_token_text": 0,
    }
    warning = next(r.getMessage() for r in caplog.records if "row 1" in r.getMessage())
    assert problem in warning
    assert ("example_id unknown" in warning) != has_id
    assert ("prompt_id pid-7" in warning) == (fmt == "ultrafeedback")

    with pytest.raises(UserError, match=r"row 1 \(.*\): .*") as err:
        make_dm(rows, tiny_tokenizer, format=fmt, on_bad_row="fail")
    assert problem in str(err.value)
    assert "data.on_bad_row=fail" in str(err.value)


def test_bad_row_message_names_file_and_example_id(tiny_tokenizer, tmp_path):
    from fpo.data.formats import PreferencePair

    path = tmp_path / "pairs.jsonl"
    bad = {"prompt": "Hi", "chosen": "Same", "rejected": "Same"}
    path.write_text("\n".join(json.dumps(r) for r in (GOOD, GOOD, bad)) + "\n")
    expected_id = PreferencePair((("user", "Hi"),), "Same", "Same").example_id
    with pytest.raises(UserError) as err:
        make_dm(str(path), tiny_tokenizer, on_bad_row="fail")
    assert str(err.value).startswith(f"{path} row 2 (line 3, example_id {expected_id})")


# ----------------------------------------------------------------------------- sources


def test_missing_file_names_path_and_key(tiny_tokenizer, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=r"data\.train_source") as err:
        make_dm(missing, tiny_tokenizer)
    assert missing in str(err.value)
    with pytest.raises(UserError, match=r"data\.val_source") as err:
        PreferenceDataModule([GOOD], val_source=missing, tokenizer=tiny_tokenizer).setup()
    assert missing in str(err.value)


def test_parquet_json_and_saved_folder_round_trip(tiny_tokenizer, uf_path, tmp_path):
    rows = read_jsonl(uf_path)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "uf.parquet"))
    (tmp_path / "uf.json").write_text(json.dumps(rows))
    datasets.DatasetDict({"train_prefs": table}).save_to_disk(str(tmp_path / "saved"))
    reference = make_dm(uf_path, tiny_tokenizer).train_dataset
    expected = [reference[i] for i in range(len(reference))]
    for source, split in (("uf.parquet", "train"), ("uf.json", "train"), ("saved", "train_prefs")):
        dm = make_dm(str(tmp_path / source), tiny_tokenizer, train_split=split)
        assert [dm.train_dataset[i] for i in range(len(dm.train_dataset))] == expected, source
    with pytest.raises(UserError, match="no split 'test_prefs'"):
        make_dm(str(tmp_path / "saved"), tiny_tokenizer, train_split="test_prefs")


def test_auto_format_detection(tiny_tokenizer, uf_path, plain_path):
    dm = PreferenceDataModule(uf_path, val_source=plain_path, tokenizer=tiny_tokenizer)
    dm.setup()
    assert dm.stats["train"]["kept"] == dm.stats["val"]["kept"] == 8
    assert dm.train_dataset[0]["prompt"] == read_jsonl(uf_path)[0]["prompt"]
    assert dm.val_dataset[0]["prompt"] == read_jsonl(plain_path)[0]["prompt"]
    with pytest.raises(UserError, match=r"data\.format"):
        make_dm([{"prompt": "x", "chosen": 3, "rejected": "y"}], tiny_tokenizer)


# ----------------------------------------------------------------------------- collation


def test_collator_layout_and_reference_pass_through():
    items = [
        {
            "example_id": "a",
            "chosen_input_ids": [1, 10, 11],
            "chosen_labels": [M, 10, 11],
            "rejected_input_ids": [1, 12],
            "rejected_labels": [M, 12],
            "ref_chosen_sum_logps": -1.5,
            "ref_rejected_sum_logps": -2.5,
            "ref_chosen_topk_indices": torch.tensor([4, 5]),
            "ref_rejected_topk_indices": [6, 7],
        },
        {
            "example_id": "b",
            "chosen_input_ids": [1, 20, 21, 22],
            "chosen_labels": [M, M, 21, 22],
            "rejected_input_ids": [1, 23, 24],
            "rejected_labels": [M, M, 24],
            "ref_chosen_sum_logps": -3.0,
            "ref_rejected_sum_logps": -4.0,
            "ref_chosen_topk_indices": torch.tensor([8, 9]),
            "ref_rejected_topk_indices": [10, 11],
        },
    ]
    batch = PreferenceCollator(pad_token_id=0)(items)
    assert batch["input_ids"].tolist() == [
        [1, 10, 11, 0],
        [1, 20, 21, 22],
        [1, 12, 0, 0],
        [1, 23, 24, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
    ]
    assert batch["labels"].tolist() == [
        [M, 10, 11, M],
        [M, M, 21, 22],
        [M, 12, M, M],
        [M, M, 24, M],
    ]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["example_id"] == ["a", "b"]
    assert batch["ref_sum_logps"].tolist() == [-1.5, -3.0, -2.5, -4.0]
    assert batch["ref_topk_indices"].tolist() == [[4, 5], [8, 9], [6, 7], [10, 11]]
    del items[0]["ref_rejected_sum_logps"]
    with pytest.raises(KeyError, match="pairs"):
        PreferenceCollator(0)(items)


# ----------------------------------------------------------------------------- ids, order


def test_example_id_stable_under_shuffling_and_filtering(tiny_tokenizer, plain_path):
    rows = read_jsonl(plain_path)
    forward = make_dm(rows, tiny_tokenizer).train_dataset
    shuffled = make_dm(rows[::-1][:5], tiny_tokenizer).train_dataset
    by_id = {item["example_id"]: item for item in (forward[i] for i in range(len(forward)))}
    assert len(by_id) == 8
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in by_id)
    for i in range(len(shuffled)):
        assert by_id[shuffled[i]["example_id"]] == shuffled[i]
    assert shuffled[0]["example_id"] == forward[7]["example_id"]


def test_dataloader_orders(tiny_tokenizer, plain_path):
    dm = make_dm(plain_path, tiny_tokenizer, batch_size=8, eval_batch_size=3, seed=1)
    file_order = dm.train_dataset.example_ids
    first = next(iter(dm.train_dataloader()))["example_id"]
    again = next(iter(make_dm(plain_path, tiny_tokenizer, batch_size=8, seed=1).train_dataloader()))
    assert first == again["example_id"]
    assert sorted(first) == sorted(file_order) and first != file_order
    assert dm.val_dataloader() == []


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_components_change_only_their_entry(plain_path):
    rows = read_jsonl(plain_path)
    base_kwargs = {"chat_template": False, "max_length": 64, "max_prompt_length": 32}

    def components(tok=None, source=rows, **kwargs):
        dm = make_dm(source, tok or build_tiny_tokenizer(), **{**base_kwargs, **kwargs})
        return dm.fingerprint_components("train")

    base = components()
    assert set(base) == {"data", "tokenizer", "template", "truncation"}
    assert components() == base
    assert components(source=rows[::-1]) == base  # row order is not content

    extra_token = build_tiny_tokenizer()
    extra_token.add_tokens(["<extra>"])
    other_template = build_tiny_tokenizer()
    other_template.chat_template = TINY_CHAT_TEMPLATE.replace("model", "assistant")
    changes = {
        "data": [components(source=rows[:7]), components(max_train_samples=7)],
        "tokenizer": [components(tok=extra_token), components(tok=other_template)],
        "template": [components(plain_template="Review: {prompt}"), components(append_eos=False)],
        "truncation": [components(max_length=63), components(max_prompt_length=31)],
    }
    for changed, variants in changes.items():
        for variant in variants:
            assert [k for k in base if base[k] != variant[k]] == [changed]


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"format": "csv"}, "data.format"),
        ({"on_bad_row": "ignore"}, "data.on_bad_row"),
        ({"plain_template": "no field"}, "data.plain_template"),
        ({"plain_template": "{question}"}, "data.plain_template"),
        ({"chat_template": "maybe"}, "data.chat_template"),
        ({"max_length": 0}, "data.max_length"),
        ({"batch_size": 0}, "data.batch_size"),
    ],
)
def test_config_errors_name_the_key(tiny_tokenizer, kwargs, key):
    with pytest.raises(UserError, match=key):
        PreferenceDataModule([GOOD], tokenizer=tiny_tokenizer, **kwargs)


def test_chat_template_true_needs_a_template():
    with pytest.raises(UserError, match=r"data\.chat_template=true"):
        PreferenceDataModule(
            [GOOD], tokenizer=build_tiny_tokenizer(chat_template=False), chat_template="true"
        )


def test_set_tokenizer_later_rebuilds(tiny_tokenizer):
    dm = PreferenceDataModule([GOOD])
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.setup()
    dm.set_tokenizer(build_tiny_tokenizer(chat_template=False))
    dm.setup()
    assert dm.train_dataset[0]["chosen_input_ids"] == [BOS, *asc("HiYes"), EOS]
    dm.set_tokenizer(tiny_tokenizer)
    assert dm.train_dataset[0]["chosen_input_ids"][1] == 3  # now templated: <start_of_turn>
