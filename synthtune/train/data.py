"""Training and eval data: tokenized once (cached), batched by length, collated per batch."""

from __future__ import annotations

from dataclasses import dataclass, field

from synthtune import paths
from synthtune.config import TrainConfig
from synthtune.data.gsm8k import load_source
from synthtune.formats import resolve_format
from synthtune.train.batching import (
    CausalCollator,
    PackedCollator,
    Seq2SeqCollator,
    length_grouped_order,
    pack_sequences,
)
from synthtune.train.loss import CountingCollator
from synthtune.train.tokenize import tokenize_rows


class EpochOrder:
    """A sampler whose order is a pure function of (seed, epoch): the same on every rank and
    after a resume, which is what makes skipping the consumed batches exact."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        if self.group_by_length:
            return iter(length_grouped_order(self.lengths, self.batch_size, seed=self.seed + self.epoch))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.lengths), generator=g).tolist())

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class TrainData:
    train_loader: object
    eval_loader: object | None
    eval_questions: list[dict]
    stats: dict = field(default_factory=dict)

    def report_lines(self) -> list[str]:
        s = self.stats
        t = s["train"]
        over, dropped = t.get("n_truncated", 0), t.get("n_dropped", 0)
        fate = (f"{dropped} over max_length, dropped" if dropped else
                f"{over} over max_length, truncated" if over else "none over max_length")
        lines = [f"train: {t['n']} examples ({fate}), {s['train_batches']} batches of {s['batch_size']}"]
        if "eval" in s:
            lines.append(f"eval: {s['eval']['n']} examples for loss, {len(self.eval_questions)} questions for accuracy")
        return lines


def build_train_data(cfg: TrainConfig, tokenizer, seq2seq: bool, mask_bf16: bool = False,
                     packing_mode: str = "mask") -> TrainData:
    """``packing_mode``: the :class:`PackedCollator` layout for the model's attention kernel
    (``synthtune.train.setup.resolve_packing_mode``); used only with ``cfg.packing``."""
    import torch
    from torch.utils.data import DataLoader

    fmt = resolve_format(cfg.prompt_format, tokenizer, seq2seq)
    cache = paths.CACHE_DIR / "prep"
    rows = load_source(cfg.data, cfg.gsm8k_dir, limit=cfg.limit).rows
    rows = [r for r in rows if r.get("answer")]
    train = tokenize_rows(rows, tokenizer, is_seq2seq=seq2seq, fmt=fmt, max_length=cfg.max_length,
                          max_target_length=cfg.max_target_length, cache_dir=cache)
    ds = train.dataset
    multiple = cfg.pad_to_multiple_of
    if seq2seq:
        collator = Seq2SeqCollator(tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    elif cfg.packing:
        ds = pack_sequences(ds, cfg.max_length)
        # The block-diagonal mask must match the activations' dtype under bf16 (sdpa refuses mixing).
        collator = PackedCollator(tokenizer.pad_token_id, attention=packing_mode, pad_to_multiple_of=multiple,
                                  mask_dtype=torch.bfloat16 if mask_bf16 else None)
    else:
        collator = CausalCollator(tokenizer.pad_token_id, pad_to_multiple_of=multiple)
    lengths = [len(x) for x in ds["input_ids"]]
    sampler = EpochOrder(lengths, cfg.per_device_batch_size, cfg.seed, cfg.group_by_length and not cfg.packing)
    # A private generator: creating a DataLoader iterator draws a seed from its generator, and
    # drawing from the global RNG would shift dropout masks after a resume (which restores the
    # global RNG but re-creates the iterator at a different point).
    # the token counts travel as host ints beside the tensors: the loop reads them without a device sync
    train_loader = DataLoader(ds, batch_size=cfg.per_device_batch_size, sampler=sampler,
                              collate_fn=CountingCollator(collator, seq2seq),
                              drop_last=False, generator=torch.Generator().manual_seed(cfg.seed))
    stats = {"train": train.stats, "format": fmt, "batch_size": cfg.per_device_batch_size,
             "train_batches": len(train_loader), "packed_rows": len(ds) if cfg.packing else None,
             "packing_mode": packing_mode if cfg.packing else None}
    eval_loader, questions = None, []
    if cfg.eval_data:
        erows = [r for r in load_source(cfg.eval_data, cfg.gsm8k_dir, limit=cfg.eval_limit).rows if r.get("answer")]
        ev = tokenize_rows(erows, tokenizer, is_seq2seq=seq2seq, fmt=fmt, max_length=cfg.max_length,
                           max_target_length=cfg.max_target_length, cache_dir=cache)
        ecoll = (Seq2SeqCollator if seq2seq else CausalCollator)(tokenizer.pad_token_id, pad_to_multiple_of=multiple)
        eval_loader = DataLoader(ev.dataset, batch_size=cfg.per_device_batch_size, shuffle=False, collate_fn=ecoll)
        questions = erows[:cfg.eval_accuracy_samples]
        stats["eval"] = ev.stats
    return TrainData(train_loader, eval_loader, questions, stats)
