"""Loop bench: our training loop (``train()``) against a minimal plain loop, on the same batches, in one process.

Run: PYTHONPATH=. .venv/bin/python bench/loop_bench.py   # CPU, 1 thread: tiny-llama (36 steps), smollm2-135m-instruct (18), LoRA
     # writes bench/results/loop_bench_cpu.json (on a GPU: loop_bench_<card>.json) unless --out says otherwise
     PYTHONPATH=. .venv/bin/python bench/loop_bench.py --loss-only --out bench/results/loop_bench_cpu_lossmem.json
     PYTHONPATH=. .venv/bin/python bench/loop_bench.py --models tiny-llama --steps 12 --warmup 4 --out /tmp/lb.json
     # GPU (bench/gpu_loop_check.sh runs these): a recipe, random-init real shapes, bf16 per the recipe
     python bench/loop_bench.py --config configs/train/llama_1b_lora.yaml --models configs/models/llama-3.2-1b-shape \
         --set random_init=true --set data=bundled:train --steps 30 --warmup 10 --loss-batch 0 --out $OUT/lb.json

Per model, runs on the same training config (``--config``, ``configs/train/smoke.yaml`` unless
given, with the model, ``gradient_accumulation_steps=1``, no evaluation, no checkpoints), one after
the other:

* ``plain``: the batches our data pipeline builds (same order), each step only
  ``model(**inputs, labels=labels).loss`` (the HF model's own mean loss), ``backward()``,
  ``AdamW.step()``, ``zero_grad()``: no accelerate, no clipping, no schedule, no logging;
* ``ours``: ``train()`` with ``loss_impl: standard``;
* ``ours_chunked``: ``train()`` with ``loss_impl: chunked``.

The plain loop runs first (``plain_cold``, recorded) and again last (``plain``, the one compared):
a CPU step is slower the first time the process meets a batch shape (oneDNN and the allocator
prepare per shape), and length-grouped batches have a new shape almost every step, so whichever
loop ran first would pay for the shapes of all the others. An untimed one-step ``train()`` comes
before the timed ones, for the same reason.

Throughput is steady-state real tokens/s: the first ``--warmup`` steps are left out. The plain
loop times the span of its steady steps. ``train()`` runs twice, ``--warmup`` steps and ``--steps`` steps (the same
first steps, same seed): the differences of their loop seconds and tokens are the steady steps'.
Both wall-clock and process CPU time are reported (``*_cpu``: tokens per CPU-second of the whole
process, all threads): on a CPU shared with other jobs the CPU-time ratio is the steadier one.
Peak memory is the process's resident set (RSS, sampled every 50 ms by
:class:`synthtune.memory.trace.MemoryTracer`) during each run, minus the RSS when the run started:
the model, the optimizer states and the step's activations. Only the first run of a process
(``plain_cold``) starts from a clean heap: the later runs reuse what the allocator kept from the
earlier ones, so their peaks are lower bounds and no basis for a comparison. Beside it, ``loss_peak``: one
forward + backward of a packed batch alone (``--loss-batch`` rows of ``max_length``), each loss in
a fresh process (sampled every 10 ms, with glibc's mmap threshold fixed at 64 KiB so that freed
tensors leave the RSS), so memory the allocator keeps from one cannot hide the other's.

On a CPU the ratio ``ours / plain`` is our per-step overhead (host work and syncs cost no device
idle time here); on a GPU it also counts the device time the host syncs cost.

On a CUDA GPU (picked when present, as ``train()`` picks it) the plain loop runs on the GPU with the
recipe's precision (bf16 weights and/or bf16 autocast, as ``resolve_precision`` says for ``train()``),
the steady span is timed between two ``torch.cuda.synchronize()`` (none per step in the loop
itself; the batch copies are non-blocking, while accelerate's loader in ``train()`` copies
blocking: a cost of ours, counted), ``train()``'s span ends on its last step, which always logs
and so reads the loss and waits for the device, and memory is the peak of
``torch.cuda.max_memory_allocated`` above the allocation at the start of the run: live tensors
(collected between runs), so every run's peak is comparable, not only the first. The CPU-time
ratios mean little there (a CUDA sync spins on the CPU), so they are left out on a GPU.

The output file is written after each run (``"partial": true`` until the last), so a bench killed
by a time limit keeps the runs it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from contextlib import nullcontext  # noqa: E402

from bench_io import emit, machine, write_json  # noqa: E402

from synthtune.config import TrainConfig, load_config  # noqa: E402
from synthtune.memory.trace import MemoryTracer  # noqa: E402
from synthtune.models import is_seq2seq_config, load_tokenizer, resolve_model  # noqa: E402
from synthtune.models import load_config as load_model_config  # noqa: E402
from synthtune.train.data import build_train_data  # noqa: E402
from synthtune.train.loop import load_for_training, train  # noqa: E402
from synthtune.train.loss import batch_tokens, model_inputs, step_loss_sum  # noqa: E402
from synthtune.train.setup import resolve_precision  # noqa: E402

SMOKE = REPO / "configs" / "train" / "smoke.yaml"
MIB = float(1 << 20)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
PEAK_KEY = "peak_cuda_alloc_mib" if CUDA else "peak_rss_mib"
IMPLS = {"standard": "ours", "chunked": "ours_chunked"}


def config(base: Path, model: str, steps: int, warmup: int, out_dir: Path, extra: list[str]) -> TrainConfig:
    over = [f"model={model}", f"max_steps={steps}", f"logging_steps={warmup}", "gradient_accumulation_steps=1",
            "eval_data=null", "eval_steps=0", "save_steps=0", "trace_memory=false", "log_with=none",
            f"output_dir={out_dir}", *extra]
    return load_config(TrainConfig, base, over)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def plain_model(cfg: TrainConfig):
    """The model ``train()`` would build, on this device, and the autocast its precision asks for."""
    prec = resolve_precision(cfg, CUDA, CUDA and torch.cuda.is_bf16_supported())
    model, tok, seq2seq, _ = load_for_training(cfg, prec.weights_dtype)
    model.to(DEVICE).train()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if prec.mixed_precision == "bf16" else nullcontext
    return model, tok, seq2seq, autocast


def on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def mask_bf16(cfg: TrainConfig) -> bool:
    """``train()``'s choice of mask dtype for packed batches."""
    prec = resolve_precision(cfg, CUDA, CUDA and torch.cuda.is_bf16_supported())
    return "bf16" in (prec.weights_dtype, prec.mixed_precision)


def step_batches(cfg: TrainConfig, tok, seq2seq: bool) -> list[dict]:
    """The batches ``train()`` trains on, in its order (one process, no accumulation)."""
    data = build_train_data(cfg, tok, seq2seq, mask_bf16=mask_bf16(cfg))
    loader, out, epoch = data.train_loader, [], 0
    while len(out) < cfg.max_steps:
        loader.sampler.set_epoch(epoch)
        out += list(loader)
        epoch += 1
    return out[:cfg.max_steps]


class Peak:
    """Peak memory above the memory at entry, in MiB: the process's RSS, or on a GPU its allocated memory."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s

    def __enter__(self):
        gc.collect()
        if CUDA:
            sync()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.dir = tempfile.TemporaryDirectory()
        self.tracer = MemoryTracer(self.dir.name, interval_s=self.interval_s).start()
        return self

    def __exit__(self, *exc):
        if CUDA:
            sync()
            self.mib = round((torch.cuda.max_memory_allocated() - self.base) / MIB, 1)
            return
        self.tracer.stop()
        rss = [r["rss_gib"] for r in self.tracer.rows if r["rss_gib"] is not None]
        self.mib = round((max(rss) - rss[0]) * 1024, 1)
        self.dir.cleanup()


def plain_loop(cfg: TrainConfig, batches: list[dict], warmup: int) -> dict:
    model, _, seq2seq, autocast = plain_model(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay)
    for i, b in enumerate(batches):
        if i == warmup:  # the steady span starts once the warm-up steps have run on the device
            sync()
            t, c = time.perf_counter(), time.process_time()
        b = on_device(b)
        with autocast():
            loss = model(**model_inputs(b, seq2seq), **({} if seq2seq else {"labels": b["labels"]})).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    tokens = sum(batch_tokens(b, seq2seq) for b in batches[warmup:])
    return rates(tokens, wall, cpu)


def rates(tokens: int, wall_s: float, cpu_s: float) -> dict:
    return {"tokens_per_s": round(tokens / wall_s, 1), "tokens_per_cpu_s": round(tokens / cpu_s, 1),
            "steady_tokens": tokens, "steady_wall_s": round(wall_s, 2), "steady_cpu_s": round(cpu_s, 2)}


def our_loop(cfgs: dict[int, TrainConfig], batches: list[dict], seq2seq: bool) -> dict:
    """``train()`` for the warm-up steps, then for all steps: the difference is the steady part."""
    runs = {}
    for steps, cfg in cfgs.items():
        gc.collect()  # accelerate's forward wrapper makes a reference cycle: the last run's model goes now
        c = time.process_time()
        s = train(cfg, progress=False)
        # the saved model: a full 1B one is ~5 GB of disk per run
        shutil.rmtree(Path(cfg.output_dir) / "final", ignore_errors=True)
        runs[steps] = (s["train_seconds"], time.process_time() - c, s["train_tokens_run"], s)
        expected = sum(batch_tokens(b, seq2seq) for b in batches[:steps])
        if s["train_tokens_run"] != expected:
            raise SystemExit(f"train() ran other batches than the bench rebuilt: {s['train_tokens_run']} != {expected}")
    short, long = sorted(runs)
    out = rates(runs[long][2] - runs[short][2], runs[long][0] - runs[short][0], runs[long][1] - runs[short][1])
    out["final_train_loss"] = runs[long][3]["final_train_loss"]
    return out


def probe_loss(base: Path, model_name: str, impl: str, rows: int, extra: list[str]) -> dict:
    """Peak memory of one forward + backward of a packed batch of ``rows`` full rows (in a fresh process)."""
    pcfg = load_config(TrainConfig, base, [f"model={model_name}", *extra, "packing=true",
                                           f"per_device_batch_size={rows}", "eval_data=null"])
    model, tok, seq2seq, autocast = plain_model(pcfg)
    batch = on_device(next(iter(build_train_data(pcfg, tok, seq2seq, mask_bf16=mask_bf16(pcfg)).train_loader)))
    with Peak(interval_s=0.01) as p:
        with autocast():
            loss = step_loss_sum(model, batch, seq2seq, impl)
        loss.backward()
    return {"tokens": int(batch["input_ids"].numel()), "vocab": model.config.vocab_size, "mib": p.mib}


def loss_peak(base: Path, model_name: str, rows: int, threads: int, extra: list[str]) -> dict:
    """:func:`probe_loss` for each loss, each in a process of its own: memory that the allocator
    keeps after one run (freed, not returned) would hide part of the next one's peak."""
    out: dict = {"rows": rows}
    for impl in ("standard", "chunked"):
        cmd = [sys.executable, __file__, "--probe-loss", f"{model_name}:{impl}:{rows}", "--threads", str(threads),
               "--config", str(base), *(f"--set={o}" for o in extra)]
        # glibc raises its mmap threshold each time a large block is freed; blocks under it then stay
        # in the heap after free, and RSS follows the allocator's history instead of the live tensors.
        # A fixed threshold returns every block of 64 KiB or more to the system when it is freed.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode:
            raise SystemExit(f"loss probe failed: {proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out.update(tokens=r["tokens"], vocab=r["vocab"])
        out[f"{impl}_mib"] = r["mib"]
    out["fp32_logits_mib"] = round(out["tokens"] * out["vocab"] * 4 / MIB, 1)
    out["saved_mib"] = round(out["standard_mib"] - out["chunked_mib"], 1)
    return out


def bench_model(base: Path, model: str, steps: int, warmup: int, extra: list[str], loss_rows: int, threads: int,
                impls: list[str], save=lambda row: None) -> dict:
    """One model's row. ``save(row)`` gets the row so far after each run, so that a run killed by a
    time limit (the GPU check gives each a cap) still leaves the runs it finished on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(base, model, steps, warmup, Path(tmp) / "ours", extra)
        path = resolve_model(model)
        seq2seq = is_seq2seq_config(load_model_config(path))
        tok = load_tokenizer(resolve_model(cfg.tokenizer, seed=cfg.seed) if cfg.tokenizer else path)  # as train() does
        if tok.pad_token is None:  # as load_for_training does
            tok.pad_token = tok.eos_token
        batches = step_batches(cfg, tok, seq2seq)
        row = {"model": model, "config": str(base.resolve().relative_to(REPO)) if base.resolve().is_relative_to(REPO)
               else str(base), "overrides": extra, "precision": cfg.precision, "max_length": cfg.max_length, "steps": steps, "warmup_steps": warmup,
               "batch_size": cfg.per_device_batch_size, "packing": cfg.packing,
               "tokens_per_step_mean": round(sum(batch_tokens(b, seq2seq) for b in batches) / steps, 1)}
        with Peak() as p:
            row["plain_cold"] = plain_loop(cfg, batches, warmup)
        row["plain_cold"][PEAK_KEY] = p.mib
        save(row)
        # one untimed train() first: the first call in a process pays one-time costs (imports,
        # lazy initialization) that would land in the short run and inflate the difference's rate
        train(config(base, model, 1, 1, Path(tmp) / "warm", extra), progress=False)
        shutil.rmtree(Path(tmp) / "warm" / "final", ignore_errors=True)
        ours = {}
        for impl in impls:
            name = IMPLS[impl]
            cfgs = {n: config(base, model, n, warmup, Path(tmp) / f"{name}{n}", [*extra, f"loss_impl={impl}"])
                    for n in (warmup, steps)}
            with Peak() as p:
                ours[name] = our_loop(cfgs, batches, seq2seq)
            ours[name][PEAK_KEY] = p.mib
            row[name] = ours[name]
            save(row)
        with Peak() as p:
            row["plain"] = plain_loop(cfg, batches, warmup)
        row["plain"][PEAK_KEY] = p.mib
        for name, r in ours.items():
            row[f"{name}_vs_plain"] = round(r["tokens_per_s"] / row["plain"]["tokens_per_s"], 3)
            if not CUDA:  # a CUDA sync spins on the CPU: CPU time there is not the loop's work
                row[f"{name}_vs_plain_cpu"] = round(r["tokens_per_cpu_s"] / row["plain"]["tokens_per_cpu_s"], 3)
        save(row)
        if loss_rows:
            row["loss_peak"] = loss_peak(base, model, loss_rows, threads, extra)
            save(row)
    said = ", ".join(f"{name} {row[name]['tokens_per_s']} ({row[f'{name}_vs_plain']}x wall"
                     + (f", {row[f'{name}_vs_plain_cpu']}x CPU time)" if not CUDA else ")") for name in ours)
    print(f"{model} {' '.join(extra)}: plain {row['plain']['tokens_per_s']} tok/s, {said}", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=SMOKE, help="the training config the runs start from")
    ap.add_argument("--models", default="tiny-llama,smollm2-135m-instruct:18",
                    help="comma list of MODEL or MODEL:STEPS (STEPS overrides --steps for that model)")
    ap.add_argument("--steps", type=int, default=36, help="optimizer steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=6, help="steps left out of the steady state (and logging_steps)")
    ap.add_argument("--set", action="append", default=[], help="training config override KEY=VALUE, repeatable")
    ap.add_argument("--loss-batch", type=int, default=4, help="rows of max_length in the loss memory probe (0: skip)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (0: torch's default). One by default: OpenMP threads spin while they wait, "
                         "which on a shared CPU turns into CPU time and wall time that are not the loop's")
    ap.add_argument("--impls", default="standard,chunked", help="comma list of the loss_impl values our loop runs")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/results/loop_bench_cpu.json, on a GPU loop_bench_<card>.json")
    ap.add_argument("--loss-only", action="store_true", help="only the loss memory probe, per model")
    ap.add_argument("--probe-loss", default=None, help=argparse.SUPPRESS)  # MODEL:IMPL:ROWS, the child of loss_peak
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.probe_loss:
        model, impl, rows = a.probe_loss.rsplit(":", 2)
        print(json.dumps(probe_loss(a.config, model, impl, int(rows), a.set)))
        return
    impls = a.impls.split(",")
    if not impls or set(impls) - set(IMPLS):
        raise SystemExit(f"--impls: choose from {', '.join(IMPLS)}, got {a.impls!r}")
    card = torch.cuda.get_device_name(0) if CUDA else "cpu"
    out = a.out or REPO / "bench" / "results" / f"loop_bench_{'cpu' if not CUDA else card_slug(card)}.json"
    rows = []
    versions = {"torch": torch.__version__, **({"cuda": torch.version.cuda} if CUDA else {})}
    for name in ("transformers", "peft", "accelerate"):
        versions[name] = __import__(name).__version__
    head = {"bench": "loop_bench", "device": card, "torch_threads": torch.get_num_threads(), **versions}

    def save_partial(row: dict) -> None:
        # "partial": the last row lacks runs still to come; the finished document below drops the key
        write_json({**head, "partial": True, "rows": [*rows, row], **machine()}, out)

    for spec in a.models.split(","):
        model, _, steps = spec.partition(":")
        steps = int(steps) if steps else a.steps
        if steps <= a.warmup:
            raise SystemExit(f"{model}: steps ({steps}) must be more than --warmup ({a.warmup})")
        if a.loss_only:
            rows.append({"model": model, "loss_peak": loss_peak(a.config, model, a.loss_batch, a.threads, a.set)})
            print(f"{model}: {rows[-1]['loss_peak']}", file=sys.stderr)
        else:
            rows.append(bench_model(a.config, model, steps, a.warmup, a.set, a.loss_batch, a.threads, impls,
                                    save=save_partial))
    emit({**head, "rows": rows, **machine()}, out)


def card_slug(name: str) -> str:
    """``NVIDIA H200`` -> ``h200``: the card in a results file name."""
    words = [w for w in name.lower().replace("-", " ").split() if w not in ("nvidia", "geforce", "tesla")]
    return "_".join(words) or "gpu"


if __name__ == "__main__":
    main()
