"""What a training step computes per batch: the model's inputs, the summed token loss and the
token counts. Shared by the loop and the evaluation (eval loss uses the same sum), below both.

Token counts come from the host: :class:`CountingCollator` counts them on the rows (Python lists)
before the batch becomes tensors on the device. Counting them on device tensors instead
(``int((labels != -100).sum())``) makes the CPU wait for the GPU to finish everything queued so
far, once per count: the CPU then cannot queue the next step's kernels while the GPU works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np

from synthtune.train.tokenize import IGNORE_INDEX

#: Tokens per chunk of the chunked loss. The logits of one chunk (chunk x vocab, fp32 plus their
#: gradient) are all that is materialized at once: 1024 x 128k x 4 B = 0.5 GiB for Llama-3's
#: vocabulary, against 8 x 512 x 128k x 4 B = 2 GiB per copy for a whole 8 x 512 batch; small
#: enough to matter, large enough that each chunk is still one big matmul.
LOSS_CHUNK_TOKENS = 1024

LOSS_IMPLS = ("standard", "chunked")


def token_loss_sum(logits, labels, is_seq2seq: bool):
    """Summed cross-entropy over label tokens (labels == -100 are ignored), computed in fp32."""
    import torch.nn.functional as F

    if not is_seq2seq:  # causal: position t predicts token t+1
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


# --------------------------------------------------------------------------------------------
# token counts, on the host
# --------------------------------------------------------------------------------------------


def row_counts(features: Sequence[dict], is_seq2seq: bool) -> dict[str, int]:
    """``num_tokens`` (real input tokens) and ``num_label_tokens`` (the tokens the loss sums) of
    a batch, from its rows before collation. Causal: the first label of a row is never a target
    (nothing predicts it: :func:`token_loss_sum` shifts it away), so it is not counted."""
    skip = 0 if is_seq2seq else 1
    n_tokens = sum(len(f["input_ids"]) for f in features)
    n_labels = sum(int(np.count_nonzero(np.asarray(f["labels"][skip:]) != IGNORE_INDEX)) for f in features)
    return {"num_tokens": n_tokens, "num_label_tokens": n_labels}


class CountingCollator:
    """Wraps a collator: the batch also carries ``num_tokens`` and ``num_label_tokens`` as Python
    ints, counted on the rows (accelerate moves tensors to the device and leaves ints alone)."""

    def __init__(self, collate: Callable[[Sequence[dict]], dict], is_seq2seq: bool):
        self.collate, self.is_seq2seq = collate, is_seq2seq

    def __call__(self, features: Sequence[dict]) -> dict:
        batch = self.collate(features)
        batch.update(row_counts(features, self.is_seq2seq))
        return batch


def label_tokens(batch: dict, is_seq2seq: bool) -> int:
    """The tokens the summed loss covers (the normalizer): the host count when the collator made
    one, else counted on the labels (a device sync on GPUs)."""
    if isinstance(batch.get("num_label_tokens"), int):
        return batch["num_label_tokens"]
    labels = batch["labels"] if is_seq2seq else batch["labels"][:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def batch_tokens(batch: dict, is_seq2seq: bool) -> int:
    """Real (non-pad) tokens a step processes: the input side, plus the labels for seq2seq,
    whose decoder runs over them too."""
    if "num_tokens" in batch:  # host count, or packed rows (their 4D additive mask holds no token count)
        n = int(batch["num_tokens"])
    elif "attention_mask" in batch:
        n = int(batch["attention_mask"].sum())
    else:
        n = batch["input_ids"].numel()
    if is_seq2seq:
        n += label_tokens(batch, True)
    return n


#: flash-attn's varlen arguments from PackedCollator(attention="varlen"): transformers passes them
#: through the model to the attention kernel
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_inputs(batch: dict, is_seq2seq: bool) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids", "labels") if is_seq2seq else \
        ("input_ids", "attention_mask", "position_ids", *VARLEN_KEYS)
    # seq2seq models build decoder inputs from labels (shifted right); causal models get no labels
    # so they skip their own loss: ours is summed and normalized per accumulation window.
    inputs = {k: batch[k] for k in keys if k in batch}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        # packed rows without a mask: transformers reads the example boundaries from the position
        # resets only when no KV cache is passed; with one, examples attend to each other silently
        inputs["use_cache"] = False
    return inputs


# --------------------------------------------------------------------------------------------
# the chunked loss
# --------------------------------------------------------------------------------------------

#: Config attributes of models that transform the logits after the lm_head (Gemma-2's soft
#: capping, Cohere's and Granite's scaling): the chunked loss applies the lm_head alone, so it
#: would compute another loss for them.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def unwrap(model):
    """The transformers model under DDP / torch.compile / PEFT wrappers."""
    while True:
        if hasattr(model, "module"):  # DDP, DeepSpeed engine
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        else:
            return model


def chunked_loss_problem(model_config) -> str | None:
    """Why the chunked loss would not equal the standard one for this model, or None."""
    for name in LOGIT_TRANSFORMS:
        value = getattr(model_config, name, None)
        if value not in (None, 1, 1.0):
            return (f"{getattr(model_config, 'model_type', 'this model')} transforms its logits after the "
                    f"lm_head ({name}={value}), which the chunked loss does not apply")
    return None


@contextlib.contextmanager
def capture_head_input(model):
    """While active, the model's output layer (lm_head) records its input and returns an empty
    ``(..., 0)`` tensor instead of the full-vocabulary logits. Yields ``(head, captured)``:
    ``captured`` gets ``(input, autocast)`` per call, ``autocast`` the autocast state the head ran
    under (None when off), so the loss can run the head as the forward would have.

    The input is taken at the lm_head rather than from ``output_hidden_states``, so whatever a
    model does between its last layer and the head is included: the final norm, and T5's
    ``d_model ** -0.5`` rescaling of tied embeddings. The model is still called whole, through
    its wrappers, so DDP's gradient hooks and accelerate's autocast stay in force.
    """
    head = unwrap(model).get_output_embeddings()
    captured: list = []
    previous = head.__dict__.get("forward")  # an instance-level forward set by someone else

    def capture(x, *args, **kwargs):
        import torch

        kind = x.device.type
        # accelerate's bf16 autocast wraps the model's forward only: the chunked loss runs after it
        on = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
        captured.append((x, torch.get_autocast_dtype(kind) if on else None))
        return x.new_empty((*x.shape[:-1], 0))

    head.forward = capture
    try:
        yield head, captured
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _chunk_loss(head, hidden, labels):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_token_loss_sum(hidden, head, labels, is_seq2seq: bool, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                           autocast_dtype=None):
    """:func:`token_loss_sum` from the lm_head's input, ``chunk_tokens`` rows of logits at a time.

    Each chunk's head + cross-entropy runs under activation checkpointing: its forward keeps
    nothing but its inputs, and the backward recomputes that chunk's logits alone. So the fp32
    full-vocabulary logits of the whole batch never exist; the price is one more lm_head matmul
    per token in the backward. Causal labels are shifted left (a -100 fills the last position)
    instead of slicing the hidden states, which would copy them. ``autocast_dtype``: the head's
    matmuls run under autocast to it (and the checkpoint's recompute with them), as inside the
    model's forward; None leaves the autocast state as it is.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    if not is_seq2seq:
        pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
        labels = torch.cat([labels[:, 1:], pad], dim=1)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    total = None
    with torch.autocast(h.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext():
        for hc, yc in zip(h.split(chunk_tokens), y.split(chunk_tokens), strict=True):
            part = checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False)
            total = part if total is None else total + part
    return total


def step_loss_sum(model, batch: dict, is_seq2seq: bool, loss_impl: str = "standard",
                  chunk_tokens: int = LOSS_CHUNK_TOKENS):
    """One micro-batch's forward and summed token loss, by ``loss_impl`` (standard | chunked)."""
    if loss_impl == "standard":
        out = model(**model_inputs(batch, is_seq2seq))
        return token_loss_sum(out.logits, batch["labels"], is_seq2seq)
    if loss_impl != "chunked":
        raise ValueError(f"loss_impl must be one of {', '.join(LOSS_IMPLS)}, not {loss_impl!r}")
    inputs = model_inputs(batch, is_seq2seq)
    if is_seq2seq:
        # the decoder inputs, as the model builds them from labels; labels themselves would make
        # the model compute its own loss on the empty logits
        inputs["decoder_input_ids"] = unwrap(model).prepare_decoder_input_ids_from_labels(labels=inputs.pop("labels"))
    with capture_head_input(model) as (head, captured):
        model(**inputs)
    if len(captured) != 1:
        raise RuntimeError(f"loss_impl=chunked: the output layer ran {len(captured)} times in one forward "
                           "(expected once); use loss_impl=standard for this model")
    hidden, autocast_dtype = captured[0]
    return chunked_token_loss_sum(hidden, head, batch["labels"], is_seq2seq, chunk_tokens, autocast_dtype)
