#!/usr/bin/env python3
"""Estimate vs measurement for `synthtune memory`: CPU saved-tensor bytes, and the H200 table.

Run: .venv/bin/python bench/memory_validation.py [--cpu-only | --gpu-only] [--markdown] [--out bench/results]
(about 2 min on 2 CPU cores; --gpu-only takes seconds). --out writes memory_validation_cpu.{json,md} and
memory_validation_h200.{json,md} there: the full tables that bench/RESULTS.md links to.

* CPU (any machine): real-shaped models with 2 layers (SmolLM2-135M, Qwen2.5-0.5B, flan-t5-base
  widths, vocab cut to 8192 so a CPU forward takes seconds); saved-tensor bytes of one forward
  counted with torch.autograd.graph.saved_tensors_hooks vs ``saved_bytes`` of the estimator.
* GPU table: every row of bench/results/memory_gpu_h200.jsonl (peak allocated memory of real
  training steps, NVIDIA H200, measured by bench/memory_gpu_measure.py) vs ``estimate``.
  When a CUDA GPU is present, rerun bench/memory_gpu_measure.py there first to add a card.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench_io import machine, write_json

from synthtune.memory.estimate import Setup
from synthtune.memory.measure import compare_measured, cpu_saved_check, load_measurements, summarize
from synthtune.memory.shape import config_from_dict

H200_TABLE = Path(__file__).resolve().parent / "results" / "memory_gpu_h200.jsonl"

CPU_SHAPES = {
    "SmolLM2-135M/2L": dict(model_type="llama", hidden_size=576, num_hidden_layers=2, num_attention_heads=9,
                            num_key_value_heads=3, intermediate_size=1536, vocab_size=8192,
                            tie_word_embeddings=True),
    "Qwen2.5-0.5B/2L": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=2, num_attention_heads=14,
                            num_key_value_heads=2, intermediate_size=4864, vocab_size=8192,
                            tie_word_embeddings=True),
    "flan-t5-base/2L": dict(model_type="t5", vocab_size=8192, d_model=768, d_kv=64, d_ff=2048, num_layers=2,
                            num_decoder_layers=2, num_heads=12, feed_forward_proj="gated-gelu",
                            tie_word_embeddings=False, dropout_rate=0.1, decoder_start_token_id=0,
                            pad_token_id=0),
}
CPU_SETUPS = [
    dict(method="full", precision="bf16-mixed"),
    dict(method="full", precision="bf16"),
    dict(method="full", precision="fp32"),
    dict(method="lora", precision="bf16", lora_r=16, lora_targets="all-linear"),
    dict(method="lora", precision="bf16", lora_r=8, lora_targets="q,v"),
    dict(method="full", precision="bf16-mixed", grad_ckpt=True),
    dict(method="lora", precision="bf16", lora_r=16, lora_targets="all-linear", grad_ckpt=True),
]


def cpu_table(batch: int, seq: int) -> list[dict]:
    rows = []
    for name, cfg in CPU_SHAPES.items():
        for kw in CPU_SETUPS:
            for b, s in ((batch, seq), (1, 4 * seq)):
                t0 = time.perf_counter()
                r = cpu_saved_check(config_from_dict(cfg), Setup(batch_size=b, seq_len=s, target_len=s // 2, **kw), name)
                r["setup"] = " ".join(f"{k}={v}" for k, v in kw.items())
                r["seconds"] = time.perf_counter() - t0
                rows.append(r)
                print(f"{name:16s} {r['setup']:60s} {r['shape']:>7s} est {r['estimated_mib']:8.1f} MiB  "
                      f"meas {r['measured_mib']:8.1f} MiB  {r['error_pct']:+6.1f}%", flush=True)
    return rows


def command(argv: list[str]) -> str:
    return " ".join([".venv/bin/python", "bench/memory_validation.py", *argv])


def cpu_markdown(rows: list[dict], cmd: str, meta: dict) -> str:
    lines = ["# Estimate vs saved-tensor bytes of one forward (CPU)", "",
             f"`{cmd}` on {meta['date']}, {meta['machine']['cpus']} CPUs, Python {meta['machine']['python']}.",
             "Written by `bench/memory_validation.py --out`; what it measures is in bench/RESULTS.md.", "",
             "| shape | setup | batch×seq | estimated MiB | measured MiB | error |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['setup']} | {r['shape']} | {r['estimated_mib']:.1f} | {r['measured_mib']:.1f} | "
              f"{r['error_pct']:+.1f}% |" for r in rows]
    return "\n".join(lines) + "\n"


def gpu_markdown(res: list[dict], groups: list[dict], cmd: str, meta: dict) -> str:
    lines = ["# Estimate vs peak allocated memory, NVIDIA H200 (156 configs)", "",
             f"Measured: `bench/results/memory_gpu_h200.jsonl` (`bench/memory_gpu_measure.py`). Estimated: `{cmd}`",
             f"on {meta['date']} (CPU only). Written by `bench/memory_validation.py --out`.", "",
             "| group | rows | max abs error | median abs error |", "|---|---|---|---|"]
    lines += [f"| {g['group']} | {g['rows']} | {g['max_abs_pct']:.1f}% | {g['median_abs_pct']:.1f}% |" for g in groups]
    lines += ["", "| config | measured GiB | estimate GiB | error | peak phase |", "|---|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['measured_gib']:.2f} | {r['estimated_gib']:.2f} | {r['error_pct']:+.1f}% | "
              f"{r['peak_phase']} |" for r in res]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--gpu-only", action="store_true", help="only the H200 table (no CPU forwards)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--markdown", action="store_true", help="print the per-row GPU table as markdown")
    ap.add_argument("--out", type=Path, help="folder for memory_validation_{cpu,h200}.{json,md} (e.g. bench/results)")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    cmd = command(argv)
    if not a.gpu_only:
        rows = cpu_table(a.batch, a.seq)
        errs = sorted(abs(r["error_pct"]) for r in rows)
        print(f"CPU saved-tensor bytes: {len(rows)} configs, max |err| {errs[-1]:.1f}%, "
              f"median {errs[len(errs) // 2]:.1f}%\n")
        if a.out:
            meta = machine()
            write_json({"command": cmd, **meta, "rows": rows}, a.out / "memory_validation_cpu.json")
            (a.out / "memory_validation_cpu.md").write_text(cpu_markdown(rows, cmd, meta))
    if not a.cpu_only:
        res = compare_measured(load_measurements(H200_TABLE))
        groups = summarize(res)
        if a.markdown:
            print("| config | measured GiB | estimate GiB | error | peak phase |\n|---|---|---|---|---|")
        for r in res:
            if a.markdown:
                print(f"| {r['label']} | {r['measured_gib']:.2f} | {r['estimated_gib']:.2f} | "
                      f"{r['error_pct']:+.1f}% | {r['peak_phase']} |")
            else:
                print(f"{r['label']:80s} meas {r['measured_gib']:6.2f}  est {r['estimated_gib']:6.2f}  "
                      f"{r['error_pct']:+6.1f}%  {r['peak_phase']}")
        print("\n| group | rows | max abs error | median abs error |\n|---|---|---|---|")
        for g in groups:
            print(f"| {g['group']} | {g['rows']} | {g['max_abs_pct']:.1f}% | {g['median_abs_pct']:.1f}% |")
        if a.out:
            meta = machine()
            write_json({"command": cmd, **meta, "measured": "bench/results/memory_gpu_h200.jsonl", "groups": groups,
                        "rows": res}, a.out / "memory_validation_h200.json")
            (a.out / "memory_validation_h200.md").write_text(gpu_markdown(res, groups, cmd, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
