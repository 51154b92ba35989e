#!/usr/bin/env python3
"""Measure real GPU memory of fine-tuning steps (full and LoRA) for synthtune.

Raw measurements for validating / fitting the LoRA-aware memory estimator
(``synthtune memory``).  Every model is a random-init model built from a config
directly on the device (no weights are downloaded), trained for three steps on
random token batches.

Protocol per config
-------------------
1. build the model on the device (fixed seed), cast to bf16 for the ``bf16``
   precision, apply gradient checkpointing / LoRA, create the optimizer;
   ``weights_gib`` = allocated memory now.
2. three steps: forward (under ``torch.autocast(bf16)`` except for ``fp32``),
   ``loss.backward()``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``.
   Every phase of every step is bracketed by ``reset_peak_memory_stats`` so the
   peak of each phase is known; step aggregates are maxima over the phases.
   * ``peak_gib``      max allocated over steps 2-3 (optimizer states exist),
   * ``peak_all_gib``  max allocated over steps 1-3,
   * ``phase_*``       the last step's phases,
   * ``reserved_peak_gib`` max reserved over all steps.
3. OOM is recorded as ``status: "oom"``; everything is freed between configs.

Usage::

    python3 bench/memory_gpu_measure.py --out OUTDIR [--budget-s 300]
    python3 bench/memory_gpu_measure.py --cpu-smoke --out /tmp/smoke

Each result is appended to ``OUTDIR/memory_gpu.jsonl`` (flushed immediately),
and ``OUTDIR/memory_gpu.md`` is rewritten after every config.
Commit them as ``bench/results/memory_gpu_<card>.{jsonl,md}`` (e.g. ``memory_gpu_h200``), with
``env.json`` as ``memory_gpu_<card>_env.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import torch

GIB = float(1 << 30)

# --------------------------------------------------------------------------
# model shapes (public configs of the named checkpoints; weights random-init)
# --------------------------------------------------------------------------

SHAPES: dict[str, dict[str, Any]] = {
    "SmolLM2-135M": dict(
        arch="causal", model_type="llama",
        kw=dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                tie_word_embeddings=True, max_position_embeddings=8192,
                rope_theta=100000.0, rms_norm_eps=1e-5)),
    "SmolLM2-360M": dict(
        arch="causal", model_type="llama",
        kw=dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15,
                num_key_value_heads=5, intermediate_size=2560, vocab_size=49152,
                tie_word_embeddings=True, max_position_embeddings=8192,
                rope_theta=100000.0, rms_norm_eps=1e-5)),
    "Qwen2.5-0.5B": dict(
        arch="causal", model_type="qwen2",
        kw=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                tie_word_embeddings=True, max_position_embeddings=32768,
                rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "Llama-3.2-1B": dict(
        arch="causal", model_type="llama",
        kw=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                tie_word_embeddings=True, head_dim=64,
                max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5)),
    "Llama-3.2-3B": dict(
        arch="causal", model_type="llama",
        kw=dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
                num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                tie_word_embeddings=True, head_dim=128,
                max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5)),
    "flan-t5-base": dict(
        arch="seq2seq", model_type="t5",
        kw=dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12,
                num_decoder_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, dropout_rate=0.1,
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)),
    "flan-t5-large": dict(
        arch="seq2seq", model_type="t5",
        kw=dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                num_decoder_layers=24, num_heads=16, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, dropout_rate=0.1,
                relative_attention_num_buckets=32,
                relative_attention_max_distance=128, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)),
    # tiny shapes for --cpu-smoke only
    "tiny-llama": dict(
        arch="causal", model_type="llama",
        kw=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                tie_word_embeddings=True, max_position_embeddings=512)),
    "tiny-qwen2": dict(
        arch="causal", model_type="qwen2",
        kw=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                tie_word_embeddings=True, max_position_embeddings=512)),
    "tiny-t5": dict(
        arch="seq2seq", model_type="t5",
        kw=dict(vocab_size=500, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, dropout_rate=0.1,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
}


@dataclass
class Cfg:
    shape: str
    method: str = "full"            # full | lora
    precision: str = "bf16-mixed"   # bf16-mixed | bf16 | fp32
    optimizer: str = "adamw"        # adamw | sgd (no momentum)
    grad_ckpt: bool = False
    attn: str = "sdpa"              # sdpa | eager (causal only)
    batch: int = 16
    seq: int = 256
    target_len: int | None = None   # seq2seq only
    lora_r: int = 16
    lora_alpha: int | None = None   # default 2*r
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"  # all-linear | qv
    group: str = ""
    note: str = ""

    def key(self) -> str:
        m = self.method if self.method == "full" else (
            f"lora-r{self.lora_r}-{self.lora_targets}"
            + (f"-do{self.lora_dropout}" if self.lora_dropout else ""))
        tl = f"/{self.target_len}" if self.target_len else ""
        return (f"{self.shape}|{m}|{self.precision}|{self.optimizer}|"
                f"ckpt={int(self.grad_ckpt)}|{self.attn}|{self.batch}x{self.seq}{tl}")


# --------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------

CAUSAL = ["SmolLM2-135M", "SmolLM2-360M", "Qwen2.5-0.5B", "Llama-3.2-1B", "Llama-3.2-3B"]
SEQ2SEQ = ["flan-t5-base", "flan-t5-large"]

METHODS = [  # (method, precision, lora_r, targets)
    ("full", "bf16-mixed", 16, "all-linear"),
    ("full", "bf16", 16, "all-linear"),
    ("lora", "bf16", 16, "all-linear"),
    ("lora", "bf16", 8, "qv"),
]


def gpu_grid() -> list[Cfg]:
    out: list[Cfg] = []

    def add(**kw: Any) -> None:
        c = Cfg(**kw)
        if c.key() not in {x.key() for x in out}:
            out.append(c)

    # 1. calibration points (SmolLM2-135M, 16x256, AdamW, no ckpt)
    add(shape="SmolLM2-135M", method="lora", precision="bf16", lora_r=16,
        lora_targets="all-linear", group="calibration", note="issue: 5.74 GiB")
    add(shape="SmolLM2-135M", method="full", precision="bf16-mixed",
        group="calibration", note="issue: 7.64 GiB")
    add(shape="SmolLM2-135M", method="lora", precision="bf16", lora_r=16,
        lora_targets="all-linear", lora_dropout=0.05, group="calibration",
        note="issue: 5.74 GiB (dropout 0.05 variant)")

    # 2. causal shapes at 16x256, all methods, ckpt off/on (ckpt first for 3B)
    for s in CAUSAL:
        ckpts = (True, False) if s == "Llama-3.2-3B" else (False, True)
        for ck in ckpts:
            for meth, prec, r, tg in METHODS:
                add(shape=s, method=meth, precision=prec, lora_r=r, lora_targets=tg,
                    grad_ckpt=ck, batch=16, seq=256, group="causal-16x256")

    # 3. seq2seq shapes, S=256, T=128
    for s in SEQ2SEQ:
        for ck in (False, True):
            for meth, prec, r, tg in METHODS:
                add(shape=s, method=meth, precision=prec, lora_r=r, lora_targets=tg,
                    grad_ckpt=ck, batch=16, seq=256, target_len=128, group="seq2seq")

    # 4. eager attention, sgd, fp32 on the small shapes
    for s in ("SmolLM2-135M", "Qwen2.5-0.5B"):
        for meth, prec, r, tg in (METHODS[0], METHODS[2]):
            add(shape=s, method=meth, precision=prec, lora_r=r, lora_targets=tg,
                attn="eager", batch=16, seq=256, group="eager")
    add(shape="SmolLM2-135M", method="lora", precision="bf16", attn="eager",
        batch=4, seq=1024, group="eager")
    add(shape="SmolLM2-135M", method="lora", precision="bf16", attn="eager",
        batch=1, seq=4096, group="eager")
    add(shape="SmolLM2-135M", method="lora", precision="bf16", attn="eager",
        batch=1, seq=4096, grad_ckpt=True, group="eager")
    for s in ("SmolLM2-135M", "Llama-3.2-1B"):
        for meth, prec, r, tg in (METHODS[0], METHODS[1], METHODS[2]):
            add(shape=s, method=meth, precision=prec, lora_r=r, lora_targets=tg,
                optimizer="sgd", batch=16, seq=256, group="sgd")
    for s in ("SmolLM2-135M", "SmolLM2-360M"):
        add(shape=s, method="full", precision="fp32", batch=16, seq=256, group="fp32")
        add(shape=s, method="lora", precision="fp32", batch=16, seq=256, group="fp32")
    add(shape="SmolLM2-135M", method="full", precision="fp32", batch=16, seq=256,
        grad_ckpt=True, group="fp32")
    add(shape="flan-t5-base", method="full", precision="fp32", batch=16, seq=256,
        target_len=128, group="fp32")

    # 5. longer sequences: 4x1024 then 1x4096
    for b, sq in ((4, 1024), (1, 4096)):
        for s in CAUSAL:
            ckpts = (True, False) if s == "Llama-3.2-3B" else (False, True)
            for ck in ckpts:
                for meth, prec, r, tg in (METHODS[0], METHODS[2]):
                    add(shape=s, method=meth, precision=prec, lora_r=r,
                        lora_targets=tg, grad_ckpt=ck, batch=b, seq=sq,
                        group=f"causal-{b}x{sq}")
    # 6. remaining methods at long sequences
    for b, sq in ((4, 1024), (1, 4096)):
        for s in CAUSAL:
            for ck in (False, True):
                for meth, prec, r, tg in (METHODS[1], METHODS[3]):
                    add(shape=s, method=meth, precision=prec, lora_r=r,
                        lora_targets=tg, grad_ckpt=ck, batch=b, seq=sq,
                        group=f"causal-{b}x{sq}-extra")
    return out


def cpu_grid() -> list[Cfg]:
    return [
        Cfg(shape="tiny-llama", method="lora", precision="bf16", lora_r=16,
            lora_targets="all-linear", grad_ckpt=True, attn="eager", batch=2, seq=32,
            group="smoke"),
        Cfg(shape="tiny-qwen2", method="full", precision="bf16-mixed",
            optimizer="sgd", batch=2, seq=32, group="smoke"),
        Cfg(shape="tiny-llama", method="full", precision="fp32", grad_ckpt=True,
            batch=2, seq=32, group="smoke"),
        Cfg(shape="tiny-t5", method="lora", precision="bf16", lora_r=8,
            lora_targets="qv", grad_ckpt=True, batch=2, seq=32, target_len=16,
            group="smoke"),
        Cfg(shape="tiny-t5", method="full", precision="bf16", batch=2, seq=32,
            target_len=16, lora_dropout=0.05, group="smoke"),
    ]


# --------------------------------------------------------------------------
# memory helpers (no-ops on CPU)
# --------------------------------------------------------------------------

class Mem:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def alloc(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def reserved_peak(self) -> int:
        return torch.cuda.max_memory_reserved() if self.cuda else 0

    def retries(self) -> int:
        if not self.cuda:
            return 0
        return int(torch.cuda.memory_stats().get("num_alloc_retries", 0))

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def g(x: int) -> float:
    return round(x / GIB, 4)


# --------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------

def build_model(c: Cfg, device: torch.device):
    import transformers as tf

    spec = SHAPES[c.shape]
    kw = dict(spec["kw"])
    kw["use_cache"] = False
    if spec["model_type"] == "llama":
        cfg = tf.LlamaConfig(**kw)
    elif spec["model_type"] == "qwen2":
        cfg = tf.Qwen2Config(**kw)
    elif spec["model_type"] == "t5":
        cfg = tf.T5Config(**kw)
    else:
        raise ValueError(spec["model_type"])

    torch.manual_seed(0)
    with device:
        if spec["arch"] == "causal":
            model = tf.AutoModelForCausalLM.from_config(
                cfg, dtype=torch.float32, attn_implementation=c.attn)
        else:
            if c.attn != "sdpa":
                cfg._attn_implementation = c.attn
            model = tf.T5ForConditionalGeneration(cfg)
    model.to(device)
    if c.precision == "bf16":
        model.to(torch.bfloat16)
    else:
        model.to(torch.float32)
    model.train()

    if c.grad_ckpt:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        if c.method == "lora":
            model.enable_input_require_grads()

    if c.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        if c.lora_targets == "all-linear":
            targets: Any = "all-linear"
        elif c.lora_targets == "qv":
            targets = ["q", "v"] if spec["model_type"] == "t5" else ["q_proj", "v_proj"]
        else:
            raise ValueError(c.lora_targets)
        lcfg = LoraConfig(
            r=c.lora_r, lora_alpha=c.lora_alpha or 2 * c.lora_r,
            lora_dropout=c.lora_dropout, target_modules=targets, bias="none",
            task_type=TaskType.CAUSAL_LM if spec["arch"] == "causal"
            else TaskType.SEQ_2_SEQ_LM)
        model = get_peft_model(model, lcfg)
        model.train()
    return model, cfg


def make_batch(c: Cfg, vocab: int, device: torch.device, step: int):
    gen = torch.Generator(device="cpu").manual_seed(1000 + step)
    ids = torch.randint(2, vocab, (c.batch, c.seq), generator=gen)
    if SHAPES[c.shape]["arch"] == "causal":
        ids = ids.to(device)
        return dict(input_ids=ids, labels=ids)
    tl = c.target_len or c.seq
    labels = torch.randint(2, vocab, (c.batch, tl), generator=gen)
    return dict(input_ids=ids.to(device), labels=labels.to(device))


# --------------------------------------------------------------------------
# one config
# --------------------------------------------------------------------------

def run_config(c: Cfg, device: torch.device, env: dict[str, Any]) -> dict[str, Any]:
    mem = Mem(device)
    rec: dict[str, Any] = dict(key=c.key(), **asdict(c))
    rec["arch"] = SHAPES[c.shape]["arch"]
    rec["model_type"] = SHAPES[c.shape]["model_type"]
    rec["model_config"] = SHAPES[c.shape]["kw"]
    if c.method == "lora":
        rec["lora_alpha"] = c.lora_alpha or 2 * c.lora_r
    rec["gpu"] = env.get("gpu_name")
    rec["torch"] = env.get("torch")
    rec["transformers"] = env.get("transformers")
    rec["peft"] = env.get("peft")
    mem.free()
    rec["baseline_gib"] = g(mem.alloc())
    retries0 = mem.retries()
    t0 = time.perf_counter()
    stage = "build"
    model = opt = batch = out = loss = None
    try:
        model, cfg = build_model(c, device)
        rec["attn_effective"] = getattr(
            getattr(model, "config", cfg), "_attn_implementation", None)
        params = list(model.parameters())
        rec["params"] = sum(p.numel() for p in params)
        trainable = [p for p in params if p.requires_grad]
        rec["trainable_params"] = sum(p.numel() for p in trainable)
        rec["param_dtypes"] = sorted({str(p.dtype) for p in params})
        rec["trainable_dtypes"] = sorted({str(p.dtype) for p in trainable})
        if c.optimizer == "adamw":
            opt = torch.optim.AdamW(trainable, lr=1e-5)
        elif c.optimizer == "sgd":
            opt = torch.optim.SGD(trainable, lr=1e-5, momentum=0.0)
        else:
            raise ValueError(c.optimizer)
        del params, trainable
        mem.sync()
        rec["weights_gib"] = g(mem.alloc())
        rec["build_s"] = round(time.perf_counter() - t0, 2)

        vocab = SHAPES[c.shape]["kw"]["vocab_size"]
        use_autocast = c.precision in ("bf16-mixed", "bf16")
        steps: list[dict[str, Any]] = []
        res_peak = 0
        for step in range(3):
            stage = f"step{step + 1}"
            batch = make_batch(c, vocab, device, step)
            ph: dict[str, Any] = {}
            mem.sync()
            ts = time.perf_counter()
            ph["before_fwd"] = mem.alloc()
            mem.reset()
            if use_autocast:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = model(**batch)
            else:
                out = model(**batch)
            loss = out.loss
            out = None
            mem.sync()
            ph["fwd_peak"] = mem.peak()
            ph["after_fwd"] = mem.alloc()
            res_peak = max(res_peak, mem.reserved_peak())
            mem.reset()
            loss.backward()
            mem.sync()
            ph["bwd_peak"] = mem.peak()
            ph["after_bwd"] = mem.alloc()
            res_peak = max(res_peak, mem.reserved_peak())
            mem.reset()
            opt.step()
            mem.sync()
            ph["opt_peak"] = mem.peak()
            opt.zero_grad(set_to_none=True)
            ph["loss"] = float(loss.detach().float().item())
            loss = None
            batch = None
            mem.sync()
            ph["after_step"] = mem.alloc()
            res_peak = max(res_peak, mem.reserved_peak())
            ph["ms"] = (time.perf_counter() - ts) * 1000.0
            ph["peak"] = max(ph["fwd_peak"], ph["bwd_peak"], ph["opt_peak"])
            steps.append(ph)

        rec["status"] = "ok"
        rec["after_step1_gib"] = g(steps[0]["after_step"])
        rec["step1_peak_gib"] = g(steps[0]["peak"])
        rec["peak_gib"] = g(max(s["peak"] for s in steps[1:]))
        rec["peak_all_gib"] = g(max(s["peak"] for s in steps))
        last = steps[-1]
        for k in ("before_fwd", "fwd_peak", "after_fwd", "bwd_peak", "after_bwd",
                  "opt_peak", "after_step"):
            rec[f"phase_{k}_gib"] = g(last[k])
        rec["reserved_peak_gib"] = g(res_peak)
        rec["step_ms"] = round(sum(s["ms"] for s in steps[1:]) / (len(steps) - 1), 1)
        rec["step1_ms"] = round(steps[0]["ms"], 1)
        rec["losses"] = [round(s["loss"], 4) for s in steps]
        rec["loss_finite"] = all(math.isfinite(s["loss"]) for s in steps)
    except torch.cuda.OutOfMemoryError as e:  # type: ignore[attr-defined]
        rec["status"] = "oom"
        rec["oom_stage"] = stage
        rec["oom_peak_gib"] = g(mem.peak())
        rec["error"] = str(e).splitlines()[0][:300]
    except Exception as e:  # noqa: BLE001 - record and continue with the grid
        msg = str(e)
        if "out of memory" in msg.lower():
            rec["status"] = "oom"
            rec["oom_stage"] = stage
            rec["oom_peak_gib"] = g(mem.peak())
        else:
            rec["status"] = "error"
            rec["traceback"] = traceback.format_exc()[-2000:]
        rec["error"] = msg.splitlines()[0][:300] if msg else repr(e)
    finally:
        model = opt = batch = out = loss = None
    rec["alloc_retries"] = mem.retries() - retries0
    rec["wall_s"] = round(time.perf_counter() - t0, 2)
    mem.free()
    rec["leftover_gib"] = g(mem.alloc())
    return rec


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

MD_HEAD = ("| shape | arch | method | precision | optim | ckpt | attn | batch×seq(/tgt) "
           "| params | trainable | weights GiB | peak GiB | peak_all GiB "
           "| after-fwd GiB | step ms | status |")


def fmt_n(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(n)


def md_row(r: dict[str, Any]) -> str:
    meth = r["method"]
    if meth == "lora":
        meth = f"lora r{r['lora_r']} {r['lora_targets']}"
        if r.get("lora_dropout"):
            meth += f" do{r['lora_dropout']}"
    bs = f"{r['batch']}×{r['seq']}" + (f"/{r['target_len']}" if r.get("target_len") else "")

    def f(k: str) -> str:
        v = r.get(k)
        return f"{v:.2f}" if isinstance(v, (int, float)) else "-"

    st = r["status"]
    if st == "oom":
        st = f"oom@{r.get('oom_stage')}"
    return (f"| {r['shape']} | {r['arch']} | {meth} | {r['precision']} | {r['optimizer']} "
            f"| {'on' if r['grad_ckpt'] else 'off'} | {r['attn']} | {bs} "
            f"| {fmt_n(r.get('params'))} | {fmt_n(r.get('trainable_params'))} "
            f"| {f('weights_gib')} | {f('peak_gib')} | {f('peak_all_gib')} "
            f"| {f('phase_after_fwd_gib')} | {r.get('step_ms', '-')} | {st} |")


def write_md(path: str, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    sep = "|" + "---|" * MD_HEAD.count(" | ") + "---|"
    lines = [
        "# synthtune GPU memory measurements (raw)",
        "",
        f"GPU: {env.get('gpu_name')} ({env.get('gpu_total_gib')} GiB); torch "
        f"{env.get('torch')} (CUDA {env.get('cuda')}), transformers "
        f"{env.get('transformers')}, peft {env.get('peft')}",
        "",
        "peak = max allocated over steps 2-3 (after optimizer states exist); "
        "peak_all = over steps 1-3; after-fwd = allocated after the last step's "
        "forward (weights + optimizer states + saved activations + logits/loss).",
        "",
        MD_HEAD,
        sep,
    ]
    lines += [md_row(r) for r in rows]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = dict(
        python=platform.python_version(), torch=torch.__version__,
        transformers=transformers.__version__, cuda=torch.version.cuda,
        device=str(device), hostname=platform.node())
    try:
        import peft
        env["peft"] = peft.__version__
    except Exception:  # noqa: BLE001
        env["peft"] = None
    try:
        import accelerate
        env["accelerate"] = accelerate.__version__
    except Exception:  # noqa: BLE001
        env["accelerate"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["gpu_total_gib"] = round(p.total_memory / GIB, 2)
        env["gpu_cc"] = f"{p.major}.{p.minor}"
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["gpu_name"] = "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="start no new config after this many seconds")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny configs on CPU (memory numbers meaningless)")
    ap.add_argument("--only", default="", help="substring filter on config keys")
    ap.add_argument("--limit", type=int, default=0, help="run at most N configs")
    ap.add_argument("--list", action="store_true", help="print the grid and exit")
    a = ap.parse_args(argv)

    grid = cpu_grid() if a.cpu_smoke else gpu_grid()
    if a.only:
        grid = [c for c in grid if a.only in c.key()]
    if a.limit:
        grid = grid[: a.limit]
    if a.list:
        for i, c in enumerate(grid):
            print(f"{i:3d} {c.group:22s} {c.key()}")
        return 0

    if a.cpu_smoke:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("CUDA not available; use --cpu-smoke", file=sys.stderr)
            return 2
        device = torch.device("cuda")

    os.makedirs(a.out, exist_ok=True)
    t_start = time.perf_counter()
    env = environment(device)
    with open(os.path.join(a.out, "env.json"), "w") as fh:
        json.dump(env, fh, indent=1)
    print("env:", json.dumps(env), flush=True)
    print(f"grid: {len(grid)} configs, budget {a.budget_s:.0f}s", flush=True)

    jsonl = os.path.join(a.out, "memory_gpu.jsonl")
    mdp = os.path.join(a.out, "memory_gpu.md")
    rows: list[dict[str, Any]] = []
    skipped = 0
    with open(jsonl, "w") as fh:
        for i, c in enumerate(grid):
            el = time.perf_counter() - t_start
            if el > a.budget_s:
                skipped = len(grid) - i
                print(f"budget reached after {el:.0f}s: skipping {skipped} configs",
                      flush=True)
                break
            r = run_config(c, device, env)
            r["index"] = i
            r["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            rows.append(r)
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            write_md(mdp, env, rows)
            extra = r.get("error", "") if r["status"] != "ok" else ""
            print(f"[{i:3d} {r['elapsed_s']:6.1f}s] {r['status']:5s} {c.key()} "
                  f"w={r.get('weights_gib')} peak={r.get('peak_gib')} "
                  f"peak_all={r.get('peak_all_gib')} fwd={r.get('phase_after_fwd_gib')} "
                  f"ms={r.get('step_ms')} {extra}", flush=True)
            if r["status"] == "error":
                print(r.get("traceback", ""), flush=True)
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_oom = sum(r["status"] == "oom" for r in rows)
    n_err = sum(r["status"] == "error" for r in rows)
    summary = dict(ran=len(rows), ok=n_ok, oom=n_oom, error=n_err, skipped=skipped,
                   total=len(grid), wall_s=round(time.perf_counter() - t_start, 1))
    with open(os.path.join(a.out, "summary.json"), "w") as fh:
        json.dump(summary, fh)
    print("summary:", json.dumps(summary), flush=True)
    return 0 if n_err == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
