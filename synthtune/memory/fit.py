"""``synthtune memory --fit``: the fastest setup that fits, and the command that launches it.

The search runs the estimator over method x launcher (the shipped accelerate configs) x
gradient checkpointing x micro-batch, keeps what fits under ``gpu_gib`` minus a headroom (the
estimate is peak *allocated*; the caching allocator reserves 5-25% more), and ranks by a
relative throughput model. The throughput model is a coarse prior, not a measurement: it only
has to order the options the way practice does.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from synthtune.memory.estimate import GIB, Setup, estimate, rule_of_thumb_bytes
from synthtune.memory.shape import ModelShape

# Launchers that ship in configs/accelerate/, as (name, zero_stage, offload).
LAUNCHERS = (("single_gpu", 0, "none"), ("multi_gpu", 0, "none"), ("zero3", 3, "none"),
             ("zero3_offload", 3, "all"))


def _speed(s: Setup) -> float:
    """Relative tokens/s per GPU (higher is faster)."""
    # forward = 1 unit; full FT backward = 2 (input and weight grads), LoRA's ~1 (no weight grads)
    work = 3.0 if s.method == "full" else 2.0
    if s.grad_ckpt:
        work += 1.0  # one more forward: ~30% slower for full FT, ~50% for LoRA
    speed = 1.0 / work
    if s.method == "qlora":
        speed *= 0.7  # NF4 dequantization on every matmul
    if s.zero_stage == 3:
        speed *= 0.85 if s.nodes == 1 else 0.7  # parameter all-gathers, worse across nodes
    if s.offload == "all":
        speed *= 0.25  # parameters and optimizer over PCIe, CPU Adam
    elif s.offload == "optimizer":
        speed *= 0.5
    tokens = s.batch_size * (s.seq_len + (s.target_len or 0))
    return speed * tokens / (tokens + 1024)  # small micro-batches leave the GPU idle


def _launcher(s: Setup) -> str:
    if s.zero_stage == 3:
        if s.offload != "none":
            return "zero3_offload"  # offloads optimizer states and parameters ("all")
        return "zero3_multinode" if s.nodes > 1 else "zero3"
    return "multi_gpu" if s.world > 1 else "single_gpu"


def launch_command(s: Setup, train_config: str, global_batch: int | None) -> tuple[str, dict[str, Any]]:
    accum = max(1, math.ceil(global_batch / (s.batch_size * s.world))) if global_batch else 1
    overrides: dict[str, Any] = {
        "method": s.method, "per_device_batch_size": s.batch_size, "gradient_accumulation_steps": accum,
        "gradient_checkpointing": s.grad_ckpt, "precision": s.precision, "max_length": s.seq_len,
    }
    if s.loss_impl != "standard":
        overrides["loss_impl"] = s.loss_impl
    if s.method != "full":
        overrides = {"method": s.method, "lora_r": s.lora_r, "lora_targets": s.lora_targets,
                     **{k: v for k, v in overrides.items() if k != "method"}}
    parts = ["accelerate launch", f"--config_file configs/accelerate/{_launcher(s)}.yaml",
             f"--num_processes {s.world}"]
    if s.nodes > 1:
        # run on every node with RANK=0..nodes-1 (as configs/accelerate/zero3_multinode.yaml says)
        parts += [f"--num_machines {s.nodes}", "--machine_rank $RANK", "--main_process_ip $MAIN_NODE"]
    parts += ["fine_tune/train.py", f"--config {train_config}"]

    def fmt(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    parts += [f"{k}={fmt(v)}" for k, v in overrides.items()]
    return " ".join(parts), overrides


def fit(shape: ModelShape, base: Setup, gpu_gib: float, *, methods: tuple[str, ...] = ("full", "lora", "qlora"),
        headroom: float = 0.1, max_batch: int = 64, cpu_gib: float | None = None,
        global_batch: int | None = None, train_config: str = "configs/train/X.yaml") -> dict[str, Any]:
    """Search for the fastest setup that fits; explain, per method, why it does or does not fit."""
    limit = gpu_gib * (1.0 - headroom)
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch]
    per_method: dict[str, dict[str, Any]] = {}
    best: tuple[float, Setup, Any] | None = None
    for method in methods:
        smallest: tuple[float, Setup, Any] | None = None
        method_best: tuple[float, Setup, Any] | None = None
        for name, zero, offload in LAUNCHERS:
            if (name == "single_gpu") != (base.world == 1) and zero == 0:
                continue
            if offload != "none" and cpu_gib is None:
                continue  # offload needs host RAM we were not told about
            if method == "qlora" and zero == 3:
                continue
            for ckpt in (False, True):
                for b in batches:
                    s = replace(base, method=method, zero_stage=zero, offload=offload, grad_ckpt=ckpt, batch_size=b)
                    try:
                        e = estimate(shape, s)
                    except ValueError:
                        continue
                    if smallest is None or e.per_gpu_gib < smallest[0]:
                        smallest = (e.per_gpu_gib, s, e)
                    if e.per_gpu_gib > limit or (cpu_gib is not None and e.cpu_gib > cpu_gib):
                        continue
                    score = _speed(s)
                    if method_best is None or score > method_best[0]:
                        method_best = (score, s, e)
        info: dict[str, Any] = {"fits": method_best is not None}
        if method_best is not None:
            info.update(setup=_short(method_best[1]), per_gpu_gib=method_best[2].per_gpu_gib,
                        relative_speed=round(method_best[0], 4))
            if best is None or method_best[0] > best[0]:
                best = method_best
        elif smallest is not None:
            info.update(smallest_setup=_short(smallest[1]), smallest_per_gpu_gib=smallest[0],
                        reason=_why_not(shape, smallest[1], smallest[2], gpu_gib, limit))
        per_method[method] = info
    result: dict[str, Any] = {"gpu_gib": gpu_gib, "usable_gib": round(limit, 2), "gpus": base.gpus, "nodes": base.nodes,
                              "model": shape.name, "params": shape.params, "methods": per_method,
                              "workshop_rule_gb": round(rule_of_thumb_bytes(shape.params) / 1e9, 1)}
    if best is None:
        result.update(fits=False, reason="nothing fits: " + "; ".join(
            f"{m}: {i.get('reason', '')}" for m, i in per_method.items()))
        return result
    _, s, e = best
    cmd, overrides = launch_command(s, train_config, global_batch)
    result.update(fits=True, best=_short(s), per_gpu_gib=e.per_gpu_gib, breakdown=e.breakdown,
                  command=cmd, overrides=overrides, accelerate_config=f"configs/accelerate/{_launcher(s)}.yaml")
    return result


def _short(s: Setup) -> dict[str, Any]:
    d = {"method": s.method, "zero_stage": s.zero_stage, "offload": s.offload, "grad_ckpt": s.grad_ckpt,
         "batch_size": s.batch_size, "precision": s.precision}
    if s.method != "full":
        d.update(lora_r=s.lora_r, lora_targets=s.lora_targets)
    return d


def _why_not(shape: ModelShape, s: Setup, e, gpu_gib: float, limit: float) -> str:
    """Name the term that breaks the budget, the workshop's way for full fine-tuning."""
    states = sum(e.model_states_gib.values())
    if s.method == "full":
        total = rule_of_thumb_bytes(shape.params, e.bytes_per_param)
        return (f"model states alone need {e.bytes_per_param:g} B/param x {shape.params / 1e9:.2f}B params = "
                f"{total / 1e9:.0f} GB; even sharded over {s.world} GPUs (ZeRO-{s.zero_stage}"
                f"{', offload ' + s.offload if s.offload != 'none' else ''}) that is {states:.1f} GiB per GPU, "
                f"and the smallest setup needs {e.per_gpu_gib:.1f} GiB > {limit:.1f} GiB usable of {gpu_gib:g}")
    return (f"the smallest setup ({_short(s)}) needs {e.per_gpu_gib:.1f} GiB per GPU "
            f"(weights {e.breakdown['weights']:.1f}, activations {e.breakdown['activations']:.1f}, "
            f"logits {e.breakdown['logits']:.1f}) > {limit:.1f} GiB usable")


def gib(x: float) -> float:
    return x / GIB
