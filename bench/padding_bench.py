"""Padding benchmark: real (non-pad) training tokens/s, the workshop's batching vs synthtune's (train.batching).

Run: .venv/bin/python bench/padding_bench.py --steps 10   # full GSM8K from SYNTHTUNE_GSM8K_DIR or ../shared/data/gsm8k
     # writes bench/results/padding_bench_cpu.json (on a GPU: padding_bench_<card>.json) unless --out says otherwise
     .venv/bin/python bench/padding_bench.py --steps 2 --tasks causal --out /tmp/pb.json   # a quick look
     # on a GPU, from a shape-only model folder (config + tokenizer, no weights), LoRA and full:
     python bench/padding_bench.py --tasks causal --device cuda --dtype bf16 --random-init \
         --model DIR --methods lora,full --batch-size 8 --steps 40

Two tasks, each a fixed number of LoRA training steps (forward + backward + AdamW step) per variant:

* causal: SmolLM2-135M-Instruct (the embedded model), LoRA r=8 on q_proj,v_proj (the workshop's
  choice of modules), ``Question: ...\\nAnswer: ...<eos>``;
* seq2seq: a random-init T5 with Flan-T5-small's shape (d_model 512, d_ff 1024, 6+6 layers, 8 heads,
  gated-GELU) and the SmolLM2 tokenizer (49k BPE, so sequence lengths are those of a real
  tokenizer; the tiny-t5 tokenizer's 1k vocab makes every sequence ~1.7x longer than any real
  model sees), LoRA r=8 on q,v.

Variants: ``workshop`` truncates and pads every example to 256 tokens (seq2seq: inputs and labels to
256 each) in random fixed batches; ``grouped`` drops the >p99 examples, length-groups batches
(:func:`synthtune.train.batching.length_grouped_order`) and pads per batch; ``bucket64`` (causal) is ``grouped``
padded up to a multiple of 64 (the GPU recipes' ``pad_to_multiple_of``: a handful of batch shapes
instead of hundreds); ``packed`` (causal only) packs
examples into 512-token rows with a block-diagonal mask, half as many rows per batch so a step sees
about as many tokens as the workshop's. Variants run interleaved one step at a time (A,B,C,A,B,C,...) so
load from other processes on the machine spreads over all of them; one untimed warm-up step each first.
Both wall-clock and process-CPU-time throughput are reported: under contention the CPU-time ratio is
the steadier of the two. On a GPU each step ends with ``torch.cuda.synchronize()`` so wall time is the
GPU's, the CPU-time columns mean little, and the median step time shows whether a variant is slow only
on shapes it has not seen yet.
Throughput counts real tokens only: tokens of the (possibly truncated) examples, never padding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synthtune import paths  # noqa: E402
from synthtune.data.gsm8k import load_source  # noqa: E402
from synthtune.train.batching import (  # noqa: E402
    CausalCollator,
    PackedCollator,
    Seq2SeqCollator,
    iter_batches,
    length_grouped_order,
    pack_sequences,
)
from synthtune.train.tokenize import length_stats, padding_waste, tokenize_rows  # noqa: E402

WORKSHOP_LEN = 256


def gsm8k_train() -> tuple[list[dict], str]:
    directory = paths.gsm8k_dir() or (REPO.parent / "shared" / "data" / "gsm8k")
    if (directory / "train.jsonl").exists():
        return load_source("dir:train", gsm8k_dir=directory).rows, f"GSM8K train ({directory.name}/train.jsonl)"
    print("full GSM8K not found: using the 36-row bundled sample (numbers will not be representative)",
          file=sys.stderr)
    return load_source("bundled:train").rows, "bundled sample (36 rows)"


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [b for b in iter_batches(order, batch_size) if len(b) == batch_size]


def grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    return [b for b in iter_batches(length_grouped_order(lengths, batch_size, seed), batch_size)
            if len(b) == batch_size]


class Variant:
    """One batching scheme: its rows, its batches (index lists into rows), and its collator."""

    def __init__(self, name: str, rows, batches, collate, real_tokens, padded_tokens):
        self.name, self.rows, self.batches, self.collate = name, rows, batches, collate
        self.real_tokens, self.padded_tokens = real_tokens, padded_tokens
        self.cursor = self.pool = 0
        self.steps = self.tokens = self.computed = 0
        self.seconds = self.cpu_seconds = 0.0
        self.step_seconds: list[float] = []

    def next_batch(self):
        # --pool N cycles over the first N batches only, so every batch shape recurs
        n = min(len(self.batches), self.pool) if self.pool else len(self.batches)
        feats = [self.rows[i] for i in self.batches[self.cursor % n]]
        self.cursor += 1
        return feats


def train_step(model, opt, batch) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) for one optimizer step."""
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()  # CUDA runs asynchronously: without this the time is the launch time
    return time.perf_counter() - t0, time.process_time() - c0


def run_interleaved(model, opt, variants: list[Variant], steps: int, rounds: int, log) -> None:
    for v in variants:  # warm-up: allocator, thread pools, first-call overheads
        train_step(model, opt, v.collate(v.next_batch()))
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for r, k in enumerate(per_round):
        for v in variants:
            for _ in range(k):
                feats = v.next_batch()
                batch = v.collate(feats)
                dt, cpu = train_step(model, opt, batch)
                v.steps += 1
                v.seconds += dt
                v.step_seconds.append(dt)
                v.cpu_seconds += cpu
                v.tokens += v.real_tokens(feats)
                v.computed += v.padded_tokens(batch)
            log(f"  round {r + 1}/{rounds} {v.name}: {v.steps} steps, {v.tokens / v.seconds:.0f} real tok/s so far "
                f"(load {os.getloadavg()[0]:.1f})")


def trainable(model, targets: list[str], method: str):
    """LoRA r=8 on ``targets`` (AdamW lr 1e-4 on the adapter), or full fine-tuning (lr 1e-5)."""
    if method == "full":
        model.train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5)
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def causal_model(args):
    """The model and tokenizer: real weights on CPU, or a random-init build of a shape-only folder."""
    from synthtune.models import load_config, load_model
    from synthtune.train.tokenize import load_tokenizer_for

    if not args.random_init:
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        return lm.model, lm.tokenizer
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(load_config(args.model), dtype=dtype)
    return model, load_tokenizer_for(args.model)[0]


def bench_causal(rows, args, log, method: str = "lora") -> dict:
    base, tok = causal_model(args)
    model, opt = trainable(base, ["q_proj", "v_proj"], method)
    full = tokenize_rows(rows, tok, is_seq2seq=False, fmt="plain", max_length=4096, warn=False)
    facts = {**length_stats(full.lengths), "over_256": sum(1 for x in full.lengths if x > WORKSHOP_LEN),
             "padding_waste_at_256": round(padding_waste(full.lengths, WORKSHOP_LEN), 4)}
    ours_len = facts["recommended_max_length"]
    workshop = tokenize_rows(rows, tok, is_seq2seq=False, max_length=WORKSHOP_LEN, truncation="truncate", warn=False)
    ours = tokenize_rows(rows, tok, is_seq2seq=False, max_length=ours_len, warn=False)
    w_rows, o_rows = list(workshop.dataset), list(ours.dataset)
    packed = list(pack_sequences(ours.dataset, max_length=2 * WORKSHOP_LEN))
    bs = args.batch_size

    def count(feats):
        return sum(len(f["input_ids"]) for f in feats)

    def padded(batch):
        return batch["input_ids"].numel()

    grouped = grouped_batches([len(r["input_ids"]) for r in o_rows], bs, args.seed)[1:]
    variants = [
        Variant("workshop", w_rows, random_batches(len(w_rows), bs, args.seed),
                CausalCollator(tok.pad_token_id, pad_to_multiple_of=WORKSHOP_LEN), count, padded),
        Variant("grouped", o_rows, grouped, CausalCollator(tok.pad_token_id), count, padded),
        *(Variant(f"bucket{m}", o_rows, grouped, CausalCollator(tok.pad_token_id, pad_to_multiple_of=m), count, padded)
          for m in args.buckets),
        Variant("packed", packed, random_batches(len(packed), max(1, bs // 2), args.seed),
                PackedCollator(tok.pad_token_id), count, padded),
    ]
    if args.variants:
        variants = [v for v in variants if v.name in args.variants]
    for v in variants:
        v.pool = args.pool
    what = "LoRA r=8 q,v" if method == "lora" else "full fine-tuning"
    log(f"causal: {args.model} {what} on {args.device} ({args.dtype}), batch {bs} (packed: {max(1, bs // 2)} x 512), "
        f"{args.steps} steps per variant in {args.rounds} rounds")
    run_interleaved(model, opt, variants, args.steps, args.rounds, log)
    return {"facts": facts, "ours_max_length": ours_len, "dropped_by_ours": ours.stats["n_dropped"],
            "truncated_by_workshop": workshop.stats["n_truncated"],
            "packed_rows": len(packed), "packed_fill": round(sum(len(r["input_ids"]) for r in packed)
                                                            / (len(packed) * 2 * WORKSHOP_LEN), 4),
            "variants": summarize(variants)}


def bench_seq2seq(rows, args, log) -> dict:
    from transformers import T5Config, T5ForConditionalGeneration

    from synthtune.train.tokenize import load_tokenizer_for

    tok, _ = load_tokenizer_for("smollm2-135m-instruct")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")  # a pad distinct from EOS for the T5 config
    torch.manual_seed(args.seed)
    cfg = T5Config(vocab_size=len(tok), d_model=512, d_kv=64, d_ff=1024, num_layers=6, num_decoder_layers=6,
                   num_heads=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                   pad_token_id=pad_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=pad_id)
    model, opt = trainable(T5ForConditionalGeneration(cfg).to(args.device), ["q", "v"], "lora")
    full = tokenize_rows(rows, tok, is_seq2seq=True, fmt="plain", max_length=4096, warn=False)
    facts = {"input": length_stats(full.lengths), "labels": length_stats(full.target_lengths),
             "inputs_over_256": sum(1 for x in full.lengths if x > WORKSHOP_LEN),
             "labels_over_256": sum(1 for x in full.target_lengths if x > WORKSHOP_LEN),
             "padding_waste_at_256_256": round(1 - sum(min(a, 256) + min(b, 256) for a, b in zip(
                 full.lengths, full.target_lengths, strict=True)) / (len(full.lengths) * 512), 4)}
    in_len, out_len = facts["input"]["recommended_max_length"], facts["labels"]["recommended_max_length"]
    workshop = tokenize_rows(rows, tok, is_seq2seq=True, max_length=WORKSHOP_LEN, truncation="truncate", warn=False)
    ours = tokenize_rows(rows, tok, is_seq2seq=True, max_length=in_len, max_target_length=out_len, warn=False)
    w_rows, o_rows = list(workshop.dataset), list(ours.dataset)
    bs = args.seq2seq_batch_size

    def count(feats):
        return sum(len(f["input_ids"]) + len(f["labels"]) for f in feats)

    def padded(batch):  # encoder and decoder tokens both cost compute
        return batch["input_ids"].numel() + batch["labels"].numel()

    variants = [
        Variant("workshop", w_rows, random_batches(len(w_rows), bs, args.seed),
                Seq2SeqCollator(pad_id, pad_to_multiple_of=WORKSHOP_LEN), count, padded),
        Variant("grouped", o_rows, grouped_batches(list(ours.dataset["length"]), bs, args.seed)[1:],
                Seq2SeqCollator(pad_id), count, padded),
    ]
    log(f"seq2seq: T5 flan-t5-small shape, random init, LoRA r=8 q,v, batch {bs}, "
        f"{args.steps} steps per variant in {args.rounds} rounds")
    run_interleaved(model, opt, variants, args.steps, args.rounds, log)
    return {"facts": facts, "ours_max_length": in_len, "ours_max_target_length": out_len,
            "dropped_by_ours": ours.stats["n_dropped"], "truncated_by_workshop": workshop.stats["n_truncated"],
            "variants": summarize(variants)}


def summarize(variants: list[Variant]) -> dict:
    base = variants[0].tokens / variants[0].seconds
    base_cpu = variants[0].tokens / variants[0].cpu_seconds
    out = {}
    for v in variants:
        tps, tpc = v.tokens / v.seconds, v.tokens / v.cpu_seconds
        times = sorted(v.step_seconds)
        out[v.name] = {
            "steps": v.steps, "seconds": round(v.seconds, 2), "s_per_step": round(v.seconds / v.steps, 4),
            "median_s_per_step": round(times[len(times) // 2], 4),
            "real_tokens": v.tokens, "real_tokens_per_s": round(tps, 1),
            "padding_fraction": round(1 - v.tokens / v.computed, 4), "speedup_vs_workshop": round(tps / base, 3),
            # CPU seconds move less than wall seconds when other processes share the cores
            "cpu_seconds": round(v.cpu_seconds, 2), "real_tokens_per_cpu_s": round(tpc, 1),
            "cpu_speedup_vs_workshop": round(tpc / base_cpu, 3)}
    return out


def table(result: dict) -> str:
    lines = ["| variant | steps | s/step (median) | real tokens | padding | real tok/s (wall) | vs workshop "
             "| real tok/CPU-s | vs workshop |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['steps']} | {v['s_per_step']:.3f} ({v['median_s_per_step']:.3f}) | "
                     f"{v['real_tokens']} | "
                     f"{v['padding_fraction']:.1%} | {v['real_tokens_per_s']:.1f} | {v['speedup_vs_workshop']:.2f}x "
                     f"| {v['real_tokens_per_cpu_s']:.1f} | {v['cpu_speedup_vs_workshop']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant and task")
    ap.add_argument("--rounds", type=int, default=None, help="interleaving rounds; default: one step per round")
    ap.add_argument("--batch-size", type=int, default=4, help="causal batch (packed: half as many 512-token rows)")
    ap.add_argument("--seq2seq-batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="causal,seq2seq")
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="causal model: a built-in name or a folder (with --random-init, config + tokenizer suffice)")
    ap.add_argument("--random-init", action="store_true", help="build the causal model from its config, no weights")
    ap.add_argument("--methods", default="lora", help="causal: lora, full, or both (comma-separated)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--buckets", default="64", help="causal: pad_to_multiple_of values, one bucketN variant each")
    ap.add_argument("--variants", default="", help="causal: run only these (comma-separated names), workshop first")
    ap.add_argument("--pool", type=int, default=0,
                    help="cycle over each variant's first N batches (shapes recur: first-seen-shape costs drop out)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/padding_bench_<machine>.json (cpu, or the card, e.g. h200)")
    args = ap.parse_args()
    args.rounds = args.rounds or args.steps
    args.buckets = [int(m) for m in args.buckets.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows, data_name = gsm8k_train()
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    # results are named by machine (bench/README.md): "NVIDIA H200" -> padding_bench_h200.json
    args.out = args.out or REPO / "bench" / "results" / f"padding_bench_{gpu.split()[-1].lower() if gpu else 'cpu'}.json"
    result = {"data": data_name, "n_rows": len(rows), "args": {k: str(v) for k, v in vars(args).items()},
              "env": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                      "cpus": os.cpu_count(), "gpu": gpu, "loadavg_start": os.getloadavg()}}
    t0 = time.time()
    for task in args.tasks.split(","):
        runs = ([(f"causal_{m}" if m != "lora" else "causal", m) for m in args.methods.split(",")]
                if task == "causal" else [(task, "lora")])
        for key, method in runs:
            result[key] = (bench_causal(rows, args, log, method) if task == "causal"
                           else bench_seq2seq(rows, args, log))
            print(f"\n{key} ({method})\n{table(result[key])}\n", flush=True)
            if gpu:
                torch.cuda.empty_cache()
    result["env"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
