import json

import pytest

from synthtune import paths
from synthtune.data.answers import extract_gold
from synthtune.data.calculator import check_calculations
from synthtune.data.gsm8k import load_split, rationale_and_answer, resolve_source
from synthtune.errors import DataError


def test_bundled_sample_is_whole_and_checked():
    train, test = load_split("train", "bundled"), load_split("test", "bundled")
    assert len(train) + len(test) >= 40 and len(test) >= 10
    qs_train = {r["question"] for r in train}
    assert not qs_train & {r["question"] for r in test}, "train and test must not overlap"
    for row in [*train, *test]:
        assert extract_gold(row["answer"]) is not None
        rep = check_calculations(row["answer"])
        assert rep.n_checked >= 1 and rep.fraction == 1.0, (row["question"], rep.errors)
        assert "<<" in row["answer"] and "\n#### " in row["answer"]


def test_full_gsm8k_from_dir(gsm8k_dir):
    train = load_split("train", "dir", gsm8k_dir)
    test = load_split("test", "auto", gsm8k_dir)
    assert (len(train), len(test)) == (7473, 1319)
    assert test.source == str(gsm8k_dir)


def test_bundled_sample_is_original_not_gsm8k(gsm8k_dir):
    full = {r["question"].strip().lower() for s in ("train", "test") for r in load_split(s, "dir", gsm8k_dir)}
    ours = [r["question"].strip().lower() for s in ("train", "test") for r in load_split(s, "bundled")]
    assert not full.intersection(ours)


def test_dir_source_needs_a_dir(monkeypatch):
    monkeypatch.delenv(paths.GSM8K_DIR_ENV, raising=False)
    with pytest.raises(DataError, match="needs a directory"):
        resolve_source("dir")
    assert resolve_source("auto") == ("hub", None)
    assert resolve_source("bundled") == ("bundled", None)


def test_missing_and_malformed_files_name_file_line_field(tmp_path):
    with pytest.raises(DataError, match="train.jsonl: does not exist"):
        load_split("train", "dir", tmp_path)
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"question": "q1", "answer": "1 #### 1"}) + "\n"
        + json.dumps({"question": "q2"}) + "\n"
        + "{not json\n")
    with pytest.raises(DataError) as err:
        load_split("test", "dir", tmp_path)
    assert f"{tmp_path / 'test.jsonl'}:2" in str(err.value) and "answer" in str(err.value)
    lenient = load_split("test", "dir", tmp_path, lenient=True)
    assert len(lenient) == 1 and [line for line, _ in lenient.skipped] == [2, 3]


def test_rationale_split():
    assert rationale_and_answer("a\nb\n#### 1,234") == ("a\nb", "1,234")
    assert rationale_and_answer("no marker") == ("no marker", "")


def test_every_reader_of_questions_refuses_a_question_that_is_not_text(tmp_path):
    # {"question": 12} passed `data check` (0 problems) and crashed synthesis with an AttributeError
    from synthtune.config import SynthConfig, load_config
    from synthtune.data.gsm8k import load_source
    from synthtune.data.validate import check_file
    from synthtune.synth.pipeline import load_items

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n"
                    + json.dumps({"question": 12, "answer": "#### 3"}) + "\n")
    where = f"{path}:2: field 'question' is a number, not a string"
    for read in (lambda: load_source(str(path)), lambda: check_file(path),
                 lambda: load_items(load_config(SynthConfig, None, [f"questions={path}", "exemplars=bundled:train"]))):
        with pytest.raises(DataError, match=where):
            read()
    assert check_file(path, lenient=True)["n_skipped"] == 1


def test_a_gold_answer_given_as_a_number_reaches_every_reader_as_text(tmp_path):
    # {"answer": 72} passed the type check, then crashed prompts and training targets on .strip()
    from synthtune.data.gsm8k import load_source
    from synthtune.formats import plain_example

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": 72}) + "\n" + json.dumps({"question": "r", "answer": 2.5}) + "\n")
    rows = load_source(str(path)).rows
    assert [r["answer"] for r in rows] == ["72", "2.5"]
    assert plain_example(rows[0]["question"], rows[0]["answer"]).endswith(" 72")
