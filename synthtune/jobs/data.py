"""`synthtune data check FILE.jsonl`: validate a GSM8K-format file (fields, final answers, calculator)."""

from __future__ import annotations

from synthtune.config import DataCheckConfig
from synthtune.data.validate import check_file


def check(cfg: DataCheckConfig) -> dict:
    """The validation report; ``problems_preview`` holds the first problems, one line each."""
    return check_file(cfg.file, lenient=cfg.lenient)
