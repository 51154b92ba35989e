"""Presence and frequency penalties and ``logit_bias``, the same arithmetic on every decoding path.

For each row (one sample), before temperature, top-k and top-p (and before greedy's argmax)::

    logits[j] += bias[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty

``count[j]`` is how often token ``j`` occurs in the tokens this sample has generated so far. The
prompt does not count: OpenAI's docs define the penalties over the text sampled so far, and vLLM,
which the ``openai`` synthesis backend runs against, counts only output tokens for these two (its
prompt-aware ``repetition_penalty`` is another parameter, which synthtune does not offer). So a
request gives the same samples here and on a vLLM server, up to the model's numerics.

``bias`` is ``logit_bias`` as a dense vector: -100 effectively bans a token, +100 effectively
forces it. With the defaults (0, 0, no bias) nothing here runs, so results are bit-identical to
sampling without this module.

Only torch is imported (and transformers for the ``generate`` processor, lazily), so the sampler
still runs from a bare checkout.
"""

from __future__ import annotations

import math

import torch


def active(params) -> bool:
    """Whether ``params`` (a ``SamplingParams``) asks for any penalty or bias."""
    return bool(params.presence_penalty or params.frequency_penalty or params.logit_bias)


def check(params, vocab: int | None = None) -> None:
    """``ValueError`` naming the field for a non-finite penalty or bias, or a bias key that is not a
    token id (below ``vocab``, the width of the model's logits, when given).

    The library accepts any finite value (serve narrows them to OpenAI's ranges).
    """
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    for tok, value in (params.logit_bias or {}).items():
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0 or (vocab is not None and tok >= vocab):
            span = f"0 to {vocab - 1}" if vocab is not None else "a non-negative integer"
            raise ValueError(f"logit_bias key {tok!r} is not a token id of this model ({span})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"logit_bias[{tok}] must be a finite number, got {value!r}")


def bias_vector(params, vocab: int, device) -> torch.Tensor | None:
    """``logit_bias`` as a dense fp32 ``[vocab]`` tensor, or None when there is none (``check`` it first)."""
    if not params.logit_bias:
        return None
    bias = torch.zeros(vocab, dtype=torch.float32, device=device)
    ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
    bias[ids] = torch.tensor([float(v) for v in params.logit_bias.values()], dtype=torch.float32, device=device)
    return bias


def adjust(logits: torch.Tensor, counts: torch.Tensor | None, params, bias: torch.Tensor | None) -> torch.Tensor:
    """``logits`` [rows, vocab] fp32 with the bias added and the penalties for ``counts`` (the
    rows' generated-token counts, same shape, or None before any token) subtracted, in place.

    Both decoding paths call this one function, so they apply the same fp32 operations in the
    same order and agree token for token under greedy decoding.
    """
    if bias is not None:
        logits += bias
    if counts is not None:
        if params.frequency_penalty:
            logits -= counts * params.frequency_penalty
        if params.presence_penalty:
            logits -= (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


class RowCounts:
    """Per-row generated-token counts for the shared-prefill sampler, kept in step with its rows
    (repeated k times per prompt, finished rows dropped)."""

    def __init__(self, params, n_rows: int, vocab: int, device):
        check(params, vocab)
        self.params = params
        self.bias = bias_vector(params, vocab, device)
        needs_counts = bool(params.presence_penalty or params.frequency_penalty)
        self.counts = torch.zeros((n_rows, vocab), dtype=torch.float32, device=device) if needs_counts else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return adjust(logits, self.counts, self.params, self.bias)

    def record(self, tokens: torch.Tensor) -> None:
        """Count the token each row just generated."""
        if self.counts is not None:
            self.counts[torch.arange(tokens.numel(), device=tokens.device), tokens] += 1.0

    def keep(self, rows: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts = self.counts.index_select(0, rows)


def logits_processor(params, start: int):
    """A transformers ``LogitsProcessorList`` applying ``params``' penalties and bias inside
    ``generate``, or None with the defaults (so ``generate`` runs exactly as before).

    ``start`` is where the generated tokens begin in the ids ``generate`` hands a processor: the
    padded prompt width for a causal model, 1 (after the decoder start token) for seq2seq.
    ``generate`` runs custom processors before its temperature/top-k/top-p warpers, which is the
    order OpenAI and vLLM use.
    """
    if not active(params):
        return None
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Penalties(LogitsProcessor):
        def __init__(self):
            self.bias: torch.Tensor | None = None
            self.checked = False

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            vocab = scores.shape[-1]
            if not self.checked:
                check(params, vocab)
                self.bias = bias_vector(params, vocab, scores.device)
                self.checked = True
            new = input_ids[:, start:]
            counts = None
            if new.shape[1] and (params.presence_penalty or params.frequency_penalty):
                # rows that already ended hold padding here; their next token is padding whatever
                # the scores say, so counting it does no harm
                counts = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
                counts.scatter_add_(1, new, torch.ones(new.shape, dtype=torch.float32, device=scores.device))
            return adjust(scores, counts, params, self.bias)

    return LogitsProcessorList([_Penalties()])
