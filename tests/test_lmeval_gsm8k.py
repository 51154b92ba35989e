"""lm-evaluation-harness's gsm8k figures, re-derived (synthtune/data/lmeval_gsm8k.py), beside ours.

Run: pytest tests/test_lmeval_gsm8k.py --doctest-modules synthtune/data/lmeval_gsm8k.py

The table's expected values are worked out by hand from the rules of lm-eval's gsm8k task config
(stop at "Question:", "</s>", "<|im_end|>"; strict-match: first ``#### (\\-?[0-9\\.\\,]+)``;
flexible-extract: last ``(-?[$0-9.,]{2,})|(-?[0-9]+)``; exact_match after dropping ``,``, ``$``,
everything up to the last ``#### ``, a final ``.``, ignoring case). Where lm-eval is installed, the
same table and generated text also go through lm-eval's own filter and metric classes (its task file
read from the installed package), which must agree with ours on every input.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from no_hang import budget

from synthtune.data.answers import is_correct
from synthtune.data.lmeval_gsm8k import (
    FLEXIBLE_RE,
    INVALID,
    STOP,
    STRICT_RE,
    cut_at_stop,
    exact_match,
    flexible_extract,
    lm_eval_score,
    strict_match,
)
from synthtune.synth.scoring import score_rows

HAVE_LM_EVAL = find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed")

GOLD_42 = "6 boxes of 7 is 6 * 7 = <<6*7=42>>42 eggs.\n#### 42"

# (completion, gold, strict-match's text, flexible-extract's text, strict right, flexible right, ours right)
CASES = [
    # the forms the two disagree on: lm-eval needs "#### " then the number's exact text
    ("6 * 7 = 42\n####42", GOLD_42, INVALID, "42", False, True, True),
    ("#### $42", GOLD_42, INVALID, "$42", False, True, True),
    ("#### **42**", GOLD_42, INVALID, "42", False, True, True),
    ("#### 42.00", GOLD_42, "42.00", "42.00", False, False, True),
    ("The total is $1,234.50.", "... = 1234.5\n#### 1234.5", INVALID, "$1,234.50.", False, False, True),
    ("#### 1,234.50", "#### 1234.5", "1,234.50", "1,234.50", False, False, True),
    ("She ate 3/4 of it.", "#### 0.75", INVALID, "4", False, False, True),
    ("#### \u22125", "#### -5", INVALID, "5", False, False, True),  # a Unicode minus is not "-"
    ("The answer is $\\boxed{42}$.", GOLD_42, INVALID, "$.", False, False, True),  # "$." is a number run
    # the forms both read alike
    ("6 * 7 = 42\n#### 42", GOLD_42, "42", "42", True, True, True),
    ("#### 42.", GOLD_42, "42.", "42.", True, True, True),  # a final "." is dropped from both sides
    ("#### 1,234", "... #### 1,234", "1,234", "1,234", True, True, True),
    ("#### -5", "#### -5", "-5", "-5", True, True, True),
    ("So she has 42 eggs.", GOLD_42, INVALID, "42", False, True, True),
    ("#### 5\n#### 6", "#### 5", "5", "6", True, False, False),  # strict takes the first, flexible the last
    ("The answer is 18.\n\nStep 3:", "#### 18", INVALID, "3", False, False, True),
    # lm-eval's stop sequences cut first: nothing after them counts
    ("#### 7\n\nQuestion: Tom has 9 cats. #### 9", "#### 7", "7", "7", True, True, True),
    ("7 apples</s>#### 9", "#### 7", INVALID, "7", False, True, True),
    ("It is 7.<|im_end|>\n8", "#### 7", INVALID, "7.", False, True, True),
    # golds: the whole answer field, a number as str() renders it (as lm-eval's "{{answer}}" does)
    ("#### 72", 72, "72", "72", True, True, True),
    ("#### 72", 72.0, "72", "72", False, False, True),  # "72.0" is not the text "72"
    ("No numbers here.", GOLD_42, INVALID, INVALID, False, False, False),
    # a string match ignoring case: even the fallback matches a gold that spells it
    ("no answer", "#### [INVALID]", INVALID, INVALID, True, True, False),
]


@pytest.mark.parametrize(("completion", "gold", "strict", "flexible", "strict_ok", "flexible_ok", "ours"), CASES,
                         ids=range(len(CASES)))
def test_lm_eval_figures_by_its_rules(completion, gold, strict, flexible, strict_ok, flexible_ok, ours):
    result = lm_eval_score(completion, gold)
    assert (result.strict, result.flexible) == (strict, flexible)
    assert (result.strict_correct, result.flexible_correct) == (strict_ok, flexible_ok)
    assert is_correct(completion, gold) is ours  # our own reading, by value, for contrast


def test_exact_match_normalizes_both_sides_in_lm_evals_order():
    assert exact_match("1,234", "Total: 1,234 coins.\n#### 1,234")
    assert exact_match("$5", "#### 5") and exact_match("5.", "#### 5.")
    # "$" in "\.$" also matches before a final newline, which itself stays: a gold ending in "\n" never
    # equals a filtered prediction (a newline is in neither filter's character class)
    assert exact_match("5\n", "#### 5.\n") and not exact_match("5", "#### 5\n")
    assert exact_match("12", "#### 3 apples #### 12")  # everything up to the *last* "#### " goes
    assert exact_match("5", "###,# 5")  # commas go first, so they can join a "#### "
    assert not exact_match("5.0", "#### 5") and not exact_match("-5", "#### 5")


def test_cut_and_filters_on_edge_text():
    assert cut_at_stop("a</s>b<|im_end|>c") == "a" and cut_at_stop("aQuestion:b") == "a"
    assert strict_match("#### -.,") == "-.,"  # any run of those characters is a strict "number"
    assert flexible_extract("--5") == "-5" and flexible_extract("x 1 y") == "1" and flexible_extract("5,") == "5,"
    for value in (None, 42, ["#### 1"]):  # lm-eval scores a non-string response as ""
        assert strict_match(value) == INVALID and flexible_extract(value) == INVALID  # type: ignore[arg-type]


def test_score_reports_lm_evals_figures_beside_ours():
    completions = [c for c, gold, *_ in CASES if gold == GOLD_42]
    out, summary = score_rows([{"question": "How many eggs?", "answer": GOLD_42, "completions": completions}])
    expected = [lm_eval_score(c, GOLD_42) for c in completions]
    assert out[0]["lm_eval_filtered"] == {"strict-match": [r.strict for r in expected],
                                          "flexible-extract": [r.flexible for r in expected]}
    assert out[0]["lm_eval_correct"] == {"strict-match": [r.strict_correct for r in expected],
                                         "flexible-extract": [r.flexible_correct for r in expected]}
    n = len(completions)  # lm-eval: strict 2 of the 9 ("#### 42", "#### 42."), flexible 6
    assert (n, sum(r.strict_correct for r in expected), sum(r.flexible_correct for r in expected)) == (9, 2, 6)
    assert summary["lm_eval_strict_match"] == 2 / n and summary["lm_eval_flexible_extract"] == 6 / n
    assert summary["strict_accuracy"] == 6 / n and summary["accuracy"] == 8 / n  # ours, by value


# --- lm-eval itself as the oracle -----------------------------------------------------------------

def _lm_eval_task() -> dict:
    import lm_eval
    import yaml

    path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    return yaml.safe_load(path.read_text())


def _lm_eval_reference(completion: str, gold: str) -> tuple[str, str, bool, bool]:
    """The completion through lm-eval's own gsm8k pipeline: the task's stop sequences as its HF model
    applies them, its RegexFilter and take_first, and its exact_match with the task's arguments."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    task = _lm_eval_task()
    for stop in task["generation_kwargs"]["until"]:
        completion = completion.split(stop)[0]
    filters = {f["name"]: f["filter"][0] for f in task["filter_list"]}
    metric = {k: v for k, v in task["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    out = []
    for name in ("strict-match", "flexible-extract"):
        spec = filters[name]
        regex = RegexFilter(regex_pattern=spec["regex_pattern"], group_select=spec.get("group_select", 0))
        out.append(list(regex.apply([[completion]], [{}]))[0][0])
    scores = [exact_match_hf_evaluate(predictions=[p], references=[gold], **metric)["exact_match"] == 1.0 for p in out]
    return out[0], out[1], scores[0], scores[1]


@needs_lm_eval
def test_constants_are_lm_evals_gsm8k_task():
    task = _lm_eval_task()
    assert tuple(task["generation_kwargs"]["until"]) == STOP
    filters = {f["name"]: f["filter"] for f in task["filter_list"]}
    assert filters["strict-match"][0]["regex_pattern"] == STRICT_RE.pattern
    assert filters["flexible-extract"][0]["regex_pattern"] == FLEXIBLE_RE.pattern
    assert filters["flexible-extract"][0]["group_select"] == -1
    assert [f[1]["function"] for f in filters.values()] == ["take_first", "take_first"]
    metric = task["metric_list"][0]
    assert metric["regexes_to_ignore"] == [",", "\\$", "(?s).*#### ", "\\.$"]
    assert (metric["ignore_case"], metric["ignore_punctuation"]) == (True, False)


@needs_lm_eval
@pytest.mark.parametrize("case", CASES, ids=range(len(CASES)))
def test_the_table_is_what_lm_eval_computes(case):
    completion, gold, strict, flexible, strict_ok, flexible_ok, _ = case
    assert _lm_eval_reference(completion, str(gold)) == (strict, flexible, strict_ok, flexible_ok)


PIECES = ["#", "####", "#### ", " ", "\n", "$", ",", ".", "-", "\u2212", "0", "1", "42", "1,234", "3/4", "**",
          "\\boxed{", "}", "Question:", "</s>", "<|im_end|>", "The answer is ", "[invalid]", "INVALID", "\0", "\u212a",
          "\u0130", "x", "A"]
_text = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=12).map("".join)
# 60 examples keep this under a few seconds; SYNTHTUNE_FUZZ_EXAMPLES=2000 compares longer.
FUZZ = settings(max_examples=int(os.environ.get("SYNTHTUNE_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                print_blob=True, suppress_health_check=[HealthCheck.too_slow])


@needs_lm_eval
@FUZZ
@given(_text, _text, st.booleans())
@example("#### 5.\0", "#### 5", True)  # numpy drops trailing NULs, after the first substitution
def test_generated_text_scores_as_lm_eval_scores_it(completion, gold, gold_from_completion):
    if gold_from_completion:  # a gold built from the completion's own text, so matches happen often
        gold = "... #### " + completion
    result = lm_eval_score(completion, gold)
    assert (result.strict, result.flexible, result.strict_correct, result.flexible_correct) == \
        _lm_eval_reference(completion, gold)


def _last_of_findall(text: str) -> str:
    """flexible-extract the way lm-eval computes it: every match of its pattern, then the last."""
    found = FLEXIBLE_RE.findall(text)
    return next((g for g in found[-1] if g), INVALID) if found else INVALID


LONG = ["b" * 700, "1" * 700, "1," * 350, " " * 1000, "$ " * 600, "-" * 800, "$" * 900, "-1" * 400, "$-" * 400, "1-" * 400,
        "-$$" * 300]


@FUZZ
@given(st.lists(st.sampled_from(PIECES + LONG), max_size=10).map("".join))
@example("12 " + "b" * 5000)  # the last number lies far before the tail scanned first
@example("x" + "1," * 3000)  # one run longer than the tail
@example("5 " + "$ " * 4000)  # thousands of runs that are no match
def test_the_last_match_found_from_the_end_is_the_last_one_of_the_whole_scan(text):
    text = cut_at_stop(text)
    assert flexible_extract(text) == _last_of_findall(text)


# --- linear time on hostile text (see tests/test_fuzz_text.py) -------------------------------------



MB = 1_000_000


@pytest.mark.parametrize(
    ("text", "strict", "flexible", "flexible_ok"),
    [("1" * MB, INVALID, "1" * MB, True), ("-$" * (MB // 2), INVALID, INVALID, False), ("1 " * (MB // 2), INVALID, "1", False),
     ("#### " * (MB // 5), INVALID, INVALID, False), ("###" + " 1" * (MB // 2), INVALID, "1", False),
     ("#" * MB, INVALID, INVALID, False)],
    ids=["digits", "sign-dollar", "spaced-digits", "marks", "almost-mark", "hashes"],
)
def test_a_megabyte_of_hostile_text_scores_in_linear_time(text, strict, flexible, flexible_ok):
    # lm-eval's own "(?s).*#### " substitution takes minutes on a megabyte without "#### " (re retries
    # ".*" from every position); a gold or prediction that long must not hang a run here.
    with budget():
        result = lm_eval_score(text, text)
        assert exact_match(text + ".", text) and not exact_match(text, text + "1")
    assert (result.strict, result.flexible, result.strict_correct, result.flexible_correct) == (
        strict, flexible, False, flexible_ok)
