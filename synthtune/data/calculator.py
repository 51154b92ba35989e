"""Check the arithmetic written in a solution, without ``eval``.

GSM8K solutions carry calculator annotations, ``48/2 = <<48/2=24>>24``, and synthesized solutions
imitate them, or write equations in prose (``5 * $3 = $15``, ``12 x 4 = 48``).  A solution whose
arithmetic is wrong is a poor training example even when its final answer happens to be right, so
the synthesis loop filters on :func:`check_calculations`.

Expressions are evaluated by a small recursive-descent parser over exact fractions: model text is
untrusted, and ``eval`` (even on an AST whitelist) makes it easy to forget a node type or to let
``9**9**9`` stall the process.

Every value is bounded, not only exponents: a literal, and every intermediate result, numerator and
denominator alike, has at most :data:`MAX_DIGITS` digits, and a power is refused before it is computed
when its result would not.  ``(((10**64)**64)**64)**64`` is therefore an error found in microseconds.
:func:`exact_value` raises :class:`CalcError` and nothing else (overflow, int/str size limits, deep
nesting and memory included); its subclass :class:`CalcLimit` means "too long or too deep to read",
and :func:`check_calculations` reports such calculations as unchecked rather than wrong.  It never
raises: it reads the first :data:`MAX_CHECK_CHARS` characters of a text and lists the rest as unchecked,
and no pattern in this module backtracks more than a bounded amount, so its time is linear in the text.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from fractions import Fraction
from itertools import pairwise

__all__ = ["CHECK_VERSION", "CalcError", "CalcLimit", "CalcReport", "check_calculations", "exact_value"]

#: The rules :func:`check_calculations` judges by. A synthesis run records it in its resume fingerprint,
#: so rows kept under other rules are not mixed into one dataset. 1: every version before it was
#: recorded; 2: an annotation and the prose that restates it are one calculation, right only when both are;
#: 3: a prose equation that converts units ("25 cents x 4 = $1") is read in both units.
CHECK_VERSION = 3

# 10**64 is far beyond any grade-school quantity.  Bounding exponents alone does not bound values
# (a power of a power multiplies them), so every result is bounded too: 1,000 digits keep arithmetic in
# microseconds and every value far below Python's 4,300-digit int->str limit.
MAX_EXPONENT = 64
MAX_DIGITS = 1000
_MAX_BITS = 3322  # 10**1000 < 2**3322
MAX_DEPTH = 50
MAX_TOKENS = 200
# Lengths past which text is left unchecked.  GSM8K annotations are under 100 characters and its
# solutions under 1,500; a rationale of 16,384 characters is ~4,000 tokens.
MAX_EXPRESSION_CHARS = 2000
MAX_CHECK_CHARS = 16384
# A thousands-grouped literal has at most this many groups (33 * 3 + 3 > MAX_DIGITS): unbounded, every
# number in a run such as "123,123,123,..." rescans the rest of the run.
_MAX_GROUPS = 33

ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")

# One token at a time.  ``x``/``×`` multiply and ``÷`` divides only in prose; ``%`` is modulo in
# annotations (Python syntax) but a percent sign in prose.
_TOKEN_RE = re.compile(
    r"""
      (?P<ws>[ \t]+)
    | (?P<mixed>(?P<whole>\d+)[ \t]+(?:and[ \t]+)?(?P<mnum>[1-9]\d*)/(?P<mden>\d+)(?![\d/.]))
    | (?P<frac>(?P<fnum>[1-9]\d*|0)/(?P<fden>\d+)(?![\d/.]))
    | (?P<num>(?:[$€£¥₹][ \t]*)?(?:\d{1,3}(?:,\d{3}){1,""" + str(_MAX_GROUPS) + r"""}+(?![\d,])|\d+)(?:\.\d+)?(?!\d)
        |(?:[$€£¥₹][ \t]*)?\.\d+)
      (?P<pct>[ \t]?%)?
    | (?P<op>\*\*|//|[-+*/^×÷\u2212\u2013])
    | (?P<lp>\() | (?P<rp>\)) | (?P<eq>=)
    | (?P<word>[^\W\d_]+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
# The en dash is a minus in "$2,430 – $2,100"; ranges ("5–6 hours") never reach a check on their own.
_OP_ALIASES = {"×": "*", "÷": "/", "\u2212": "-", "\u2013": "-", "^": "**"}


class CalcError(ValueError):
    """An expression that cannot be evaluated (bad syntax, division by zero, a value too large).

    The only exception :func:`exact_value` raises: arithmetic failures of any kind are turned into it.
    """


class CalcLimit(CalcError):
    """An expression too long or nested too deeply to read; a check reports it as unchecked."""


@dataclass
class CalcReport:
    """Outcome of :func:`check_calculations`.

    ``fraction`` is ``n_correct / n_checked``, or None when the text had nothing to check (callers
    must not read "no arithmetic" as "all arithmetic right" or "all wrong").  ``unchecked`` says what
    was left out for being too long to read (:class:`CalcLimit`); it counts neither way.
    """

    n_checked: int = 0
    n_correct: int = 0
    errors: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float | None:
        return self.n_correct / self.n_checked if self.n_checked else None

    def as_dict(self) -> dict[str, object]:
        """The counts and messages; ``unchecked`` appears only when something was left unchecked."""
        out: dict[str, object] = {"n_checked": self.n_checked, "n_correct": self.n_correct,
                                  "fraction": self.fraction, "errors": list(self.errors)}
        if self.unchecked:
            out["unchecked"] = list(self.unchecked)
        return out


@dataclass(frozen=True)
class _Tok:
    kind: str  # "num", "op", "(", ")", "=", or "break"
    text: str
    start: int
    end: int
    value: Fraction | None = None
    decimals: int = 0
    percent: bool = False
    fraction: bool = False  # a written fraction such as "1/3" (prose), itself a division


def _number_token(text: str, start: int, end: int, percent: bool) -> _Tok:
    digits = text.lstrip("$€£¥₹ \t").replace(",", "")
    decimals = len(digits.split(".", 1)[1]) if "." in digits else 0
    if len(digits) > MAX_DIGITS + 1:  # a number, but too long to read: the parser raises CalcLimit on it
        return _Tok("num", text, start, end, None, decimals, percent)
    return _Tok("num", text, start, end, Fraction(Decimal(digits)), decimals, percent)


def _int(digits: str) -> int | None:
    """``int(digits)``, or None past :data:`MAX_DIGITS` (where ``int`` raises for over 4,300)."""
    return int(digits) if len(digits) <= MAX_DIGITS else None


def _tokenize(text: str, prose: bool) -> list[_Tok]:
    """Split ``text`` into numbers, operators, parentheses, ``=`` and breaks (anything else).

    In prose a number glued to letters ("2x", "5A", "D3", "1.2Y") is algebra or a label, and a
    number with a leading zero ("0900") is a clock time, so both become breaks rather than values.
    A tight fraction ("1/3") is one number there, as in "25 / 1/3 = 75", and so is a mixed number
    ("1 1/2", "1 and 1/3").
    """
    tokens: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        assert m is not None  # the "other" branch matches any character
        # (endpos, not a slice: copying the text up to here for every such token was quadratic)
        if m["mixed"] is not None and not (prose and _proper(m["mnum"], m["mden"])):
            # Annotations are Python, and "3 10/2" is no mixed number: read the first number alone.
            m = _TOKEN_RE.match(text, pos, m.end("whole"))
        elif m["frac"] is not None and not prose:
            m = _TOKEN_RE.match(text, pos, m.end("fnum"))
        assert m is not None
        pos = m.end()
        kind = next(name for name in _KINDS if m[name] is not None)
        if kind == "ws":
            continue
        start, end = m.start(), m.end()
        glued_before = _glued_before(tokens, text, start)
        if kind in ("mixed", "frac"):
            parts = [_int(m[g]) for g in (("whole", "mnum", "mden") if kind == "mixed" else ("fnum", "fden"))]
            if None in parts:
                tokens.append(_Tok("num", m.group(), start, end, None))  # too long to read
                continue
            value: Fraction | None = None
            if parts[-1]:
                value = Fraction(parts[-2], parts[-1]) + (parts[0] if kind == "mixed" else 0)
            if value is None or glued_before or _letter_at(text, end):
                tokens.append(_Tok("break", m.group(), start, end))
            else:
                tokens.append(_Tok("num", m.group(), start, end, value, 0, False, True))
        elif kind == "num":
            num_text = m["num"]
            end = start + len(num_text)
            digits = num_text.lstrip("$€£¥₹ \t")
            leading_zero = len(digits) > 1 and digits[0] == "0" and digits[1].isdigit()
            if prose and leading_zero and _space_thousands(tokens, text, start, digits):
                # "$80 000", "18 000 watts": a space as thousands separator, as GSM8K sometimes writes.
                prev = tokens.pop()
                assert prev.value is not None
                merged = prev.value * 1000 + int(digits)
                tokens.append(_Tok("num", text[prev.start:end], prev.start, end, merged, 0, prev.percent))
                continue
            glued = glued_before or (_letter_at(text, end) and not _x_operator_follows(text, end))
            if prose and (glued or leading_zero):
                # Algebra ("2x", "5A", "D3") and clock times ("0900") are not quantities to check.
                tokens.append(_Tok("break", m.group(), start, m.end()))
                continue
            tokens.append(_number_token(num_text, start, end, bool(m["pct"]) and prose))
            if m["pct"] and not prose:
                tokens.append(_Tok("op", "%", m.start("pct"), m.end("pct")))
        elif kind == "op":
            tokens.append(_Tok("op", _OP_ALIASES.get(m["op"], m["op"]), start, end))
        elif kind in ("lp", "rp", "eq"):
            prev = tokens[-1] if tokens else None
            if prose and kind == "lp" and prev and prev.end == start and prev.kind in ("num", ")"):
                # "2(50+100)" and "66(1/3)": multiplication written by juxtaposition.
                tokens.append(_Tok("op", "*", start, start))
            tokens.append(_Tok({"lp": "(", "rp": ")", "eq": "="}[kind], m.group(), start, end))
        elif (kind == "word" and prose and m.group() in ("x", "X") and tokens
              and tokens[-1].kind in ("num", ")") and _x_operator_follows(text, start)):
            tokens.append(_Tok("op", "*", start, end))
        elif kind == "word" and prose and tokens and tokens[-1].kind == "num" and (
            units := _UNIT_WORDS_RE.match(text, start)
        ):
            # "3 packs × $4.50 = $13.50", "2.5 hours × 60 = 150": unit words between a number and the
            # next operator are read past, as a person reads them.
            pos = units.end()
        elif kind == "other" and not prose and m.group() == "%":
            tokens.append(_Tok("op", "%", start, end))
        else:
            tokens.append(_Tok("break", m.group(), start, end))
    return tokens


def _proper(numerator: str, denominator: str) -> bool:
    """Whether numerator < denominator; digit strings too long to convert compare by length."""
    num, den = _int(numerator), _int(denominator)
    return num < den if num is not None and den is not None else len(numerator) < len(denominator)


# Up to three words, then an operator (a lone "x" counts when a number follows it).  Not before "=":
# "... by 11/20 we get X = $1200" and "1/2 a cup = 4 ounces" end an expression rather than qualify it.
_UNIT_WORDS_RE = re.compile(
    r"[^\W\d_]+(?:[ \t]+[^\W\d_]+){0,2}(?=[ \t]*(?:[-+*/×÷\u2212]|[xX][ \t]*[$€£¥₹(.\d]))"
)
_KINDS = ("ws", "mixed", "frac", "num", "op", "lp", "rp", "eq", "word", "other")


def _letter_at(text: str, pos: int) -> bool:
    return pos < len(text) and text[pos].isalpha()


def _space_thousands(tokens: list[_Tok], text: str, start: int, digits: str) -> bool:
    if len(digits) != 3 or not tokens or tokens[-1].kind != "num" or tokens[-1].fraction:
        return False
    prev = tokens[-1]
    prev_digits = prev.text.lstrip("$€£¥₹ \t")
    return text[prev.end:start] == " " and prev_digits.isdigit() and len(prev_digits) <= 3


def _glued_before(tokens: list[_Tok], text: str, start: int) -> bool:
    # The "x" of "12x4" is a letter touching the 4, but it was already read as a times sign.
    if not (start and text[start - 1].isalpha()):
        return False
    return not (tokens and tokens[-1].kind == "op" and tokens[-1].end == start)


_X_OPERATOR_RE = re.compile(r"[xX][ \t]*[$€£¥₹(.\d]")


def _x_operator_follows(text: str, pos: int) -> bool:
    """Whether ``text[pos]`` is an ``x`` used as a times sign: "12 x 4", "12x4", "75x 8", "0.2 x $50"."""
    return bool(_X_OPERATOR_RE.match(text, pos)) and not _letter_at(text, pos + 1)


class _Parser:
    """Recursive descent with Python's precedence: ``+ -`` < ``* / // %`` < unary ``-`` < ``**``."""

    def __init__(self, tokens: list[_Tok], percent_as_fraction: bool) -> None:
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.percent_as_fraction = percent_as_fraction

    def parse(self) -> Fraction:
        if not self.tokens:
            raise CalcError("empty expression")
        if len(self.tokens) > MAX_TOKENS:
            raise CalcLimit(f"expression too long (over {MAX_TOKENS} tokens)")
        try:
            value = self._sum()
        except CalcError:
            raise
        except (ArithmeticError, ValueError, RecursionError, MemoryError) as exc:
            # Bounds make these unreachable as far as we know; if one is missed, the caller still gets
            # the one documented error type.
            raise CalcError(f"cannot evaluate ({type(exc).__name__}: {exc})") from exc
        if self.pos != len(self.tokens):
            raise CalcError(f"unexpected {self.tokens[self.pos].text!r}")
        return value

    def _peek_op(self, *ops: str) -> str | None:
        if self.pos < len(self.tokens):
            tok = self.tokens[self.pos]
            if tok.kind == "op" and tok.text in ops:
                return tok.text
        return None

    def _sum(self) -> Fraction:
        value = self._product()
        while op := self._peek_op("+", "-"):
            self.pos += 1
            rhs = self._product()
            value = _bounded(value + rhs if op == "+" else value - rhs)
        return value

    def _product(self) -> Fraction:
        value = self._unary()
        while op := self._peek_op("*", "/", "//", "%"):
            self.pos += 1
            rhs = self._unary()
            if op == "*":
                value = _bounded(value * rhs)
                continue
            if rhs == 0:
                raise CalcError("division by zero")
            if op == "/":
                value = _bounded(value / rhs)
            elif op == "//":
                value = _bounded(Fraction(value // rhs))
            else:
                value = _bounded(value % rhs)
        return value

    def _unary(self) -> Fraction:
        if op := self._peek_op("-", "+"):
            self.pos += 1
            self._enter()
            try:
                value = self._unary()
            finally:
                self.depth -= 1
            return -value if op == "-" else value
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek_op("**"):
            self.pos += 1
            self._enter()
            try:
                exponent = self._unary()  # right-associative, and 2**-1 is legal
            finally:
                self.depth -= 1
            if exponent.denominator != 1:
                raise CalcError("fractional exponent")
            if abs(exponent) > MAX_EXPONENT:
                raise CalcError(f"exponent larger than {MAX_EXPONENT}")
            if base == 0 and exponent < 0:
                raise CalcError("division by zero")
            # Refused before computing: the result has about size(base) * exponent bits.
            if max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(exponent) > _MAX_BITS + 64:
                raise CalcError(f"result has more than {MAX_DIGITS} digits")
            return _bounded(base ** int(exponent))
        return base

    def _atom(self) -> Fraction:
        if self.pos >= len(self.tokens):
            raise CalcError("expression ends early")
        tok = self.tokens[self.pos]
        if tok.kind == "num":
            self.pos += 1
            if tok.value is None:
                raise CalcLimit(f"number longer than {MAX_DIGITS} digits")
            return tok.value / 100 if tok.percent and self.percent_as_fraction else tok.value
        if tok.kind == "(":
            self.pos += 1
            self._enter()
            try:
                value = self._sum()
            finally:
                self.depth -= 1
            if self.pos >= len(self.tokens) or self.tokens[self.pos].kind != ")":
                raise CalcError("unbalanced parentheses")
            self.pos += 1
            return value
        raise CalcError(f"unexpected {tok.text!r}")

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcLimit(f"expression nested too deeply (over {MAX_DEPTH} levels)")


def _bounded(value: Fraction) -> Fraction:
    """``value``, or :class:`CalcError` when its numerator or denominator passes :data:`MAX_DIGITS`."""
    if value.numerator.bit_length() > _MAX_BITS or value.denominator.bit_length() > _MAX_BITS:
        raise CalcError(f"result has more than {MAX_DIGITS} digits")
    return value


def _values(tokens: list[_Tok]) -> set[Fraction]:
    """Every value ``tokens`` can mean: "20%" is 0.2 in "20% * 50" but 20 in "0.2 * 100 = 20%"."""
    readings = (True, False) if any(t.percent for t in tokens) else (False,)
    return {_Parser(tokens, as_fraction).parse() for as_fraction in readings}


def exact_value(expression: str, prose: bool = False) -> Fraction:
    """Exact value of an arithmetic expression; :class:`CalcError` if it is not one.

    >>> exact_value("48/2"), exact_value("(1/2)*14 + 2**3"), exact_value("12 x 4", prose=True)
    (Fraction(24, 1), Fraction(15, 1), Fraction(48, 1))
    >>> exact_value("(10**64)**64")
    Traceback (most recent call last):
    ...
    synthtune.data.calculator.CalcError: result has more than 1000 digits
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalcLimit(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tokens = _tokenize(expression, prose)
    except CalcError:
        raise
    except (ArithmeticError, ValueError, RecursionError, MemoryError) as exc:
        raise CalcError(f"cannot read ({type(exc).__name__}: {exc})") from exc
    if any(t.kind in ("break", "=") for t in tokens):
        bad = next(t for t in tokens if t.kind in ("break", "="))
        raise CalcError(f"unexpected {bad.text!r}")
    return _Parser(tokens, percent_as_fraction=True).parse()


def _round_half_up(value: Fraction, places: int) -> Fraction:
    scale = 10**places
    scaled = abs(value) * scale
    rounded = Fraction(int(scaled + Fraction(1, 2)), scale)
    return rounded if value >= 0 else -rounded


def _agrees(exact: Fraction, written: Fraction, decimals: int) -> bool:
    """Whether ``written`` is ``exact`` or ``exact`` rounded to the decimals actually written.

    GSM8K writes ``<<10/3=3.33>>`` and ``<<2/3=0.67>>``; both rounding directions of a tie (half up,
    half even) are accepted because writers use either, and with two or more decimals so is cutting
    the digits off ("16.66" for 16.666...).  An integer result is only accepted when it is exact:
    "7/2 = 3" is the kind of slip the check exists to catch.
    """
    if exact == written:
        return True
    if decimals == 0:
        return False
    scale = 10**decimals
    accepted = {_round_half_up(exact, decimals), Fraction(round(exact * scale), scale)}
    if decimals >= 2:
        # "15/90 * 100% = 16.66", "3/21 * 100% = 14.28": GSM8K writers also cut repeating decimals.
        accepted.add(Fraction(int(exact * scale), scale))
    return written in accepted


def _fmt(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    try:
        return f"{float(value):.6g}"
    except OverflowError:  # past 1.8e308 (values go up to 10**1000)
        with localcontext() as ctx:
            ctx.prec = 6
            return f"{Decimal(value.numerator) / Decimal(value.denominator):.6g}"


def _check_annotation(body: str) -> str | None:
    """None if ``body`` (the text between ``<<`` and ``>>``) is right, else what is wrong.

    Raises :class:`CalcLimit` when the annotation is too long or deep to check.
    """
    if len(body) > MAX_EXPRESSION_CHARS:
        raise CalcLimit(f"longer than {MAX_EXPRESSION_CHARS} characters")
    if "=" not in body:
        return f"<<{body}>>: no '=' in annotation"
    lhs, rhs = body.rsplit("=", 1)
    try:
        exact = exact_value(lhs)
    except CalcLimit:
        raise
    except CalcError as exc:
        return f"<<{body}>>: cannot evaluate {lhs.strip()!r} ({exc})"
    rhs_tokens = _tokenize(rhs, prose=False)
    sign = 1
    if len(rhs_tokens) == 2 and rhs_tokens[0].kind == "op" and rhs_tokens[0].text == "-":
        sign, rhs_tokens = -1, rhs_tokens[1:]
    if len(rhs_tokens) != 1 or rhs_tokens[0].kind != "num" or rhs_tokens[0].value is None:
        # GSM8K has a few like <<3/4=3/4>>: a result written as an expression must be exact.
        try:
            written = exact_value(rhs)
        except CalcLimit:
            raise
        except CalcError:
            return f"<<{body}>>: result {rhs.strip()!r} is not a number"
        return None if written == exact else f"<<{body}>>: {lhs.strip()} is {_fmt(exact)}, not {rhs.strip()}"
    if _agrees(exact, sign * rhs_tokens[0].value, rhs_tokens[0].decimals):
        return None
    return f"<<{body}>>: {lhs.strip()} is {_fmt(exact)}, not {rhs.strip()}"


def _longest_parseable(tokens: list[_Tok], from_end: bool) -> list[_Tok] | None:
    """The longest run of ``tokens`` ending at its end (or starting at its start) that parses.

    Runs that cannot parse for their brackets or their ends are skipped without parsing: parsing
    "((((1+1+...+1" at every length reads to the end each time, quadratic in the run.
    """
    n = len(tokens)
    depth = [0]  # depth[i]: open brackets after the first i tokens
    for tok in tokens:
        depth.append(depth[-1] + (tok.kind == "(") - (tok.kind == ")"))
    # lowest[i]: the lowest depth from token i on (from the end) or up to token i (from the start)
    lowest = depth[:]
    if from_end:
        if not tokens or tokens[-1].kind not in ("num", ")"):
            return None  # every candidate ends there
        for i in range(n - 1, -1, -1):
            lowest[i] = min(depth[i], lowest[i + 1])
    else:
        for i in range(1, n + 1):
            lowest[i] = min(depth[i], lowest[i - 1])
    for size in range(min(n, MAX_TOKENS), 0, -1):
        # A run parses only if balanced: never below its starting depth, and back to it at its end.
        if from_end:
            start = n - size
            if lowest[start] != depth[start] or depth[n] != depth[start] or tokens[start].kind in _NO_START:
                continue
            part = tokens[start:]
        else:
            if depth[size] != 0 or lowest[size] < 0 or tokens[size - 1].kind not in ("num", ")"):
                continue
            part = tokens[:size]
        try:
            _values(part)
        except CalcError:
            continue
        return part
    return None


_NO_START = (")", "=", "break")


def _has_operator(tokens: list[_Tok]) -> bool:
    # Only a binary operator (or a written fraction) makes a calculation; "x = -5" or "D3 = 644"
    # merely restates a value.
    return any(t.fraction for t in tokens) or any(
        t.kind == "op" and prev.kind in ("num", ")") for prev, t in pairwise(tokens)
    )


def _percent_after_sign(tokens: list[_Tok]) -> bool:
    # "10 - 20% = 8" means "less 20% of 10", which neither reading of a percent sign captures.
    return any(t.percent and prev.kind == "op" and prev.text in "+-" for prev, t in pairwise(tokens))


def _left_side(text: str, part: list[_Tok]) -> list[_Tok] | None:
    """The expression on the left of an ``=``, or None when it is not safely complete.

    Prose cuts expressions short: "S + 143 = ..." (a variable), "X*2 - $40 = ..." or "$80 000 x 20/100"
    (a space as thousands separator).  When what precedes the parseable tail is a number or an
    operator, or the tail opens with a sign that binds to something unseen, the equation is skipped
    rather than reported as wrong.
    """
    left = _longest_parseable(part, from_end=True)
    if not left:
        return None
    dropped = part[: len(part) - len(left)]
    if dropped and dropped[-1].kind in ("num", "op"):
        return None
    if (len(left) == 3 and left[1].text == "-" and left[0].end == left[1].start == left[2].start - 1
            and left[0].value is not None and left[2].value is not None and left[0].value < left[2].value):
        return None  # "Weeks 1-2 = ...": a range, not a subtraction
    first = left[0]
    if first.kind == "op":
        if first.text != "-":
            return None
        prev = text[: first.start].rstrip()[-1:]
        if prev and (prev.isalnum() or prev in ").%"):
            return None
    return left


_MIXED_TAIL_RE = re.compile(r"[ \t]+and[ \t]+[($€£¥₹]?\d+/\d+")
_CENTS_TAIL_RE = re.compile(r"[ \t]*(?:cents?\b|¢)")
# Runs of spaces are taken whole: "[ \t]*,?[ \t]*" splits a run of n spaces n ways, quadratic per "=".
_REMAINDER_TAIL_RE = re.compile(
    r"(?:[ \t]++[^\W\d_]+){0,3}[ \t]*+,?[ \t]*+(?:with[ \t]++)?(?:a[ \t]++)?(?:remainder\b|rem\b|[rR][ \t]*+\d)"
)


def _right_side(text: str, part: list[_Tok]) -> list[_Tok] | None:
    """The value on the right of an ``=``, or None when it continues in a way we cannot read.

    "= 30 + M trees", "= 24/Y", "= 18 000 watts" and "= $10/hour" all leave an operator or a number
    behind the parseable head; those are skipped.
    """
    right = _longest_parseable(part, from_end=False)
    if not right:
        return None
    rest = part[len(right):]
    if rest and rest[0].kind in ("num", "op", "("):
        return None
    if _MIXED_TAIL_RE.match(text, right[-1].end):
        return None  # "= 16 and (2/3)", "= $3 and $1/3": a mixed number spelled out
    return right


def _prose_equations(text: str, annotated: list[tuple[int, int]], shown: str,
                     unchecked: list[str] | None = None) -> list[tuple[str | None, int | None]]:
    """Check "a op b = c" equations in prose: one (problem or None when right, index of the
    annotation it restates or None) per equation. ``text`` has its annotations blanked; a problem
    quotes the equation from ``shown``, the same text with them.

    An equation restates the annotation that stands between its ``=`` and its result, GSM8K's
    ``48/2 = <<48/2=24>>24``. One whose annotations stand among its operands (``5 + <<2*3=6>>6 = 11``)
    is a calculation of its own."""
    results: list[tuple[str | None, int | None]] = []
    starts = [a_start for a_start, _ in annotated]
    segment: list[_Tok] = []
    for tok in [*_tokenize(text, prose=True), _Tok("break", "", len(text), len(text))]:
        if tok.kind != "break":
            segment.append(tok)
            continue
        parts: list[list[_Tok]] = [[]]
        for t in segment:
            if t.kind == "=":
                parts.append([])
            else:
                parts[-1].append(t)
        segment = []
        for i in range(len(parts) - 1):
            # Only the first side of a chain can have been cut short by the text before it.
            left = _left_side(text, parts[i]) if i == 0 else _longest_parseable(parts[i], from_end=False)
            if i > 0 and left is not None and len(left) != len(parts[i]):
                left = None
            right = _right_side(text, parts[i + 1])
            if not left or not right or not _has_operator(left):
                too_long = [t for t in (*parts[i], *parts[i + 1]) if t.kind == "num" and t.value is None]
                if too_long and unchecked is not None:  # it may be an equation; it cannot be read
                    equation = shown[(parts[i] or parts[i + 1])[0].start: (parts[i + 1] or parts[i])[-1].end]
                    unchecked.append(f"{_clip(equation)}: number longer than {MAX_DIGITS} digits")
                continue
            if _percent_after_sign(left) or _percent_after_sign(right):
                continue
            # The prose around an annotation says the same calculation again; the caller counts the two as
            # one. It is the annotation after the left side and within the right one ("$<<...>>24" reads
            # as one number token, "$" to "24").
            j = bisect_left(starts, left[-1].end)  # the first annotation after the left side (in order)
            restated = j if j < len(annotated) and annotated[j][1] <= right[-1].end else None
            factors = _conversions(text, left, right)
            problem = _check_equation(text, left, right, parts[i + 1], shown, factors or set())
            if problem is not None and (factors is None or (factors and _mixed_units(text, left))):
                # "6 months x 2 = 1 year" (no fixed factor), "50 cents + $2 = $2.50" (the units mix
                # within the left side): one factor cannot read it, so it is not judged
                continue
            results.append((problem, restated))
    return results


# Units that convert into one another: each dimension's units in its smallest, so "25 cents x 4 = $1"
# and "30 minutes x 4 = 2 hours" are read as right once converted. Months and years have no fixed size
# (4 weeks or 30 days; 52 weeks or 365 days): such a conversion is not judged when it fails as written.
_UNIT_SIZES = {
    "cent": ("money", 1), "dollar": ("money", 100),
    "second": ("time", 1), "minute": ("time", 60), "hour": ("time", 3600), "day": ("time", 86400),
    "week": ("time", 604800), "month": ("time", None), "year": ("time", None),
    "inch": ("length", 1), "foot": ("length", 12), "feet": ("length", 12), "yard": ("length", 36),
    "mile": ("length", 63360),
    "ounce": ("mass", 1), "pound": ("mass", 16),
    "cup": ("volume", 1), "pint": ("volume", 2), "quart": ("volume", 4), "gallon": ("volume", 16),
}
#: abbreviations as GSM8K-style text writes them ("in" is left out: it is a preposition first)
_UNIT_ABBREVIATIONS = {"sec": "second", "min": "minute", "hr": "hour", "wk": "week", "yr": "year",
                       "ft": "foot", "yd": "yard", "oz": "ounce", "lb": "pound", "qt": "quart", "gal": "gallon"}
_UNIT_AFTER_RE = re.compile(r"[ \t]*([^\W\d_]+|¢)")
_WORD_RE = re.compile(r"[^\W\d_]+")


def _unit(word: str) -> str | None:
    """The unit ``word`` names ("minutes" -> "minute", "¢" -> "cent"), if it is one that converts."""
    w = word.lower()
    if w == "¢":
        return "cent"
    for stem in (w, w[:-1] if w.endswith("s") else "", w[:-2] if w.endswith("es") else ""):
        if stem in _UNIT_SIZES:
            return stem
        if stem in _UNIT_ABBREVIATIONS:
            return _UNIT_ABBREVIATIONS[stem]
    return None


def _conversions(text: str, left: list[_Tok], right: list[_Tok]) -> set[Fraction] | None:
    """Factors that turn the left side's unit into the result's: empty when the two name no
    different units of one dimension, None when such a conversion has no fixed factor (months)."""
    units = {u for a, b in pairwise(left) for w in _WORD_RE.findall(text, a.end, b.start) if (u := _unit(w))}
    if not units:
        return set()
    after = _UNIT_AFTER_RE.match(text, right[-1].end)
    result = "dollar" if "$" in right[-1].text else (_unit(after.group(1)) if after else None)
    if result is None or result in units:
        return set()
    dimension, size = _UNIT_SIZES[result]
    factors: set[Fraction] = set()
    for u in units:
        dim, from_size = _UNIT_SIZES[u]
        if dim != dimension:
            continue
        if size is None or from_size is None:
            return None
        factors.add(Fraction(from_size, size))
    return factors


_COMPOUND_BEFORE_RE = re.compile(r"(?:\d[ \t]*([^\W\d_]+)|\$[ \t]*\d[\d,.]*)[ \t]+(?:and[ \t]+)?$")


def _mixed_units(text: str, left: list[_Tok]) -> bool:
    """Whether the left side holds more than one unit of a dimension: a sum or difference, a dollar
    amount beside cents, or the tail of a compound quantity ("1 hour 30 minutes x 2", "$2 and 50
    cents x 2")."""
    if any(t.kind == "op" and t.text in ("+", "-", "\u2212") for t in left) or any("$" in t.text for t in left):
        return True
    before = _COMPOUND_BEFORE_RE.search(text, max(0, left[0].start - 40), left[0].start)
    return before is not None and (before.group(1) is None or _unit(before.group(1)) is not None)


def _check_equation(text: str, left: list[_Tok], right: list[_Tok], right_part: list[_Tok], shown: str,
                    factors: set[Fraction]) -> str | None:
    """A problem with the equation, or None when it is right. ``factors``: unit conversions from
    the left side's unit to the result's (:func:`_conversions`); the left side may be read in either."""
    try:
        lhs_values = _values(left)
        rhs_values = _values(right)
    except CalcError:  # pragma: no cover - both sides were chosen because they parse
        return None
    lhs_values = lhs_values | {v * f for v in lhs_values for f in factors}
    # A single written number, possibly negative, is compared allowing for rounding.
    written = right[-1] if len(right) == 1 or (len(right) == 2 and right[0].text == "-") else None
    if written is not None and not factors and _CENTS_TAIL_RE.match(text, right[-1].end):
        # "$2.50 - $2.24 = 26 cents": dollars on the left, cents on the right.
        lhs_values = lhs_values | {v * 100 for v in lhs_values}
    if written is not None and _REMAINDER_TAIL_RE.match(text, right[-1].end):
        # "13 / 6 = 2 full cycles with a remainder of 1": integer division, said so in words.
        lhs_values = lhs_values | {Fraction(v.numerator // v.denominator) for v in lhs_values}
    for exact in lhs_values:
        for value in rhs_values:
            if written is not None and _agrees(exact, value, written.decimals):
                return None
            if written is None and exact == value:
                return None
        # A running total, "3 * 4 = 12 + 2 = 14": the left side equals the first number on the right.
        first = right_part[0]
        if len(right) > 1 and first.kind == "num" and first.value is not None and (
            _agrees(exact, first.value, first.decimals) or (first.percent and exact == first.value / 100)
        ):
            return None
    equation = shown[left[0].start: right[-1].end]
    values = ", ".join(sorted(_fmt(v) for v in lhs_values))
    return f"{equation}: left side is {values}"


def _check_cut(text: str) -> int:
    """Where to stop reading a text longer than :data:`MAX_CHECK_CHARS`: a line end, else a space.

    Cutting inside a line could leave "3 * 4 = 1" of "3 * 4 = 12" and report a false error.
    """
    line_end = text.rfind("\n", 0, MAX_CHECK_CHARS)
    if line_end > 0:
        return line_end
    return max(0, max(text.rfind(c, 0, MAX_CHECK_CHARS) for c in " \t"))


def _clip(body: str, limit: int = 80) -> str:
    return body if len(body) <= limit else f"{body[:limit]}... ({len(body):,} characters)"


def check_calculations(text: str) -> CalcReport:
    """Check every ``<<expr=result>>`` annotation and every plain equation in ``text``.

    >>> r = check_calculations("She sold 48/2 = <<48/2=24>>24 stickers, then 48+24 = <<48+24=72>>72.")
    >>> r.n_checked, r.n_correct, r.fraction
    (2, 2, 1.0)
    >>> r = check_calculations("It costs $2*2 = <<2*2=4>>2 dollars.")  # the prose says another result
    >>> r.n_checked, r.n_correct, r.errors
    (1, 0, ['$2*2 = <<2*2=4>>2: left side is 4'])
    >>> r = check_calculations("5 * $3 = $15 and 12 x 4 = 46")
    >>> r.n_checked, r.n_correct, r.errors
    (2, 1, ['12 x 4 = 46: left side is 48'])
    >>> check_calculations("No arithmetic here.").fraction is None
    True
    >>> r = check_calculations("<<" + "(" * 60 + "1" + ")" * 60 + "=1>>")  # too deep to read
    >>> r.n_checked, r.unchecked[0][-45:]
    (0, 'expression nested too deeply (over 50 levels)')
    """
    report = CalcReport()
    if len(text) > MAX_CHECK_CHARS:
        cut = _check_cut(text)
        report.unchecked.append(f"characters {cut:,} to {len(text):,}: only the first {MAX_CHECK_CHARS:,} "
                                "characters of a text are checked")
        text = text[:cut]
    annotated: list[tuple[int, int]] = []
    right: list[bool | None] = []  # per annotation; None: too long to check
    for match in ANNOTATION_RE.finditer(text):
        annotated.append(match.span())
        try:
            problem = _check_annotation(match.group(1))
        except CalcLimit as exc:
            report.unchecked.append(f"<<{_clip(match.group(1))}>>: {exc}")
            right.append(None)
            continue
        report.n_checked += 1
        right.append(problem is None)
        if problem is None:
            report.n_correct += 1
        else:
            report.errors.append(problem)
    # Blank the annotations (same length, so positions still line up) before reading the prose.
    prose = ANNOTATION_RE.sub(lambda m: " " * len(m.group()), text)
    for problem, restated in _prose_equations(prose, annotated, text, report.unchecked):
        if restated is None or right[restated] is None:  # its own calculation, or the only check of one
            report.n_checked += 1
            if problem is None:
                report.n_correct += 1
            else:
                report.errors.append(problem)
        elif problem is not None and right[restated]:
            # An annotation and the prose around it are one calculation, right only when both are: a
            # calculator can write <<2*2=4>> and the model still go on "$2*2 = ... 2 dollars". GSM8K's
            # 8,792 gold rationales hold 23,228 such pairs; 12 disagree: 6 slips in the data ("8*3 =
            # <<80*3=240>>240"), 6 prose this reader cuts or splits otherwise ("14, 400 / 80").
            right[restated] = False
            report.n_correct -= 1
            report.errors.append(problem)
    return report
