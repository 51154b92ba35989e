"""`synthtune data check`: is a GSM8K-format file fit to train or evaluate on?

A row whose checks fail (a bug: extraction and the calculator are built not to raise) is reported as
a problem on its line and the check goes on; calculations too long to read are counted in
``calc_unchecked``, not as wrong.
"""

from __future__ import annotations

from pathlib import Path

from synthtune.data.answers import extract_gold
from synthtune.data.calculator import check_calculations
from synthtune.data.gsm8k import read_rows

PREVIEW = 10


def check_file(path: str | Path, lenient: bool = False) -> dict:
    """Validate fields (strict unless ``lenient``), final answers and calculator annotations."""
    res = read_rows(path, lenient=lenient)
    problems: list[str] = [f"{path}:{line}: skipped: {reason}" for line, reason in res.skipped]
    no_final = 0
    checked = correct = unchecked = 0
    for row, line in zip(res.rows, res.lines, strict=True):
        try:
            has_final = extract_gold(row["answer"]) is not None
            calc = check_calculations(str(row["answer"]))
        except Exception as exc:  # noqa: BLE001 - one bad row must not hide the rest of the report
            problems.append(f"{path}:{line}: answer: could not be checked ({type(exc).__name__}: {exc})")
            continue
        if not has_final:
            no_final += 1
            problems.append(f"{path}:{line}: answer has no final '#### <number>' line")
        checked += calc.n_checked
        correct += calc.n_correct
        unchecked += len(calc.unchecked)
        problems.extend(f"{path}:{line}: {e}" for e in calc.errors)
    return {
        "path": str(path),
        "n_rows": len(res.rows),
        "n_skipped": len(res.skipped),
        "n_without_final_answer": no_final,
        "calc_checked": checked,
        "calc_correct": correct,
        "calc_fraction": round(correct / checked, 6) if checked else None,
        "calc_unchecked": unchecked,
        "n_problems": len(problems),
        "problems_preview": problems[:PREVIEW],
    }
