"""JSON Lines input and output with errors that point at the offending line.

Every data file in synthtune (questions, synthesized completions, scored outputs) is JSONL, and most
of them are written by hand or by long-running jobs.  The two failure modes worth designing for are a
bad line somewhere in a file of thousands (so errors carry ``file:line`` and the field) and a job
killed mid-write (so whole-file writes are atomic and appends are fsynced line by line).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataError", "JsonlResult", "append_jsonl", "read_jsonl", "write_jsonl"]


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


@dataclass
class JsonlResult:
    """Rows read from a JSONL file.

    ``lines[i]`` is the 1-based line number of ``rows[i]``, so later validation (which knows about
    fields this module does not) can still report the exact line.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def _is_empty(value: Any) -> bool:
    # A field that is present but null, blank or an empty list is as useless downstream as a missing
    # one, and letting it through would surface later as a confusing error far from the file.
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, dict)):
        return len(value) == 0
    return False


def _required_hint(required: Sequence[str]) -> str:
    names = " and ".join(f"'{name}'" for name in required)
    return f"each line needs a JSON object with {names}"


def _parse_line(
    path: Path, lineno: int, raw: bytes, required: Sequence[str]
) -> dict[str, Any] | None:
    """Parse one physical line; None for blank lines, DataError for anything unusable."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, lineno, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                        "save the file as UTF-8") from None
    if lineno == 1:
        # Editors on Windows like to prepend a byte-order mark, which json.loads rejects.
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, lineno, f"is not valid JSON: {exc.msg} at column {exc.colno}",
                        "each line must hold exactly one JSON object") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"holds a JSON {type(obj).__name__}, not an object",
                        _required_hint(required) if required else "each line must be a JSON object")
    for name in required:
        if name not in obj:
            raise DataError(path, lineno, "is missing", _required_hint(required), field=name)
        if _is_empty(obj[name]):
            raise DataError(path, lineno, "is empty", _required_hint(required), field=name)
    return obj


def read_jsonl(
    path: str | os.PathLike[str], required: Sequence[str] = (), lenient: bool = False
) -> JsonlResult:
    """Read a JSONL file, one JSON object per non-blank line.

    Strict mode (the default) raises :class:`DataError` at the first bad line.  ``lenient=True``
    skips bad lines instead and records ``(line, reason)`` in ``skipped``: nothing is dropped
    silently, and callers are expected to report ``len(result.skipped)``.

    A missing file is always an error, even when lenient: skipping a whole file is not a row-level
    problem and would turn a typo in a path into an empty dataset.
    """
    path = Path(path)
    if isinstance(required, str):
        # read_jsonl(p, "answer") would otherwise require the fields 'a', 'n', 's', ...
        required = (required,)
    if not path.exists():
        raise DataError(path, None, "file not found", "check the path, or create the file first")
    if path.is_dir():
        raise DataError(path, None, "is a directory, not a JSONL file", "pass the path of a .jsonl file")
    result = JsonlResult()
    with path.open("rb") as fh:
        # Splitting bytes ourselves (not text mode) means a decoding error can still name its line,
        # and a stray '\r' from Windows line endings is just whitespace to json.loads.
        for lineno, raw in enumerate(fh, start=1):
            try:
                obj = _parse_line(path, lineno, raw, required)
            except DataError as exc:
                if not lenient:
                    raise
                result.skipped.append((lineno, exc.reason))
                continue
            if obj is not None:
                result.rows.append(obj)
                result.lines.append(lineno)
    return result


def _dumps(row: Mapping[str, Any], path: Path, index: int) -> str:
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and other tools would choke on the file later.
        return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise DataError(path, None, f"row {index} cannot be written as JSON: {exc}",
                        "rows must be dicts of JSON-compatible values") from None


def _serialize(path: Path, rows: Iterable[Mapping[str, Any]]) -> str:
    # Serialize everything before touching the disk, so an unserializable row cannot leave a
    # partially written append behind.
    parts = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(path, None, f"row {index} is a {type(row).__name__}, not a dict",
                            "each row must be a dict")
        parts.append(_dumps(row, path, index))
    return "".join(parts)


def _fsync_dir(directory: Path) -> None:
    # On POSIX a rename is only durable once the directory entry is synced; where directories
    # cannot be opened (Windows) os.replace is still atomic, just not guaranteed durable.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` to ``path`` atomically and return how many were written.

    The data goes to a temporary file in the same directory (so the final rename cannot cross
    filesystems), is fsynced, then replaces ``path`` in one step: readers and crashes see either the
    old file or the complete new one, never half of it.  Parent directories are created.
    """
    path = Path(path)
    text = _serialize(path, rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates files as 0600; give the result the permissions a plain open() would have.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return text.count("\n")


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    current = os.umask(0)
    os.umask(current)
    return current


def append_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Append ``rows`` to ``path`` (created if absent), flushed and fsynced; return the count.

    Meant for long jobs that record results as they go: after a crash every line that was
    acknowledged is on disk, so a resumed job can trust the file.
    """
    path = Path(path)
    text = _serialize(path, rows)
    if not text:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as fh:
        # A job killed mid-line leaves no trailing newline; without this the first new row would be
        # glued onto the torn one and both would be unreadable.
        if fh.tell() > 0:
            with path.open("rb") as rf:
                rf.seek(-1, os.SEEK_END)
                if rf.read(1) != b"\n":
                    fh.write(b"\n")
        fh.write(text.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
    return text.count("\n")
