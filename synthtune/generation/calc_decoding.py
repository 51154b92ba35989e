"""Calculator-assisted decoding: the calculator, not the model, writes each annotation's result.

GSM8K solutions carry calculator annotations, ``3*14 = <<3*14=42>>42``. Small models imitate the
form but not the arithmetic (``<<3*14=40>>40``). GSM8K's authors (Cobbe et al. 2021, "Training
Verifiers to Solve Math Word Problems", section 2) ran a calculator while sampling: when the model
has written ``<<expr=``, the calculator computes ``expr`` and the result plus ``>>`` is forced into
the sample, and sampling resumes after it. This module does the same, on every local decoding path:

* :func:`injection`: from the completion text so far, what to force (``"42>>"``) or None;
* :func:`injection_ids`: those characters as the token ids the model would have produced;
* :class:`Injector`: both, per row, over the row's generated token ids: what the shared-prefill
  sampler (``synthtune.generation.sampler``) queues after each pushed token;
* :func:`calculator_processor`: a transformers ``LogitsProcessor`` for ``generate()`` (seq2seq, the
  sampler's fallback, ``complete()`` with one sample, in-training accuracy) that forces the queued
  ids by setting every other logit of the row to -inf.

Only the expression is the calculator's business: the model still chooses whether to write an
annotation and what to put in it, and the text after ``>>`` (GSM8K repeats the result there).
An expression the calculator refuses (a unit, a variable, ``20%``: :class:`CalcError`) is left to
the model. Results are written the way GSM8K writes them (:func:`format_result`).

Costs: nothing runs when ``SamplingParams.calculator`` is False. When it is True, each step decodes
the newest token of each row (one token); only when that token ends in ``=`` is a bounded tail
(:data:`TAIL_TOKENS` tokens, :data:`TAIL_CHARS` characters) decoded and read, so the time per step
does not grow with the completion, whatever text the model writes.

Imports: stdlib and ``synthtune.data.calculator`` (stdlib only); torch and transformers lazily, in
the processor, so the sampler still runs from a bare checkout.
"""

from __future__ import annotations

from collections import deque
from fractions import Fraction

from synthtune.data.calculator import CalcError, exact_value

__all__ = ["TAIL_CHARS", "TAIL_TOKENS", "Injector", "calculator_processor", "format_result", "injection",
           "injection_ids"]

#: Characters of the completion :func:`injection` reads (its end). GSM8K's annotations are under 100
#: characters; an expression longer than about 190 is left to the model.
TAIL_CHARS = 200
#: Tokens of a row decoded to find a trigger: every token is at least one character, so the
#: :data:`TAIL_CHARS` characters :func:`injection` reads are always among them.
TAIL_TOKENS = TAIL_CHARS
#: Decimals written exactly (``0.125``); past them, a result is rounded to :data:`ROUND_DECIMALS`.
EXACT_DECIMALS = 4
#: GSM8K writes ``<<10/3=3.33>>``, ``<<2/3=0.67>>``.
ROUND_DECIMALS = 2

OPEN, CLOSE, EQ = "<<", ">>", "="


def format_result(value: Fraction) -> str:
    """``value`` as GSM8K writes a calculator result.

    An integer is its digits; a value with at most :data:`EXACT_DECIMALS` decimals is written
    exactly; anything else is rounded half-up (away from zero) to :data:`ROUND_DECIMALS` decimals.
    Trailing zeros are dropped, except that a rounded value keeps one decimal: ``3.0`` for 2.9996.
    A bare integer claims exactness (``check_calculations`` rightly flags ``<<7/2=3>>``), so a
    rounded result never reads as one.

    >>> [format_result(Fraction(n, d)) for n, d in [(42, 1), (-3, 1), (5, 2), (1, 8), (10, 3), (-2, 3)]]
    ['42', '-3', '2.5', '0.125', '3.33', '-0.67']
    >>> format_result(Fraction(29996, 10000)), format_result(Fraction(1, 300000)), format_result(Fraction(27, 10))
    ('2.9996', '0.0', '2.7')
    >>> format_result(Fraction(29999, 10000) + Fraction(1, 10**6))
    '3.0'
    """
    if value.denominator == 1:
        return str(value.numerator)
    scale = 10**EXACT_DECIMALS
    if scale % value.denominator == 0:  # a finite expansion of at most EXACT_DECIMALS places
        return _decimal(value.numerator * (scale // value.denominator), EXACT_DECIMALS, keep=0)
    scale = 10**ROUND_DECIMALS
    scaled = int(abs(value) * scale + Fraction(1, 2))  # half-up on the magnitude
    return _decimal(scaled if value > 0 else -scaled, ROUND_DECIMALS, keep=1)


def _decimal(scaled: int, places: int, keep: int) -> str:
    """``scaled / 10**places`` in decimal, trailing zeros dropped down to ``keep`` decimals."""
    sign = "-" if scaled < 0 else ""
    whole, frac = divmod(abs(scaled), 10**places)
    digits = f"{frac:0{places}d}".rstrip("0")
    digits = digits + "0" * (keep - len(digits)) if len(digits) < keep else digits
    if not digits:
        return f"{sign}{whole}"
    if whole == 0 and not digits.strip("0"):
        sign = ""  # a negative value rounded to zero reads "0.0", not "-0.0"
    return f"{sign}{whole}.{digits}"


def _open_expression(text: str) -> str | None:
    """The ``expr`` when ``text`` ends with ``<<expr=`` (the last ``<<`` unclosed, ``expr`` free of
    ``<``, ``>`` and ``=``), else None. Reads only the last :data:`TAIL_CHARS` characters."""
    if not text.endswith(EQ):
        return None
    tail = text[-TAIL_CHARS:]
    start = tail.rfind(OPEN)
    if start < 0:
        return None
    expr = tail[start + len(OPEN):-1]
    if not expr.strip() or any(c in expr for c in "<>="):
        return None
    return expr


def injection(text: str) -> str | None:
    """What the calculator writes after ``text``, the completion so far: the result and ``>>``.

    None unless ``text`` ends right after ``<<expr=`` (the first ``=`` after the last unclosed
    ``<<``) and the calculator evaluates ``expr``. Time is bounded whatever ``text`` is: only its
    last :data:`TAIL_CHARS` characters are read.

    >>> injection("She has 3*14 = <<3*14="), injection("<<10/3="), injection("<<(1/2)*14 + 2**3=")
    ('42>>', '3.33>>', '15>>')
    >>> injection("<<3*14=42>> so x ="), injection("<<5 apples="), injection("<<4=3="), injection("<<=")
    (None, None, None, None)
    """
    expr = _open_expression(text)
    if expr is None:
        return None
    try:
        value = exact_value(expr)
    except CalcError:  # a unit, a variable, a percent sign, too long: the model's own text stands
        return None
    return format_result(value) + CLOSE


def injection_ids(tokenizer, context: str, inject: str, *, at_token_boundary: bool = False) -> list[int] | None:
    """Token ids that extend ``context`` (the completion so far) by exactly ``inject``, as the
    tokenizer would split ``context + inject``; None when no such split exists.

    The local context (from the last ``<<`` of the tail, where the annotation opened) is tokenized
    with and without ``inject`` (no special tokens). When the first is a token-prefix of the second,
    the rest are the ids to force. When ``inject`` merges with the context's last characters into a
    token (e.g. SmolLM2 has ``=-`` as a token, before a negative result), no split of ``inject`` is
    how the tokenizer would write that text: then, unless ``at_token_boundary``, None, and the model
    writes the result itself. None too when the ids do not decode back to ``inject`` (a tokenizer
    that cannot spell it).

    ``at_token_boundary``: ``context`` ends where one of the model's own generated tokens ends (the
    sampler's case: a trigger is a generated token whose text ends in ``=``). Generated tokens are
    never re-merged, so the merged form (``=-``) is already out of reach: whatever the model writes
    next starts a token of its own, and the model's own ``-`` after ``=`` is the same split the
    calculator would force. So when the merge check fails, ``inject``'s own tokens are forced,
    provided the context's tokens followed by them decode to ``context + inject`` exactly (a
    vocabulary that marks a word start, such as SentencePiece's ``▁``, spells ``inject`` alone with a
    leading space: that is refused, and the model writes the result itself).
    """
    tail = context[-TAIL_CHARS:]
    start = tail.rfind(OPEN)
    local = tail[start:] if start >= 0 else tail
    before = tokenizer(local, add_special_tokens=False)["input_ids"]
    after = tokenizer(local + inject, add_special_tokens=False)["input_ids"]
    if len(after) > len(before) and after[:len(before)] == before:
        ids = [int(i) for i in after[len(before):]]
    elif at_token_boundary:
        ids = [int(i) for i in tokenizer(inject, add_special_tokens=False)["input_ids"]]
        if not ids or tokenizer.decode([*before, *ids], skip_special_tokens=False) != local + inject:
            return None
    else:
        return None
    if tokenizer.decode(ids, skip_special_tokens=False) != inject:
        return None
    return ids


class Injector:
    """Per-row queues of forced token ids, fed from each row's generated tokens.

    ``after(row, tokens)`` is called once a row's newest token is known (``tokens``: the ids the
    row has generated so far); when they end an annotation's ``<<expr=``, the ids of the result are
    queued (:func:`injection_ids` with ``at_token_boundary``: the ``=`` ends a generated token, so a
    result that would merge with it, ``=-3``, is forced as its own tokens, ``-3``). ``pop(row)``
    then gives the next forced id (None when the model chooses). A trigger is
    only looked for when the newest token's text ends in ``=``: one single-token decode per row and
    step, and a :data:`TAIL_TOKENS`-token decode only then.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.queues: dict[int, deque[int]] = {}
        self._ends_eq: dict[int, bool] = {}  # token id -> its text ends in "=" (memo)

    def may_trigger(self, token: int) -> bool:
        """Whether ``token``'s text ends in ``=``: only then can a row have just opened ``<<expr=``."""
        hit = self._ends_eq.get(token)
        if hit is None:
            hit = self.tok.decode([token], skip_special_tokens=True).endswith(EQ)
            self._ends_eq[token] = hit
        return hit

    def after(self, row: int, tokens) -> None:
        """Queue the result's ids for ``row`` when ``tokens`` (its generated ids) end in ``<<expr=``."""
        if not len(tokens) or self.queues.get(row) or not self.may_trigger(int(tokens[-1])):
            return
        text = self.tok.decode([int(t) for t in tokens[-TAIL_TOKENS:]], skip_special_tokens=True)
        inject = injection(text)
        if inject is None:
            return
        # the newest token ends in "=" (may_trigger): the result starts a token of its own
        ids = injection_ids(self.tok, text, inject, at_token_boundary=True)
        if ids:
            self.queues[row] = deque(ids)

    def pop(self, row: int) -> int | None:
        """The next forced id of ``row``, or None when nothing is queued."""
        queue = self.queues.get(row)
        if not queue:
            return None
        token = queue.popleft()
        if not queue:
            del self.queues[row]
        return token

    def drop(self, row: int) -> None:
        """Forget ``row``'s queue (the row ended)."""
        self.queues.pop(row, None)


def calculator_processor(tokenizer, start: int):
    """A transformers ``LogitsProcessor`` that forces calculator results inside ``generate``.

    ``start`` is where the generated tokens begin in the ids ``generate`` hands a processor: the
    padded prompt width for a causal model, 1 (after the decoder start token) for seq2seq. Put it
    after any other processor (penalties, bias): a forced row's scores become -inf except the forced
    id (0), so greedy picks it and sampling draws it with probability 1 (temperature, top-k and
    top-p keep the only finite score); other rows' scores are untouched.
    """
    from transformers import LogitsProcessor

    class _Calculator(LogitsProcessor):
        def __init__(self):
            self.injector = Injector(tokenizer)

        def __call__(self, input_ids, scores):
            new = input_ids[:, start:]
            if new.shape[1]:
                last = new[:, -1].tolist()
                for row, token in enumerate(last):
                    # a row whose newest token ends in "=" may have opened <<expr=: read its tail
                    if row not in self.injector.queues and self.injector.may_trigger(token):
                        self.injector.after(row, new[row, -TAIL_TOKENS:].tolist())
            for row in list(self.injector.queues):
                token = self.injector.pop(row)
                scores[row] = float("-inf")
                scores[row, token] = 0.0
            return scores

    return _Calculator()
