"""The chunked loss (loss_impl: chunked) against the standard one, and the host token counts."""

import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, Gemma2Config

import synthtune.memory.estimate  # noqa: F401  (the package exports a function of that name)
from synthtune.config import TrainConfig
from synthtune.memory.shape import load_shape
from synthtune.models import resolve_model
from synthtune.train.batching import CausalCollator, Seq2SeqCollator
from synthtune.train.loss import (
    LOSS_CHUNK_TOKENS,
    CountingCollator,
    chunked_loss_problem,
    label_tokens,
    step_loss_sum,
)
from synthtune.train.setup import apply_lora

ROWS = [  # prompt tokens are -100; rows of unequal length, so the batch is padded
    {"input_ids": [5, 9, 11, 13, 17, 19, 23, 29, 31], "labels": [-100, -100, -100, 13, 17, 19, 23, 29, 31]},
    {"input_ids": [7, 8, 12, 40, 41], "labels": [-100, -100, 12, 40, 41]},
    {"input_ids": [3, 4, 6, 50, 51, 52, 53], "labels": [-100, -100, -100, -100, 51, 52, 53]},
    # no prompt: the first label is a target for seq2seq, nothing predicts it in a causal model
    {"input_ids": [60, 61, 62], "labels": [60, 61, 62]},
]


def _model(name: str, method: str, targets: list[str], tied: bool = False):
    path = resolve_model(name)
    seq2seq = name == "tiny-t5"
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    torch.manual_seed(0)
    if tied:  # T5 with tied embeddings rescales the decoder output by d_model ** -0.5 before its lm_head
        mcfg = AutoConfig.from_pretrained(path, tie_word_embeddings=True, scale_decoder_outputs=True)
        model = cls.from_config(mcfg)
    else:
        model = cls.from_pretrained(path)
    if method == "lora":
        cfg = TrainConfig(model=name, lora_targets=targets, lora_dropout=0.0)
        model = apply_lora(model, cfg, seq2seq)
        # LoRA's B starts at zero: move it, so the adapters take part in the comparison
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    return model.train(), seq2seq


def _loss_and_grads(model, batch, seq2seq, impl, chunk):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks (T5 has dropout) in both
    loss = step_loss_sum(model, batch, seq2seq, impl, chunk_tokens=chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,method,targets,tied", [
    ("tiny-llama", "lora", ["all-linear"], False),
    ("tiny-llama", "lora", ["q_proj", "lm_head"], False),  # a LoRA-wrapped lm_head
    ("tiny-llama", "full", [], False),  # the tied embedding gets gradients from both ends
    ("tiny-t5", "lora", ["q", "v"], False),
    ("tiny-t5", "full", [], True),
])
def test_chunked_loss_equals_the_standard_loss_and_gradients(name, method, targets, tied):
    model, seq2seq = _model(name, method, targets, tied)
    collate = (Seq2SeqCollator if seq2seq else CausalCollator)(0)
    batch = CountingCollator(collate, seq2seq)(ROWS)
    ref, ref_grads = _loss_and_grads(model, batch, seq2seq, "standard", LOSS_CHUNK_TOKENS)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())
    for chunk in (5, LOSS_CHUNK_TOKENS):  # several uneven chunks, and one
        loss, grads = _loss_and_grads(model, batch, seq2seq, "chunked", chunk)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        for n, g in grads.items():  # fp32 sums in another order: 1e-5 of each gradient's own scale
            scale = ref_grads[n].abs().max().item()
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")


def test_chunked_loss_keeps_no_full_vocabulary_logits():
    # what autograd saves between forward and backward: the standard loss keeps batch x vocab fp32
    # log-probabilities, the chunked one nothing of vocabulary width
    model, _ = _model("tiny-llama", "lora", ["all-linear"])
    batch = CountingCollator(CausalCollator(0), False)(ROWS)
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = batch["input_ids"].numel()

    def widest_saved(impl):
        widths = []

        def pack(t):
            if t.dim() and t.shape[-1] == vocab and t.numel() > vocab:  # not the (vocab, hidden) weight itself
                widths.append(t.numel() // vocab)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step_loss_sum(model, batch, False, impl, chunk_tokens=4)
        return max(widths, default=0)

    assert widest_saved("standard") >= tokens - batch["input_ids"].shape[0]
    assert widest_saved("chunked") == 0


def test_host_counts_equal_the_tensor_counts():
    for seq2seq, collate in ((False, CausalCollator(0)), (True, Seq2SeqCollator(0))):
        batch = CountingCollator(collate, seq2seq)(ROWS)
        assert type(batch["num_label_tokens"]) is int and type(batch["num_tokens"]) is int
        assert batch["num_tokens"] == int(batch["attention_mask"].sum())
        tensor_only = {k: v for k, v in batch.items() if k != "num_label_tokens"}
        assert label_tokens(batch, seq2seq) == label_tokens(tensor_only, seq2seq) == (15 if seq2seq else 14)


def test_chunked_loss_refused_where_it_would_differ():
    assert chunked_loss_problem(AutoConfig.from_pretrained(resolve_model("tiny-llama"))) is None
    assert "final_logit_softcapping=30.0" in chunked_loss_problem(Gemma2Config(final_logit_softcapping=30.0))


def test_memory_estimate_follows_the_loss_choice():
    est = sys.modules["synthtune.memory.estimate"]
    assert est.LOSS_CHUNK_TOKENS == LOSS_CHUNK_TOKENS
    shape = load_shape("tiny-llama")
    base = dict(method="lora", batch_size=8, seq_len=512, precision="bf16")
    std = est.estimate(shape, est.Setup(**base))
    chk = est.estimate(shape, est.Setup(**base, loss_impl="chunked"))
    tokens, chunk, v = 8 * 512, LOSS_CHUNK_TOKENS, shape.vocab
    # standard: 4 B kept + 6 B forward temporaries per logit; chunked: one chunk's 10 B
    assert std.phases_gib["forward"] - chk.phases_gib["forward"] == pytest.approx(
        (10 * v * tokens - 10 * v * chunk) / est.GIB, abs=2e-4)
    assert est.saved_bytes(shape, est.Setup(**base)) - est.saved_bytes(
        shape, est.Setup(**base, loss_impl="chunked")) == 4 * v * tokens
    with pytest.raises(ValueError, match="zero_stage 3"):
        est.Setup(**base, loss_impl="chunked", zero_stage=3).check()


@pytest.mark.integration  # trains
def test_chunked_loss_trains_like_the_standard_loss(tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from synthtune.config import load_config
    from synthtune.train.loop import train

    smoke = Path(__file__).resolve().parents[1] / "configs" / "train" / "smoke.yaml"
    runs = {}
    for impl in ("standard", "chunked"):
        over = [f"output_dir={tmp_path / impl}", f"loss_impl={impl}", "max_steps=3", "logging_steps=1", "packing=true",
                "eval_data=null", "eval_steps=0", "save_steps=0", "trace_memory=false", "log_with=none"]
        runs[impl] = train(load_config(TrainConfig, smoke, over), progress=False)
    losses = {impl: [h["loss"] for h in s["history"] if "loss" in h] for impl, s in runs.items()}
    assert len(losses["standard"]) == 3 and losses["chunked"] == pytest.approx(losses["standard"], rel=1e-5)
    a, b = (load_file(tmp_path / impl / "final" / "adapter_model.safetensors") for impl in runs)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert runs["chunked"]["memory"]["estimate"]["per_gpu_gib"] < runs["standard"]["memory"]["estimate"]["per_gpu_gib"]


def test_chunked_loss_runs_the_head_under_the_forwards_autocast():
    # accelerate's bf16 autocast wraps the model's forward only; the chunked loss runs the lm_head
    # after it, and ran it in fp32 (on a 128k vocabulary, the step's largest matmul) until it
    # took over the autocast state the head saw inside the forward
    model, seq2seq = _model("tiny-llama", "full", [])
    inner = model.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return inner(*args, **kwargs)

    model.forward = forward
    seen = []
    # (the capture's own empty output, during the forward, is not a head matmul)
    model.get_output_embeddings().register_forward_hook(lambda mod, args, out: out.shape[-1] and seen.append(out.dtype))
    batch = CountingCollator(CausalCollator(0), seq2seq)(ROWS)
    standard = step_loss_sum(model, batch, seq2seq, "standard")
    assert seen == [torch.bfloat16]
    seen.clear()
    chunked = step_loss_sum(model, batch, seq2seq, "chunked", chunk_tokens=5)
    chunked.backward()  # the checkpointed chunks recompute under the same autocast
    assert seen and set(seen) == {torch.bfloat16}
    assert chunked.item() == pytest.approx(standard.item(), rel=1e-3)
