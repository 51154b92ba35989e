"""Packed rows under each attention kernel: the per-example losses and gradients of unpacked
batches, the layouts each kernel takes (synthtune.train.setup's table), and real training.

On CPU (torch 2.13, transformers 5.24) sdpa and eager train with the 4D mask and with
position_ids; flex attention runs forward only (torch has no CPU backward), and flash-attn needs
a CUDA GPU: its flattened varlen layout is checked here against a reference varlen kernel.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from synthtune.config import TrainConfig, load_config
from synthtune.data.gsm8k import load_source
from synthtune.errors import ConfigError
from synthtune.models import resolve_model
from synthtune.train.batching import CausalCollator, PackedCollator, pack_sequences
from synthtune.train.loss import model_inputs
from synthtune.train.setup import AUTO_PACKING, PACKING_MODES, resolve_packing_mode
from synthtune.train.tokenize import IGNORE_INDEX, tokenize_rows

M = IGNORE_INDEX
REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "smoke.yaml"
CPU_TRAINABLE = [("sdpa", "mask"), ("eager", "mask"), ("sdpa", "position_ids"), ("eager", "position_ids")]


@pytest.fixture(scope="module")
def packed_data(tiny_llama):
    tok = tiny_llama.tokenizer
    data = tokenize_rows(load_source("bundled:train").rows[:16], tok, is_seq2seq=False, max_length=256, cache_dir=None)
    examples, packed = list(data.dataset), list(pack_sequences(data.dataset, max_length=512))
    assert len(packed) <= len(examples) // 3  # several examples share each row
    return tok, examples, packed


def _model(attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), attn_implementation=attn,
                                                 dtype=torch.float32)
    model.config.use_cache = True  # transformers' default: model_inputs must switch it off itself
    return model


def _token_losses(logits, labels):
    """(rows, tokens) cross-entropy of each position's next token; 0 where the label is -100."""
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=M, reduction="none")
    return F.pad(ce, (1, 0))  # aligned with the labels: position t holds the loss of label t


def _unpacked(model, tok, examples):
    batch = CausalCollator(tok.pad_token_id)(examples)
    losses = _token_losses(model(**model_inputs(batch, False)).logits, batch["labels"])
    return losses.sum(1)  # one summed loss per example


def _packed(model, batch, packed, n_examples):
    return _per_example(model(**model_inputs(batch, False)).logits, batch["labels"], packed, n_examples)


def _per_example(logits, labels, packed, n_examples):
    """Per-example summed losses from packed rows (one flattened row for varlen), in example order."""
    losses = _token_losses(logits, labels)
    flat = labels.shape[0] == 1 and len(packed) > 1
    out = torch.zeros(n_examples)
    offset = 0
    for r, row in enumerate(packed):
        start = offset if flat else 0
        for i, n in zip(row["example_ids"], _lengths(row), strict=True):
            out[i] = losses[0 if flat else r, start:start + n].sum()
            start += n
        offset += len(row["input_ids"])
    return out


def _lengths(row):
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return [b - a for a, b in zip(starts, [*starts[1:], len(row["position_ids"])], strict=True)]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, tok, examples, packed, batch):
    """(max relative per-example loss error, max gradient error relative to its norm), packed vs unpacked."""
    model.zero_grad()
    ref = _unpacked(model, tok, examples)
    ref.sum().backward()
    ref_grads = _grads(model)
    model.zero_grad()
    got = _packed(model, batch, packed, len(examples))
    got.sum().backward()
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys() and ref_grads
    loss_err = ((got - ref.detach()).abs() / ref.detach().abs()).max().item()
    grad_err = max(((grads[k] - g).norm() / g.norm().clamp_min(1e-12)).item() for k, g in ref_grads.items())
    return loss_err, grad_err


# ---------------------------------------------------------------------------- collator layouts


def test_varlen_collator_flattens_the_batch_exactly():
    feats = [{"input_ids": [1, 2, 3, 4, 5], "labels": [M, 2, M, M, 5], "position_ids": [0, 1, 0, 1, 2]},
             {"input_ids": [7, 8], "labels": [M, 8], "position_ids": [0, 1]}]
    b = PackedCollator(pad_token_id=0, attention="varlen")(feats)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8]]  # no padding at all
    assert b["labels"].tolist() == [[M, 2, M, M, 5, M, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1]]
    assert b["cu_seq_lens_q"].tolist() == b["cu_seq_lens_k"].tolist() == [0, 2, 5, 7]
    assert b["cu_seq_lens_q"].dtype == torch.int32  # what flash-attn's varlen kernel takes
    assert b["max_length_q"] == b["max_length_k"] == 3 and isinstance(b["max_length_q"], int)  # no device sync
    assert int(b["num_tokens"]) == 7 and "attention_mask" not in b
    padded = PackedCollator(pad_token_id=0, attention="varlen", pad_to_multiple_of=4)(feats)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 0]]
    assert padded["labels"][0, -1] == M and padded["position_ids"][0, -1] == 0  # padding: an example of its own
    assert padded["cu_seq_lens_q"].tolist() == [0, 2, 5, 7, 8] and int(padded["num_tokens"]) == 7
    with pytest.raises(ValueError, match="varlen"):
        PackedCollator(pad_token_id=0, attention="bogus")


def test_model_inputs_pass_the_layout_and_switch_the_cache_off():
    feats = [{"input_ids": [1, 2, 3], "labels": [M, 2, 3], "position_ids": [0, 0, 1]}]
    varlen = model_inputs(PackedCollator(0, attention="varlen")(feats), False)
    assert set(varlen) == {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                           "max_length_k", "use_cache"} and varlen["use_cache"] is False
    assert model_inputs(PackedCollator(0, attention="position_ids")(feats), False)["use_cache"] is False
    assert "use_cache" not in model_inputs(PackedCollator(0, attention="mask")(feats), False)  # a 4D mask needs none
    assert "use_cache" not in model_inputs(CausalCollator(0)(feats), False)


# ---------------------------------------------------------------------------- the table


@pytest.mark.parametrize("attn,mode", [(a, m) for a in PACKING_MODES for m in ("auto", "mask", "position_ids", "varlen")])
def test_packing_mode_table(attn, mode):
    cfg = load_config(TrainConfig, SMOKE, ["packing=true", f"packing_mode={mode}"])
    if mode == "auto":
        assert resolve_packing_mode(cfg, attn) == AUTO_PACKING[attn] in PACKING_MODES[attn]
    elif mode in PACKING_MODES[attn]:
        assert resolve_packing_mode(cfg, attn) == mode
    else:
        with pytest.raises(ConfigError, match=f"packing_mode={mode} is not a layout "
                                              f"attn_implementation={attn} takes"):
            resolve_packing_mode(cfg, attn)
    assert resolve_packing_mode(load_config(TrainConfig, SMOKE, [f"packing_mode={mode}"]), attn) is None  # no packing
    # flash-attn reads position resets only in a one-row batch: with B rows it attends across examples
    assert "position_ids" not in PACKING_MODES["flash_attention_2"]


# ---------------------------------------------------------------------------- equal losses and gradients


@pytest.mark.parametrize("attn,mode", CPU_TRAINABLE)
def test_packed_losses_and_gradients_equal_unpacked(packed_data, attn, mode):
    tok, examples, packed = packed_data
    model = _model(attn)
    batch = PackedCollator(tok.pad_token_id, attention=mode)(packed)
    loss_err, grad_err = _compare(model, tok, examples, packed, batch)
    assert loss_err < 1e-5 and grad_err < 1e-5, (loss_err, grad_err)


def test_a_layout_whose_boundaries_are_ignored_is_caught(packed_data):
    # transformers' default use_cache=True drops the position_ids boundaries: the same check fails
    tok, examples, packed = packed_data
    model = _model("sdpa")
    batch = PackedCollator(tok.pad_token_id, attention="position_ids")(packed)
    with torch.no_grad():
        ref = _unpacked(model, tok, examples)
        ok = _packed(model, batch, packed, len(examples))
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True)
        leaky = _per_example(out.logits, batch["labels"], packed, len(examples))
    assert ((ok - ref).abs() / ref.abs()).max().item() < 1e-5
    assert ((leaky - ref).abs() / ref.abs()).max().item() > 1e-3


def _varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """flash-attn's varlen contract in plain torch: causal attention within each [cu[i], cu[i+1])
    span of the flattened row, nothing across. Only a kernel for the test: CPUs have no flash-attn."""
    assert attention_mask is None and query.shape[0] == 1 and cu_seq_lens_q is not None
    assert torch.equal(cu_seq_lens_q, cu_seq_lens_k) and max_length_q == max_length_k
    cu = cu_seq_lens_q.tolist()
    assert max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True)) == max_length_q
    out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                                    scale=scaling, enable_gqa=True)
                     for a, b in zip(cu[:-1], cu[1:], strict=True)], dim=2)
    return out.transpose(1, 2).contiguous(), None


def test_varlen_layout_equals_unpacked_through_a_varlen_kernel(packed_data):
    from transformers import AttentionInterface

    AttentionInterface.register("synthtune_varlen_reference", _varlen_reference)
    tok, examples, packed = packed_data
    model = _model("synthtune_varlen_reference")
    sdpa = _model("sdpa")
    batch = PackedCollator(tok.pad_token_id, attention="varlen")(packed)
    assert batch["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    model.zero_grad()
    got = _packed(model, batch, packed, len(examples))
    got.sum().backward()
    sdpa.zero_grad()
    ref = _unpacked(sdpa, tok, examples)
    ref.sum().backward()
    assert ((got - ref).abs() / ref.abs()).max().item() < 1e-5
    ref_grads = _grads(sdpa)
    assert max(((g - ref_grads[k]).norm() / ref_grads[k].norm()).item() for k, g in _grads(model).items()) < 1e-5


@pytest.mark.integration  # compiles flex attention for the CPU (~20 s)
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch compiles flex attention with a C compiler on CPU")
def test_flex_attention_block_mask_from_position_ids_forward_on_cpu(packed_data):
    # forward only: torch has no flex attention backward on CPU (validate refuses training there)
    tok, examples, packed = packed_data
    batch = PackedCollator(tok.pad_token_id, attention="position_ids")(packed)
    with torch.no_grad():
        ref = _unpacked(_model("sdpa"), tok, examples)
        got = _packed(_model("flex_attention"), batch, packed, len(examples))
    assert ((got - ref).abs() / ref.abs()).max().item() < 1e-5


# ---------------------------------------------------------------------------- training


@pytest.mark.integration  # trains three times
def test_packed_training_in_every_cpu_mode_gives_the_same_run(tmp_path):
    # sdpa + mask (the default) trains in test_train.py's packed test; the other three here, and
    # the equivalence tests above tie all four to the unpacked losses
    from synthtune.train.loop import train

    runs = {}
    for attn, mode in CPU_TRAINABLE[1:]:
        cfg = load_config(TrainConfig, SMOKE, [f"output_dir={tmp_path / f'{attn}-{mode}'}", "packing=true",
                                               f"attn_implementation={attn}", f"packing_mode={mode}", "max_steps=4",
                                               "gradient_accumulation_steps=1", "logging_steps=1", "eval_data=null",
                                               "save_steps=0", "log_with=none", "trace_memory=false"])
        s = train(cfg, progress=False)
        assert s["attn_implementation"] == attn and s["data"]["packing_mode"] == mode
        assert json.loads((tmp_path / f"{attn}-{mode}" / "summary.json").read_text())["steps"] == 4
        runs[(attn, mode)] = [h["loss"] for h in s["history"] if "loss" in h]
        # it trained: peft starts every lora_B at zero, and each has moved
        lora_b = {k: v for k, v in load_file(Path(s["final_dir"]) / "adapter_model.safetensors").items()
                  if "lora_B" in k}
        assert lora_b and all(v.abs().max() > 0 for v in lora_b.values())
    first = runs[CPU_TRAINABLE[1]]
    assert len(first) == 4 and all(x == x for x in first)
    for key, losses in runs.items():
        assert losses == pytest.approx(first, rel=1e-5), key  # the same examples, the same attention
