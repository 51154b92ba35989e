"""Tokenization for fine-tuning, cached: label masks, truncation policy, length statistics.

    synthtune prep --model smollm2-135m-instruct --data gsm8k:train --format auto --max-length 512

What the 2023 workshop did, and what this module does instead:

* It padded every example to 256 tokens. 15.7% of GSM8K train (SmolLM2 tokenizer) is longer than
  that, so their final answers were cut off, silently, and 28% of every batch was padding. Here the
  over-long examples are counted and reported (dropped by default), padding is per batch
  (:class:`CausalCollator`, :class:`Seq2SeqCollator`), batches can be length-grouped
  (:func:`length_grouped_order`) or packed (:func:`pack_sequences`), and :func:`length_stats`
  recommends a ``max_length`` covering 99% of the data.
* It set ``pad_token = eos_token`` and then masked every pad id in the labels, which masked the real
  EOS: the model never learned to stop. Here labels are built from the prompt/target split, never
  from ``input_ids == pad_token_id``; EOS is appended to every target and is always a label.

Truncation policy (``truncation=``): ``drop`` (default) leaves out any example longer than
``max_length`` (seq2seq: input over ``max_length`` or labels over ``max_target_length``) and says how
many; ``truncate`` keeps their first tokens, which cuts the end of the answer and its EOS away (what
the workshop did, for comparison). Left-truncating the prompt instead would keep the answer but
train on answers to questions the model cannot see, so it is not offered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthtune import paths
from synthtune.errors import DataError
from synthtune.formats import add_special_tokens, format_example, resolve_format
from synthtune.models import is_seq2seq_config, load_config, load_tokenizer, resolve_model
from synthtune.plotting import png

logger = logging.getLogger(__name__)

TRUNCATION = ("drop", "truncate")
IGNORE_INDEX = -100  # the label value torch's cross_entropy (and every HF model) skips
# Bump when the tokenization recipe changes, so caches built by older code are not reused.
_PREP_VERSION = 1


# --------------------------------------------------------------------------------------------
# tokenization with a cache
# --------------------------------------------------------------------------------------------


def _encode_batch(batch: dict, tokenizer, fmt: str, is_seq2seq: bool, qf: str, af: str) -> dict:
    """Untruncated ids for a batch; lengths are the full lengths, truncation comes later."""
    eos = tokenizer.eos_token_id
    prompts, targets = [], []
    for q, a in zip(batch[qf], batch[af], strict=True):
        p, t = format_example({"question": q, "answer": a}, tokenizer, fmt=fmt, is_seq2seq=is_seq2seq)
        prompts.append(p)
        targets.append(t)
    p_ids = tokenizer(prompts, add_special_tokens=add_special_tokens(fmt))["input_ids"]
    t_ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    if is_seq2seq:
        out["target_length"] = []
    for p, t in zip(p_ids, t_ids, strict=True):
        # Chat targets already end in the template's end-of-turn token, which is EOS for most chat
        # models; append EOS only when it is not already last, so it appears exactly once.
        target = list(t) if t and t[-1] == eos else [*t, eos]
        if is_seq2seq:
            out["input_ids"].append(list(p))
            out["labels"].append(target)
            out["length"].append(len(p))
            out["target_length"].append(len(target))
        else:
            out["input_ids"].append([*p, *target])
            # Masked by position (the prompt/target split), never by value: when pad == eos a value
            # mask would hide the EOS the model must learn to emit.
            out["labels"].append([IGNORE_INDEX] * len(p) + target)
            out["length"].append(len(p) + len(target))
    return out


def _limit_batch(batch: dict, is_seq2seq: bool, max_length: int, max_target_length: int, policy: str) -> dict:
    """Apply the truncation policy; batched map may return fewer rows than it got (dropping)."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        over = len(ids) > max_length or (is_seq2seq and len(labels) > max_target_length)
        if over and policy == "drop":
            continue
        ids = ids[:max_length]
        labels = labels[:max_target_length] if is_seq2seq else labels[:max_length]
        if all(x == IGNORE_INDEX for x in labels):
            continue  # the prompt alone filled max_length: no target token left to learn from
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        # The length that costs compute, used to group batches: both sides for seq2seq.
        out["length"].append(len(ids) + (len(labels) if is_seq2seq else 0))
    return out


@dataclass
class PreparedData:
    """A tokenized dataset and what it cost to make it.

    ``dataset`` columns: ``input_ids``, ``labels``, ``length`` (tokens a padded batch pays for this
    row: causal ``len(input_ids)``, seq2seq ``len(input_ids) + len(labels)``; use it for
    :func:`length_grouped_order`). Collators ignore ``length``.
    """

    dataset: Any
    stats: dict
    lengths: list[int]  # full (untruncated) lengths of every input row: causal total, seq2seq input side
    target_lengths: list[int] | None = None  # seq2seq: full label lengths (EOS included)
    from_cache: bool = False
    fmt: str = "plain"
    is_seq2seq: bool = False
    cache_files: list[str] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return self.stats["n_truncated"]


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash: vocab, merges, normalizer, post-processor, chat template and special tokens.

    Content rather than path, so the same tokenizer at two paths shares a cache and a tokenizer
    edited in place (e.g. ``pad_token = eos_token``) does not.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    specials = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    h.update(json.dumps(specials).encode())
    return h.hexdigest()[:16]


def _as_dataset(rows, question_field: str, answer_field: str):
    """A ``datasets.Dataset`` with just the two text columns, and a fingerprint of its content."""
    import datasets

    if isinstance(rows, datasets.Dataset):
        missing = [f for f in (question_field, answer_field) if f not in rows.column_names]
        if missing:
            raise _missing_field(missing[0], None)
        ds = rows.select_columns([question_field, answer_field])
        return ds, ds._fingerprint
    rows = list(getattr(rows, "rows", rows))  # a gsm8k Split, a list, any iterable of dicts
    cols: dict[str, list[str]] = {question_field: [], answer_field: []}
    for i, row in enumerate(rows, start=1):
        for f in (question_field, answer_field):
            value = row.get(f)
            if value is None or not str(value).strip():
                raise _missing_field(f, i)
            cols[f].append(str(value))
    # Only the two text fields: synthesized rows carry extra fields (scores, provenance) whose types
    # may differ from row to row, and they play no part in training.
    digest = hashlib.sha256(json.dumps([cols[question_field], cols[answer_field]]).encode()).hexdigest()[:16]
    return datasets.Dataset.from_dict(cols), digest


def _missing_field(name: str, row: int | None):
    return DataError("rows", row, "is missing or empty", "every training row needs a question and an answer "
                     "(GSM8K format: rationale then '#### n')", field=name)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tokenize_rows(rows, tokenizer, *, is_seq2seq: bool, fmt: str = "plain", max_length: int = 512,
                  max_target_length: int | None = None, truncation: str = "drop", cache_dir: Path | None = None,
                  question_field: str = "question", answer_field: str = "answer",
                  warn: bool = True) -> PreparedData:
    """Tokenize rows (list of dicts, a gsm8k ``Split`` or a ``datasets.Dataset``) for training.

    Causal: ``input_ids = prompt + target + EOS``, ``labels = [-100] * len(prompt) + target + EOS``.
    Seq2seq: ``input_ids = prompt`` (with the tokenizer's own special tokens), ``labels = target + EOS``.
    ``max_target_length`` (seq2seq only) defaults to ``max_length``.

    Two ``datasets.map`` stages, each cached in ``cache_dir`` (default ``CACHE_DIR/prep``) under a
    key made of the tokenizer's content hash, the data's fingerprint and the settings: tokenizing
    (independent of ``max_length``, so trying another length does not re-tokenize) and limiting.
    A repeated call loads both from the cache (``from_cache`` is then True). Under multi-process
    launches run it on the main process first (``accelerator.main_process_first()``).
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"unknown truncation policy {truncation!r}; use one of {', '.join(TRUNCATION)}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: the model could never learn to stop")
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    max_target_length = max_target_length or max_length
    cache_dir = Path(cache_dir) if cache_dir else paths.CACHE_DIR / "prep"
    cache_dir.mkdir(parents=True, exist_ok=True)

    ds, data_fp = _as_dataset(rows, question_field, answer_field)
    key1 = _key(_PREP_VERSION, tokenizer_fingerprint(tokenizer), data_fp, fmt, is_seq2seq)
    key2 = _key(key1, max_length, max_target_length if is_seq2seq else None, truncation)
    file1, file2 = cache_dir / f"tok-{key1}.arrow", cache_dir / f"lim-{key2}.arrow"
    from_cache = file1.exists() and file2.exists()

    # new_fingerprint: the key already names everything the output depends on, and it spares
    # datasets from hashing the tokenizer inside the function (slow, and unstable across runs).
    tokenized = ds.map(_encode_batch, batched=True, remove_columns=ds.column_names,
                       fn_kwargs={"tokenizer": tokenizer, "fmt": fmt, "is_seq2seq": is_seq2seq,
                                  "qf": question_field, "af": answer_field},
                       cache_file_name=str(file1), load_from_cache_file=True, new_fingerprint=key1,
                       desc="tokenizing")
    limited = tokenized.map(_limit_batch, batched=True, remove_columns=tokenized.column_names,
                            fn_kwargs={"is_seq2seq": is_seq2seq, "max_length": max_length,
                                       "max_target_length": max_target_length, "policy": truncation},
                            cache_file_name=str(file2), load_from_cache_file=True, new_fingerprint=key2,
                            desc=f"limiting to {max_length} tokens")

    lengths = list(tokenized["length"])
    target_lengths = list(tokenized["target_length"]) if is_seq2seq else None
    stats = _prep_stats(lengths, target_lengths, len(limited), max_length, max_target_length, truncation)
    stats.update(format=fmt, kind="seq2seq" if is_seq2seq else "causal")
    if warn and stats["n_truncated"]:
        print(f"[synthtune] warning: {stats['n_truncated']} of {stats['n']} examples "
              f"({stats['truncated_fraction']:.1%}) exceed max_length={max_length}"
              + (f"/max_target_length={max_target_length}" if is_seq2seq else "")
              + f"; {'dropped' if truncation == 'drop' else 'truncated (their answers lose the end and EOS)'}."
              f" A max_length of {stats['recommended_max_length']} covers 99%.", file=sys.stderr, flush=True)
    return PreparedData(dataset=limited, stats=stats, lengths=list(lengths),
                        target_lengths=list(target_lengths) if target_lengths is not None else None,
                        from_cache=from_cache, fmt=fmt, is_seq2seq=is_seq2seq,
                        cache_files=[str(file1), str(file2)])


def _prep_stats(lengths, target_lengths, n_kept, max_length, max_target_length, truncation) -> dict:
    n = len(lengths)
    if target_lengths is None:
        over = sum(1 for x in lengths if x > max_length)
    else:
        over = sum(1 for x, y in zip(lengths, target_lengths, strict=True) if x > max_length or y > max_target_length)
    stats = {"n": n, "n_kept": n_kept, "n_truncated": over, "n_dropped": n - n_kept,
             "truncated_fraction": over / n if n else 0.0, "truncation": truncation, "max_length": max_length,
             **length_stats(lengths)}
    if target_lengths is not None:
        stats["max_target_length"] = max_target_length
        stats["target"] = length_stats(target_lengths)
        stats["recommended_max_target_length"] = stats["target"]["recommended_max_length"]
    return stats


# --------------------------------------------------------------------------------------------
# length statistics
# --------------------------------------------------------------------------------------------


def padded_len(n: int, multiple: int | None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (unchanged when it is 0 or None)."""
    return n if not multiple else -(-n // multiple) * multiple


def length_stats(lengths: Sequence[int], *, coverage: float = 0.99, multiple: int = 8) -> dict:
    """mean, p50/p90/p99, min/max, and ``recommended_max_length``.

    Percentiles are order statistics (the smallest length with at least that share of examples at
    or below it), so ``recommended_max_length`` (p99 rounded up to ``multiple``: tensor cores and
    CPU vector units favour multiples of 8; use 64 on GPUs to bound the number of shapes) really
    covers ``coverage`` of the examples.
    """
    xs = sorted(int(x) for x in lengths)
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "min": 0, "max": 0, "recommended_max_length": 0}

    def pct(q: float) -> int:
        return xs[max(0, math.ceil(q * n) - 1)]

    cover = pct(coverage)
    return {"n": n, "mean": round(sum(xs) / n, 2), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
            "min": xs[0], "max": xs[-1], "recommended_max_length": padded_len(cover, multiple)}


def padding_waste(lengths: Sequence[int], pad_to: int) -> float:
    """Share of a fixed ``pad_to``-token batch that is padding (over-long rows count as full)."""
    if not lengths:
        return 0.0
    return 1.0 - sum(min(int(x), pad_to) for x in lengths) / (len(lengths) * pad_to)


def plot_length_histogram(lengths: Sequence[int], path: Path | str, max_length: int | None = None, *,
                          title: str = "token lengths") -> None:
    """A PNG histogram with the p99 line and, when given, the ``max_length`` cut and how many exceed it."""
    stats = length_stats(lengths)
    with png(path, (7, 3.5), dpi=100) as (_, ax):
        ax.hist(list(lengths), bins=min(60, max(10, len(set(lengths)))), color="#4c72b0", edgecolor="white")
        ax.axvline(stats["p99"], color="#55a868", linestyle="--", label=f"p99 = {stats['p99']}")
        if max_length is not None:
            over = sum(1 for x in lengths if x > max_length)
            ax.axvline(max_length, color="#c44e52", label=f"max_length = {max_length} ({over} over)")
        ax.set_xlabel("tokens per example")
        ax.set_ylabel("examples")
        ax.set_title(f"{title}: n={stats['n']}, mean {stats['mean']:.0f}, max {stats['max']}")
        ax.legend()



def load_tokenizer_for(model: str) -> tuple[Any, bool]:
    """The tokenizer of ``model`` and whether it is seq2seq, without loading any weights."""
    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token is None:
        # Collators need a pad id; eos is safe because labels never derive from it.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, is_seq2seq_config(load_config(path))


def load_prepared(path: Path | str):
    """The dataset written by ``synthtune prep`` (``OUT/dataset`` or ``OUT``)."""
    import datasets

    path = Path(path)
    return datasets.load_from_disk(str(path / "dataset" if (path / "dataset").exists() else path))
