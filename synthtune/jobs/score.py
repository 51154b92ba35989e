"""``synthtune score IN.jsonl --out OUT.jsonl [--json]``: score a file of any model's GSM8K outputs.

The scoring itself is :mod:`synthtune.synth.scoring`; this job reads, validates and writes files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from synthtune.config import ScoreConfig
from synthtune.data.jsonl import read_jsonl, write_jsonl
from synthtune.errors import DataError
from synthtune.synth.scoring import REQUIRED, report_skipped, score_lines


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # also catches hard links
    except OSError:
        return False


def score_file(
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], lenient: bool = False
) -> dict[str, Any]:
    """Score the JSONL file ``in_path``, write scored rows to ``out_path``, return the summary.

    The output is written atomically and may never be the input file: scoring in place would destroy
    the raw completions if anything went wrong.  With ``lenient``, unreadable or invalid lines are
    skipped, and ``n_skipped`` in the summary says how many (``skipped_preview`` shows the first).
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if _same_file(in_path, out_path):
        raise DataError(out_path, None, "is the input file; refusing to overwrite it",
                        "pass a different --out path")
    data = read_jsonl(in_path, required=REQUIRED, lenient=lenient)
    skipped = list(data.skipped)  # lines that were not even JSON objects, then rows that fail validation
    out_rows, summary = score_lines(data.rows, str(in_path), data.lines, lenient, skipped)
    if lenient:
        report_skipped(summary, skipped)
    write_jsonl(out_path, out_rows)
    return summary


def run(cfg: ScoreConfig) -> dict[str, Any]:
    """`synthtune score`'s entry point: :func:`score_file` with the command's config."""
    return score_file(cfg.input, cfg.out, lenient=cfg.lenient)
