"""Batches for training: per-batch padding collators, length-grouped order, and packing."""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Iterable, Iterator, Sequence

from synthtune.train.tokenize import IGNORE_INDEX, padded_len

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# collators
# --------------------------------------------------------------------------------------------


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
        length = padded_len(max(len(x) for x in ids), self.pad_to_multiple_of)
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
        n_in = padded_len(max(len(x) for x in ids), self.pad_to_multiple_of)
        n_out = padded_len(max(len(x) for x in labels), self.pad_to_multiple_of)
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


PACKED_ATTENTION = ("mask", "position_ids", "varlen")


class PackedCollator:
    """Batches packed rows so attention never crosses an example boundary.

    Three layouts, one per family of attention kernels (``synthtune.train.setup`` picks one from
    ``attn_implementation``; each carries ``position_ids`` that restart at 0 per example, for RoPE):

    ``attention="mask"`` (default; sdpa and eager on any device): a 4D additive block-diagonal
    causal mask ``(B, 1, L, L)`` (0 = attend, ``finfo(mask_dtype).min`` = blocked). transformers
    uses a 4D mask as given, whatever ``use_cache`` is. Pass the model's dtype as ``mask_dtype``
    (sdpa wants the mask in the query's dtype). Memory is ``B*L*L`` mask elements: fine at 512-2048 tokens.

    ``attention="position_ids"`` (flex attention; sdpa/eager too): no ``attention_mask``.
    transformers then finds the example boundaries from the position resets (a BlockMask that
    skips other examples' blocks for flex, a dense mask it builds on the device for sdpa/eager),
    but only when no KV cache is passed: **call the model with** ``use_cache=False``
    (``synthtune.train.loss.model_inputs`` does). Measured here with transformers 5.24: with the
    default ``use_cache=True`` the boundaries are silently ignored and examples attend to each other.
    flash-attn honours the resets only in a batch of one row, hence the next layout.

    ``attention="varlen"`` (flash-attn): the rows are flattened into one row of all the batch's
    tokens, with no padding, plus ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 start offsets of the
    examples, ending with the total) and ``max_length_q``/``max_length_k`` (the longest example,
    a host int): the arguments of flash-attn's varlen kernel, which transformers passes through.
    Computed here, on the host, they cost no device sync per layer. ``pad_to_multiple_of`` pads the
    flat row with one padding example of its own.

    Padding (rows of unequal length) gets labels -100 and its own positions/block, so it never
    touches the real tokens. ``num_tokens`` (a 0-d tensor) counts the real tokens of the batch, for
    throughput; models ignore it, but it is not a model input.
    """

    def __init__(self, pad_token_id: int, *, attention: str = "mask", pad_to_multiple_of: int | None = None,
                 mask_dtype=None):
        if attention not in PACKED_ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(PACKED_ATTENTION)}, not {attention!r}")
        self.pad_token_id, self.attention = pad_token_id, attention
        self.pad_to_multiple_of, self.mask_dtype = pad_to_multiple_of, mask_dtype

    def __call__(self, features: Sequence[dict]) -> dict:
        if self.attention == "varlen":
            return self._flat(features)
        import torch

        ids = [f["input_ids"] for f in features]
        length = padded_len(max(len(x) for x in ids), self.pad_to_multiple_of)
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

    def _flat(self, features: Sequence[dict]) -> dict:
        import torch

        ids, labels, pos = [], [], []
        for f in features:
            ids += list(f["input_ids"])
            labels += list(f["labels"])
            pos += list(f["position_ids"])
        n_real = len(ids)
        pad = padded_len(n_real, self.pad_to_multiple_of) - n_real
        ids += [self.pad_token_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(pad))
        starts = [i for i, p in enumerate(pos) if p == 0]
        cu = [*starts, len(pos)]
        longest = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
        cu_t = torch.tensor(cu, dtype=torch.int32)
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos]),
                "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t.clone(), "max_length_q": longest, "max_length_k": longest,
                "num_tokens": torch.tensor(n_real)}


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
