"""Preprocessing for fine-tuning: formatting, tokenization, collators, length grouping, packing, length stats.

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

Formats (zero-shot, the same text at training and evaluation time: use :func:`encode_prompt` to
build evaluation prompts so they match the training prompts token for token):

* ``plain``: ``Question: {q}\\nAnswer:`` then the target `` {answer}`` then EOS. The text is
  ``Question: {q}\\nAnswer: {answer}``; the space belongs to the target because BPE tokenizers
  attach a leading space to the following word (``ĠNatal``): a prompt ending in a space would end in
  a lone ``Ġ`` token that the model rarely saw in pretraining.
* ``chat``: the tokenizer's chat template, the question as the user turn and the answer as the
  assistant turn; everything before the assistant content is masked, the template's end-of-turn
  token(s) are part of the target (SmolLM2's ``<|im_end|>`` is its EOS).
* seq2seq (T5/UL2): the encoder reads the plain prompt, the decoder's labels are ``{answer}`` + EOS.

Truncation policy (``truncation=``): ``drop`` (default) leaves out any example longer than
``max_length`` (seq2seq: input over ``max_length`` or labels over ``max_target_length``) and says how
many; ``truncate`` keeps their first tokens, which cuts the end of the answer and its EOS away (what
the workshop did, for comparison). Left-truncating the prompt instead would keep the answer but
train on answers to questions the model cannot see, so it is not offered.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import constants

logger = logging.getLogger(__name__)

FORMATS = ("plain", "chat")
TRUNCATION = ("drop", "truncate")
IGNORE_INDEX = -100  # the label value torch's cross_entropy (and every HF model) skips
PLAIN_PROMPT = "Question: {question}\nAnswer:"
# Bump when the tokenization recipe changes, so caches built by older code are not reused.
_PREP_VERSION = 1


# --------------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------------


def resolve_format(fmt: str, tokenizer, is_seq2seq: bool) -> str:
    """``auto`` -> ``chat`` for decoder models whose tokenizer has a chat template, else ``plain``."""
    if fmt == "auto":
        from synthtune.synth.prompts import default_format

        return default_format(tokenizer, is_seq2seq)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)} or auto")
    if fmt == "chat":
        if is_seq2seq:
            raise ValueError("the 'chat' format is for decoder-only models; seq2seq models use 'plain'")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the 'chat' format needs a tokenizer with a chat template; this one has none "
                             "(use 'plain' or 'auto')")
    return fmt


def _chat_prompt(question: str, tokenizer) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def format_example(row: dict, tokenizer, *, fmt: str, is_seq2seq: bool,
                   question_field: str = "question", answer_field: str = "answer") -> tuple[str, str]:
    """``(prompt_text, target_text)`` for one row; EOS is not in the text, :func:`tokenize_rows` adds it."""
    question = str(row[question_field]).strip()
    answer = str(row[answer_field]).strip()
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    if fmt == "plain":
        prompt = PLAIN_PROMPT.format(question=question)
        # The decoder of a seq2seq model starts fresh, so its target needs no separating space.
        return prompt, answer if is_seq2seq else " " + answer
    prompt = _chat_prompt(question, tokenizer)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        # Some templates render past turns differently from the generation prompt (e.g. they strip
        # reasoning blocks); then no prefix split is exact and the mask would be wrong.
        raise ValueError("this chat template does not render the conversation as generation prompt + answer, "
                         "so the prompt cannot be masked exactly; use fmt='plain'")
    # Trailing whitespace after the end-of-turn token (SmolLM2 writes '<|im_end|>\n') would be a label
    # the model never needs to produce: generation stops at the end-of-turn token.
    return prompt, full[len(prompt):].rstrip()


def _add_special_tokens(fmt: str) -> bool:
    # A rendered chat template already holds its BOS/role tokens; adding them again doubles the BOS.
    return fmt != "chat"


def encode_prompt(question: str, tokenizer, *, fmt: str, is_seq2seq: bool) -> list[int]:
    """Evaluation/inference prompt ids, identical to the prompt part of a training example."""
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    prompt, _ = format_example({"question": question, "answer": ""}, tokenizer, fmt=fmt, is_seq2seq=is_seq2seq)
    return tokenizer(prompt, add_special_tokens=_add_special_tokens(fmt))["input_ids"]


def _encode_batch(batch: dict, tokenizer, fmt: str, is_seq2seq: bool, qf: str, af: str) -> dict:
    """Untruncated ids for a batch; lengths are the full lengths, truncation comes later."""
    eos = tokenizer.eos_token_id
    prompts, targets = [], []
    for q, a in zip(batch[qf], batch[af], strict=True):
        p, t = format_example({"question": q, "answer": a}, tokenizer, fmt=fmt, is_seq2seq=is_seq2seq)
        prompts.append(p)
        targets.append(t)
    p_ids = tokenizer(prompts, add_special_tokens=_add_special_tokens(fmt))["input_ids"]
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


# --------------------------------------------------------------------------------------------
# tokenization with a cache
# --------------------------------------------------------------------------------------------


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
    from synthtune.data.jsonl import DataError

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
    cache_dir = Path(cache_dir) if cache_dir else constants.CACHE_DIR / "prep"
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
# collators
# --------------------------------------------------------------------------------------------


def _padded_len(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _pad(seqs: Sequence[Sequence[int]], value: int, length: int):
    import torch

    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


class CausalCollator:
    """Right-pads a list of ``{input_ids, labels}`` rows to the longest in the batch.

    ``input_ids`` pad with ``pad_token_id``, ``labels`` with -100, ``attention_mask`` is 1 on real
    tokens. Labels come from the rows, never from comparing ids with the pad id, so a tokenizer whose
    pad is its EOS keeps its EOS label. ``pad_to_multiple_of`` (e.g. 64 on GPUs) limits the number of
    distinct shapes: kernels and caching allocators favour few shapes.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (eos is fine: labels do not use it)")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        ids = [f["input_ids"] for f in features]
        length = _padded_len(max(len(x) for x in ids), self.pad_to_multiple_of)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for i, x in enumerate(ids):
            mask[i, : len(x)] = 1
        return {"input_ids": _pad(ids, self.pad_token_id, length), "attention_mask": mask,
                "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length)}


class Seq2SeqCollator:
    """Pads encoder ``input_ids``/``attention_mask`` and decoder ``labels`` (-100) separately.

    No ``decoder_input_ids``: T5-style models build them from ``labels`` by shifting right and
    replacing -100 with the pad id, so the labels' EOS stays a target.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        ids = [f["input_ids"] for f in features]
        labels = [f["labels"] for f in features]
        n_in = _padded_len(max(len(x) for x in ids), self.pad_to_multiple_of)
        n_out = _padded_len(max(len(x) for x in labels), self.pad_to_multiple_of)
        mask = torch.zeros((len(ids), n_in), dtype=torch.long)
        for i, x in enumerate(ids):
            mask[i, : len(x)] = 1
        return {"input_ids": _pad(ids, self.pad_token_id, n_in), "attention_mask": mask,
                "labels": _pad(labels, IGNORE_INDEX, n_out)}


# --------------------------------------------------------------------------------------------
# length grouping
# --------------------------------------------------------------------------------------------


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int = 0, *,
                         mega_batch_mult: int | None = None, shuffle_batches: bool = True) -> list[int]:
    """A seeded permutation of ``range(len(lengths))`` whose consecutive ``batch_size`` chunks have similar lengths.

    As HF's ``LengthGroupedSampler``: shuffle, cut into megabatches of ``mega_batch_mult * batch_size``,
    sort each megabatch by length (longest first). Randomness survives (which examples meet is
    random) while padding within a batch shrinks. The longest batch goes first, so an out-of-memory
    shows at step 1 rather than hours in. ``shuffle_batches`` then shuffles the remaining batches, so
    the loss curve does not saw-tooth from long to short once per megabatch.
    """
    n = len(lengths)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if n == 0:
        return []
    if mega_batch_mult is None:
        # HF's default: 50 batches per megabatch, fewer on small datasets so several megabatches remain.
        mega_batch_mult = max(1, min(n // (batch_size * 4), 50))
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    size = mega_batch_mult * batch_size
    megas = [sorted(order[i: i + size], key=lambda j: -lengths[j]) for i in range(0, n, size)]
    batches = [m[i: i + batch_size] for m in megas for i in range(0, len(m), batch_size)]
    longest = max(range(len(batches)), key=lambda b: lengths[batches[b][0]])
    first = batches.pop(longest)
    # The last (possibly short) batch stays last, so drop_last drops it and every other batch is full.
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    if shuffle_batches:
        rng.shuffle(batches)
    return [i for b in [first, *batches, *tail] for i in b]


class LengthGroupedSampler:
    """A torch-compatible sampler over :func:`length_grouped_order`; ``set_epoch`` reshuffles.

    Its batches are chunks of ``batch_size`` consecutive indices, so give the DataLoader the same
    per-device ``batch_size``; accelerate's batch-sampler sharding then hands whole chunks to ranks.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, **kwargs):
        self.lengths, self.batch_size, self.seed, self.kwargs = list(lengths), batch_size, seed, kwargs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch, **self.kwargs))


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


def pack_sequences(dataset, max_length: int):
    """Pack causal examples into rows of at most ``max_length`` tokens (best-fit decreasing).

    Each output row holds whole examples; ``position_ids`` restart at 0 for each, which is how
    :class:`PackedCollator` (and transformers) keep attention and RoPE positions per example.
    The first label of every example is -100: it would be predicted from the previous example's
    last token (unpacked it is never a label, the causal shift drops it), so the packed loss equals
    the unpacked loss exactly. Best-fit decreasing fills rows to ~99% where packing in order
    leaves ~10-15% empty at max_length 512 on GSM8K. Examples longer than ``max_length`` are an
    error: tokenize with the same ``max_length`` first.
    """
    import datasets

    cols = dataset.select_columns(["input_ids", "labels"])[:]  # plain lists: per-row Column access is slow
    ids_col, labels_col = cols["input_ids"], cols["labels"]
    lengths = [len(x) for x in ids_col]
    too_long = sum(1 for x in lengths if x > max_length)
    if too_long:
        raise ValueError(f"{too_long} examples are longer than max_length={max_length}; tokenize with "
                         f"tokenize_rows(..., max_length={max_length}) first")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        k = bisect.bisect_left(free, (lengths[i], -1))  # the fullest bin that still fits
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - lengths[i], len(bins) - 1))
        else:
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - lengths[i], b))
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "n_examples": [],
                            "example_ids": []}
    for members in bins:
        ids, labels, pos = [], [], []
        for i in members:
            ids += list(ids_col[i])
            labels += [IGNORE_INDEX, *list(labels_col[i])[1:]]
            pos += list(range(lengths[i]))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(pos)
        out["length"].append(len(ids))
        out["n_examples"].append(len(members))
        out["example_ids"].append(members)  # row indices in the input, in packed order
    return datasets.Dataset.from_dict(out)


class PackedCollator:
    """Batches packed rows so attention never crosses an example boundary.

    ``attention="mask"`` (default, right for sdpa and eager on any device): ``position_ids`` plus
    a 4D additive block-diagonal causal mask ``(B, 1, L, L)`` (0 = attend, ``finfo(mask_dtype).min``
    = blocked). transformers uses a 4D mask as given, whatever ``use_cache`` is. Pass the model's
    dtype as ``mask_dtype`` (sdpa wants the mask in the query's dtype). Memory is ``B*L*L`` mask
    elements: fine at 512-2048 tokens.

    ``attention="position_ids"`` (flash-attention / large L): ``position_ids`` and no
    ``attention_mask``. transformers then finds the example boundaries from the position resets
    (varlen kernels for flash-attn, a derived block mask for sdpa/eager), but only when no KV cache
    is passed: **call the model with** ``use_cache=False`` (or set ``model.config.use_cache =
    False``). Measured here with transformers 5.24: with the default ``use_cache=True`` the
    boundaries are silently ignored and examples attend to each other.

    Padding (rows of unequal length) gets labels -100 and its own positions/block, so it never
    touches the real tokens. ``num_tokens`` (a 0-d tensor) counts the real tokens of the batch, for
    throughput; models ignore it, but it is not a model input.
    """

    def __init__(self, pad_token_id: int, *, attention: str = "mask", pad_to_multiple_of: int | None = None,
                 mask_dtype=None):
        if attention not in ("mask", "position_ids"):
            raise ValueError("attention must be 'mask' or 'position_ids'")
        self.pad_token_id, self.attention = pad_token_id, attention
        self.pad_to_multiple_of, self.mask_dtype = pad_to_multiple_of, mask_dtype

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        ids = [f["input_ids"] for f in features]
        length = _padded_len(max(len(x) for x in ids), self.pad_to_multiple_of)
        pos = torch.zeros((len(ids), length), dtype=torch.long)
        for i, f in enumerate(features):
            p = list(f["position_ids"])
            pos[i, : len(p)] = torch.as_tensor(p)
            pos[i, len(p):] = torch.arange(length - len(p))  # the padding is a sequence of its own
        batch = {"input_ids": _pad(ids, self.pad_token_id, length),
                 "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, length), "position_ids": pos,
                 # the real tokens: neither the 4D mask nor position_ids can tell them from padding
                 "num_tokens": torch.tensor(sum(len(x) for x in ids))}
        if self.attention == "mask":
            # Segment ids from the position resets: a new example starts wherever position is 0.
            seg = torch.cumsum((pos == 0).long(), dim=1)
            same = seg[:, :, None] == seg[:, None, :]
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            dtype = self.mask_dtype or torch.float32
            blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
            zero = torch.zeros((), dtype=dtype)
            batch["attention_mask"] = torch.where(same & causal, zero, blocked)[:, None]
        return batch


# --------------------------------------------------------------------------------------------
# length statistics
# --------------------------------------------------------------------------------------------


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
            "min": xs[0], "max": xs[-1], "recommended_max_length": _padded_len(cover, multiple)}


def padding_waste(lengths: Sequence[int], pad_to: int) -> float:
    """Share of a fixed ``pad_to``-token batch that is padding (over-long rows count as full)."""
    if not lengths:
        return 0.0
    return 1.0 - sum(min(int(x), pad_to) for x in lengths) / (len(lengths) * pad_to)


def plot_length_histogram(lengths: Sequence[int], path: Path | str, max_length: int | None = None, *,
                          title: str = "token lengths") -> None:
    """A PNG histogram with the p99 line and, when given, the ``max_length`` cut and how many exceed it."""
    from synthtune.plotting import png

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


# --------------------------------------------------------------------------------------------
# the `synthtune prep` job
# --------------------------------------------------------------------------------------------


def load_tokenizer_for(model: str) -> tuple[Any, bool]:
    """The tokenizer of ``model`` and whether it is seq2seq, without loading any weights."""
    from synthtune.models import is_seq2seq_config, load_config, load_tokenizer, resolve_model

    path = resolve_model(model)
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token is None:
        # Collators need a pad id; eos is safe because labels never derive from it.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, is_seq2seq_config(load_config(path))


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-." else "-" for c in (Path(text).name or text))
    return keep.strip("-.")[:60] or "data"


def default_prep_dir(model: str, data: str, fmt: str, max_length: int) -> Path:
    return constants.OUTPUTS_DIR / "prep" / f"{_slug(model)}_{_slug(data)}_{fmt}_{max_length}"


def run_prep(model: str, data: str, *, fmt: str = "auto", max_length: int = 512,
             max_target_length: int | None = None, truncation: str = "drop", out: Path | str | None = None,
             limit: int | None = None, cache_dir: Path | None = None) -> dict:
    """Tokenize ``data`` for ``model`` and write ``dataset/`` (arrow), ``stats.json``, ``length_hist.png``."""
    import tempfile

    from synthtune.data.gsm8k import load_source
    from synthtune.files import atomic_write_text, replace_dir

    tokenizer, is_seq2seq = load_tokenizer_for(model)
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    rows = load_source(data, limit=limit)
    prepared = tokenize_rows(rows, tokenizer, is_seq2seq=is_seq2seq, fmt=fmt, max_length=max_length,
                             max_target_length=max_target_length, truncation=truncation, cache_dir=cache_dir)
    out_dir = Path(out) if out else default_prep_dir(model, data, fmt, max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_dir = out_dir / "dataset"
    # Saved beside it, then swapped in whole: a rerun killed mid-save leaves the previous dataset,
    # never a half-written one that load_from_disk would trip over (or, worse, half-load).
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".dataset-") as tmp:
        prepared.dataset.save_to_disk(str(Path(tmp) / "dataset"))  # arrow + json metadata, never pickled
        replace_dir(Path(tmp) / "dataset", ds_dir)
    hist = out_dir / "length_hist.png"
    side = "encoder input" if is_seq2seq else "prompt + answer + EOS"
    plot_length_histogram(prepared.lengths, hist, max_length, title=f"{_slug(data)} ({side})")
    stats = {**prepared.stats, "model": model, "data": data, "from_cache": prepared.from_cache,
             "padding_waste_at_max_length": round(padding_waste(prepared.lengths, max_length), 4)}
    stats_path = out_dir / "stats.json"
    atomic_write_text(stats_path, json.dumps(stats, indent=2) + "\n")
    keys = ("n", "n_kept", "n_truncated", "n_dropped", "truncated_fraction", "mean", "p50", "p90", "p99", "max",
            "recommended_max_length", "format", "kind", "max_length", "truncation", "from_cache")
    summary = {k: stats[k] for k in keys}
    if is_seq2seq:
        summary["recommended_max_target_length"] = stats["recommended_max_target_length"]
        summary["target_p99"] = stats["target"]["p99"]
    summary.update(out=str(out_dir), dataset=str(ds_dir), stats=str(stats_path), histogram=str(hist))
    return summary


def load_prepared(path: Path | str):
    """The dataset written by ``synthtune prep`` (``OUT/dataset`` or ``OUT``)."""
    import datasets

    path = Path(path)
    return datasets.load_from_disk(str(path / "dataset" if (path / "dataset").exists() else path))


def iter_batches(order: Iterable[int], batch_size: int) -> Iterator[list[int]]:
    """Chunks of ``batch_size`` indices (the last may be short), for samplers and benches."""
    batch: list[int] = []
    for i in order:
        batch.append(i)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch
