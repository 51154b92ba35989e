"""Calculator-annotation and prose-equation checks.

Run: pytest tests/test_calculator.py --doctest-modules synthtune/data/calculator.py
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import pytest

from synthtune.data.calculator import CalcError, check_calculations, exact_value


def _counts(text: str) -> tuple[int, int]:
    report = check_calculations(text)
    return report.n_checked, report.n_correct


# --- annotations --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<<48/2=24>>", True),
        ("<<48/2=25>>", False),
        ("<<0.2*50=10>>", True),
        ("<<.5*10=5>>", True),
        ("<<(1/2)*14=7>>", True),
        ("<<3-5=-2>>", True),
        ("<<2**10=1024>>", True),
        ("<<7//2=3>>", True),
        ("<<7%3=1>>", True),
        ("<<10/3=3.33>>", True),  # GSM8K rounds to the decimals it writes
        ("<<10/3=3.3333>>", True),
        ("<<2/3=0.67>>", True),
        ("<<2/3=0.66>>", True),  # cut off, as GSM8K writers do with repeating decimals
        ("<<2/3=0.6>>", False),  # ... but one decimal is too coarse to tell a cut from a slip
        ("<<0.125=0.13>>", True),  # a tie, rounded half up
        ("<<0.125=0.12>>", True),  # the same tie, rounded half to even
        ("<<7/2=3>>", False),  # an integer result must be exact
        ("<<7/2=3.5>>", True),
        ("<<3/4=3/4>>", True),  # GSM8K writes a few results as fractions
        ("<<3/4=2/3>>", False),
        ("<<1,000+1=1,001>>", True),  # synthesized annotations use thousands separators as people do
        ("<<100-20=80.0>>", True),
        ("<<1/0=1>>", False),
        ("<<9**9**9=1>>", False),  # refused, not computed
        ("<<hello>>", False),
        ("<<x=5>>", False),
        ("<<2+2=four>>", False),
        ("<<__import__('os').system('true')=0>>", False),
    ],
)
def test_annotation(text, ok):
    report = check_calculations(text)
    assert report.n_checked == 1
    assert (report.n_correct == 1) is ok
    assert bool(report.errors) is not ok


def test_annotation_error_messages_say_what_is_wrong():
    assert check_calculations("<<48/2=25>>").errors == ["<<48/2=25>>: 48/2 is 24, not 25"]
    assert "division by zero" in check_calculations("<<1/0=1>>").errors[0]
    assert "exponent" in check_calculations("<<9**9**9=1>>").errors[0]
    assert "no '='" in check_calculations("<<hello>>").errors[0]


def test_gsm8k_solution_counts_each_calculation_once():
    # The prose "48/2 = 24" around an annotation repeats it: the two are one calculation, counted once.
    text = (
        "Lena sold 48/2 = <<48/2=24>>24 stickers in June.\n"
        "Lena sold 48+24 = <<48+24=72>>72 stickers altogether in May and June.\n#### 72"
    )
    report = check_calculations(text)
    assert (report.n_checked, report.n_correct, report.fraction, report.errors) == (2, 2, 1.0, [])


def test_wrong_annotation_inside_right_prose_is_reported():
    report = check_calculations("She sold 48/2 = <<48/2=25>>25 stickers.")
    assert (report.n_checked, report.n_correct) == (1, 0)


# --- prose equations ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "checked", "correct"),
    [
        ("48 / 2 = 24", 1, 1),
        ("5 * $3 = $15", 1, 1),
        ("12 x 4 = 48", 1, 1),
        ("12x4=48", 1, 1),
        ("75x 8 = 600", 1, 1),
        ("2+3=5", 1, 1),
        ("12 \u00d7 4 = 48", 1, 1),
        ("12 \u00f7 4 = 3", 1, 1),
        ("7 \u2212 2 = 5", 1, 1),
        ("$2,430 \u2013 $2,100 = $330", 1, 1),
        ("2 + 3 = 6", 1, 0),
        ("10 / 3 = 3.33 hours", 1, 1),
        ("10 / 3 = 3 hours", 1, 0),
        ("1,000 + 2,500 = 3,500", 1, 1),
        ("She has 16 - 3 - 4 = 9 eggs.", 1, 1),
        ("16 - 3 - 4 = 9 * 2 = 18", 2, 2),
        ("3 * 4 = 12 + 2 = 14", 2, 2),  # a running total
        ("3 * 4 = 13 + 2 = 15", 2, 1),
        ("2 * (3 + 4) = 14", 1, 1),
        ("2(50+100+120)=540", 1, 1),  # multiplication by juxtaposition
        ("66(1/3) = 22 apples", 1, 1),
        ("20% * 50 = 10", 1, 1),
        ("0.25 * 100 = 25%", 1, 1),
        ("3/4 = 75%", 1, 1),
        ("8 x 1 1/2 = 12 rolls", 1, 1),  # a mixed number
        ("4 / 3 = 1 and 1/3 hours", 1, 1),
        ("25 / 1/3 = 75 decorations", 1, 1),  # a tight fraction is one number
        ("$80 000 x 20/100 = $16 000", 1, 1),  # a space as thousands separator
        ("$2.50 - $2.24 = 26 cents", 1, 1),
        ("2 ** 3 = 8", 1, 1),
        ("She buys 3 packs \u00d7 $4.50 = $13.50", 1, 1),  # unit words before an operator are read past
        ("2.5 hours \u00d7 60 = 150 minutes", 1, 1),
        ("$10 per hour * 5 = $50", 1, 1),
        ("7 / 2 = 3 remainder 1", 1, 1),
        ("13 / 6 = 2 full cycles with a remainder of 1 hour", 1, 1),
        ("15 trucks / 90 vehicles * 100% = 16.66%", 1, 1),
        ("2^3 = 8", 1, 1),
        ("Total: -5 + 3 = -2", 1, 1),
        ("5 + 3 = 8, 2 + 2 = 5", 2, 1),
        # a result in another unit of the left side's is read converted too ("left side is 100" was
        # an error), and a wrong one is still wrong
        ("25 cents x 4 = $1", 1, 1),
        ("25 cents x 4 = $2", 1, 0),
        ("30 minutes x 4 = 2 hours", 1, 1),
        ("2 hours x 60 = 120 minutes", 1, 1),  # the multiplier converts: right as written
        ("2 hours x 60 = 121 minutes", 1, 0),
        ("2 dollars x 4 = 800 cents", 1, 1),
        ("30 min x 4 = 2 hours", 1, 1),  # abbreviations
        ("8 oz x 6 = 3 lbs", 1, 1),
        ("2 dollars x 4 = 900 cents", 1, 0),
        ("30 minutes x 4 = 121 minutes", 1, 0),  # one unit on both sides
        ("3 boxes x 4 = 13 pencils", 1, 0),  # not units that convert
        ("6 months x 2 = 1 year", 0, 0),  # no fixed factor: not judged when wrong as written
        ("6 months x 2 = 12 months", 1, 1),
        # units that mix within the left side: one factor cannot read it, so it is not judged
        ("50 cents + $2 = $2.50", 0, 0),
        ("20 cents x 5 + $3 = $4", 0, 0),
        ("1 hour 30 minutes x 2 = 3 hours", 0, 0),
        ("$2 and 50 cents x 2 = $5", 0, 0),
        ("5 pounds 8 ounces x 2 = 11 pounds", 0, 0),
    ],
)
def test_prose_equation(text, checked, correct):
    assert _counts(text) == (checked, correct)


@pytest.mark.parametrize(
    "text",
    [
        "No arithmetic here.",
        "x = 5",
        "So x = -5.",
        "2x + 3 = 11",  # algebra, not arithmetic
        "11x+15=301",
        "S + 143 = 200 - 16",  # the left side starts with an unknown
        "X*2 - $40 = $250",
        "100/5 = 5A/5",
        "8/3 = 24/Y",
        "D3 = 2 * 322",
        "Weeks 1-2 = 96 - 70",  # a range
        "0900-0130 = 0730 hours",  # clock times
        "10 - 20% = 8",  # "less 20%": ambiguous
        "3*30 = 30 + M trees",
        "5 hours * $10/hour = $50",  # the unit hides the left operand
        "The ratio 3:2 = 1.5",
        "Dividing both sides by 11/20 we get X = $1200.",  # words before "=" end the expression
        "1/2 a cup = 4 ounces",
        "4 pounds - 6 ounces = 58 ounces",
        "Total = 26",
        "He paid $10,000 = 10 * $1,000.",  # a value restated as a product: not a calculation
    ],
)
def test_prose_that_is_not_checkable_is_skipped(text):
    report = check_calculations(text)
    assert report.n_checked == 0, report
    assert report.fraction is None


def test_prose_error_message():
    assert check_calculations("12 x 4 = 46").errors == ["12 x 4 = 46: left side is 48"]


def test_report_as_dict():
    assert check_calculations("2 + 2 = 4 and 2 + 2 = 5").as_dict() == {
        "n_checked": 2, "n_correct": 1, "fraction": 0.5, "errors": ["2 + 2 = 5: left side is 4"],
    }


# --- the evaluator itself ------------------------------------------------------------------------------

def test_evaluate_is_exact():
    assert exact_value("0.1 + 0.2") == Fraction(3, 10)
    assert exact_value("1/3 * 3") == 1
    assert exact_value("-2**2") == -4  # Python precedence: ** binds tighter than unary minus
    assert exact_value("2**-1") == Fraction(1, 2)
    assert exact_value("2**3**2") == 512  # right-associative
    assert exact_value("(1 + 2) * 3 - 4 / 2") == 7
    assert exact_value("12 x 4", prose=True) == 48
    assert exact_value("20% * 50", prose=True) == 10


@pytest.mark.parametrize(
    "expression",
    ["", "1 +", "(1 + 2", "1 + 2)", "1/0", "0**-1", "2**0.5", "2**65", "9**9**9", "import os", "x", "1 = 1",
     "__import__('os')", "2 x 3", "(" * 60 + "1" + ")" * 60, "+".join(["1"] * 500)],
)
def test_evaluate_refuses(expression):
    with pytest.raises(CalcError):
        exact_value(expression)


# --- the real GSM8K, when this machine has it -------------------------------------------------------

def _gsm8k_rows(split: str) -> list[dict]:
    value = os.environ.get("SYNTHTUNE_GSM8K_DIR")
    path = Path(value) if value else Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"
    if not (path / f"{split}.jsonl").exists():
        pytest.skip(f"GSM8K not found at {path} (set SYNTHTUNE_GSM8K_DIR)")
    with open(path / f"{split}.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# the 7,473 train solutions take ~2.5 s: the slow tier; the 1,319 test ones stay in make test-fast
@pytest.mark.parametrize("split", [pytest.param("train", marks=pytest.mark.integration), "test"])
def test_gsm8k_reference_solutions_check_out(split):
    rows = _gsm8k_rows(split)
    n_checked = n_correct = 0
    annotation_errors = []
    for row in rows:
        report = check_calculations(row["answer"])
        n_checked += report.n_checked
        n_correct += report.n_correct
        annotation_errors += [e for e in report.errors if e.startswith("<<")]
    # Measured: train 24,769 of 24,801 right (0.99871; 23,716 annotations, 1,085 prose equations), test
    # 4,485 of 4,487. Every annotation is right by itself; 21 prose equations are flagged, mostly real
    # slips in GSM8K ("6/3=.5", "2*8 = 24", "14*20=140") plus a few unit switches ("100 * 0.75 = $0.75"),
    # and 12 annotations disagree with the prose around them (6 slips, "8*3 = <<80*3=240>>240"; 6 prose
    # read otherwise, "14, 400 / 80 = <<14400/80=180>>180"), which makes the pair wrong.
    assert n_correct / n_checked >= 0.99
    assert annotation_errors == []
    assert n_checked > 3 * len(rows)


@pytest.mark.parametrize(("text", "checked", "right", "error"), [
    ("3*14 = <<3*14=42>>42 apples", 1, 1, None),
    # the calculator wrote the annotation, the model another number after it: one wrong calculation
    ("3*14 = <<3*14=42>>40 apples", 1, 0, "3*14 = <<3*14=42>>40: left side is 42"),
    ("It costs $3*14 = $<<3*14=42>>40.", 1, 0, "$3*14 = $<<3*14=42>>40: left side is 42"),
    # both wrong: still one calculation, one error
    ("3*14 = <<3*14=40>>41 apples", 1, 0, "<<3*14=40>>: 3*14 is 42, not 40"),
    # a chain: each "=" restates the annotation after it
    ("2*3 = <<2*3=6>>6 * 4 = <<6*4=24>>24 eggs", 2, 2, None),
    ("2*3 = <<2*3=6>>6 * 4 = <<6*4=24>>25 eggs", 2, 1, "6 * 4 = <<6*4=24>>25: left side is 24"),
    # an annotation among the operands: the equation is a calculation of its own
    ("5 + <<2*3=6>>6 = 11 eggs", 2, 2, None),
    ("5 + <<2*3=6>>6 = 12 eggs", 2, 1, "5 + <<2*3=6>>6 = 12: left side is 11"),
    # two annotations: the prose restates the one after its "="
    ("12 + <<3*4=12>>12 = <<12+12=24>>25 eggs", 2, 1, "12 + <<3*4=12>>12 = <<12+12=24>>25: left side is 24"),
])
def test_an_annotation_and_the_prose_around_it_are_one_calculation(text, checked, right, error):
    report = check_calculations(text)
    assert (report.n_checked, report.n_correct) == (checked, right), report
    assert report.errors == ([error] if error else [])


def test_the_prose_around_an_annotation_too_long_to_check_is_checked_alone():
    long_sum = "+".join(["1"] * 400)
    report = check_calculations(f"So 3 + 4 = <<{long_sum}=400>>8 apples.")
    assert report.unchecked and (report.n_checked, report.n_correct) == (1, 0)
    assert report.errors == [f"3 + 4 = <<{long_sum}=400>>8: left side is 7"]


def test_a_prose_equation_with_a_number_too_long_to_read_is_listed_as_unchecked():
    # It was dropped without a note, where an annotation as long is listed (the report's promise)
    report = check_calculations("So 5 * 2 = 10, and " + "9" * 1500 + " * 2 = 3.")
    assert (report.n_checked, report.n_correct, report.errors) == (1, 1, [])
    assert len(report.unchecked) == 1 and report.unchecked[0].endswith("number longer than 1000 digits")
