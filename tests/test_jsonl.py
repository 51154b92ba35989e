"""JSONL reading with line-accurate errors, and crash-safe writing.

Run: pytest tests/test_jsonl.py
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from synthtune.data import jsonl
from synthtune.data.jsonl import append_jsonl, read_jsonl, write_jsonl
from synthtune.errors import DataError

# CPython's 4,300-digit limit on int() of a string came in 3.10.7 (and 3.11); without it such a line parses
NEEDS_INT_LIMIT = pytest.mark.skipif(not hasattr(sys, "get_int_max_str_digits"), reason="no int digit limit")


def _write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def test_reads_rows_with_their_line_numbers(tmp_path):
    path = _write(tmp_path / "x.jsonl", '{"a": 1}\n\n   \n{"a": 2}\n{"a": 3}')
    result = read_jsonl(path)
    assert result.rows == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert result.lines == [1, 4, 5]  # blank lines are skipped but still counted
    assert result.skipped == []
    assert len(result) == 3


def test_missing_field_message_names_file_line_field_and_fix(tmp_path):
    lines = ['{"question": "q", "answer": "1"}'] * 16 + ['{"question": "q"}']
    path = _write(tmp_path / "x.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path, required=("question", "answer"))
    assert str(info.value) == (
        f"{path}:17: field 'answer' is missing (each line needs a JSON object with 'question' and 'answer')"
    )
    assert (info.value.line, info.value.field) == (17, "answer")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"question": "q", "answer": ""}', "field 'answer' is empty"),
        ('{"question": "q", "answer": "   "}', "field 'answer' is empty"),
        ('{"question": "q", "answer": null}', "field 'answer' is empty"),
        ('{"question": [], "answer": "1"}', "field 'question' is empty"),
        ('{"question": "q", "answer": 1', "is not valid JSON"),
        ('["question", "answer"]', "holds a list, not an object"),
        ('"just a string"', "holds a string, not an object"),
        # a number past Python's 4,300-digit int limit raised a bare ValueError, deep nesting a
        # RecursionError: neither named the file or line, and both escaped lenient mode
        pytest.param('{"question": "q", "answer": 1' + "0" * 5000 + "}", "cannot be read: Exceeds the limit (4300 digits)",
                     marks=NEEDS_INT_LIMIT),
        ("[" * 100_000, "cannot be read: nests too deeply"),
        ("{'question': 'q'}", "is not valid JSON"),  # Python repr, a common mistake
    ],
)
def test_bad_lines_raise_in_strict_mode(tmp_path, line, problem):
    path = _write(tmp_path / "x.jsonl", '{"question": "q", "answer": "1"}\n' + line + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path, required=("question", "answer"))
    assert str(info.value).startswith(f"{path}:2: ")
    assert problem in str(info.value)


@pytest.mark.parametrize(("row", "field", "problem"), [
    ({"question": 12, "answer": "#### 3"}, "question", "is a number, not a string (write 'question' as a string)"),
    ({"question": ["q"], "answer": "#### 3"}, "question", "is a list, not a string"),
    ({"question": "q", "answer": {"n": 3}}, "answer", "is an object, not a string or a number"),
    ({"question": "q", "answer": True}, "answer", "is a boolean, not a string or a number"),
    ({"question": "q", "answer": float("nan")}, "answer", "is not a finite number"),  # Python's json reads NaN
])
def test_a_field_of_the_wrong_type_is_refused_on_its_line(tmp_path, row, field, problem):
    # {"question": 12} passed the presence check and crashed synthesis with an AttributeError
    path = _write(tmp_path / "x.jsonl", '{"question": "q", "answer": 3}\n' + json.dumps(row) + "\n")
    types = {"question": (str,), "answer": (str, int, float)}
    with pytest.raises(DataError) as info:
        read_jsonl(path, required=("question",), types=types)
    assert str(info.value).startswith(f"{path}:2: field '{field}' {problem}")
    assert (info.value.line, info.value.field) == (2, field)
    lenient = read_jsonl(path, required=("question",), types=types, lenient=True)
    assert lenient.rows == [{"question": "q", "answer": 3}] and lenient.skipped[0][0] == 2
    # an optional field may be absent or null
    _write(path, '{"question": "q"}\n{"question": "q", "answer": null}\n')
    assert len(read_jsonl(path, required=("question",), types=types)) == 2


def test_answer_zero_is_not_empty(tmp_path):
    path = _write(tmp_path / "x.jsonl", '{"question": "q", "answer": 0}\n')
    assert read_jsonl(path, required=("question", "answer")).rows == [{"question": "q", "answer": 0}]


def test_lenient_mode_skips_and_records(tmp_path):
    path = _write(
        tmp_path / "x.jsonl",
        '{"question": "q1", "answer": "1"}\n'
        "not json\n"
        '{"question": "q3"}\n'
        "[1, 2]\n"
        '{"question": "q5", "answer": "5"}\n',
    )
    result = read_jsonl(path, required=("question", "answer"), lenient=True)
    assert [r["question"] for r in result.rows] == ["q1", "q5"]
    assert result.lines == [1, 5]
    assert [line for line, _ in result.skipped] == [2, 3, 4]
    assert "not valid JSON" in result.skipped[0][1]
    assert result.skipped[1][1] == "field 'answer' is missing"


def test_required_may_be_a_single_name(tmp_path):
    path = _write(tmp_path / "x.jsonl", '{"answer": "1"}\n')
    assert read_jsonl(path, required="answer").rows == [{"answer": "1"}]


def test_missing_file_is_an_error_even_when_lenient(tmp_path):
    for lenient in (False, True):
        with pytest.raises(DataError) as info:
            read_jsonl(tmp_path / "nope.jsonl", lenient=lenient)
        assert "nope.jsonl" in str(info.value) and "not found" in str(info.value)


def test_directory_is_an_error(tmp_path):
    with pytest.raises(DataError, match="directory"):
        read_jsonl(tmp_path)


def test_bom_crlf_and_unicode(tmp_path):
    path = _write(tmp_path / "x.jsonl", '\ufeff{"a": "caf\u00e9"}\r\n{"a": "\u22125"}\r\n')
    assert read_jsonl(path).rows == [{"a": "caf\u00e9"}, {"a": "\u22125"}]


def test_invalid_utf8_names_its_line(tmp_path):
    path = _write(tmp_path / "x.jsonl", b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: .*UTF-8"):
        read_jsonl(path)


def test_write_then_read_round_trips(tmp_path):
    rows = [{"q": "caf\u00e9 \u2212 \U0001f60a", "n": 1.5, "l": [1, None, True]}, {"q": "line\nbreak"}]
    path = tmp_path / "deep" / "dir" / "out.jsonl"
    assert write_jsonl(path, rows) == 2
    assert read_jsonl(path).rows == rows
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 2 and "caf\u00e9" in text  # one row per line, UTF-8 not \u escapes


def test_write_is_atomic_when_serialization_fails(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"keep": 1}])
    with pytest.raises(DataError, match="row 1 cannot be written"):
        write_jsonl(path, [{"a": 1}, {"b": object()}])
    with pytest.raises(DataError, match="row 0 cannot be written"):
        write_jsonl(path, [{"nan": float("nan")}])  # NaN is not JSON
    assert read_jsonl(path).rows == [{"keep": 1}]
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_write_is_atomic_when_the_process_dies_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"keep": 1}])

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C between write and rename looks like

    monkeypatch.setattr(jsonl.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, [{"new": i} for i in range(1000)])
    assert read_jsonl(path).rows == [{"keep": 1}]
    assert os.listdir(tmp_path) == ["out.jsonl"]  # the temporary file is cleaned up


def test_written_file_gets_normal_permissions(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    mode = stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600
    os.chmod(path, 0o640)
    write_jsonl(path, [{"a": 2}])
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps its mode


def test_write_rejects_non_dict_rows(tmp_path):
    with pytest.raises(DataError, match="row 0 is a list"):
        write_jsonl(tmp_path / "out.jsonl", [[1, 2]])


def test_append_adds_lines_and_fsyncs(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(jsonl.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    assert append_jsonl(path, [{"i": 0}]) == 1
    assert append_jsonl(path, [{"i": 1}, {"i": 2}]) == 2
    assert append_jsonl(path, []) == 0
    assert read_jsonl(path).rows == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert len(synced) == 2


def test_append_after_a_torn_line_starts_a_new_line(tmp_path):
    path = _write(tmp_path / "log.jsonl", '{"i": 0}\n{"i": 1, "tor')
    append_jsonl(path, [{"i": 2}])
    result = read_jsonl(path, lenient=True)
    assert result.rows == [{"i": 0}, {"i": 2}]
    assert [line for line, _ in result.skipped] == [2]


def test_append_serializes_everything_before_writing(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"i": 0}])
    with pytest.raises(DataError):
        append_jsonl(path, [{"i": 1}, {"bad": {1, 2}}])
    assert read_jsonl(path).rows == [{"i": 0}]


def test_data_error_reason_and_message_without_line(tmp_path):
    err = DataError(tmp_path / "f.jsonl", None, "file not found", "check the path")
    assert str(err) == f"{tmp_path / 'f.jsonl'}: file not found (check the path)"
    assert err.reason == "file not found"
    assert isinstance(err, ValueError)
    json.dumps({"error": str(err)})


# --------------------------------------------------------------------------------------------
# one row per line for every line splitter; torn tails; what JSON cannot hold
# --------------------------------------------------------------------------------------------

#: Every character str.splitlines breaks a line at (U+000A..000D, 001C..001E, 0085, 2028, 2029),
#: found by asking it rather than from a list that could go stale.
SPLITTERS = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and len(f"a{chr(c)}b".splitlines()) > 1]


def test_the_writer_escapes_every_character_any_line_splitter_breaks_at(tmp_path):
    assert {"\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"} <= set(SPLITTERS)
    rows = [{"question": f"before{c}after", c: "as a key"} for c in SPLITTERS]
    path = tmp_path / "out.jsonl"
    write_jsonl(path, rows)
    append_jsonl(path, rows)
    text = path.read_text(encoding="utf-8")
    assert not set(text) & (set(SPLITTERS) - {"\n"})
    # str.splitlines (the old resume reader), text mode and JSON readers all see one row per line
    assert [json.loads(line) for line in text.splitlines()] == rows + rows
    with open(path, encoding="utf-8") as fh:
        assert len(fh.readlines()) == 2 * len(rows)
    assert read_jsonl(path).rows == rows + rows


def test_datasets_loads_a_file_with_line_separators(tmp_path):
    import datasets

    rows = [{"question": f"a{c}b", "answer": "#### 1"} for c in ("\u2028", "\u2029", "\x85", "\x0c")]
    write_jsonl(tmp_path / "kept.jsonl", rows)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "kept.jsonl"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.to_list() == rows


@pytest.mark.parametrize(("row", "where"), [
    ({"scores": {"reward": float("nan")}}, "scores.reward' is nan"),
    ({"l": [1.0, float("inf")]}, "l[1]' is inf"),
    ({"q": "ok", "t": "bad \ud800 text"}, "t' holds a lone surrogate U+D800"),
    ({"nested": [{"\udfff": 1}]}, "nested[0].\udfff (a key)' holds a lone surrogate U+DFFF"),
])
def test_unstorable_values_are_refused_naming_the_field_and_nothing_is_written(tmp_path, row, where):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"keep": 1}])
    for write in (write_jsonl, append_jsonl):
        with pytest.raises(DataError) as info:
            write(path, [{"fine": 1}, row])
        assert "row 1 cannot be written: field '" + where in str(info.value)
        assert "nothing was written" in str(info.value)
    assert path.read_bytes() == b'{"keep": 1}\n'


def test_read_appended_drops_only_a_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = [{"q": "caf\u00e9 \u2028 \U0001f9ee", "i": i} for i in range(3)]
    write_jsonl(path, rows)
    whole = path.read_bytes()
    assert jsonl.read_appended(path) == (jsonl.JsonlResult(rows, [], [1, 2, 3]), False)
    # cut inside the last row's 4-byte emoji: the old resume reader raised UnicodeDecodeError here
    cut = whole.rindex("\U0001f9ee".encode()) + 2
    _write(path, whole[:cut])
    result, torn = jsonl.read_appended(path)
    assert (result.rows, torn) == (rows[:2], True)
    # the newline alone lost: the row is whole, and kept
    _write(path, whole[:-1])
    assert jsonl.read_appended(path)[0].rows == rows
    # a file's only row, with a byte-order mark and no newline, is whole too (it was read as torn)
    _write(path, "\ufeff" + json.dumps(rows[0]))
    assert jsonl.read_appended(path) == (jsonl.JsonlResult(rows[:1], [], [1]), False)
    # a missing file is empty, not an error (a run that has not written yet)
    assert jsonl.read_appended(tmp_path / "none.jsonl") == (jsonl.JsonlResult(), False)


@pytest.mark.parametrize(("content", "problem"), [
    (b'{"i": 0}\n{"i": "\xe2\x80"}\n{"i": 2}\n', ":2: is not valid UTF-8"),  # a torn character, mid-file
    (b'{"i": 0}\n{"i": 1, "tor\n{"i": 2}\n', ":2: is not valid JSON"),
    (b'{"i": 0}\n[1, 2]', ":2: holds a list"),  # a last line that parses is whole, so checked
    # whole but unreadable: no torn write
    pytest.param(b'{"i": 0}\n{"i": 1' + b"0" * 5000 + b"}", ":2: cannot be read", marks=NEEDS_INT_LIMIT),
])
def test_read_appended_refuses_damage_anywhere_but_the_tail(tmp_path, content, problem):
    path = _write(tmp_path / "log.jsonl", content)
    with pytest.raises(DataError, match=f"log.jsonl{problem}"):
        jsonl.read_appended(path)
