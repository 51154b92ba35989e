"""Packed attention benchmark: training tokens/s of the same packed rows under each (attention kernel, layout).

Run: .venv/bin/python bench/packed_attention_bench.py --steps 4 --batch-size 2 --out bench/results/packed_attention_cpu.json
     .venv/bin/python bench/packed_attention_bench.py --steps 1 --out /tmp/pa.json   # a quick look
     # on a GPU, from a shape-only model folder (config + tokenizer, no weights):
     python bench/packed_attention_bench.py --device cuda --dtype bf16 --random-init --model DIR --batch-size 8 \
         --variants sdpa:mask,sdpa:position_ids,flex_attention:position_ids,flash_attention_2:varlen \
         --out $OUT/packed_attention_h200.json

A variant is an ``attn_implementation`` and a :class:`~synthtune.train.batching.PackedCollator`
layout (``mask``: the (B, 1, S, S) additive mask; ``position_ids``: resets only, transformers
derives the mask or flex's BlockMask; ``varlen``: one flattened row with cu_seqlens, flash-attn).
The default variants are the four that train on a CPU. One model (the embedded SmolLM2-135M,
LoRA r=8 on all linear layers, AdamW), the kernel switched with ``set_attn_implementation``
before each step; the steps run interleaved (A,B,C,D,A,...) so load from other processes spreads
over all variants, after one untimed warm-up step each. Every variant gets the same batches of
packed rows (GSM8K examples packed into ``--max-length`` rows), so they process the same real
tokens; each variant's loss on the first batch before any update is recorded, and must agree.
A step is what the loop does per micro-batch: forward, the summed token loss
(``synthtune.train.loss``), backward, an AdamW step. ``collate_ms`` is the host time to build one
batch in that layout, the median over the batches after a warm-up (the loop collates in its own
process). Throughput counts real tokens, never padding. On a shared machine the ratio of median
step times (same batches, same order) is the steadiest figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_io import emit, machine  # noqa: E402  (the script's own folder is on sys.path)

from synthtune.data.gsm8k import load_source  # noqa: E402
from synthtune.train.batching import PackedCollator, iter_batches, pack_sequences  # noqa: E402
from synthtune.train.loss import model_inputs, token_loss_sum  # noqa: E402
from synthtune.train.tokenize import tokenize_rows  # noqa: E402

CPU_VARIANTS = "sdpa:mask,sdpa:position_ids,eager:mask,eager:position_ids"


def load(args):
    """LoRA r=8 on all linear layers of the model (real weights, or a random-init build of a config)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from synthtune.models import load_config, load_tokenizer, resolve_model

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    path = resolve_model(args.model)
    with torch.device(args.device):
        if args.random_init:
            base = AutoModelForCausalLM.from_config(load_config(path), dtype=dtype)
        else:
            base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tok = load_tokenizer(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, base, opt, tok


def step(model, opt, batch, device) -> tuple[float, float, float]:
    """(wall s, process CPU s, summed loss) of one forward + backward + AdamW step."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = token_loss_sum(model(**model_inputs(batch, False)).logits, batch["labels"], False)
    (loss / max(int((batch["labels"] != -100).sum()), 1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()  # CUDA runs asynchronously: without this the time is the launch time
    return time.perf_counter() - t0, time.process_time() - c0, float(loss.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-init", action="store_true", help="build the model from its config, no weights")
    ap.add_argument("--data", default="bundled:train", help="GSM8K source (gsm8k:train with SYNTHTUNE_GSM8K_DIR)")
    ap.add_argument("--variants", default=CPU_VARIANTS, help="comma list of attn_implementation:layout")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    ap.add_argument("--batch-size", type=int, default=4, help="packed rows per batch")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    model, base, opt, tok = load(args)
    rows = [r for r in load_source(args.data).rows if r.get("answer")]
    data = tokenize_rows(rows, tok, is_seq2seq=False, fmt="plain", max_length=args.max_length, cache_dir=None,
                         warn=False)
    packed = list(pack_sequences(data.dataset, args.max_length))
    batches = [[packed[i] for i in b] for b in iter_batches(range(len(packed)), args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size] or batches
    mask_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    variants = []
    for spec in args.variants.split(","):
        attn, layout = spec.split(":")
        coll = PackedCollator(tok.pad_token_id, attention=layout, mask_dtype=mask_dtype)
        coll(batches[0])  # warm-up: the first call of each torch op pays for its setup
        times = []
        for _ in range(3):
            for b in batches:
                t0 = time.perf_counter()
                coll(b)
                times.append(time.perf_counter() - t0)
        variants.append({"name": spec, "attn": attn, "layout": layout, "batches": [coll(b) for b in batches],
                         "collate_ms": round(1000 * statistics.median(times), 3),
                         "seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0, "step_seconds": []})
    # the same weights for every variant's check: each first loss before any optimizer step
    with torch.no_grad():
        for v in variants:
            base.set_attn_implementation(v["attn"])
            b = {k: x.to(device) if isinstance(x, torch.Tensor) else x for k, x in v["batches"][0].items()}
            v["first_batch_loss_sum"] = float(token_loss_sum(model(**model_inputs(b, False)).logits, b["labels"], False))
    for v in variants:  # warm-up: allocator, thread pools, compilation (flex), first-call overheads
        base.set_attn_implementation(v["attn"])
        step(model, opt, v["batches"][0], device)
    for i in range(args.steps):
        for v in variants:
            base.set_attn_implementation(v["attn"])
            batch = v["batches"][(i + 1) % len(batches)]
            dt, cpu, _ = step(model, opt, batch, device)
            v["seconds"] += dt
            v["cpu_seconds"] += cpu
            v["step_seconds"].append(dt)
            v["tokens"] += int(batch["num_tokens"])
        log(f"step {i + 1}/{args.steps}: " + ", ".join(f"{v['name']} {v['tokens'] / v['seconds']:.0f} tok/s"
                                                       for v in variants) + f" (load {os.getloadavg()[0]:.1f})")
    ref = variants[0]
    results = [{"variant": v["name"], "attn_implementation": v["attn"], "layout": v["layout"],
                "steps": len(v["step_seconds"]), "real_tokens": v["tokens"],
                "tokens_per_s": round(v["tokens"] / v["seconds"], 1),
                "tokens_per_cpu_s": round(v["tokens"] / v["cpu_seconds"], 1),
                "median_step_s": round(statistics.median(v["step_seconds"]), 4),
                # the same batches in the same order: the ratio of median steps is the steadiest figure
                "median_step_vs_first": round(statistics.median(v["step_seconds"])
                                              / statistics.median(ref["step_seconds"]), 3),
                "vs_first_wall": round((v["tokens"] / v["seconds"]) / (ref["tokens"] / ref["seconds"]), 3),
                "vs_first_cpu": round((v["tokens"] / v["cpu_seconds"]) / (ref["tokens"] / ref["cpu_seconds"]), 3),
                "collate_ms": v["collate_ms"], "first_batch_loss_sum": v["first_batch_loss_sum"]} for v in variants]
    import transformers

    result = {**machine(torch=torch.__version__, transformers=transformers.__version__,
                        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        threads=args.threads),
              "model": args.model, "random_init": args.random_init, "dtype": args.dtype, "data": args.data,
              "batch_size": args.batch_size, "max_length": args.max_length, "packed_rows": len(packed),
              "batches": len(batches), "method": "lora r=8 all-linear", "variants": results}
    emit(result, args.out)


if __name__ == "__main__":
    main()
