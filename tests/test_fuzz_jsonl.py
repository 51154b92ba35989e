"""Property tests of the JSONL writer and readers (hypothesis).

Run: pytest tests/test_fuzz_jsonl.py

* Any dict of strings, numbers, lists and nested dicts round-trips through write_jsonl /
  append_jsonl and both readers, one row per line for every line splitter, whatever characters
  the strings hold: every Unicode line break, controls, non-characters, astral characters.
* What JSON or UTF-8 cannot hold (NaN and infinities, lone surrogates) is refused with a
  DataError and the file is left exactly as it was.
* A written file cut at ANY byte offset (a crash mid-append, a full disk) reads back, with
  ``read_appended``, as the rows wholly before the cut, the torn one dropped: never an exception.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthtune.data.jsonl import append_jsonl, read_appended, read_jsonl, write_jsonl
from synthtune.errors import DataError

# Characters line splitters break at, and others that have broken JSONL tools: the BOM, NUL,
# a bare CR, RTL overrides, non-characters, astral-plane text.
SPECIAL = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\ufeff\x00\u202e\ufffe\U0001f9ee\U0010ffff\"\\"
# Any code point, surrogates included (st.characters leaves category Cs out unless asked).
ANY_CHAR = st.one_of(st.characters(codec=None, exclude_categories=()), st.sampled_from(SPECIAL))
TEXT = st.text(ANY_CHAR, max_size=12)
SAFE_TEXT = st.text(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(SPECIAL)), max_size=12)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
ROWS = st.lists(st.dictionaries(TEXT, VALUE, max_size=4), max_size=4)
SAFE_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), SAFE_TEXT)
SAFE_ROWS = st.lists(st.dictionaries(SAFE_TEXT, st.one_of(SAFE_SCALAR, st.lists(SAFE_SCALAR, max_size=2)),
                                     max_size=3), min_size=1, max_size=3)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _unstorable(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_unstorable(k) or _unstorable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_unstorable(v) for v in value)
    return False


@FUZZ
@given(rows=ROWS, appended=ROWS)
def test_any_rows_round_trip_or_are_refused_whole(rows, appended):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_bytes(b'{"before": 1}\n')
        expected = [{"before": 1}]
        for write, batch in ((append_jsonl, rows), (append_jsonl, appended), (write_jsonl, expected + rows)):
            before = path.read_bytes()
            if any(_unstorable(r) for r in batch):
                try:
                    write(path, batch)
                except DataError as err:
                    assert "cannot be written" in str(err) and "nothing was written" in str(err)
                else:
                    raise AssertionError("an unstorable row was written")
                assert path.read_bytes() == before
                continue
            write(path, batch)
            expected = batch if write is write_jsonl else expected + batch
            data = path.read_bytes()
            text = data.decode("utf-8")  # strict: every byte written is valid UTF-8
            # one row per line for every splitter: bytes on b"\n", str.splitlines, and JSON per line
            assert data.count(b"\n") == len(text.splitlines()) == len(expected)
            assert [json.loads(line) for line in text.splitlines()] == expected
            assert read_jsonl(path).rows == expected
            assert read_appended(path)[0].rows == expected


# Every cut of every example is read back, so fewer examples cover thousands of cuts.
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=SAFE_ROWS)
def test_a_file_cut_at_any_byte_reads_as_the_rows_before_the_cut(rows):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        write_jsonl(path, rows)
        data = path.read_bytes()
        ends = []  # byte offset where each row's JSON ends (before its "\n")
        for i, b in enumerate(data):
            if b == 0x0A:
                ends.append(i)
        assert len(ends) == len(rows)
        for cut in range(len(data), -1, -1):  # shortening the file in place, as a crash leaves it
            os.truncate(path, cut)
            result, torn = read_appended(path)
            whole = sum(1 for end in ends if end <= cut)
            assert result.rows == rows[:whole], cut
            # torn: bytes of a row were cut, i.e. something follows the last whole row's end
            last_end = ends[whole - 1] + 1 if whole else 0
            assert torn == (cut > last_end and whole < len(rows) and data[last_end:cut] != b""), cut
