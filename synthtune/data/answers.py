"""Final-answer extraction and grading for GSM8K-style math.

Three extractors, because evaluation reports more than one number:

* :func:`extract_answer` -- what a careful human grader would call the model's final answer.  An
  explicit marker wins (``#### n``, ``\\boxed{n}``, "the answer is n", "Answer: n", a bare "A: n"
  line), and of several markers the *last* one counts, since models often restate or correct
  themselves.  Without a marker it falls back to the last number that is not a date, a step label,
  a list number or an ordinal.
* :func:`extract_strict` -- only ``#### n``, as lm-evaluation-harness' gsm8k ``strict-match``.
* :func:`extract_flexible` -- the last number in the text, as lm-eval's ``flexible-extract``.

All three first cut the completion where a model stops answering and starts a new few-shot block
("Question:", "Q:", "Problem:", chat end-of-turn tokens): base models in few-shot mode do this
constantly, and the numbers in a hallucinated next question must not count.

Numbers are compared by value, not text: ``18``, ``18.0``, ``$18.00`` and ``18 dollars.`` are all
``"18"``.  Decisions worth knowing:

* Fractions are exact values: ``3/4`` normalizes to ``"0.75"``; a fraction without a finite decimal
  keeps the reduced form (``2/6`` -> ``"1/3"``), so ``1/3`` never equals a rounded ``0.33``.
* A percent sign is dropped: ``25%`` is ``"25"`` (GSM8K golds for percent questions are the bare
  number), so it does not equal ``0.25``.
* Scale words count: ``$1.5 million`` is ``"1500000"``.
* Numbers written as words ("eighteen") and mixed numbers ("2 1/2") are not read: the gain is small
  and words like "one" occur everywhere in prose.

Failure modes handled on purpose, each with cases in ``tests/test_answers.py``: "the answer is"
inside a hypothesis ("if the answer is 10, ...") is not a marker; a markdown heading "#### 2. Compute"
is not GSM8K's answer line; an answer written as a calculation ("the answer is 16 - 3 - 4 = 9") is the
value after its last "="; and a looping completion cut off mid-number by the token limit ("The answer
is 18. The answer is 1") is read as the number it was repeating.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from fractions import Fraction

__all__ = [
    "extract_answer",
    "extract_flexible",
    "extract_gold",
    "extract_strict",
    "is_correct",
    "normalize_number",
    "trim_completion",
]

# --- number grammar -------------------------------------------------------------------------------

# Thousands groups are only taken when well formed (``1,234``, Indian ``1,00,000``), so a list such as
# ``5,6`` stays two numbers.  The lookbehind keeps digits glued to letters (``x2``, ``H2O``) or to a
# previous decimal point out; a sign counts only when not preceded by a letter/digit/closing bracket,
# so ``10-5`` yields ``5`` rather than ``-5``.  A ``/den`` makes a fraction unless another ``/``
# follows (that is a date, ``12/05/2021``).
NUMBER_RE = re.compile(
    r"""
    (?<![^\W_]|[.)\]])
    (?P<sign>[-\u2212])?
    (?:[$€£¥₹][ \t]?)?
    (?P<sign2>[-\u2212])?
    (?P<body>(?:\d{1,3}(?:,\d{3})+|\d{1,2}(?:,\d{2})+,\d{3}|\d+)(?:\.\d+)?|\.\d+)
    (?:/(?P<den>\d+)(?![\d/]))?
    (?:[ \t]+(?P<scale>(?i:thousand|million|billion|trillion))\b)?
    """,
    re.VERBOSE,
)
# "$1.5 million" is 1500000: GSM8K has answers that size, and models like to write them this way.
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}

# --- where a completion stops being an answer -----------------------------------------------------

# A new few-shot block or chat turn.  Labels must start a line or follow the end of a sentence, and
# are case-sensitive so "any questions:" in prose does not cut anything.
CONTINUATION_RE = re.compile(
    r"""
    (?:(?:^|\n|(?<=[.!?)*\]]))[ \t#>*]*
       (?:Question|Problem|Q|Human|User|Instruction|Input)(?:[ \t]+\d+)?[ \t]*(?:\*\*)?[ \t]*[:：])
    | <\|(?:endoftext|im_end|im_start|eot_id|end|user|end_of_text)\|>
    | </s> | <eos> | <end_of_turn> | \[INST\]
    """,
    re.VERBOSE,
)

# --- explicit answer markers ----------------------------------------------------------------------

# GSM8K's own final-answer line, which fine-tuned models reproduce.
STRICT_RE = re.compile(r"#{4}[ \t]*(?:\*\*|__)?[ \t]*")

BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
BOXED_BARE_RE = re.compile(r"\\boxed[ \t]+(?=[-\u2212$\d.])")

# "The answer is", "the final answer is:", "Answer:", "**Final Answer:**", "answer = ", "Ans:",
# "The answer to the question is".  "Final answer" is strong enough to stand alone, e.g. a markdown
# heading "### Final Answer" followed by the number on the next line.
ANSWER_PHRASE_RE = re.compile(
    r"""
    \b(?:
        final[ \t]+answer\b(?:[ \t]+(?:is|was|would[ \t]+be|will[ \t]+be))?
      | (?:answer|ans)\b
        (?:[ \t]+(?:to|for|of)[ \t][^.\n:=]{0,60}?)?
        (?:[ \t]*(?:\*\*|__))?
        (?:[ \t]+(?:is|was|would[ \t]+be|will[ \t]+be|should[ \t]+be|must[ \t]+be|equals)\b|[ \t]*[:=])
      | ans\.(?=[ \t]*[-\u2212$\d])
    )
    """,
    re.VERBOSE | re.IGNORECASE,
)

# "A: 18" as its own short line.  In few-shot CoT prompts "A:" also opens the reasoning
# ("A: Lena sold 48/2 = 24 stickers..."), so it only counts when the rest of the line is the number
# and at most a few unit words.
SHORT_A_RE = re.compile(r"(?:^|(?<=[\s(]))A[ \t]*:[ \t]*")
_SHORT_TAIL_RE = re.compile(r"[ \t]*(?:[^\W\d_][\w'’]*[ \t]*){0,4}[.!]?[ \t*]*(?:\n|$)")

# Words and symbols that may sit between a marker and its number.
_FILLER_RE = re.compile(
    r"""
    (?:\s|\*|_|:|=|`|\(|\[|\{|\\\(|\\\[|\$(?![\d.])|~|≈|\\approx
      |\b(?:approximately|approx\.?|about|around|roughly|exactly|just|simply|therefore|thus|then
          |equal[ \t]+to|a[ \t]+total[ \t]+of|that)\b
    )*
    """,
    re.VERBOSE | re.IGNORECASE,
)

# An answer given as a calculation ("the answer is 16 - 3 - 4 = 9"): the value is after the last "=".
_CHAIN_START_RE = re.compile(r"[ \t]*(?:[-+*/x×÷^\u2212][ \t]*[$(]?[ \t]*[\d.]|=)")
_CLAUSE_END_RE = re.compile(r"\n|[.!?;](?=\s|$)")

# --- what the last-number fallback skips ----------------------------------------------------------

_MONTHS = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
NOT_AN_ANSWER_RE = re.compile(
    r"""
      \b\d{4}-\d{1,2}-\d{1,2}\b                                   # ISO date
    | \b\d{1,2}/\d{1,2}/\d{2,4}\b                                 # 12/05/2021
    | \b""" + _MONTHS + r"""\.?[ \t]+\d{1,2}(?:st|nd|rd|th)?\b(?:,?[ \t]+\d{4}\b)?   # March 5, 2021
    | \b\d{1,2}(?:st|nd|rd|th)?[ \t]+(?:of[ \t]+)?""" + _MONTHS + r"""\b(?:,?[ \t]+\d{4}\b)?
    | \b\d{1,2}:\d{2}(?::\d{2})?(?:[ \t]*[ap]\.?m\.?)?\b              # a time of day
    | (?i:\b(?:step|part|question|problem|example|case|method|option)[ \t]+\#?\d+\b)
      (?=[ \t]*[:.)\-]|[ \t]*$|[ \t]*\n)                          # "Step 3:" headings
    | ^[ \t]*(?:[-*+][ \t]*)?\d+[.)](?=[ \t]+\S)                  # "1. ", "2) " list numbers
    | \b\d+(?:st|nd|rd|th)\b                                      # ordinals: "3rd", "21st"
    """,
    re.VERBOSE | re.MULTILINE,
)

# --- LaTeX that hides numbers ---------------------------------------------------------------------

_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]*?)\s*\}\s*\{\s*([^{}]*?)\s*\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_THIN_SPACE_RE = re.compile(r"(?<=\d)(?:\{,\}|\\[,!;:][ \t]?|\\ )(?=\d{3}(?!\d))")
_LATEX_SUBS = (
    ("\\$", "$"), ("\\%", "%"), ("\\left", ""), ("\\right", ""), ("\\cdot", "*"),
    ("\\times", "*"), ("\\div", "/"), ("\\,", " "), ("\\!", ""), ("\\;", " "), ("\\quad", " "),
    ("\u00a0", " "), ("\u2009", " "), ("\u202f", " "),
)


def _clean_latex(text: str) -> str:
    """Rewrite the LaTeX models put around numbers into plain text the number grammar reads."""
    text = _LATEX_THIN_SPACE_RE.sub(",", text)
    for _ in range(3):  # \text{\frac{..}{..}} nests; a few passes cover what models write
        text = _LATEX_TEXT_RE.sub(r"\1", text)
        text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    for old, new in _LATEX_SUBS:
        text = text.replace(old, new)
    return text


# --- values ---------------------------------------------------------------------------------------

def _canonical(value: Fraction) -> str:
    """One spelling per value: ``18``, ``1234.5``, ``-0.25``, ``1/3``."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    # A denominator of 2^a 5^b has exactly max(a, b) decimal places; integer arithmetic keeps it exact.
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
    return f"-{text}" if value < 0 else text


def _match_value(match: re.Match[str]) -> Fraction | None:
    try:
        value = Fraction(Decimal(match["body"].replace(",", "")))
    except InvalidOperation:  # pragma: no cover - the grammar only admits valid decimals
        return None
    if match["den"] is not None and int(match["den"]) != 0:
        value /= int(match["den"])
    if match["scale"] is not None:
        value *= _SCALES[match["scale"].lower()]
    if (match["sign"] is None) != (match["sign2"] is None):
        value = -value
    return value


def _numbers(text: str, skip_spans: bool = False) -> Iterator[tuple[re.Match[str], Fraction]]:
    excluded: list[tuple[int, int]] = []
    if skip_spans:
        excluded = [m.span() for m in NOT_AN_ANSWER_RE.finditer(text)]
    for match in NUMBER_RE.finditer(text):
        start = match.start("body")
        if any(lo <= start < hi for lo, hi in excluded):
            continue
        value = _match_value(match)
        if value is not None:
            yield match, value


def _first_number_at(text: str, pos: int) -> tuple[re.Match[str], Fraction] | None:
    """The number starting at ``pos`` after optional filler, if there is one."""
    filler = _FILLER_RE.match(text, pos)
    start = filler.end() if filler else pos
    match = NUMBER_RE.match(text, start)
    if match is None:
        return None
    value = _match_value(match)
    return None if value is None else (match, value)


def normalize_number(s: str | int | float) -> str | None:
    """Canonical text of a single number, or None when ``s`` is not one.

    Strips currency, thousands separators, a percent sign, a trailing period and trailing unit words.
    Exact: values go through :class:`decimal.Decimal` and :class:`fractions.Fraction`, never float.

    >>> [normalize_number(s) for s in ["18", "18.0", "18.00", "$18", "$18.", "18 apples."]]
    ['18', '18', '18', '18', '18', '18']
    >>> normalize_number("1,234.50"), normalize_number("-0"), normalize_number("\u22125")
    ('1234.5', '0', '-5')
    >>> normalize_number("25%"), normalize_number("3/4"), normalize_number("2/6")
    ('25', '0.75', '1/3')
    >>> normalize_number("eighteen") is None, normalize_number("18 and 20") is None
    (True, True)
    """
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return str(s)
    if isinstance(s, float):
        if s != s or s in (float("inf"), float("-inf")):
            return None
        # repr gives the shortest decimal that round-trips, so 0.1 stays 0.1 rather than its binary
        # expansion.
        return _canonical(Fraction(Decimal(repr(s))))
    if not isinstance(s, str):
        return None
    text = _clean_latex(s).strip().strip("*_`").strip()
    text = text.removeprefix("+")
    match = _LOOSE_NUMBER_RE.fullmatch(text)
    if match is None or (match["den"] is not None and int(match["den"]) == 0):
        return None
    value = _match_value(match)
    return None if value is None else _canonical(value)


# A lone number as people type it: commas anywhere between digits are accepted (the caller says this
# string *is* a number), then optional percent and unit words without digits.
_LOOSE_NUMBER_RE = re.compile(
    r"""
    \$?[ \t]*
    (?P<sign>[-\u2212])?[ \t]*
    (?:[$€£¥₹][ \t]*)?
    (?P<sign2>[-\u2212])?
    (?P<body>\d[\d,]*(?:\.\d*)?|\.\d+)
    (?:[ \t]*/[ \t]*(?P<den>\d+))?
    (?:[ \t]+(?P<scale>(?i:thousand|million|billion|trillion))\b)?
    [ \t]*%?
    (?:[ \t]*[^\W\d_][^\d]*?)?
    [ \t]*\$?[ \t]*\.?
    """,
    re.VERBOSE,
)


# --- extraction -----------------------------------------------------------------------------------

def trim_completion(completion: str) -> str:
    """The part of ``completion`` that answers the question asked.

    Cuts at the first new few-shot block or chat end token.  A label that comes before any number
    (a model restating "Problem: ..." before solving it) is not a cut point, or nothing would be left.

    >>> trim_completion("The answer is 18.\\n\\nQuestion: Tom has 3 cats...")
    'The answer is 18.'
    >>> trim_completion("Problem: Marta has 16 eggs.\\nSolution: 16 - 3 = 13")
    'Problem: Marta has 16 eggs.\\nSolution: 16 - 3 = 13'
    """
    first_digit = re.search(r"\d", completion)
    cut = CONTINUATION_RE.search(completion, first_digit.end()) if first_digit else None
    return completion[: cut.start() if cut else len(completion)].rstrip()


# A candidate answer: where its marker starts, its value, and the number's match in the text when the
# value is read straight from there (None for boxed content and "= n" chains).
_Candidate = tuple[int, Fraction, "re.Match[str] | None"]


def _boxed_candidates(text: str) -> Iterator[_Candidate]:
    for match in BOXED_RE.finditer(text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        content = text[match.end(): i - 1 if depth == 0 else i]
        # \boxed{16 - 3 - 4 = 9} or \boxed{x = 5}: the value is the right-hand side.
        content = content.rsplit("=", 1)[-1]
        found = next(_numbers(content), None)
        if found is not None:
            yield match.start(), found[1], None
    for match in BOXED_BARE_RE.finditer(text):
        found = _first_number_at(text, match.end())
        if found is not None:
            yield match.start(), found[1], found[0]


def _phrase_value(text: str, pos: int) -> tuple[Fraction, re.Match[str] | None] | None:
    """Value of the answer that starts right after a marker ending at ``pos``."""
    found = _first_number_at(text, pos)
    if found is None:
        return None
    match, value = found
    end_match = _CLAUSE_END_RE.search(text, match.end())
    clause_end = end_match.start() if end_match else len(text)
    if _CHAIN_START_RE.match(text, match.end()) and "=" in text[match.end(): clause_end]:
        tail = text[text.rindex("=", match.end(), clause_end) + 1: clause_end]
        after = _first_number_at(tail, 0)
        if after is not None:
            return after[1], None
    return value, match


# "#### 2. Compute the total" is a markdown heading, not GSM8K's answer line.
_HEADING_TAIL_RE = re.compile(r"[.)][ \t]+[^\W\d_]|[ \t]*:")
# "If the answer is 10, then 10 * 2 = 20, which is too many": a hypothesis, not an answer.
_HYPOTHESIS_BEFORE_RE = re.compile(
    r"\b(?:if|suppose|supposing|assume|assuming|whether|unless)[ \t]+(?:(?:the|our|my|your)[ \t]+)?$",
    re.IGNORECASE,
)


def _strict_candidates(text: str) -> Iterator[_Candidate]:
    for match in STRICT_RE.finditer(text):
        found = _first_number_at(text, match.end())
        if found is not None and not _HEADING_TAIL_RE.match(text, found[0].end()):
            yield match.start(), found[1], found[0]


def _explicit_candidates(text: str) -> Iterator[_Candidate]:
    yield from _strict_candidates(text)
    yield from _boxed_candidates(text)
    for match in ANSWER_PHRASE_RE.finditer(text):
        if _HYPOTHESIS_BEFORE_RE.search(text, max(0, match.start() - 30), match.start()):
            continue
        found = _phrase_value(text, match.end())
        if found is not None:
            yield match.start(), found[0], found[1]
    for match in SHORT_A_RE.finditer(text):
        found = _first_number_at(text, match.end())
        if found is not None and _SHORT_TAIL_RE.match(text, found[0].end()):
            yield match.start(), found[1], found[0]


def _prepare(completion: str) -> str:
    return _clean_latex(trim_completion(completion))


def _is_cut_off(completion: str) -> bool:
    """Whether generation stopped mid-text (max tokens), rather than at a stop sequence or newline."""
    return bool(completion) and not completion[-1].isspace() and trim_completion(completion) == completion


def _repair_truncated(text: str, match: re.Match[str]) -> Fraction | None:
    """The full number a cut-off final number repeats, if the text shows it.

    Small models often loop ("... The answer is 18. The answer is 18. The answer is 1") until the token
    limit cuts the last number short.  When the words before the cut number occurred earlier followed
    by a longer number starting with the same digits, that earlier number is what was being written.
    """
    if match.end() != len(text):
        return None
    context = text[max(0, match.start() - 15): match.start()].lstrip()
    if len(context.strip()) < 3:
        return None
    digits = match["body"]
    repaired = None
    pos = text.find(context)
    while 0 <= pos < match.start() - len(context):
        earlier = NUMBER_RE.match(text, pos + len(context))
        if earlier is not None and len(earlier["body"]) > len(digits) and earlier["body"].startswith(digits):
            repaired = _match_value(earlier)
        pos = text.find(context, pos + 1)
    return repaired


def extract_answer(completion: str) -> str | None:
    """The final numeric answer in a model completion, normalized; None if there is no number.

    >>> extract_answer("She sold 48 + 24 = 72 stickers.\\n#### 72")
    '72'
    >>> extract_answer("So Marta makes 9 * 2 = $18 every day. The answer is $18.")
    '18'
    >>> extract_answer("**Final Answer:** $\\\\boxed{1,234.50}$")
    '1234.5'
    >>> extract_answer("The answer is 5.\\n\\nQuestion: A farmer has 12 cows and 3 pigs")
    '5'
    >>> extract_answer("16 - 3 - 4 = 9 eggs are left, so she makes 9 * 2 = 18 dol")
    '18'
    >>> extract_answer("The answer is 18. The answer is 18. The answer is 1")  # cut off mid-number
    '18'
    >>> extract_answer("I don't know.") is None
    True
    """
    if not isinstance(completion, str):
        return None
    text = _prepare(completion)
    best: _Candidate | None = None
    for candidate in _explicit_candidates(text):
        if best is None or candidate[0] >= best[0]:
            best = candidate
    if best is not None:
        value = best[1]
        if best[2] is not None and _is_cut_off(completion):
            value = _repair_truncated(text, best[2]) or value
        return _canonical(value)
    return _fallback_answer(text, cut_off=_is_cut_off(completion))


# Words after which a number describes rather than answers: "= 5 hours to read 120 pages", "= $25 for
# 14 peaches", "= 71 seconds in 3 days".  "to" is left out on purpose ("rounds down to 15").
_DESCRIPTOR_BEFORE_RE = re.compile(
    r"\b(?:in|for|of|after|with|than|per|each|by|on|over|from|at|every|a|an|the|those|these|all|first"
    r"|last|next|within|during|into|across|among|between|about|out|under)[ \t]*$",
    re.IGNORECASE,
)


def _is_next_list_number(text: str, match: re.Match[str]) -> bool:
    """Whether ``match`` is a bare "4." ending the text after a list item "3.": a cut-off list.

    A lone "72." as the last line is a common way to state an answer, so a trailing list number is
    only recognised by its predecessor.
    """
    line_start = text.rfind("\n", 0, match.start()) + 1
    tail = text[match.end():]
    if text[line_start: match.start()].strip(" \t-*") or tail.rstrip() not in (".", ")"):
        return False
    number = match["body"]
    if not number.isdigit() or int(number) < 2:
        return False
    previous = re.compile(rf"^[ \t]*(?:[-*+][ \t]*)?{int(number) - 1}[.)][ \t]+\S", re.MULTILINE)
    return bool(previous.search(text, 0, line_start))


def _fallback_answer(text: str, cut_off: bool = False) -> str | None:
    """The last number, unless the last sentence computes its result before naming other numbers.

    Chain-of-thought prose ends like "It will take her 120/24 = 5 hours to read 120 pages.": the
    answer is the value after the last "=", and the numbers behind it only describe it.  They count
    as descriptions when they already appeared earlier or follow a preposition; otherwise ("= 8
    apples, gives 2 away, so she has 6") the last number stands.  On GSM8K's own reference solutions
    with the "####" line removed this halves the misses of plain last-number extraction.
    """
    numbers = list(_numbers(text, skip_spans=True))
    if numbers and _is_next_list_number(text, numbers[-1][0]):
        numbers.pop()
    if not numbers:
        return None
    last_match, last_value = numbers[-1]
    if cut_off:
        repaired = _repair_truncated(text, last_match)
        if repaired is not None:
            return _canonical(repaired)
    sentence_start = 0
    for end in _CLAUSE_END_RE.finditer(text, 0, last_match.start()):
        sentence_start = end.end()
    equals = text.rfind("=", sentence_start, last_match.start())
    if equals != -1:
        after = [(m, v) for m, v in numbers if m.start() > equals]
        # "120/24" reads as the fraction 5, but its 120 has still been mentioned.
        seen = {v for m, v in numbers if m.start() < equals}
        seen |= {Fraction(Decimal(m["body"].replace(",", ""))) for m, _ in numbers if m.start() < equals}
        if len(after) > 1 and all(
            v in seen or _DESCRIPTOR_BEFORE_RE.search(text, 0, m.start()) for m, v in after[1:]
        ):
            return _canonical(after[0][1])
    return _canonical(last_value)


def extract_strict(completion: str) -> str | None:
    """Only the GSM8K ``#### n`` form, like lm-eval's gsm8k ``strict-match``.

    As there, the *first* ``####`` counts (lm-eval's filter takes match 0); the completion is trimmed
    at a new few-shot block first, which lm-eval does with its ``until`` stop sequences.

    >>> extract_strict("48 + 24 = 72\\n#### 72"), extract_strict("The answer is 72.")
    ('72', None)
    """
    if not isinstance(completion, str):
        return None
    found = next(_strict_candidates(_prepare(completion)), None)
    return None if found is None else _canonical(found[1])


def extract_flexible(completion: str) -> str | None:
    """The last number in the (trimmed) completion, like lm-eval's gsm8k ``flexible-extract``.

    Unlike lm-eval the value is normalized (``18.0`` == ``18``) and no numbers are skipped.

    >>> extract_flexible("Step 1: 16 - 3 - 4 = 9. Step 2: 9 * 2 = 18.")
    '18'
    """
    if not isinstance(completion, str):
        return None
    last = None
    for _, value in _numbers(_prepare(completion)):
        last = value
    return None if last is None else _canonical(last)


def extract_gold(text: str | int | float) -> str | None:
    """The normalized gold answer: GSM8K's ``... #### 72`` or a bare number.

    >>> extract_gold("48/2 = <<48/2=24>>24 stickers.\\n#### 1,234"), extract_gold(72), extract_gold(" 72 ")
    ('1234', '72', '72')
    >>> extract_gold("no answer here") is None
    True
    """
    if not isinstance(text, str):
        return normalize_number(text)
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        first_line = tail.split("\n", 1)[0]
        normalized = normalize_number(first_line)
        if normalized is not None:
            return normalized
        found = _first_number_at(_clean_latex(first_line), 0)
        return None if found is None else _canonical(found[1])
    return normalize_number(text)


def is_correct(completion: str, gold: str | int | float) -> bool:
    """Whether the final answer in ``completion`` equals ``gold`` as a number.

    >>> is_correct("... so she has 18.00 dollars.", "#### 18"), is_correct("#### 17", 18)
    (True, False)
    """
    expected = extract_gold(gold)
    got = extract_answer(completion)
    # Canonical forms are unique per value, so string equality is numeric equality.
    return expected is not None and got is not None and expected == got
