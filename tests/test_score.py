"""Scoring model outputs: `synthtune score IN.jsonl --out OUT.jsonl` without the CLI layer.

Run: pytest tests/test_score.py
"""

from __future__ import annotations

import json
import os

import pytest

from synthtune.data.jsonl import read_jsonl, write_jsonl
from synthtune.errors import DataError
from synthtune.jobs.score import score_file
from synthtune.synth.scoring import score_rows

ROWS = [
    {
        "question": "Marta's hens lay 16 eggs...",
        "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = <<9*2=18>>18\n#### 18",
        "completions": [
            "16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.",
            "She makes 9 * 2 = $18.00.\n#### 18",
            "The answer is 20.",
            "I don't know.",
        ],
    },
    {
        "question": "Lena sold stickers...",
        "answer": 72,
        "completions": ["The answer is 70.", "The answer is 71.", "The answer is 72.", "#### 71"],
    },
    {
        "question": "Ravi earns $12 an hour...",
        "answer": "10",
        "completions": ["\\boxed{11}", "The answer is 12.", "no idea", "no idea either"],
    },
]


def test_score_rows_adds_fields_and_summarizes():
    out, summary = score_rows(ROWS)
    assert out[0]["extracted"] == ["18", "18", "20", None]
    assert out[0]["correct"] == [True, True, False, False]
    assert (out[0]["majority"], out[0]["majority_correct"]) == ("18", True)
    assert out[1]["extracted"] == ["70", "71", "72", "71"]
    assert (out[1]["majority"], out[1]["majority_correct"]) == ("71", False)
    assert (out[2]["majority"], out[2]["majority_correct"]) == ("11", False)  # tie of 11 and 12: first wins
    assert out[0]["question"] == ROWS[0]["question"] and out[0]["completions"] == ROWS[0]["completions"]
    assert summary == {
        "n_questions": 3,
        "n_completions": 12,
        "parse_rate": 9 / 12,
        "accuracy": 3 / 12,
        "maj_at_k": 1 / 3,
        "pass_at_k": 2 / 3,
        "k": 4,
        "strict_accuracy": 1 / 12,
        "flexible_accuracy": 3 / 12,
        "format_rate": 2 / 12,  # the two '#### n' completions, one right and one wrong
        # lm-eval's string match: "#### 18" (strict); "18." twice and "72." (flexible: a final "." goes)
        "lm_eval_strict_match": 1 / 12,
        "lm_eval_flexible_extract": 3 / 12,
    }
    assert out[0]["lm_eval_filtered"] == {"strict-match": ["[invalid]", "18", "[invalid]", "[invalid]"],
                                          "flexible-extract": ["18.", "18", "20.", "[invalid]"]}
    assert out[0]["lm_eval_correct"] == {"strict-match": [False, True, False, False],
                                         "flexible-extract": [True, True, False, False]}
    assert "extracted" not in ROWS[0]  # the input rows are not modified


def test_single_completion_string_is_accepted():
    out, summary = score_rows([{"question": "q", "answer": "#### 5", "completion": "2 + 3 = 5"}])
    assert out[0]["extracted"] == ["5"] and out[0]["correct"] == [True]
    assert out[0]["completion"] == "2 + 3 = 5"
    assert (summary["k"], summary["accuracy"], summary["maj_at_k"]) == (1, 1.0, 1.0)


def test_k_is_none_when_it_varies():
    rows = [
        {"question": "a", "answer": 1, "completions": ["1"]},
        {"question": "b", "answer": 2, "completions": ["2", "3"]},
    ]
    assert score_rows(rows)[1]["k"] is None


def test_empty_input_has_no_rates():
    out, summary = score_rows([])
    assert out == []
    assert summary["n_questions"] == 0
    assert summary["accuracy"] is None and summary["maj_at_k"] is None and summary["parse_rate"] is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "answer": "1", "completions": "1"}, "field 'completions' is a string, not a list"),
        ({"question": "q", "answer": "1", "completions": ["1", None]}, "field 'completions' item 1 is null"),
        ({"question": "q", "answer": "1", "completions": ["1", 2]}, "field 'completions' item 1 is a number"),
        ({"question": "q", "answer": "1", "completions": []}, "field 'completions' is an empty list"),
        ({"question": "q", "answer": "1"}, "field 'completions' is missing"),
        ({"question": "q", "answer": "1", "completion": ["1"]}, "field 'completion' is a list, not a string"),
        ({"question": "q", "answer": "1", "completion": "1", "completions": ["1"]}, "with 'completion'"),
        ({"question": "q", "answer": "no", "completions": ["1"]}, "field 'answer' has no final answer"),
        ({"question": "q", "answer": True, "completions": ["1"]}, "field 'answer' is a boolean"),
        ({"question": "q", "answer": {"n": 1}, "completions": ["1"]}, "field 'answer' is an object"),
        ({"answer": "1", "completions": ["1"]}, "field 'question' is missing"),
    ],
)
def test_invalid_rows_name_the_line_and_field(tmp_path, row, message):
    good = {"question": "q", "answer": "1", "completions": ["1"]}
    path = tmp_path / "in.jsonl"
    # The bad row sits on line 3, after a blank line, so the line number must come from the file.
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        score_file(path, tmp_path / "out.jsonl")
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_score_rows_errors_use_row_positions_by_default():
    with pytest.raises(DataError, match=r"^<rows>:2: field 'completions'"):
        score_rows([ROWS[0], {"question": "q", "answer": "1", "completions": "1"}])


def test_score_file_writes_scored_rows(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "scored" / "out.jsonl"
    write_jsonl(src, ROWS)
    before = src.read_bytes()
    summary = score_file(src, dst)
    assert summary["n_questions"] == 3 and summary["maj_at_k"] == 1 / 3
    assert "n_skipped" not in summary
    out = read_jsonl(dst).rows
    assert [r["majority"] for r in out] == ["18", "71", "11"]
    assert src.read_bytes() == before
    json.dumps(summary)  # the CLI prints it with --json


def test_lenient_skips_bad_lines_and_counts_them(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps(ROWS[0]) + "\n"
        + "{broken json\n"
        + json.dumps({"question": "q", "answer": "1", "completions": "1"}) + "\n"
        + json.dumps({"question": "q"}) + "\n"
        + json.dumps(ROWS[1]) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(DataError):
        score_file(src, tmp_path / "strict.jsonl")
    summary = score_file(src, tmp_path / "out.jsonl", lenient=True)
    assert summary["n_questions"] == 2
    assert summary["n_skipped"] == 3
    assert [s["line"] for s in summary["skipped_preview"]] == [2, 3, 4]
    assert "field 'completions' is a string" in summary["skipped_preview"][1]["reason"]
    assert len(read_jsonl(tmp_path / "out.jsonl").rows) == 2


def test_lenient_preview_is_capped_but_the_count_is_not(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("not json\n" * 50 + json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    summary = score_file(src, tmp_path / "out.jsonl", lenient=True)
    assert (summary["n_questions"], summary["n_skipped"], len(summary["skipped_preview"])) == (1, 50, 20)


def test_score_rows_lenient():
    out, summary = score_rows([{"question": "q"}, ROWS[0]], lenient=True)
    assert len(out) == 1 and summary["n_skipped"] == 1
    assert summary["skipped_preview"] == [{"line": 1, "reason": "field 'answer' is missing"}]


def test_refuses_to_overwrite_the_input(tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, ROWS)
    before = src.read_bytes()
    with pytest.raises(DataError, match="refusing to overwrite"):
        score_file(src, src)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="refusing to overwrite"):
        score_file("in.jsonl", "./sub/../in.jsonl")
    os.symlink(src, tmp_path / "link.jsonl")
    with pytest.raises(DataError, match="refusing to overwrite"):
        score_file(src, tmp_path / "link.jsonl")
    os.link(src, tmp_path / "hard.jsonl")
    with pytest.raises(DataError, match="refusing to overwrite"):
        score_file(src, tmp_path / "hard.jsonl")
    assert src.read_bytes() == before


def test_rescoring_a_scored_file_is_stable(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    first = score_file(tmp_path / "in.jsonl", tmp_path / "a.jsonl")
    second = score_file(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    assert first == second
    assert read_jsonl(tmp_path / "a.jsonl").rows == read_jsonl(tmp_path / "b.jsonl").rows


def test_missing_input_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        score_file(tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
