"""Final-answer extraction and grading for GSM8K-style math.

Three extractors, because evaluation reports more than one number:

* :func:`extract_answer` -- what a careful human grader would call the model's final answer.  An
  explicit marker wins (``#### n``, ``\\boxed{n}``, "the answer is n", "Answer: n", a bare "A: n"
  line), and of several markers the *last* one counts, since models often restate or correct
  themselves.  Without a marker it falls back to the last number that is not a date, a step label,
  a list number or an ordinal.
* :func:`extract_strict` -- only a ``#### n`` line (the first), read by value.
* :func:`extract_flexible` -- the last number in the text, read by value.

The last two look where lm-evaluation-harness's gsm8k ``strict-match`` and ``flexible-extract`` look,
but they are not its figures: it compares the text it extracts (``#### 42.00`` is not ``42``,
``#### $42`` and ``####42`` are no answer).  :mod:`synthtune.data.lmeval_gsm8k` computes lm-eval's.

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

Model text is untrusted, so the work per completion is linear in its length whatever the text: no
pattern here backtracks more than a bounded amount (one that did took minutes on a 1 KB completion).
Three documented bounds keep it small however long the text is, and only change results on text that
no grader would call normal:

* :data:`ANSWER_WINDOW`: after the cut at a new few-shot block, only the last 8,192 characters of a
  completion are read for its answer (a word or number the window's edge cuts through is dropped,
  so no number is read by halves);
* :data:`MAX_NUMBER_CHARS`: a number written with more than 100 characters (digits, separators and
  point), or with a denominator that long, is not read as a number;
* a cut at a new few-shot block allows at most 64 characters of indentation or markdown before the
  label, and ``\\boxed{...}`` is read up to 500 characters of content.

No function here raises on any ``str`` input (lone surrogates and every Unicode line separator
included); ``tests/test_fuzz_text.py`` checks this on generated text with a time guard per call.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache

__all__ = [
    "extract_answer",
    "extract_flexible",
    "extract_gold",
    "extract_strict",
    "is_computed",
    "is_correct",
    "normalize_number",
    "trim_completion",
]

# --- bounds (see the module docstring) ------------------------------------------------------------

# 8,192 characters is ~2,000 tokens: longer than the reasoning of any GSM8K answer (reference solutions
# stay under 1,000), while a model that rambles past it without a new "Question:" is not answering.
ANSWER_WINDOW = 8192
# No grade-school quantity is written with 100 characters, and the bound keeps every canonical value
# far below Python's 4,300-digit int->str limit (a denominator of 2**330 has 330 decimal places).
MAX_NUMBER_CHARS = 100
# Characters a readable number can span: sign, currency, body, "/", denominator, scale word.
_NUMBER_SPAN = 2 * MAX_NUMBER_CHARS + 40
# Indian digit groups ("1,00,00,000") are read up to this many pairs: unbounded, every number in a run
# such as "12,12,12,..." rescans the rest of the run, which is quadratic.
_MAX_PAIR_GROUPS = 8
# Indentation or markdown allowed between a line start and a few-shot label ("   **Question:**").
_MAX_LABEL_INDENT = 64
# Characters of ``\boxed{...}`` content read; an answer box holds a number, not an essay.
_MAX_BOXED_CHARS = 500

# --- number grammar -------------------------------------------------------------------------------

# Thousands groups are only taken when well formed (``1,234``, Indian ``1,00,000``), so a list such as
# ``5,6`` stays two numbers.  The lookbehind keeps digits glued to letters (``x2``, ``H2O``) or to a
# previous decimal point out; a sign counts only when not preceded by a letter/digit/closing bracket,
# so ``10-5`` yields ``5`` rather than ``-5``.  A ``/den`` makes a fraction unless another ``/``
# follows (that is a date, ``12/05/2021``).
NUMBER_RE = re.compile(
    r"""
    (?=[-\u2212$€£¥₹.\d])          # what a number can start with: a cheap test before the lookbehind
    (?<![^\W_]|[.)\]])
    (?P<sign>[-\u2212])?
    (?:[$€£¥₹][ \t]?)?
    (?P<sign2>[-\u2212])?
    (?P<body>(?:\d{1,3}(?:,\d{3})+|\d{1,2}(?:,\d{2}){1,""" + str(_MAX_PAIR_GROUPS) + r"""},\d{3}|\d+)(?:\.\d+)?|\.\d+)
    (?:/(?P<den>\d++)(?![\d/]))?
    (?:[ \t]++(?P<scale>(?i:thousand|million|billion|trillion))\b)?
    """,
    re.VERBOSE,
)
# "$1.5 million" is 1500000: GSM8K has answers that size, and models like to write them this way.
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}

# --- where a completion stops being an answer -----------------------------------------------------

# A new few-shot block or chat turn.  Labels must start a line or follow the end of a sentence, and
# are case-sensitive so "any questions:" in prose does not cut anything.  This pattern is the
# definition; :func:`trim_completion` finds the same first match by scanning for labels and end tokens
# (literal text the regex engine skips to quickly), ~20x faster on long text, and the fuzz suite checks
# that the two agree.
CONTINUATION_RE = re.compile(
    r"""
    (?:(?:^|\n|(?<=[.!?)*\]]))[ \t#>*]{0,""" + str(_MAX_LABEL_INDENT) + r"""}+
       (?:Question|Problem|Q|Human|User|Instruction|Input)(?:[ \t]++\d++)?[ \t]*+(?:\*\*[ \t]*+)?[:：])
    | <\|(?:endoftext|im_end|im_start|eot_id|end|user|end_of_text)\|>
    | </s> | <eos> | <end_of_turn> | \[INST\]
    """,
    re.VERBOSE,
)
_LABEL_RE = re.compile(
    r"(?:Question|Problem|Q|Human|User|Instruction|Input)(?:[ \t]++\d++)?[ \t]*+(?:\*\*[ \t]*+)?[:：]"
)
_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|eot_id|>", "<|end|>", "<|user|>",
               "<|end_of_text|>", "</s>", "<eos>", "<end_of_turn>", "[INST]")
_INDENT_CHARS = frozenset(" \t#>*")

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
        (?:[ \t]*+(?:\*\*|__))?
        (?:[ \t]++(?:is|was|would[ \t]+be|will[ \t]+be|should[ \t]+be|must[ \t]+be|equals)\b|[ \t]*+[:=])
      | ans\.(?=[ \t]*[-\u2212$\d])
    )
    """,
    re.VERBOSE | re.IGNORECASE,
)

# "A: 18" as its own short line.  In few-shot CoT prompts "A:" also opens the reasoning
# ("A: Lena sold 48/2 = 24 stickers..."), so it only counts when the rest of the line is the number
# and at most a few unit words.
SHORT_A_RE = re.compile(r"(?:^|(?<=[\s(]))A[ \t]*:[ \t]*")
# Each word is taken whole (possessive): as plain repeats, "A: 5 " + 200 letters split the letters into
# up to four words in every way before failing, which took seconds.
_SHORT_TAIL_RE = re.compile(r"[ \t]*+(?:[^\W\d_][\w'’]*+[ \t]*+){0,4}[.!]?[ \t*]*(?:\n|$)")

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

# The braces' content is stripped in code: "\{\s*([^{}]*?)\s*\}" splits a run of spaces three ways
# and is cubic on "\frac{1}{" followed by spaces.
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*+\{([^{}]*+)\}\s*+\{([^{}]*+)\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_THIN_SPACE_RE = re.compile(r"(?<=\d)(?:\{,\}|\\[,!;:][ \t]?|\\ )(?=\d{3}(?!\d))")
_LATEX_SUBS = (
    ("\\$", "$"), ("\\%", "%"), ("\\left", ""), ("\\right", ""), ("\\cdot", "*"),
    ("\\times", "*"), ("\\div", "/"), ("\\,", " "), ("\\!", ""), ("\\;", " "), ("\\quad", " "),
    ("\u00a0", " "), ("\u2009", " "), ("\u202f", " "),
)


def _frac_as_division(match: re.Match[str]) -> str:
    return f"{match[1].strip()}/{match[2].strip()}"


def _clean_latex(text: str) -> str:
    """Rewrite the LaTeX models put around numbers into plain text the number grammar reads."""
    text = _LATEX_THIN_SPACE_RE.sub(",", text)
    for _ in range(3):  # \text{\frac{..}{..}} nests; a few passes cover what models write
        text = _LATEX_TEXT_RE.sub(r"\1", text)
        text = _LATEX_FRAC_RE.sub(_frac_as_division, text)
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
    if len(match["body"]) > MAX_NUMBER_CHARS or len(match["den"] or "") > MAX_NUMBER_CHARS:
        return None
    body = match["body"].replace(",", "")
    try:
        # int() is ~20x faster than going through Decimal, and most numbers are whole.
        value = Fraction(int(body)) if "." not in body else Fraction(Decimal(body))
    except InvalidOperation:  # pragma: no cover - the grammar only admits valid decimals
        return None
    if match["den"] is not None:
        if int(match["den"]) == 0:  # "5/0" is no number, and reading it as 5 would be a wrong one
            return None
        value /= int(match["den"])
    if match["scale"] is not None:
        value *= _SCALES[match["scale"].lower()]
    if (match["sign"] is None) != (match["sign2"] is None):
        value = -value
    return value


@lru_cache(maxsize=32)
def _number_matches(text: str) -> tuple[re.Match[str], ...]:
    # Each extractor, the fallback and the boxes all read the numbers of one prepared text: found once.
    return tuple(NUMBER_RE.finditer(text))


def _numbers(text: str, skip_spans: bool = False) -> Iterator[tuple[re.Match[str], Fraction]]:
    # Both matches come in text order and the skipped spans never overlap, so one pass over each
    # decides; testing every number against every span was quadratic.
    spans = (m.span() for m in NOT_AN_ANSWER_RE.finditer(text)) if skip_spans else iter(())
    span = next(spans, None)
    for match in _number_matches(text):
        start = match.start("body")
        while span is not None and span[1] <= start:
            span = next(spans, None)
        if span is not None and span[0] <= start:
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


_RESULT_EQUALS_RE = re.compile(r"=[ \t]*+")


def is_computed(text: str, answer: str) -> bool:
    """Whether the working before ``text``'s ``####`` line reaches ``answer`` (canonical, as
    :func:`extract_answer` gives it) as the result of an ``=``: ``<<48+24=72>>`` or ``48 + 24 = 72``.

    A rationale written with the answer in front of it (STaR's rationalization) can state the answer
    without working it out; this tells the two apart. Linear time: one number is read after each ``=``.

    >>> is_computed("48 + 24 = <<48+24=72>>72 clips.\\n#### 72", "72"), is_computed("So it is 72.\\n#### 72", "72")
    (True, False)
    >>> is_computed("340*1 = <<340*1=340>>340 texts.\\n#### 70", "70"), is_computed("3 * $4 = $12.00\\n#### 12", "12")
    (False, True)
    """
    body = text.split("####", 1)[0]
    for eq in _RESULT_EQUALS_RE.finditer(body):
        match = NUMBER_RE.match(body, eq.end())
        value = _match_value(match) if match is not None else None
        if value is not None and _canonical(value) == answer:
            return True
    return False


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
    if match is None or (match["den"] is not None and match["den"].strip("0") == ""):
        return None
    value = _match_value(match)
    return None if value is None else _canonical(value)


# A lone number as people type it: commas anywhere between digits are accepted (the caller says this
# string *is* a number), then optional percent and unit words without digits.
#
# Every run of spaces is taken whole (possessive) and the tail is written as its two cases, so nothing
# can split a run several ways: the plain form was polynomial in the spaces of "1" + spaces + "x1".
# Tail: either unit words (a letter, then anything without digits, which also covers a trailing "$"
# or "."), or an optional "$" and ".".
_LOOSE_NUMBER_RE = re.compile(
    r"""
    \$?[ \t]*+
    (?P<sign>[-\u2212])?[ \t]*+
    (?:[$€£¥₹][ \t]*+)?
    (?P<sign2>[-\u2212])?
    (?P<body>\d[\d,]*+(?:\.\d*+)?|\.\d++)
    (?:[ \t]*+/[ \t]*+(?P<den>\d++))?
    (?:[ \t]++(?P<scale>(?i:thousand|million|billion|trillion))\b)?
    [ \t]*+%?[ \t]*+
    (?:[^\W\d_][^\d]*+|\$?[ \t]*+\.?)
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
    cut = _continuation_start(completion, first_digit.end()) if first_digit else None
    return completion[: len(completion) if cut is None else cut].rstrip()


def _continuation_start(text: str, pos: int) -> int | None:
    """Where ``CONTINUATION_RE.search(text, pos)`` would match, found from the labels backwards.

    A label matches at the first of these starts: the newline before its indentation, the end of the
    indentation when a sentence end precedes it, or just after any "*" within the last
    ``_MAX_LABEL_INDENT`` characters before it.  Each label looks back a bounded distance, so the scan
    is linear; labels and end tokens are literal text that ``re`` and ``str.find`` skip to quickly.
    """
    best = len(text) + 1
    for token in _END_TOKENS:
        found = text.find(token, pos)
        if found != -1 and found < best:
            best = found
    for label in _LABEL_RE.finditer(text, pos, best):
        at = label.start()
        start = at
        while start > 0 and at - start <= _MAX_LABEL_INDENT and text[start - 1] in _INDENT_CHARS:
            start -= 1
        if at - start <= _MAX_LABEL_INDENT:  # ``start`` begins the indentation
            if start == 0 and pos == 0:
                return 0
            if start > 0 and text[start - 1] == "\n" and start - 1 >= pos:
                return start - 1
            if start > 0 and text[start - 1] in ".!?)]" and start >= pos:
                return start
        star = text.find("*", max(start, at - _MAX_LABEL_INDENT - 1, pos - 1), at)
        if star != -1:
            return star + 1
    return best if best <= len(text) else None


def _window(text: str) -> str:
    """The last :data:`ANSWER_WINDOW` characters of ``text``, less the word the cut lands in."""
    if len(text) <= ANSWER_WINDOW:
        return text
    start = len(text) - ANSWER_WINDOW
    if not text[start - 1].isspace():
        # Inside a word or number: "12345" must not be read as "345", nor "4-5" as "-5".
        start = _CUT_TOKEN_RE.match(text, start).end()
    return text[start:]


_CUT_TOKEN_RE = re.compile(r"[\w.,/$€£¥₹\-\u2212]*+")


# A candidate answer: where its marker starts, its value, and the number's match in the text when the
# value is read straight from there (None for boxed content and "= n" chains).
_Candidate = tuple[int, Fraction, "re.Match[str] | None"]


def _closing_braces(text: str) -> dict[int, int]:
    """Position of each ``{`` -> position of the ``}`` that closes it (unclosed ones are absent)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for brace in _BRACE_RE.finditer(text):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            pairs[stack.pop()] = brace.start()
    return pairs


_BRACE_RE = re.compile(r"[{}]")


def _first_value_in(text: str, numbers: Sequence[re.Match[str]], starts: list[int], lo: int, hi: int) -> Fraction | None:
    """The first readable number in ``text[lo:hi]``, from the numbers of the whole text.

    A box's content starts after "{" or "=" and ends at "}", which no number spans, so the whole
    text's matches there are the ones the slice would give; scanning each box's slice again was
    quadratic on nested boxes.  A match running past ``hi`` (a capped box) falls back to the slice.
    """
    for i in range(bisect_left(starts, lo), len(numbers)):
        match = numbers[i]
        if match.start() >= hi:
            return None
        if match.end() > hi:
            found = next(_numbers(text[lo:hi]), None)
            return None if found is None else found[1]
        value = _match_value(match)
        if value is not None:
            return value
    return None


def _boxed_candidates(text: str) -> Iterator[_Candidate]:
    closing: dict[int, int] = {}
    numbers: tuple[re.Match[str], ...] = ()
    starts: list[int] = []
    for i, match in enumerate(BOXED_RE.finditer(text)):
        # Braces are paired once per text: counting depth from each box reread the rest of the text per
        # box, quadratic on "\\boxed{\\boxed{...".
        if i == 0:
            closing = _closing_braces(text)
            numbers = _number_matches(text)
            starts = [m.start() for m in numbers]
        end = closing.get(match.end() - 1, len(text))
        if end > match.end() + _MAX_BOXED_CHARS:
            end = match.end() + _MAX_BOXED_CHARS
            while end > match.end() and _CUT_TOKEN_RE.fullmatch(text[end - 1]):
                end -= 1  # the number or word the cap cuts through is dropped, as at the window's edge
        # \boxed{16 - 3 - 4 = 9} or \boxed{x = 5}: the value is the right-hand side.
        start = text.rfind("=", match.end(), end) + 1 or match.end()
        value = _first_value_in(text, numbers, starts, start, end)
        if value is not None:
            yield match.start(), value, None
    for match in BOXED_BARE_RE.finditer(text):
        found = _first_number_at(text, match.end())
        if found is not None:
            yield match.start(), found[1], found[0]


class _Marks:
    """Clause ends and "=" signs of one text, found once.

    Searching forward from every marker rescanned the rest of the text per marker: quadratic on text
    such as "the answer is 1+1 " repeated with no full stop.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.clause_ends = [m.start() for m in _CLAUSE_END_RE.finditer(text)]
        self.equals = [m.start() for m in _EQUALS_RE.finditer(text)]
        self.tails: dict[int, tuple[re.Match[str], Fraction] | None] = {}

    def chain_result(self, pos: int) -> tuple[re.Match[str], Fraction] | None:
        """The number after the last "=" between ``pos`` and the end of its clause, if any."""
        i = bisect_left(self.clause_ends, pos)
        clause_end = self.clause_ends[i] if i < len(self.clause_ends) else len(self.text)
        j = bisect_left(self.equals, clause_end) - 1
        if j < 0 or self.equals[j] < pos:
            return None
        equals = self.equals[j]
        if equals not in self.tails:  # markers in one clause share its last "="
            self.tails[equals] = _first_number_at(self.text[equals + 1: clause_end], 0)
        return self.tails[equals]


_EQUALS_RE = re.compile("=")


def _phrase_value(text: str, pos: int, marks: _Marks) -> tuple[Fraction, re.Match[str] | None] | None:
    """Value of the answer that starts right after a marker ending at ``pos``."""
    found = _first_number_at(text, pos)
    if found is None:
        return None
    match, value = found
    if _CHAIN_START_RE.match(text, match.end()):
        after = marks.chain_result(match.end())
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
    marks = _Marks(text)
    for match in ANSWER_PHRASE_RE.finditer(text):
        if _HYPOTHESIS_BEFORE_RE.search(text, max(0, match.start() - 30), match.start()):
            continue
        found = _phrase_value(text, match.end(), marks)
        if found is not None:
            yield match.start(), found[0], found[1]
    for match in SHORT_A_RE.finditer(text):
        found = _first_number_at(text, match.end())
        if found is not None and _SHORT_TAIL_RE.match(text, found[0].end()):
            yield match.start(), found[1], found[0]


# ``synthtune score`` runs three extractors on each completion; the cache trims it once, not three times.
@lru_cache(maxsize=32)
def _prepared(completion: str) -> tuple[str, bool]:
    """The text answers are read from, and whether generation stopped mid-text (max tokens)."""
    trimmed = trim_completion(completion)
    # Cut off: no stop sequence, newline or new block ended it (trimming removes nothing).
    cut_off = bool(completion) and not completion[-1].isspace() and trimmed == completion
    return _clean_latex(_window(trimmed)), cut_off


def _prepare(completion: str) -> str:
    return _prepared(completion)[0]


def _is_cut_off(completion: str) -> bool:
    return _prepared(completion)[1]


_AFTER_ANSWER = " \t\r\n.,;:!?)*"


def _clause_before(text: str, start: int) -> str:
    """The words from the last comma, full stop, semicolon or line break up to ``start``."""
    begin = max(text.rfind(c, 0, start) for c in ",.;!?\n") + 1
    return text[begin:start].strip()


def _repair_truncated(text: str, match: re.Match[str]) -> Fraction | None:
    """The full number a cut-off final number repeats, if the text shows it.

    Small models often loop ("... The answer is 18. The answer is 18. The answer is 1") until the token
    limit cuts the last number short.  When the words before the cut number occurred earlier followed
    by a longer number starting with the same digits, and the clause that leads to each (from the
    last comma, full stop or line break) is the same with no other number between them, or the text
    between the two (past the earlier one's punctuation) also came right before the earlier one, the
    text is such a loop and the earlier number is what was being written.  Otherwise it is no loop:
    "I first thought the answer is 12, but 3 - 2 = 1, so the answer is 1" corrects its answer, and a
    completion whose stop string was removed (``Sample.text`` is) ends in a number just as a cut-off
    one does.
    """
    if match.end() != len(text):
        return None
    context = text[max(0, match.start() - 15): match.start()].lstrip()
    if len(context.strip()) < 3:
        return None
    digits = match["body"]
    # The last earlier occurrence that shows such a number decides, so they are read from the end.
    pos = text.rfind(context, 0, match.start() - 1)
    while pos != -1:
        at = pos + len(context)
        # Cheap test first (the body starts within a sign, currency sign and space of ``at``), then a
        # bounded read: rereading a long digit run at every earlier occurrence was quadratic.
        if text.find(digits, at, at + 4 + len(digits)) != -1:
            earlier = NUMBER_RE.match(text, at, at + _NUMBER_SPAN)
            if earlier is not None and len(earlier["body"]) > len(digits) and earlier["body"].startswith(digits):
                # a loop: the same clause leads to both, or what lies between them came before too
                # ("18 18 18 1": nothing but spaces between)
                between = text[earlier.end(): match.start() - len(context)].lstrip(_AFTER_ANSWER)
                value = _match_value(earlier)
                # ... and no other number between them: "The answer is 12. Wait: 15 - 14 = 1. The
                # answer is 1" corrects itself with the same words
                same = (_clause_before(text, earlier.start()) == _clause_before(text, match.start())
                        and all(_match_value(m) == value
                                for m in NUMBER_RE.finditer(text, earlier.end(), match.start() - len(context))))
                return value if same or text.endswith(between, 0, pos) else None
        pos = text.rfind(context, 0, pos + len(context) - 1)
    return None


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
_LONGEST_DESCRIPTOR = len("between")


def _descriptor_before(text: str, pos: int) -> bool:
    """Whether a descriptor word ends just before ``pos`` (spaces between allowed).

    Only the few characters that can hold the word are searched: searching from the text's start for
    every number was quadratic.
    """
    end = pos
    while end and text[end - 1] in " \t":
        end -= 1
    return bool(_DESCRIPTOR_BEFORE_RE.search(text, max(0, end - _LONGEST_DESCRIPTOR), end))


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
    last = _number_matches(text)[-1]
    if last.start() > numbers[-1][0].start() and last["den"] is not None and not last["den"].strip("0"):
        return None  # "... = 7. So 5/0": the last number is none, and the one before it no answer
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
            v in seen or _descriptor_before(text, m.start()) for m, v in after[1:]
        ):
            return _canonical(after[0][1])
    return _canonical(last_value)


def extract_strict(completion: str) -> str | None:
    """Only the GSM8K ``#### n`` form, read by value.

    The *first* ``####`` counts, as in lm-eval's ``strict-match``, but any spacing, ``$``, markdown
    and thousands separators are read, and the value is normalized (``#### $42.00`` is ``42``; lm-eval
    finds no answer there: :func:`synthtune.data.lmeval_gsm8k.strict_match`). The completion is
    trimmed at a new few-shot block first.

    >>> extract_strict("48 + 24 = 72\\n#### 72"), extract_strict("The answer is 72.")
    ('72', None)
    """
    if not isinstance(completion, str):
        return None
    found = next(_strict_candidates(_prepare(completion)), None)
    return None if found is None else _canonical(found[1])


def extract_flexible(completion: str) -> str | None:
    """The last number in the (trimmed) completion, read by value.

    Unlike lm-eval's ``flexible-extract`` (:func:`synthtune.data.lmeval_gsm8k.flexible_extract`)
    the value is normalized (``18.0`` == ``18``, ``3/4`` == ``0.75``) and a run of ``$``, ``.`` and
    ``,`` without a digit is no number.

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
        # "#### 72 dollars" and "#### 25 m^2" are 72 and 25; "#### 1 1/2", "#### 3 hours 20 minutes"
        # and "#### 4:30" are no 1, 3 or 4: past a unit's exponent, the rest holds no digit
        line = _clean_latex(first_line)
        found = _first_number_at(line, 0)
        if found is None or any(c.isdigit() for c in _EXPONENT_RE.sub("", line[found[0].end():])):
            return None
        return _canonical(found[1])
    return normalize_number(text)


_EXPONENT_RE = re.compile(r"(?<=[^\W\d_])(?:\^\{?\d\}?|[²³])")


def is_correct(completion: str, gold: str | int | float) -> bool:
    """Whether the final answer in ``completion`` equals ``gold`` as a number.

    >>> is_correct("... so she has 18.00 dollars.", "#### 18"), is_correct("#### 17", 18)
    (True, False)
    """
    expected = extract_gold(gold)
    got = extract_answer(completion)
    # Canonical forms are unique per value, so string equality is numeric equality.
    return expected is not None and got is not None and expected == got
