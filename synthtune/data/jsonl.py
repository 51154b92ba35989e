"""JSON Lines input and output with errors that point at the offending line.

Every data file in synthtune (questions, synthesized completions, scored outputs) is JSONL, and most
of them are written by hand or by long-running jobs.  The two failure modes worth designing for are a
bad line somewhere in a file of thousands (so errors carry ``file:line`` and the field) and a job
killed mid-write (so whole-file writes are atomic and appends are fsynced line by line).

One line is one row, whatever reads the file: rows are split on ``\\n`` only, and the writer
escapes every character some line splitter treats as a line break (``str.splitlines`` also
splits on U+0085, U+2028, U+2029 and the ASCII separators; json.dumps already escapes the ASCII
ones), so a question holding U+2028 cannot turn one row into two for Python, JavaScript or
editors. What cannot be stored is refused before anything is written, naming row and field:
NaN and infinities (JSON has no such numbers) and lone surrogates (not characters; UTF-8 cannot
encode them, and pyarrow, so ``datasets``, rejects the ``\\ud800`` escape).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthtune.errors import DataError
from synthtune.files import atomic_write_bytes

__all__ = ["DataError", "JsonlResult", "append_jsonl", "json_type", "read_appended", "read_jsonl", "write_jsonl"]

#: Characters json.dumps(ensure_ascii=False) leaves raw that some line splitter breaks lines on.
_RAW_BREAKS = re.compile("[\x85\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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


#: How a JSON user names what ``json.loads`` returns, with its article.
_TYPE_NAMES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
               list: "a list", dict: "an object"}


def json_type(value: Any) -> str:
    """How a JSON user would name the type of ``value``, with its article: "a list", "an object"."""
    return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def _type_names(kinds: tuple[type, ...]) -> str:
    return " or ".join(dict.fromkeys(_TYPE_NAMES[k] for k in kinds))


def _kind_error(value: Any, kinds: tuple[type, ...]) -> str | None:
    """Why ``value`` is not one of ``kinds`` (bool is no number here), or None if it is."""
    if isinstance(value, float) and float in kinds and not math.isfinite(value):
        # Python's json reads NaN and Infinity, and 1e400 as an infinity; JSON has no such numbers
        return "is not a finite number (NaN, an infinity, or past a float's range)"
    if isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool)):
        return None
    return f"is {json_type(value)}, not {_type_names(kinds)}"


def _parse_line(
    path: Path, lineno: int, raw: bytes, required: Sequence[str], types: Mapping[str, tuple[type, ...]] = {}
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
    except (ValueError, RecursionError) as exc:  # a number past int's 4,300 digits; deep nesting
        why = "nests too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0].rstrip(".")
        raise DataError(path, lineno, f"cannot be read: {why}",
                        "each line must hold one JSON object of ordinary size") from None
    if not isinstance(obj, dict):
        raise DataError(path, lineno, f"holds {json_type(obj)}, not an object",
                        _required_hint(required) if required else "each line must be a JSON object")
    for name in required:
        if name not in obj:
            raise DataError(path, lineno, "is missing", _required_hint(required), field=name)
        if _is_empty(obj[name]):
            raise DataError(path, lineno, "is empty", _required_hint(required), field=name)
    for name, kinds in types.items():
        # an optional field may be absent or null; present, it must be of its kind
        why = _kind_error(obj[name], kinds) if obj.get(name) is not None else None
        if why:
            raise DataError(path, lineno, why, f"write '{name}' as {_type_names(kinds)}", field=name)
    return obj


def read_jsonl(
    path: str | os.PathLike[str], required: Sequence[str] = (), lenient: bool = False,
    types: Mapping[str, tuple[type, ...]] = {},
) -> JsonlResult:
    """Read a JSONL file, one JSON object per non-blank line.

    ``required`` fields must be present and non-empty; a field in ``types`` (e.g. ``{"question":
    (str,)}``), where present and not null, must be of one of its types (a JSON boolean is no number).

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
                obj = _parse_line(path, lineno, raw, required, types)
            except DataError as exc:
                if not lenient:
                    raise
                result.skipped.append((lineno, exc.reason))
                continue
            if obj is not None:
                result.rows.append(obj)
                result.lines.append(lineno)
    return result


def read_appended(path: str | os.PathLike[str], required: Sequence[str] = ()) -> tuple[JsonlResult, bool]:
    """Read a file that a job appends to (``append_jsonl``), tolerating the tear a crash leaves.

    Returns ``(result, torn)``. Only the last line may be unusable, and only if it lacks its
    ``\\n``: that is the row a killed process was writing (cut anywhere, mid-character
    included), so it is dropped and ``torn`` is True; rewrite the file (``write_jsonl``) before
    appending again. A last line without ``\\n`` that parses is whole (only its newline was lost)
    and is kept. A bad line anywhere else means the file was damaged or edited, and raises
    :class:`DataError` with its line: a resume must not guess. A missing file reads as empty.
    """
    path = Path(path)
    if isinstance(required, str):
        required = (required,)
    result = JsonlResult()
    if not path.exists():
        return result, False
    # Split on b"\n" alone: no other byte or character ends a row.
    lines = path.read_bytes().split(b"\n")
    # What follows the final "\n": b"" for a whole file, else an unterminated last line.
    tail = lines.pop()
    for lineno, raw in enumerate(lines, start=1):
        obj = _parse_line(path, lineno, raw, required)
        if obj is not None:
            result.rows.append(obj)
            result.lines.append(lineno)
    if tail.strip():
        # A cut JSON object never parses (its closing brace is missing) and a cut character never
        # decodes, so a tail that does both is a whole row that only lost its newline: keep it.
        # Only a tail that fails to decode or parse is the torn write; a parsed one is checked as usual.
        try:
            text = tail.decode("utf-8")
            # the file's only line may start with a byte-order mark, as _parse_line allows
            json.loads(text.removeprefix("\ufeff") if not lines else text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return result, True
        except (ValueError, RecursionError):
            pass  # whole but unreadable (a huge number, deep nesting): _parse_line says so, with its line
        obj = _parse_line(path, len(lines) + 1, tail, required)
        if obj is not None:
            result.rows.append(obj)
            result.lines.append(len(lines) + 1)
    return result, False


def _find(value: Any, bad: Callable[[Any], bool], path: str = "") -> tuple[str, Any] | None:
    """The first value (or key) in a row with ``bad(value)``, and where it sits (``a.b[2]``)."""
    if bad(value):
        return path or "(the row)", value
    if isinstance(value, Mapping):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if bad(key):
                return f"{here} (a key)", key
            found = _find(item, bad, here)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _find(item, bad, f"{path}[{i}]")
            if found:
                return found
    return None


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _has_surrogate(value: Any) -> bool:
    return isinstance(value, str) and _SURROGATE.search(value) is not None


def _dumps(row: Mapping[str, Any], path: Path, index: int) -> str:
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and other tools would choke on the file later.
        text = json.dumps(row, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        found = _find(row, _non_finite)
        if found is None:
            raise DataError(path, None, f"row {index} cannot be written as JSON: {exc}",
                            "rows must be dicts of JSON-compatible values") from None
        raise DataError(path, None, f"row {index} cannot be written: field '{found[0]}' is {found[1]!r}, which "
                        f"JSON has no number for", "store None (null) or a string instead; nothing was "
                        "written") from None
    bad = _SURROGATE.search(text)
    if bad is not None:
        where = (_find(row, _has_surrogate) or ("?", None))[0]
        raise DataError(path, None, f"row {index} cannot be written: field '{where}' holds a lone surrogate "
                        f"U+{ord(bad.group()):04X}, which is not a character and has no UTF-8 form",
                        "replace it, e.g. with U+FFFD; nothing was written")
    # Only inside JSON strings (outside them json.dumps writes ASCII), where the escape stands for
    # the same character: the row is unchanged, only its line can no longer be split.
    return _RAW_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


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


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` to ``path`` atomically and return how many were written.

    The data goes to a temporary file in the same directory (so the final rename cannot cross
    filesystems), is fsynced, then replaces ``path`` in one step: readers and crashes see either the
    old file or the complete new one, never half of it.  Parent directories are created.
    """
    path = Path(path)
    text = _serialize(path, rows)
    atomic_write_bytes(path, text.encode("utf-8"))
    return text.count("\n")


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
