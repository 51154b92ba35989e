"""Pathological model text through everything that reads it: extraction, the calculator, scorers.

Run: pytest tests/test_fuzz_text.py

The reproductions from issue #12 are plain regression tests (each failed on the code before the fix:
it hung past its budget or raised).  The hypothesis properties feed generated text (long runs of
digits, commas, operators, ``*`` and letters, nested brackets, huge numbers, every Unicode line
separator, lone surrogates, NaN/inf spelled out) and check that nothing raises but the documented
error, that the results agree with each other, and that every call ends within a wall-clock budget.
The budget is a no-hang guard, not a speed claim: calls take milliseconds, the budget is seconds
(``bench/score_adversarial_bench.py`` measures speed).
"""

from __future__ import annotations

import json
import os
import re
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from no_hang import budget

from synthtune.config import SynthConfig
from synthtune.data.answers import (
    ANSWER_WINDOW,
    CONTINUATION_RE,
    MAX_NUMBER_CHARS,
    _continuation_start,
    extract_answer,
    extract_flexible,
    extract_gold,
    extract_strict,
    is_computed,
    is_correct,
    normalize_number,
    trim_completion,
)
from synthtune.data.calculator import MAX_DIGITS, CalcError, CalcLimit, check_calculations, exact_value
from synthtune.data.lmeval_gsm8k import INVALID, exact_match, flexible_extract, lm_eval_score, strict_match
from synthtune.data.validate import check_file
from synthtune.formats import rationalization_hint
from synthtune.generation.sampler import Sample
from synthtune.synth.pipeline import STATUS, evaluate_question, load_items, run_synthesis
from synthtune.synth.prompts import leaks_hint
from synthtune.synth.scorers import calculator_score, gold_correctness, guarded, vote_share
from synthtune.synth.scoring import score_rows

# Calls on 100 KB take milliseconds; the code before the fix took minutes to hours on the same inputs.


EXTRACTORS = (extract_answer, extract_strict, extract_flexible, extract_gold, normalize_number, trim_completion,
              strict_match, flexible_extract)


# --- the reproductions ---------------------------------------------------------------------

def test_a_long_word_after_a_short_answer_line():
    # "A: 5 " + 200 letters + "," took 4 s, 300 letters 20 s, and the growth was polynomial.
    with budget():
        assert extract_answer("A: 5 " + "b" * 300 + ",") == "5"
    with budget():
        assert extract_answer("A: 5 " + "b" * 8000 + ",") == "5"
    with budget():
        out, summary = score_rows([{"question": "q", "answer": "5", "completions": ["A: 5 " + "b" * 300 + ","]}])
    assert out[0]["extracted"] == ["5"] and summary["accuracy"] == 1.0


@pytest.mark.parametrize(
    "text",
    ["12," * 33_334, "1" + "*" * 100_000, "1 " + "* " * 50_000, "A: 5 " + "b" * 100_000 + ","],
    ids=["digit-groups", "star-run", "spaced-stars", "long-word"],
)
def test_quadratic_shapes_of_100kb(text):
    # Each took over a minute before (the continuation cut rescanned star runs from every star, digit
    # groups rescanned the rest of the run from every number).
    with budget():
        for extract in EXTRACTORS:
            extract(text)
        check_calculations(text)
        leaks_hint(text, rationalization_hint("5"))  # synthesis reads every rationale for the hint
        leaks_hint("hint" * 25_000, text)  # and a hostile gold answer makes a hostile hint
        is_computed(text, "5")  # and for a calculation that computes the answer
        is_computed("= " * 50_000 + "=" + "1," * 20_000, "5")


def test_a_cut_off_repetition_of_long_digit_groups():
    # Repairing a cut-off last number read the whole digit run after every earlier occurrence of the
    # words before it; the repair still reads "123" for the "1" the text was cut in, as it did.
    with budget():
        assert extract_answer("123," * 2000 + "1") == "123"


def test_nested_powers_are_an_error_found_at_once():
    # Bounding only exponents let a power of a power grow: 4 levels ran for seconds, then int->str raised.
    for depth in (3, 4, 5):
        expression = "(" * (depth - 1) + "10**64" + "".join(")**64" for _ in range(depth - 1))
        with budget():
            report = check_calculations(f"<<{expression}=1>>")
        assert (report.n_checked, report.n_correct) == (1, 0)
        assert f"more than {MAX_DIGITS} digits" in report.errors[0]
        with budget(), pytest.raises(CalcError, match="more than 1000 digits"):
            exact_value(expression)


def test_values_past_float_and_int_str_limits_are_reported_not_raised():
    # float() of a huge fraction raised OverflowError, str() of a 4,300+ digit integer ValueError.
    report = check_calculations("<<(10**64)**5/3=1>>")
    assert report.errors == ["<<(10**64)**5/3=1>>: (10**64)**5/3 is 3.33333e+319, not 1"]
    big = "9" * 5000
    report = check_calculations(f"<<{big}+1=1>>")
    assert report.n_checked == 0 and report.errors == [] and "longer than 2000 characters" in report.unchecked[0]
    for prose in (f"{big} + 1 = 2", f"1 {big}/{big}1 + 1 = 2", f"{big}/{big} = 1"):
        report = check_calculations(prose)  # a number too long to read: the equation is not checked
        assert report.n_checked == 0 and report.errors == []
    with pytest.raises(CalcLimit, match="number longer than 1000 digits"):
        exact_value("1" * 1500)
    for text in (f"1/{2**13000}", big, f"#### {big}", f"The answer is {big}."):
        for extract in EXTRACTORS:
            extract(text)  # no 4,300-digit str() anywhere
    assert extract_answer(f"So 5 + 5 = 10, then 1/{2**13000}") == "10"  # a number too long is no number


def test_score_and_data_check_go_on_past_pathological_rows(tmp_path):
    hostile = ["<<(((10**64)**64)**64)**64=1>>\n#### 1", "A: 5 " + "b" * 5000 + ",", "1" + "*" * 50_000,
               "<<" + "9" * 5000 + "+1=1>>", "12," * 20_000]
    rows = [{"question": f"q{i}", "answer": f"#### {i}", "completions": [text, "#### 1"]} for i, text in enumerate(hostile)]
    with budget():
        out, summary = score_rows(rows)
    assert summary["n_completions"] == 10 and "n_failed" not in summary
    assert out[0]["extracted"] == ["1", "1"] and out[1]["extracted"] == ["5", "1"]

    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": text}) + "\n" for i, text in enumerate(hostile)))
    with budget():
        report = check_file(path, lenient=True)
    assert report["n_rows"] == 5 and report["calc_unchecked"] == 3  # the 5,000 digits and two texts past 16 KB
    assert any("more than 1000 digits" in p for p in report["problems_preview"])


class _HostileBackend:
    """Always the same completions, as a deterministic backend would sample them on every resume."""

    name = model_name = "hostile"
    tokenizer = None
    is_seq2seq = False

    def sample(self, prompts, params):
        texts = ["<<(((10**64)**64)**64)**64=1>>\n#### 1", "<<(10**64)**5/3=1>>\n#### 2", "A: 5 " + "b" * 3000 + ","]
        return [[Sample(texts[i % len(texts)], 10, "eos") for i in range(params.num_samples)] for _ in prompts]


def test_synthesis_runs_through_text_that_crashed_the_calculator(tmp_path):
    cfg = SynthConfig(questions="bundled:train", out=str(tmp_path / "run"), k=3, rounds=1, batch_size=4, shots=2,
                      exemplar_pool_size=12, prompt_format="plain", limit=4)
    with budget(60):
        summary = run_synthesis(cfg, backend=_HostileBackend(), progress=False, log=lambda m: None)
    assert summary["questions"] == 4 and summary["stages"]["sampled"] == 12
    status = [json.loads(line) for line in (tmp_path / "run" / STATUS).read_text().splitlines()]
    assert len(status) == 4 and not any("scorer_failures" in s for s in status)


def test_a_failing_scorer_fails_its_completion_and_says_why(tmp_path):
    cfg = SynthConfig(questions="bundled:train", out=str(tmp_path / "run"), k=3, rounds=1, shots=2,
                      exemplar_pool_size=12, prompt_format="plain")
    item = load_items(cfg)[0][0]
    gold = item.gold.split("####")[-1].strip()
    samples = [Sample(f"So it is {gold}.\n#### {gold}", 5, "eos"), Sample(f"The answer is {gold}.", 5, "eos")]

    def reward(question, completions, gold=None):  # a user's scorer with a bug on some inputs
        return [float(c.rsplit("is", 1)[1].strip(" .")) / 100 for c in completions]

    kept, status, scores = evaluate_question(item, samples, cfg, [], reward_fn=reward)
    assert kept == [1] and scores["reward"] == [None, float(gold) / 100]
    assert status["scorer_failures"] == [
        {"scorer": "reward", "sample": 0, "reason": f"ValueError: could not convert string to float: '{gold}.\\n#### {gold}'"}]
    assert status["stages"]["reward_ok"] == 1

    always = guarded(lambda q, cs, g=None: [1 / 0 for _ in cs], failed=0.0)("q", ["a", "b"])
    assert list(always) == [0.0, 0.0] and always.failures == {0: "ZeroDivisionError: division by zero"} | {
        1: "ZeroDivisionError: division by zero"}
    empty = guarded(lambda q, cs, g=None: [])("q", ["a", "b"])
    assert list(empty) == [None, None] and empty.failures[1] == "ValueError: returned 0 scores for 1 completion"


def test_builtin_scorers_on_pathological_completions():
    texts = ["<<(((10**64)**64)**64)**64=1>>", "A: 5 " + "b" * 5000 + ",", "\ud800 #### 7 \udfff", "nan", "inf"]
    with budget():
        calc = calculator_score("q", texts)
        gold = gold_correctness("q", texts, "#### 7")
        share = vote_share("q", texts)
    assert list(calc) == [0.0, None, None, None, None] and not calc.failures
    assert list(gold) == [0.0, 0.0, 1.0, 0.0, 0.0] and list(share) == [0.2, 0.2, 0.2, None, None]


# --- generated text --------------------------------------------------------------------------------

LINE_SEPARATORS = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
PIECES = [
    "1", "12", "123", "0", "9" * 40, "12,", "123,", "1,", ",", ".", "1.", "1/", "/", " ", "\t", "  ", "b", "b ", "ab",
    "*", "**", "* ", "+", "-", "\u2212", "x", " x ", "×", "÷", "^", "=", " = ", "%", "$", "€", "(", ")", "((", "))",
    "[", "]", "{", "}", "<<", ">>", "#", "####", "#### ", "A: ", "A:", "The answer is ", "the final answer is ",
    "Answer: ", "answer to the ", "ans. ", "\\boxed{", "\\boxed ", "\\frac{", "}{", "\\text{", "\\,", "{,}",
    "Question:", "\nQuestion 2:", "**Q:**", ". Problem:", "User：", "<|im_end|>", "</s>", "[INST]", "Step 1:",
    "1st ", "3rd", "March 5, 2021", "12/05/2021", "10:30 am", "1 1/2", "2 and 1/3", " million", " thousand",
    "NaN", "nan", "inf", "-inf", "Infinity", "1e308", "1e-400", "١٢٣", "１２", "½", "²", "\ud800", "\udfff",
    "\ud83d", "10**64", "**64", "9**9**9", "= 1 in ", "remainder", " r 1", "cents", " and ", "if the answer is ",
    *LINE_SEPARATORS,
]
# Well-formed answers and calculations, so the generated text also exercises what parses.
SNIPPETS = [
    "#### 72", "#### 1,234.50\n", "<<48/2=24>>24", "<<(1+2)*3=9>>", "<<10/3=3.33>>", "<<2**10=1024>>", "<<1/0=1>>",
    "5 * $3 = $15. ", "12 x 4 = 46\n", "16 - 3 - 4 = 9 eggs", "20% * 50 = 10", "The answer is 18.", "\\boxed{42}",
    "A: 18\n", "**Final Answer:** $1.5 million", "the answer is 16 - 3 - 4 = 9.", "\\frac{3}{4}", "1. First\n2.",
]


@st.composite
def hostile_text(draw, max_parts: int = 6, max_repeat: int = 3000) -> str:
    """Up to ``max_parts`` pieces, each a token repeated up to ``max_repeat`` times or free text."""
    run = st.tuples(st.sampled_from(PIECES), st.integers(1, max_repeat)).map(lambda t: t[0] * t[1])
    free = st.text(alphabet=st.characters(codec=None), max_size=30)
    snippet = st.sampled_from(SNIPPETS)
    parts = draw(st.lists(st.one_of(run, run, snippet, st.sampled_from(PIECES), free), max_size=max_parts))
    return "".join(parts)


# 60 examples per property keep the file under 30 s on 2 cores; SYNTHTUNE_FUZZ_EXAMPLES=2000 fuzzes longer.
FUZZ = settings(max_examples=int(os.environ.get("SYNTHTUNE_FUZZ_EXAMPLES", "60")), deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])


@FUZZ
@given(hostile_text())
def test_extraction_never_raises_and_its_results_agree(text):
    with budget():
        answer, strict, flexible = extract_answer(text), extract_strict(text), extract_flexible(text)
        gold, normalized, trimmed = extract_gold(text), normalize_number(text), trim_completion(text)
    for value in (answer, strict, flexible, gold, normalized):
        assert value is None or isinstance(value, str)
        if value is not None and len(value) <= MAX_NUMBER_CHARS:
            assert normalize_number(value) == value  # canonical text is a fixed point
    assert text.startswith(trimmed)
    if flexible is None:  # no number at all: no marker can have one either
        assert answer is None and strict is None
    if strict is not None:
        assert "####" in text
    if answer is not None and len(answer) <= MAX_NUMBER_CHARS:
        assert is_correct(text, answer)


@FUZZ
@given(hostile_text(), hostile_text(max_parts=3))
def test_lm_eval_figures_on_hostile_text(text, gold):
    # lm-eval's own gold normalization ("(?s).*#### ") is quadratic; ours must stay linear on both sides
    with budget():
        result = lm_eval_score(text, gold)
        assert result.strict_correct == exact_match(result.strict, gold)
        assert result.flexible_correct == exact_match(result.flexible, gold)
    assert result.strict == INVALID or f"#### {result.strict}" in text
    assert result.flexible == INVALID or result.flexible in text


@FUZZ
@given(hostile_text(max_repeat=200), st.integers(0, 5))
def test_the_label_scan_finds_what_the_continuation_pattern_finds(text, offset):
    for pos in {0, min(offset, len(text)), (m.end() if (m := re.search(r"\d", text)) else 0)}:
        with budget():
            expected = CONTINUATION_RE.search(text, pos)
            assert _continuation_start(text, pos) == (expected.start() if expected else None)


@FUZZ
@given(hostile_text(max_repeat=100), st.integers(1, 2 * ANSWER_WINDOW))
@example("1. First\n2. ", 1)  # found by this test: trailing whitespace moved the window's edge
def test_only_the_end_of_a_long_completion_decides(text, extra):
    # Letters before the answer text push the text past the window without adding numbers or labels;
    # the window's edge falls in them, and they are dropped up to the space. The window is taken after
    # trimming (a stop at a new block, trailing whitespace), so the letters must outrun the trimmed tail:
    # measured on the untrimmed tail, a cut of 1 could land past the letters ("1. First\n2. " -> '2').
    tail = " " + text[-(ANSWER_WINDOW - 1):]
    long = "b" * (ANSWER_WINDOW - len(trim_completion(tail)) + extra) + tail
    with budget():
        for extract in (extract_answer, extract_strict, extract_flexible):
            assert extract(long) == extract(tail)


@FUZZ
@given(hostile_text())
def test_the_calculator_check_never_raises(text):
    with budget():
        report = check_calculations(text)
    assert 0 <= report.n_correct <= report.n_checked
    assert len(report.errors) == report.n_checked - report.n_correct
    assert (report.fraction is None) == (report.n_checked == 0)
    assert all(isinstance(m, str) for m in report.errors + report.unchecked)


@FUZZ
@given(hostile_text(max_parts=8, max_repeat=40), st.booleans())
def test_evaluate_raises_only_its_own_error(text, prose):
    with budget():
        try:
            value = exact_value(text, prose=prose)
        except CalcError:
            return
    assert isinstance(value, Fraction)
    assert max(abs(value.numerator), value.denominator) < 10**MAX_DIGITS


@FUZZ
@given(st.integers(-(10**6), 10**6), st.lists(st.integers(-70, 70), min_size=1, max_size=6))
def test_power_towers_are_refused_or_bounded(base, exponents):
    expression = "(" * len(exponents) + str(base) + "".join(f")**{e}" for e in exponents)
    with budget():
        try:
            value = exact_value(expression)
        except CalcError:
            return
    assert max(abs(value.numerator), value.denominator) < 10**MAX_DIGITS


def _leaf(n: int) -> tuple[str, Fraction | None]:
    return str(n), Fraction(n)


def _combine(pair) -> tuple[str, Fraction | None]:
    (left, lv), op, (right, rv) = pair
    if lv is None or rv is None:
        value = None
    elif op == "/":
        value = lv / rv if rv != 0 else None
    else:
        value = {"+": lv + rv, "-": lv - rv, "*": lv * rv}[op]
    return f"({left} {op} {right})", value


def _power(pair) -> tuple[str, Fraction | None]:
    (text, value), exponent = pair
    return f"{text}**{exponent}", value**exponent


_EXPRESSIONS = st.recursive(
    st.integers(0, 10**6).map(_leaf) | st.tuples(st.integers(0, 999).map(_leaf), st.integers(0, 3)).map(_power),
    lambda inner: st.tuples(inner, st.sampled_from("+-*/"), inner).map(_combine),
    max_leaves=12,
)


@FUZZ
@given(_EXPRESSIONS)
def test_evaluate_is_exact_arithmetic(expression):
    text, expected = expression
    with budget():
        if expected is None:  # a division by zero somewhere
            with pytest.raises(CalcError, match="division by zero"):
                exact_value(text)
        else:
            assert exact_value(text) == expected
            assert check_calculations(f"<<{text}={expected.numerator}/{expected.denominator}>>").n_correct == 1


def test_window_and_bounds_are_what_the_docs_say():
    assert ANSWER_WINDOW == 8192 and MAX_NUMBER_CHARS == 100 and MAX_DIGITS == 1000
    head = "#### 1\n" + "b " * (ANSWER_WINDOW // 2)  # the marker falls out of the window
    assert extract_answer(head + "so 7 it is") == "7"
    assert extract_answer("#### 1\n" + "b " * 100 + "so 7 it is") == "1"
