"""Score any model's GSM8K outputs (``synthtune score`` and ``synthtune eval`` use this).

Input rows hold ``question``, ``answer`` (GSM8K gold text such as ``"... #### 72"``, or a number)
and ``completions`` (a list of strings; a single ``completion`` string is accepted too).  Output rows
are the input plus ``extracted``, ``correct``, ``majority`` and ``majority_correct``, so a scored
file can be inspected line by line next to its source, and ``lm_eval_filtered`` and
``lm_eval_correct``: per completion, what lm-evaluation-harness's gsm8k filters (``strict-match``,
``flexible-extract``) extract and whether its ``exact_match`` accepts it
(:mod:`synthtune.data.lmeval_gsm8k`).

Our own numbers compare values (``42.00`` == ``42``, ``$1,234.50`` == ``1234.5``); lm-eval's compare
strings. Both are reported, each under its own name: ``strict_accuracy`` and ``flexible_accuracy``
are ours, ``lm_eval_strict_match`` and ``lm_eval_flexible_extract`` are lm-eval's figures on the same
completions.

Scoring one completion never stops a run: answer extraction is linear-time and bounded (see
:mod:`synthtune.data.answers`), and should it still raise, that completion counts as unparsed and
wrong, its row gains ``score_errors`` (the reason per completion, None for the others) and the summary
``n_failed`` and ``failed_preview`` (both only present when something failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from synthtune.data.answers import extract_answer, extract_flexible, extract_gold, extract_strict
from synthtune.data.jsonl import json_type
from synthtune.data.lmeval_gsm8k import LmEvalResult, lm_eval_score
from synthtune.errors import DataError
from synthtune.synth.scorers import failure_reason
from synthtune.synth.vote import majority_vote

__all__ = ["REQUIRED", "report_skipped", "score_lines", "score_rows"]

REQUIRED = ("question", "answer")
# The summary is printed as one JSON line; the count of skipped lines is exact, the reasons a preview.
SKIPPED_PREVIEW = 20
_HINT = "each line needs 'question', 'answer' and 'completions' (a list of strings)"


def _completions(row: dict[str, Any], source: str, line: int) -> list[str]:
    has_list, has_one = "completions" in row, "completion" in row
    if has_list and has_one:
        raise DataError(source, line, "is given together with 'completion'", "keep only one of the two",
                        field="completions")
    if not has_list and not has_one:
        raise DataError(source, line, "is missing", _HINT, field="completions")
    if has_one:
        value = row["completion"]
        if not isinstance(value, str):
            raise DataError(source, line, f"is {json_type(value)}, not a string", _HINT,
                            field="completion")
        return [value]
    value = row["completions"]
    if not isinstance(value, list):
        raise DataError(source, line, f"is {json_type(value)}, not a list of strings", _HINT,
                        field="completions")
    if not value:
        raise DataError(source, line, "is an empty list", "give at least one completion per question",
                        field="completions")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(source, line, f"item {i} is {json_type(item)}, not a string",
                            "write a failed generation as an empty string", field="completions")
    return value


def _gold(row: dict[str, Any], source: str, line: int) -> str:
    value = row.get("answer")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(source, line, f"is {json_type(value)}, not a string or number", _HINT,
                        field="answer")
    gold = extract_gold(value)
    if gold is None:
        raise DataError(source, line, "has no final answer",
                        "write the gold answer as GSM8K's '... #### 72' or as a bare number", field="answer")
    return gold


Extracted = tuple[str | None, str | None, str | None, LmEvalResult | None, str | None]


def _extract(completion: str, answer: str | int | float) -> Extracted:
    """(answer, strict, flexible, lm-eval's result, None), or (None, None, None, None, why) if
    extraction raised."""
    try:
        return (extract_answer(completion), extract_strict(completion), extract_flexible(completion),
                lm_eval_score(completion, answer), None)
    except Exception as exc:  # noqa: BLE001 - a bug must cost this completion, not a 100k-completion run
        return None, None, None, None, failure_reason(exc)


def _ratio(num: int, den: int) -> float | None:
    # None rather than 0.0 for an empty input: "no data" must not read as "0% accuracy".
    return num / den if den else None


def score_rows(
    rows: Sequence[dict[str, Any]],
    *,
    source: str = "<rows>",
    lines: Sequence[int] | None = None,
    lenient: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score ``rows``; return ``(out_rows, summary)``.

    ``source`` and ``lines`` (1-based, parallel to ``rows``) only serve error messages; they default
    to ``<rows>`` and the row positions.  A bad row raises :class:`DataError`, or with ``lenient`` is
    left out and counted in ``summary["n_skipped"]`` (the first reasons in ``skipped_preview``).

    Summary keys: ``n_questions``, ``n_completions``, ``parse_rate`` (completions with an extracted
    answer), ``accuracy`` (over completions), ``maj_at_k`` (questions whose majority answer is right),
    ``pass_at_k`` (questions with at least one right completion), ``k`` (completions per question, or
    None if it varies), ``strict_accuracy`` (the first ``#### n`` line is right, by value) and
    ``flexible_accuracy`` (the last number is right, by value), ``format_rate`` (completions with a
    ``#### n`` line, right or wrong), and ``lm_eval_strict_match`` and ``lm_eval_flexible_extract``:
    lm-evaluation-harness's gsm8k figures on the same completions, by its rules (string match, its
    stop sequences), all over completions. With one completion per question these are the numbers
    lm-eval would print for these completions; with k, their mean over the k samples (lm-eval's gsm8k
    scores one). Rates are None when there is nothing to divide by.
    """
    skipped: list[tuple[int, str]] = []
    out_rows, summary = score_lines(rows, source, lines, lenient, skipped)
    if lenient:
        report_skipped(summary, skipped)
    return out_rows, summary


def report_skipped(summary: dict[str, Any], skipped: list[tuple[int, str]]) -> None:
    skipped = sorted(skipped)
    summary["n_skipped"] = len(skipped)
    preview = skipped[:SKIPPED_PREVIEW]
    summary["skipped_preview"] = [{"line": line, "reason": reason} for line, reason in preview]


def score_lines(
    rows: Sequence[dict[str, Any]],
    source: str,
    lines: Sequence[int] | None,
    lenient: bool,
    skipped: list[tuple[int, str]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    out_rows: list[dict[str, Any]] = []
    n_completions = n_parsed = n_correct = n_strict = n_flexible = n_maj = n_pass = n_format = 0
    n_lm_strict = n_lm_flexible = 0
    failed: list[dict[str, Any]] = []
    sizes: set[int] = set()
    for index, row in enumerate(rows):
        line = lines[index] if lines is not None else index + 1
        try:
            if not isinstance(row, dict):
                raise DataError(source, line, f"holds {json_type(row)}, not an object", _HINT)
            for name in REQUIRED:
                if name not in row:
                    raise DataError(source, line, "is missing", _HINT, field=name)
            gold = _gold(row, source, line)
            completions = _completions(row, source, line)
        except DataError as exc:
            if not lenient:
                raise
            skipped.append((line, exc.reason))
            continue
        results = [_extract(c, row["answer"]) for c in completions]
        extracted = [r[0] for r in results]
        correct = [answer == gold for answer in extracted]
        vote = majority_vote(extracted)
        out_row = {
            **row,
            "extracted": extracted,
            "correct": correct,
            "majority": vote.answer,
            "majority_correct": vote.answer == gold,
        }
        # None where extraction failed: that completion counts as wrong for lm-eval's figures too
        lm_eval = [r[3] for r in results]
        out_row["lm_eval_filtered"] = {
            "strict-match": [None if x is None else x.strict for x in lm_eval],
            "flexible-extract": [None if x is None else x.flexible for x in lm_eval]}
        out_row["lm_eval_correct"] = {
            "strict-match": [x is not None and x.strict_correct for x in lm_eval],
            "flexible-extract": [x is not None and x.flexible_correct for x in lm_eval]}
        errors = [r[4] for r in results]
        if any(errors):
            out_row["score_errors"] = errors
            failed += [{"line": line, "completion": i, "reason": e} for i, e in enumerate(errors) if e]
        out_rows.append(out_row)
        sizes.add(len(completions))
        n_completions += len(completions)
        n_parsed += sum(answer is not None for answer in extracted)
        n_correct += sum(correct)
        strict = [r[1] for r in results]
        n_format += sum(answer is not None for answer in strict)
        n_strict += sum(answer == gold for answer in strict)
        n_flexible += sum(r[2] == gold for r in results)
        n_lm_strict += sum(out_row["lm_eval_correct"]["strict-match"])
        n_lm_flexible += sum(out_row["lm_eval_correct"]["flexible-extract"])
        n_maj += vote.answer == gold
        n_pass += any(correct)
    n_questions = len(out_rows)
    summary: dict[str, Any] = {
        "n_questions": n_questions,
        "n_completions": n_completions,
        "parse_rate": _ratio(n_parsed, n_completions),
        "accuracy": _ratio(n_correct, n_completions),
        "maj_at_k": _ratio(n_maj, n_questions),
        "pass_at_k": _ratio(n_pass, n_questions),
        "k": sizes.pop() if len(sizes) == 1 else None,
        "strict_accuracy": _ratio(n_strict, n_completions),
        "flexible_accuracy": _ratio(n_flexible, n_completions),
        "format_rate": _ratio(n_format, n_completions),
        "lm_eval_strict_match": _ratio(n_lm_strict, n_completions),
        "lm_eval_flexible_extract": _ratio(n_lm_flexible, n_completions),
    }
    if failed:
        summary["n_failed"] = len(failed)
        summary["failed_preview"] = failed[:SKIPPED_PREVIEW]
    return out_rows, summary
