"""fpo.data on any preference dataset: schemas, column maps, file kinds, hub arguments,
``datasets.map`` caching and workers, and ids pinned to the pipeline before ``datasets.map``.

Every source is made here, in ``tmp_path``: nothing downloads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pytest

from fpo.data import PreferenceDataModule
from fpo.data.formats import Columns
from fpo.data.row import RowProcessor
from fpo.errors import UserError
from fpo.models.tiny import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
BOS, EOS = 1, 2


def items(dm, split="train") -> list[dict]:
    dataset = dm.dataset(split, wrapped=False)
    return [dataset[i] for i in range(len(dataset))]


def make_dm(source, tok=None, **kwargs) -> PreferenceDataModule:
    dm = PreferenceDataModule(source, tokenizer=tok or build_tiny_tokenizer(), **kwargs)
    dm.setup()
    return dm


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ ids as before datasets.map

SENTIMENT = {
    "format": "plain",
    "chat_template": False,
    "append_eos": False,
    "max_length": 64,
    "max_prompt_length": 32,
}
FIXTURE = {"max_length": 256, "max_prompt_length": 128}
# sha256 (first 32 hex) of json.dumps(all items, sort_keys=True), computed with the row-by-row
# pipeline this one replaced (commit 6c5e5f5), tiny tokenizer.
PINNED = {
    "uf_fixture_chat": ("tests/fixtures/ultrafeedback_binarized.jsonl", True, FIXTURE,
                        "616076bcd992325a33351f96d4ca2808"),
    "uf_fixture_plain": ("tests/fixtures/ultrafeedback_binarized.jsonl", False, FIXTURE,
                         "e836fdc188fc36c11a579fa11e1547fe"),
    "plain_fixture_chat": ("tests/fixtures/plain_pairs.jsonl", True, FIXTURE,
                           "35634deab99c1376c4a0af958ee7b20c"),
    "plain_fixture_short": ("tests/fixtures/plain_pairs.jsonl", False,
                            {"max_length": 24, "max_prompt_length": 24,
                             "plain_template": "Q: {prompt}\nA:"},
                            "a885623f206d154c3892a479e1081aff"),
    "sentiment_train": ("data/sentiment/train.jsonl", False, SENTIMENT,
                        "e874420d1d0bf1ef0de6b6197233c1f8"),
    "sentiment_val": ("data/sentiment/val.jsonl", False, SENTIMENT,
                      "eb7aca9a1479384180287cc2856402d1"),
    "sentiment_test": ("data/sentiment/test.jsonl", False, SENTIMENT,
                       "ec1580fd6591521ae938817a7a84a638"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PINNED))
def test_ids_are_those_of_the_row_by_row_pipeline(case):
    path, chat, kwargs, digest = PINNED[case]
    dm = make_dm(str(ROOT / path), build_tiny_tokenizer(chat_template=chat), **kwargs)
    blob = json.dumps(items(dm), sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest()[:32] == digest
    assert dm.stats["train"]["bad_rows"] == dm.stats["train"]["special_token_text"] == 0


# The same with google/gemma-3-270m's tokenizer (no chat template: plain_template).
GEMMA_PINNED = {
    "uf_fixture_chat": "a6372a202952b478371e6c6bffb923e0",
    "plain_fixture_chat": "c16d8fee571d63482ee89593b0a7aea6",
    "plain_fixture_short": "5152dfd21344849fc4e145d950d90511",
    "sentiment_train": "57a6f1ec0c133e8a0b0d179ebd37166b",
    "sentiment_val": "bef65d0b9440483a67f4726147c7e915",
    "sentiment_test": "85d28bc93992a4b7ca7c5258c886486a",
}


@pytest.mark.slow
def test_gemma_ids_are_those_of_the_row_by_row_pipeline():
    """Its special tokens include thousands of ``<unusedN>`` and HTML tags are added (not
    special) tokens: the sentiment data's ``<em>`` and ``</b>`` must stay what they were."""
    from transformers import AutoTokenizer

    from fpo.models.gemma3_gguf import ensure_fp32_folder

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_fp32_folder()), local_files_only=True)
    for case, digest in GEMMA_PINNED.items():
        path, _, kwargs, _ = PINNED[case]
        dm = make_dm(str(ROOT / path), tokenizer, **kwargs)
        blob = json.dumps(items(dm), sort_keys=True).encode()
        assert hashlib.sha256(blob).hexdigest()[:32] == digest, case


# ------------------------------------------------------------------ schemas and file kinds

HH_PROMPT = "\n\nHuman: What is a cat?\n\nAssistant: A small animal.\n\nHuman: And a dog?"
HH_ROWS = [
    {
        "chosen": HH_PROMPT + "\n\nAssistant: A loyal friend.",
        "rejected": HH_PROMPT + "\n\nAssistant: No.",
    },
    {"chosen": "Human: Hi\n\nAssistant:  Hello! ", "rejected": "Human: Hi\n\nAssistant: Go away"},
]
TRL_ROWS = [
    {
        "prompt": [{"role": "user", "content": "Name a colour"}],
        "chosen": [{"role": "assistant", "content": "Blue"}],
        "rejected": [{"role": "assistant", "content": "Seven"}],
    }
]
MAPPED_ROWS = [{"question": "2+2?", "better": "4", "worse": "5", "id": 7}]
MAPPED = {"prompt": "question", "chosen": "better", "rejected": "worse"}


def uf_rows() -> list[dict]:
    with open(ROOT / "tests/fixtures/ultrafeedback_binarized.jsonl") as f:
        return [json.loads(line) for line in f]


SCHEMAS = {
    "ultrafeedback": (uf_rows, {}),
    "hh_rlhf": (lambda: HH_ROWS, {}),
    "trl_conversational": (lambda: TRL_ROWS, {}),
    "plain_column_map": (lambda: MAPPED_ROWS, {"columns": MAPPED}),
}


def write_sources(rows: list[dict], folder: Path) -> dict[str, tuple[str, str]]:
    """The same rows as a JSONL file, a JSON array, a parquet file and a save_to_disk folder:
    ``{kind: (source, split)}``."""
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rows.json").write_text(json.dumps(rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(folder / "rows.parquet"))
    datasets.DatasetDict({"train_prefs": table}).save_to_disk(str(folder / "saved"))
    return {
        "jsonl": (str(folder / "rows.jsonl"), "train"),
        "json": (str(folder / "rows.json"), "train"),
        "parquet": (str(folder / "rows.parquet"), "train"),
        "save_to_disk": (str(folder / "saved"), "train_prefs"),
    }


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_every_schema_reads_alike_from_every_file_kind(schema, tmp_path):
    rows, kwargs = SCHEMAS[schema]
    expected = items(make_dm(rows(), **kwargs))
    assert expected and all(item["chosen_input_ids"][-1] == EOS for item in expected)
    for kind, (source, split) in write_sources(rows(), tmp_path).items():
        dm = make_dm(source, train_split=split, **kwargs)
        assert items(dm) == expected, kind
        assert dm.stats["train"]["bad_rows"] == 0


def test_hh_rlhf_prompt_is_the_shared_conversation_up_to_the_last_assistant_turn():
    tok = build_tiny_tokenizer()
    first, second = items(make_dm(HH_ROWS, tok))
    turns = [
        {"role": "user", "content": "What is a cat?"},
        {"role": "assistant", "content": "A small animal."},
        {"role": "user", "content": "And a dog?"},
    ]
    assert first["prompt_messages"] == turns
    rendered = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    prompt = enc(tok, rendered)
    assert prompt[0] == BOS and first["prompt_input_ids"] == prompt
    assert first["chosen_input_ids"] == prompt + enc(tok, "A loyal friend.") + [EOS]
    assert first["rejected_input_ids"] == prompt + enc(tok, "No.") + [EOS]
    # a bare "Human:" start; the answers are stripped
    assert second["prompt_messages"] == [{"role": "user", "content": "Hi"}]
    assert second["chosen_input_ids"][-7:] == [*enc(tok, "Hello!"), EOS]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "missing or null key 'rejected'"),
        ({"chosen": "Human: a\n\nAssistant: b", "rejected": "Other: c"}, "do not share a conv"),
        ({"chosen": "Hi\n\nHuman: a\n\nAssistant: b", "rejected": "Hi\n\nHuman: a\n\nAssistant: c"},
         "text before its first 'Human:' turn"),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},
         "chosen == rejected"),
    ],
)  # fmt: skip
def test_hh_rlhf_bad_rows_name_the_problem(row, problem, caplog):
    with caplog.at_level("WARNING", logger="fpo.data"):
        dm = make_dm([HH_ROWS[0], row], format="hh_rlhf")
    assert dm.stats["train"]["bad_rows"] == 1
    assert any("row 1 (" in r.getMessage() and problem in r.getMessage() for r in caplog.records)


def test_explicit_prompt_messages_are_put_before_answers_once():
    from fpo.data.formats import parse_row

    user = {"role": "user", "content": "Hi"}
    row = {"prompt": [user], "chosen": [user, {"role": "assistant", "content": "Yes"}]}
    pair = parse_row({**row, "rejected": "No"}, "ultrafeedback")  # an answer string
    assert (pair.prompt_messages, pair.chosen, pair.rejected) == ((("user", "Hi"),), "Yes", "No")


def test_auto_detects_each_schema():
    from fpo.data.formats import row_format

    assert row_format(uf_rows()[0]) == "ultrafeedback"
    assert row_format(HH_ROWS[0]) == "hh_rlhf"
    assert row_format(TRL_ROWS[0]) == "ultrafeedback"
    assert row_format(MAPPED_ROWS[0], Columns(**MAPPED)) == "plain"
    assert row_format({"prompt": "p", "chosen": "\n\nHuman: x\n\nAssistant: y"}) == "plain"
    assert row_format(MAPPED_ROWS[0]) is None


@pytest.mark.parametrize(
    ("rows", "fmt", "fits"),
    [(HH_ROWS, "plain", "hh_rlhf"), (HH_ROWS, "ultrafeedback", "hh_rlhf"),
     (TRL_ROWS, "plain", "ultrafeedback"), (uf_rows(), "hh_rlhf", "ultrafeedback")],
)  # fmt: skip
def test_a_row_of_another_format_names_its_keys_and_the_format_that_fits(rows, fmt, fits):
    with pytest.raises(UserError) as err:
        make_dm(rows, format=fmt, on_bad_row="fail")
    message = str(err.value)
    assert "row 0 (" in message and "row keys: [" in message
    assert f"it fits data.format={fits} (or use data.format=auto)" in message
    assert "'chosen'" in message.split("row keys: ")[1]


def test_auto_names_the_keys_when_no_format_fits():
    with pytest.raises(UserError, match=r"row keys: \['better', 'id', 'question', 'worse'\]"):
        make_dm(MAPPED_ROWS)


@pytest.mark.parametrize(
    ("columns", "key"),
    [({"answer": "x"}, "data.columns.answer"), ({"chosen": ""}, "data.columns.chosen"),
     ("chosen", "data.columns")],
)  # fmt: skip
def test_column_map_errors_name_the_key(columns, key):
    with pytest.raises(UserError, match=key):
        PreferenceDataModule(MAPPED_ROWS, columns=columns)


def test_missing_mapped_column_names_that_column(caplog):
    with caplog.at_level("WARNING", logger="fpo.data"):
        dm = make_dm([*MAPPED_ROWS, {"question": "q", "better": "b"}], columns=MAPPED)
    assert dm.stats["train"]["bad_rows"] == 1
    assert any("missing or null key 'worse'" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ hub, workers, cache


def test_hub_names_go_to_load_dataset_with_subset_split_and_kwargs(monkeypatch):
    calls = []

    def fake_load_dataset(name, subset=None, split=None, **kwargs):
        calls.append((name, subset, split, kwargs))
        return datasets.Dataset.from_list(HH_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = make_dm(
        "org/preferences",
        train_split="train_prefs",
        subset="helpful-base",
        load_kwargs={"revision": "abc123"},
    )
    assert calls == [("org/preferences", "helpful-base", "train_prefs", {"revision": "abc123"})]
    assert items(dm) == items(make_dm(HH_ROWS))


def test_worker_processes_give_the_same_ids(tmp_path):
    source, _ = write_sources(uf_rows(), tmp_path)["jsonl"]
    assert items(make_dm(source, num_proc=2)) == items(make_dm(source))


def test_tokenized_splits_are_cached_by_content_and_settings(tmp_path, monkeypatch):
    source, _ = write_sources(uf_rows(), tmp_path)["parquet"]
    cache = tmp_path / "cache"
    first = items(make_dm(source, cache_dir=str(cache)))
    assert len(list(cache.glob("*.arrow"))) == 1

    def refuse(self, row, index):
        raise AssertionError("the cached split was tokenized again")

    monkeypatch.setattr(RowProcessor, "__call__", refuse)
    assert items(make_dm(source, cache_dir=str(cache))) == first
    with pytest.raises(AssertionError, match="tokenized again"):
        make_dm(source, cache_dir=str(cache), max_length=255)  # other settings: not cached
    with pytest.raises(AssertionError, match="tokenized again"):
        make_dm(uf_rows(), cache_dir=str(cache))  # in-memory rows: never cached


def test_hh_rlhf_config_loads_a_hub_subset(monkeypatch, tmp_path):
    from hydra.utils import instantiate

    from fpo.testing import compose_train

    calls = []

    def fake_load_dataset(name, subset=None, split=None, **kwargs):
        calls.append((name, subset, split, kwargs))
        return datasets.Dataset.from_list(HH_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = compose_train(
        "data=hh_rlhf", "+data.load_kwargs.data_dir=helpful-base", f"paths.cache_dir={tmp_path}"
    )
    dm = instantiate(cfg.data, tokenizer=build_tiny_tokenizer())
    dm.setup()
    assert calls == [
        ("Anthropic/hh-rlhf", None, split, {"data_dir": "helpful-base"})
        for split in ("train", "test")
    ]
    assert items(dm) == items(make_dm(HH_ROWS, max_length=512, max_prompt_length=256))
