"""lm-evaluation-harness's own GSM8K figures (``strict-match`` and ``flexible-extract``), re-derived.

:mod:`synthtune.data.answers` reads answers by value, as a careful grader would; lm-eval's ``gsm8k``
task compares strings, and leaderboards print its numbers. To put ours beside theirs without running
lm-eval, this module applies the rules of its task config (``lm_eval/tasks/gsm8k/gsm8k.yaml``, 0.4.x)
to the same completions:

1. cut the completion at the first of the task's stop sequences (``until``): :data:`STOP`;
2. filter it: ``strict-match`` takes the *first* match of ``#### (\\-?[0-9\\.\\,]+)``,
   ``flexible-extract`` the *last* match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (of the whole pattern,
   the group that matched); no match gives :data:`INVALID`;
3. compare with ``exact_match``: prediction and gold (the dataset's whole ``answer`` field) both lose
   every ``,``, every ``$``, everything up to the last ``#### `` and a final ``.``, in that order, are
   lowercased, and must then be equal strings.

So ``#### 42.00``, ``#### $42`` and ``3/4`` against a gold of 0.75 are wrong here, and
``The answer is $\\boxed{42}$.`` is read as ``$.`` by flexible-extract. ``tests/test_lmeval_gsm8k.py``
checks these functions against lm-eval's own filter and metric classes on generated text.

Linear time on any text, with the same results: the two filter patterns are linear with ``re`` (a
greedy character class with nothing after it never backtracks); flexible-extract's last match is
found from the end of the text instead of by walking every match; and lm-eval's ``(?s).*#### ``
regex, which is quadratic on text without ``#### `` (re retries ``.*`` from every position: 2 s on
100 KB), is an ``rfind``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "INVALID",
    "STOP",
    "LmEvalResult",
    "cut_at_stop",
    "exact_match",
    "flexible_extract",
    "gold_text",
    "lm_eval_score",
    "strict_match",
]

#: lm-eval's gsm8k ``generation_kwargs.until``. Its API and HF models also stop at the model's EOS
#: token, which our generation does as a token, so no text of it reaches a completion.
STOP = ("Question:", "</s>", "<|im_end|>")
#: what lm-eval's regex filter returns when its pattern does not match (its ``fallback``)
INVALID = "[invalid]"

STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# Where a flexible match can start afresh: a "-" (only ever a match's first character) or a
# character outside the class. Between two of them lies at most one match, so lm-eval's last match is
# in the last such segment that holds one: the last digit or pair of other class characters, which
# _HIT_RE finds in the reversed text (written to start with a character set: re skips to it in C).
_NOT_CLASS_RE = re.compile(r"[^$0-9.,]")
_HIT_RE = re.compile(r"[0-9$.,](?:(?<=[0-9])|[$.,])")
_FINAL_PERIOD_RE = re.compile(r"\.$")  # "$" also matches before a final "\n", as in lm-eval
_ANSWER_MARK = "#### "


def cut_at_stop(completion: str) -> str:
    """The completion up to the first of lm-eval's gsm8k stop sequences (:data:`STOP`).

    >>> cut_at_stop("#### 4\\n\\nQuestion: next")
    '#### 4\\n\\n'
    """
    cut = len(completion)
    for stop in STOP:
        at = completion.find(stop, 0, cut)
        if at != -1:
            cut = at
    return completion[:cut]


def strict_match(completion: str) -> str:
    """lm-eval's gsm8k ``strict-match`` filter: the number after the first ``#### ``, as written.

    >>> strict_match("so 72\\n#### 72"), strict_match("####72"), strict_match("#### $72")
    ('72', '[invalid]', '[invalid]')
    """
    found = STRICT_RE.search(_text(completion))
    # lm-eval strips the match; the character class holds no whitespace, so there is none to strip
    return INVALID if found is None else found[1]


def flexible_extract(completion: str) -> str:
    """lm-eval's gsm8k ``flexible-extract`` filter: the last run of number characters, as written.

    The run may hold ``$``, ``.`` and ``,`` and need not hold a digit (``$.`` counts).

    >>> flexible_extract("4 + 68 = 72."), flexible_extract("4 + 3 = 7 eggs."), flexible_extract("$\\\\boxed{42}$.")
    ('72.', '7', '$.')
    """
    last = _last_flexible(_text(completion))
    return INVALID if last is None else last


def _last_flexible(text: str) -> str | None:
    """The group of the last match lm-eval's ``findall`` would list, found from the end of ``text``.

    Linear and in C but for a few calls: walking every match of a 100 KB completion instead costs
    ~20 ms ("1 1 1 ..."), and trying the pattern at every position of text without numbers ~10 ms.
    """
    backwards = text[::-1]
    hit = _HIT_RE.search(backwards)
    if hit is None:
        return None
    n = len(text)
    after = _NOT_CLASS_RE.search(text, n - hit.start())
    end = after.start() if after else n
    before = _NOT_CLASS_RE.search(backwards, hit.end())
    start = 0
    if before is not None:
        k = n - 1 - before.start()
        start = k if text[k] == "-" else k + 1
    longer, digits = FLEXIBLE_RE.findall(text, start, end)[-1]  # the segment holds one match
    return longer or digits


def _text(completion: str) -> str:
    # lm-eval scores a response that is not a string as the empty one
    return cut_at_stop(completion) if isinstance(completion, str) else ""


def _normalize(text: str) -> str:
    """What lm-eval's gsm8k ``exact_match`` compares: its ``regexes_to_ignore`` in order, then lowercase.

    The metric builds a numpy string array after each substitution, which drops trailing NULs.
    """
    text = text.replace(",", "").rstrip("\0")
    text = text.replace("$", "").rstrip("\0")
    mark = text.rfind(_ANSWER_MARK)  # (?s).*#### : from the start up to the last mark
    if mark != -1:
        text = text[mark + len(_ANSWER_MARK):].rstrip("\0")
    text = _FINAL_PERIOD_RE.sub("", text).rstrip("\0")
    return text.lower()


def exact_match(prediction: str, gold: str) -> bool:
    """lm-eval's gsm8k ``exact_match`` of one filtered prediction against the gold text.

    >>> exact_match("1,234", "...\\n#### 1234"), exact_match("42.00", "#### 42"), exact_match("72.", "#### 72")
    (True, False, True)
    """
    return _normalize(prediction) == _normalize(gold)


def gold_text(answer: str | int | float) -> str:
    """The gold as lm-eval's ``doc_to_target: "{{answer}}"`` renders it: the text as is, a number by
    ``str`` (so a gold given as ``18.0`` only matches ``18.0``)."""
    return answer if isinstance(answer, str) else str(answer)


@dataclass(frozen=True)
class LmEvalResult:
    """One completion through lm-eval's gsm8k filters: what each extracted, and whether it matched."""

    strict: str
    flexible: str
    strict_correct: bool
    flexible_correct: bool


def lm_eval_score(completion: str, answer: str | int | float) -> LmEvalResult:
    """Both of lm-eval's gsm8k figures for one completion against the dataset's ``answer`` field.

    >>> lm_eval_score("#### 42.00", "6 * 7 = 42\\n#### 42")
    LmEvalResult(strict='42.00', flexible='42.00', strict_correct=False, flexible_correct=False)
    """
    gold = _normalize(gold_text(answer))
    strict, flexible = strict_match(completion), flexible_extract(completion)
    return LmEvalResult(strict, flexible, _normalize(strict) == gold, _normalize(flexible) == gold)
