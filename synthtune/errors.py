"""Every error a user can fix, and the tuple the entry points catch to print it in one line.

An error here means "change your input": its message says what was wrong, where (file, line, field)
and how to fix it. ``synthtune`` prints it without a traceback and exits with status 2;
``fine_tune/train.py`` does the same on every rank. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A config file or override is wrong; the message names where and how to fix it."""


class DataError(ValueError):
    """A data file is missing or has a bad line.

    The message reads ``PATH:LINE: field 'NAME' PROBLEM (HINT)`` so that editors and terminals can
    jump to it; the parts are also kept as attributes for callers that want to reformat them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        line: int | None,
        problem: str,
        hint: str = "",
        field: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        self.hint = hint
        where = f"{self.path}:{line}" if line is not None else self.path
        subject = f"field '{field}' {problem}" if field is not None else problem
        super().__init__(f"{where}: {subject}" + (f" ({hint})" if hint else ""))

    @property
    def reason(self) -> str:
        """The problem without the location or the hint, as recorded for skipped lines."""
        return f"field '{self.field}' {self.problem}" if self.field is not None else self.problem


class ModelError(RuntimeError):
    """A model could not be resolved or loaded; the message says what to do about it."""


class MergeMismatch(RuntimeError):
    """A merged model's logits differ from the adapter model's by more than the allowed tolerance."""


class DirectoryInUse(RuntimeError):
    """Another live process holds the directory's lock; the message names it and its PID."""


#: What ``synthtune`` and ``fine_tune/train.py`` report as one line (exit status 2), not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelError, MergeMismatch, DirectoryInUse,
                                                FileNotFoundError)
