"""GSM8K from three sources, validated the same way.

* ``bundled``: the project's own 50 problems in ``data/gsm8k_sample/`` (always available);
* a directory holding the original ``train.jsonl`` / ``test.jsonl`` (``--gsm8k-dir`` or
  ``SYNTHTUNE_GSM8K_DIR``);
* ``hub``: the dataset ``openai/gsm8k``, config ``main``, through ``datasets``.

``auto`` takes the directory when one is configured, else the hub.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from synthtune import paths
from synthtune.data.answers import normalize_number
from synthtune.data.jsonl import JsonlResult, read_jsonl
from synthtune.errors import DataError

SPLITS = ("train", "test")
SOURCES = ("auto", "bundled", "hub", "dir")
HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"
FIELDS = ("question", "answer")
#: What each field holds, checked where a file is read: ``{"question": 12}`` is refused on its line,
#: not an AttributeError deep in synthesis. A gold answer may be a bare number.
FIELD_TYPES = {"question": (str,), "answer": (str, int, float)}


def read_rows(path: str | Path, required: tuple[str, ...] = FIELDS, lenient: bool = False) -> JsonlResult:
    """GSM8K-format rows of a JSONL file, checked against :data:`FIELD_TYPES`. A gold answer given as
    a number becomes its text (``72`` -> ``"72"``): prompts and training targets take strings."""
    res = read_jsonl(path, required=required, lenient=lenient, types=FIELD_TYPES)
    for row in res.rows:
        if isinstance(row.get("answer"), (int, float)):
            row["answer"] = normalize_number(row["answer"])
    return res


@dataclass
class Split:
    """Validated rows of one split, and where they came from."""

    rows: list[dict]
    source: str
    split: str
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)


def resolve_source(source: str = "auto", gsm8k_dir: str | Path | None = None) -> tuple[str, Path | None]:
    """Turn (source, dir) as given on the command line into ("bundled"|"hub"|"dir", dir)."""
    if source not in SOURCES:
        raise DataError("--source", None, f"unknown GSM8K source {source!r}", f"use one of {', '.join(SOURCES)}")
    directory = Path(gsm8k_dir).expanduser() if gsm8k_dir else paths.gsm8k_dir()
    if source == "dir" and directory is None:
        raise DataError("--source", None, "source 'dir' needs a directory", f"pass --gsm8k-dir or set {paths.GSM8K_DIR_ENV}")
    if source in ("auto", "dir") and directory is not None:
        return "dir", directory
    if source == "auto":
        return "hub", None
    return source, None


def load_split(split: str, source: str = "auto", gsm8k_dir: str | Path | None = None,
               lenient: bool = False, limit: int | None = None) -> Split:
    """Load one split. Every row has a non-empty question and answer, or an error names the line."""
    if split not in SPLITS:
        raise DataError("--split", None, f"unknown split {split!r}", f"GSM8K has {', '.join(SPLITS)}")
    kind, directory = resolve_source(source, gsm8k_dir)
    if kind == "bundled":
        res = read_rows(paths.BUNDLED_GSM8K_DIR / f"{split}.jsonl", lenient=lenient)
        out = Split(res.rows, "bundled", split, res.skipped)
    elif kind == "dir":
        path = directory / f"{split}.jsonl"
        if not path.exists():
            raise DataError(path, None, "does not exist", "the GSM8K directory must hold train.jsonl and test.jsonl "
                            "as published in github.com/openai/grade-school-math")
        res = read_rows(path, lenient=lenient)
        out = Split(res.rows, str(directory), split, res.skipped)
    else:
        out = _load_hub(split, lenient)
    if limit is not None:
        out.rows = out.rows[:limit]
    return out


def _load_hub(split: str, lenient: bool) -> Split:
    try:
        import datasets

        ds = datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split)
    except Exception as err:  # datasets raises many types for "offline" / "not found"
        first = str(err).splitlines()[0] if str(err) else ""
        raise DataError(
            f"hub:{HUB_ID}", None, f"could not be loaded ({type(err).__name__}: {first})",
            f"pass --gsm8k-dir DIR (or set {paths.GSM8K_DIR_ENV}) to a folder with train.jsonl/test.jsonl, "
            f"or use --source bundled for the project's 50-problem sample") from err
    rows, skipped = [], []
    for i, row in enumerate(ds, start=1):
        missing = [f for f in FIELDS if not str(row.get(f) or "").strip()]
        if missing:
            reason = f"field {missing[0]!r} is missing or empty"
            if not lenient:
                raise DataError(f"hub:{HUB_ID}[{split}]", i, "is missing or empty", field=missing[0])
            skipped.append((i, reason))
            continue
        rows.append({f: row[f] for f in FIELDS})
    return Split(rows, HUB_ID, split, skipped)


def bundled_texts() -> Iterator[str]:
    """Every question and answer of the bundled sample (the tiny tokenizers train on it)."""
    for split in SPLITS:
        for row in read_rows(paths.BUNDLED_GSM8K_DIR / f"{split}.jsonl").rows:
            yield row["question"]
            yield row["answer"]


def rationale_and_answer(gold: str) -> tuple[str, str]:
    """Split a GSM8K solution into its reasoning and the text after ``####``."""
    head, sep, tail = gold.rpartition("####")
    if not sep:
        return gold.strip(), ""
    return head.strip(), tail.strip()


def load_source(spec: str, gsm8k_dir: str | Path | None = None, *, lenient: bool = False,
                limit: int | None = None) -> Split:
    """Load questions (and gold answers, when present) from a source spec.

    ``bundled:train``, ``gsm8k:test`` (the configured folder, else the hub), ``hub:train``,
    ``dir:train``, or a path to any JSONL file with a ``question`` field (``answer`` optional:
    without gold, synthesis falls back to self-consistency).
    """
    name, sep, split = spec.partition(":")
    if sep and name in ("bundled", "gsm8k", "hub", "dir") and not Path(spec).exists():
        return load_split(split, "auto" if name == "gsm8k" else name, gsm8k_dir, lenient=lenient, limit=limit)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(spec, None, "is neither an existing JSONL file nor a source spec",
                        "use bundled:train, gsm8k:train, hub:train, dir:train or a path to a .jsonl file")
    res = read_rows(path, required=("question",), lenient=lenient)
    rows = res.rows[:limit] if limit is not None else res.rows
    return Split(rows, str(path), path.stem, res.skipped)


def is_test_source(spec: str) -> bool:
    """True for specs naming a test split: those must never feed few-shot exemplars."""
    return spec.endswith(":test") or Path(spec).stem == "test"
