"""What a training step computes per batch: the model's inputs, the summed token loss and the
token count. Shared by the loop and the evaluation (eval loss uses the same sum), below both.
"""

from __future__ import annotations


def token_loss_sum(logits, labels, is_seq2seq: bool):
    """Summed cross-entropy over label tokens (labels == -100 are ignored), computed in fp32."""
    import torch.nn.functional as F

    if not is_seq2seq:  # causal: position t predicts token t+1
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def batch_tokens(batch: dict, is_seq2seq: bool) -> int:
    """Real (non-pad) tokens a step processes: the input side, plus the labels for seq2seq,
    whose decoder runs over them too."""
    if "num_tokens" in batch:  # packed rows: the 4D additive mask holds no token count
        n = int(batch["num_tokens"])
    elif "attention_mask" in batch:
        n = int(batch["attention_mask"].sum())
    else:
        n = batch["input_ids"].numel()
    if is_seq2seq:
        n += int((batch["labels"] != -100).sum())
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
