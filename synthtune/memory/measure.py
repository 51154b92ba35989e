"""Measurements beside the estimate: saved-tensor bytes on CPU, and tables measured on GPUs.

``saved_tensor_bytes`` counts what autograd keeps from a real forward pass, through
``torch.autograd.graph.saved_tensors_hooks``: each saved tensor's storage once (autograd saves
the same tensor for several ops), parameters excluded. That is the activation term the
estimator walks op by op, measured on any machine, with no GPU.

``compare_measured`` runs the estimator on every row of a measured table (the caller loads it with
``load_measurements``, e.g. ``bench/results/memory_gpu_h200.jsonl``: peak allocated memory of real
training steps on an NVIDIA H200) and returns estimate vs measurement.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from synthtune.memory.estimate import GIB, Setup, estimate, saved_bytes
from synthtune.memory.shape import ModelShape, config_from_dict, resolve_targets, shape_from_config


def saved_tensor_bytes(model, batch: dict, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves during ``model(**batch)`` (CPU, bf16 autocast)."""
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        # keyed by storage address: views and re-saves of one tensor count once, as in memory
        storages.setdefault(st.data_ptr(), st.nbytes())
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch)
    loss = out.loss  # keep the graph (and so every saved storage) alive while counting
    total = sum(n for ptr, n in storages.items() if ptr not in params and ptr != 0)
    del loss, out
    return total


def build_random_model(config, setup: Setup):
    """A random-init model of ``config`` prepared as the GPU protocol does (bf16 cast, ckpt, LoRA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    torch.manual_seed(0)
    kwargs = {} if seq2seq else {"attn_implementation": setup.attn if setup.attn != "flash" else "sdpa"}
    model = cls.from_config(config, dtype=torch.float32, **kwargs)
    if setup.precision == "bf16":
        model.to(torch.bfloat16)
    model.train()
    if setup.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.method != "full":
            model.enable_input_require_grads()
    if setup.method != "full":
        from peft import LoraConfig, get_peft_model

        shape = shape_from_config(config)
        targets = resolve_targets(shape, setup.lora_targets)
        model = get_peft_model(model, LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r,
                                                 lora_dropout=setup.lora_dropout, target_modules=targets))
        model.train()
    return model


def random_batch(config, setup: Setup) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, config.vocab_size, (setup.batch_size, setup.seq_len), generator=g)
    if getattr(config, "is_encoder_decoder", False):
        t = setup.target_len or setup.seq_len
        return {"input_ids": ids, "labels": torch.randint(2, config.vocab_size, (setup.batch_size, t), generator=g)}
    return {"input_ids": ids, "labels": ids}


def cpu_saved_check(config, setup: Setup, name: str = "") -> dict[str, Any]:
    """Estimated vs measured saved-tensor bytes for one config on CPU."""
    shape = shape_from_config(config, name=name)
    model = build_random_model(config, setup)
    measured = saved_tensor_bytes(model, random_batch(config, setup), autocast=setup.precision != "fp32")
    est = saved_bytes(shape, setup)
    return {"model": name or shape.model_type, "method": setup.method, "precision": setup.precision,
            "grad_ckpt": setup.grad_ckpt, "shape": f"{setup.batch_size}x{setup.seq_len}",
            "estimated_mib": est / 2**20, "measured_mib": measured / 2**20,
            "error_pct": 100.0 * (est - measured) / measured}


# ---------------------------------------------------------------------------------------------
# measured tables (passed in: the library never reads bench/)
# ---------------------------------------------------------------------------------------------


def load_measurements(path: Path | str) -> list[dict[str, Any]]:
    """The rows of a measurement table written by ``bench/memory_gpu_measure.py`` (one JSON object per line)."""
    # newline="\n": rows end at "\n" only (text mode would also split at a bare "\r")
    with open(path, encoding="utf-8", newline="\n") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def setup_from_row(row: dict[str, Any], shape: ModelShape) -> Setup:
    targets = row["lora_targets"]
    if targets == "qv":
        targets = "q,v"  # short names resolve to q_proj,v_proj on Llama-style models
    return Setup(method=row["method"], lora_r=row["lora_r"], lora_targets=targets,
                 lora_dropout=row.get("lora_dropout") or 0.0, precision=row["precision"],
                 optimizer=row["optimizer"], batch_size=row["batch"], seq_len=row["seq"],
                 target_len=row.get("target_len"), grad_ckpt=row["grad_ckpt"], attn=row["attn"])


def row_label(row: dict[str, Any]) -> str:
    m = row["method"]
    if m != "full":
        m = f"lora r{row['lora_r']} {row['lora_targets']}" + (f" do{row['lora_dropout']}" if row.get("lora_dropout") else "")
    shape = f"{row['batch']}x{row['seq']}" + (f"/{row['target_len']}" if row.get("target_len") else "")
    return (f"{row['shape']} {m} {row['precision']} {row['optimizer']} ckpt={'on' if row['grad_ckpt'] else 'off'} "
            f"{row['attn']} {shape}")


def group_of(row: dict[str, Any]) -> str:
    """Validation groups: architecture x method x checkpointing (+ the odd settings apart)."""
    if row["attn"] == "eager":
        return "causal eager"
    if row["precision"] == "fp32":
        return f"{row['arch']} fp32"
    method = "full" if row["method"] == "full" else "lora"
    return f"{row['arch']} {method} ckpt={'on' if row['grad_ckpt'] else 'off'}"


def compare_measured(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Estimate every measured row (from :func:`load_measurements`); each result has measured/estimated GiB
    and the % error."""
    shapes: dict[str, ModelShape] = {}
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r["shape"] not in shapes:
            cfg = dict(r["model_config"], model_type=r["model_type"])
            shapes[r["shape"]] = shape_from_config(config_from_dict(cfg), name=r["shape"])
        shape = shapes[r["shape"]]
        e = estimate(shape, setup_from_row(r, shape))
        out.append({"label": row_label(r), "group": group_of(r), "shape": r["shape"],
                    "measured_gib": r["peak_gib"], "estimated_gib": e.per_gpu_gib,
                    "error_pct": 100.0 * (e.per_gpu_gib - r["peak_gib"]) / r["peak_gib"],
                    "peak_phase": e.peak_phase, "trainable_measured": r["trainable_params"],
                    "trainable_estimated": e.trainable_params})
    return out


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per group: rows, max and median absolute % error."""
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(abs(r["error_pct"]))
    groups["all"] = [abs(r["error_pct"]) for r in results]
    return [{"group": g, "rows": len(v), "max_abs_pct": max(v), "median_abs_pct": statistics.median(v)}
            for g, v in groups.items()]


def gib(nbytes: float) -> float:
    return nbytes / GIB
