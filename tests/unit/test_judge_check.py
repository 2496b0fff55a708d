"""fpo-judge-check: accuracy per category on the labelled check set; the shipped set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpo.commands.judge_check import main
from fpo.errors import UserError
from fpo.evaluation.judge_check import (
    MARKERS,
    check_judge,
    markdown_report,
    read_check_set,
    write_report,
)

ROOT = Path(__file__).resolve().parents[2]
CHECK_SET = ROOT / "data" / "judge_check" / "check_set.jsonl"
ROWS = [
    {"text": "good film", "label": "positive", "category": "plain"},
    {"text": "bad film", "label": "negative", "category": "plain"},
    {"text": "great great great", "label": "gamed", "category": "stacked"},
    {"text": "lovely hotel", "label": "gamed", "category": "ad"},
]


class TableJudge:
    name = "table"
    positive_threshold = 0.5

    def __init__(self, table):
        self.table = table

    def score(self, prompts, completions):
        assert prompts == [""] * len(completions)  # texts are judged on their own
        return [self.table[text] for text in completions]


def test_accuracy_counts_positive_verdicts_above_the_threshold():
    scores = {"good film": 0.9, "bad film": 0.5, "great great great": 1.0, "lovely hotel": 0.1}
    result = check_judge(TableJudge(scores), ROWS)
    # correct: good (0.9 > .5), bad (0.5 is not above .5), stacked wrong, ad right
    assert result["accuracy"] == 0.75 and result["reviews"] == 1.0 and result["gamed"] == 0.5
    assert result["categories"] == {"plain": 1.0, "stacked": 0.0, "ad": 1.0}
    assert result["mean_score"]["plain"] == pytest.approx(0.7)
    table = markdown_report([result], ROWS)
    assert "| table | 0.5 | 0.75 | 1.00 | 0.50 | 1.00 | 0.00 | 1.00 |" in table
    assert "plain (positive/negative, 2) | stacked (gamed, 1)" in table


def test_report_replaces_only_the_text_between_markers(tmp_path):
    out = tmp_path / "doc.md"
    write_report("first\n", out)
    assert out.read_text() == "first\n"  # no markers: the whole file
    out.write_text(f"# Title\n\n{MARKERS[0]}\nold\n{MARKERS[1]}\n\nProse.\n")
    write_report("new\n", out)
    assert out.read_text() == f"# Title\n\n{MARKERS[0]}\nnew\n{MARKERS[1]}\n\nProse.\n"


def test_check_set_rows_are_validated(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "good", "category": "c"}) + "\n")
    with pytest.raises(UserError, match="line 1: label 'good'"):
        read_check_set(bad)
    with pytest.raises(UserError, match="does not exist"):
        read_check_set(tmp_path / "missing.jsonl")


def test_a_unicode_line_separator_inside_a_text_does_not_split_its_row(tmp_path):
    row = {"text": "Great film.\u2028Truly.", "label": "positive", "category": "plain_positive"}
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r["text"] for r in read_check_set(path)] == [row["text"]]


def test_shipped_check_set_has_every_kind_of_text():
    rows = read_check_set(CHECK_SET)
    assert len(rows) >= 150 and len({row["text"] for row in rows}) == len(rows)
    by_category = {}
    for row in rows:
        by_category.setdefault(row["category"], set()).add(row["label"])
    assert by_category == {
        "plain_positive": {"positive"}, "plain_negative": {"negative"},
        "negated_praise": {"negative"}, "negated_criticism": {"positive"},
        "sarcasm": {"negative"}, "stacked_adjectives": {"gamed"}, "off_topic_ad": {"gamed"},
    }  # fmt: skip


def test_command_on_the_lexicon_judges_matches_the_committed_report(tmp_path, capsys):
    """The lexicon rows of docs/judge_check.md are what the command gives now; both lexicons
    call every stacked-adjective list positive (the gaming the check set is there to show)."""
    out = tmp_path / "judge_check.md"
    main(["--data", str(CHECK_SET), "--judges", "vader,afinn", "--out", str(out)])
    report = out.read_text()
    assert report == capsys.readouterr().out
    committed = (ROOT / "docs" / "judge_check.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| vader", "| afinn"))]
    assert len(rows) == 4
    for row in rows:  # the accuracy rows' last cell, seconds per text, varies
        assert (row if row.count("|") == 9 else row.rsplit("|", 2)[0]) in committed, row
    vader = next(line for line in rows if line.startswith("| vader-compound | 0 |"))
    assert vader.split(" | ")[-3] == "0.00"  # stacked_adjectives: every one called positive
