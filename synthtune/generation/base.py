"""Batched generation with local transformers models (causal or seq2seq).

This is the plain path: left-padded batches, ``generate``, stop strings, decoded new text.
The synthesis backend builds its faster shared-prefill sampler on top of the same contract:
``prompts in -> list of k completions per prompt out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    seed: int = 0
    # OpenAI's penalties, over the tokens each sample has generated (not the prompt, as vLLM
    # counts them): logits[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # token id -> added to its logit before sampling (greedy too); -100 bans a token, +100 forces it
    logit_bias: dict[int, float] | None = None
    # GSM8K's calculator (synthtune.generation.calc_decoding): once a sample has written "<<expr=",
    # the exact result and ">>" are forced in; the forced tokens count toward max_new_tokens
    calculator: bool = False


@dataclass
class Sample:
    """One completion, from any backend. Defined here, away from torch, so the OpenAI client
    imports without it."""

    text: str  # decoded new text, cut at the first stop string (stop string removed), stripped
    n_tokens: int  # new tokens generated (up to and including EOS / the stop)
    finish_reason: str  # "eos" | "stop" | "length"
    # the n_tokens new token ids (for provenance and exact comparisons); not part of equality
    token_ids: list[int] = field(default_factory=list, repr=False, compare=False)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the first stop string (the stop string itself is dropped).

    >>> truncate_at_stop("#### 4\\n\\nProblem: next", ["\\n\\nProblem:"])
    '#### 4'
    """
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def logits_processors(params: SamplingParams, tokenizer, start: int):
    """The ``logits_processor`` argument ``generate`` needs for ``params`` (a ``LogitsProcessorList``),
    or None when nothing is asked for (``generate`` then runs exactly as without one).

    ``start`` is where the generated tokens begin in the ids a processor sees: the padded prompt
    width (causal) or 1 (seq2seq). Penalties and bias come first; the calculator comes last, so a
    token it forces is not moved by them.
    """
    from synthtune.generation import penalties
    from synthtune.generation.calc_decoding import calculator_processor

    found = penalties.logits_processor(params, start)
    if not params.calculator:
        return found
    if found is None:
        from transformers import LogitsProcessorList

        found = LogitsProcessorList()
    found.append(calculator_processor(tokenizer, start))
    return found


def generate(lm, prompts: Sequence[str], params: SamplingParams | None = None, *, batch_size: int = 8,
             add_special_tokens: bool = True, progress: bool = True, desc: str = "generating") -> list[list[str]]:
    """Return ``params.num_samples`` completions for each prompt, in prompt order."""
    params = params or SamplingParams()
    tok = lm.tokenizer
    side = tok.padding_side
    if not lm.is_seq2seq:
        # Left padding keeps every prompt's last token adjacent to its first new token. Only for
        # this call: the tokenizer is shared (training, saving) and its file says how it pads.
        tok.padding_side = "left"
    try:
        return _generate(lm, prompts, params, batch_size, add_special_tokens, progress, desc)
    finally:
        tok.padding_side = side


def _generate(lm, prompts, params: SamplingParams, batch_size: int, add_special_tokens: bool, progress: bool,
              desc: str) -> list[list[str]]:
    import torch

    tok, model = lm.tokenizer, lm.model
    gen_kwargs = dict(max_new_tokens=params.max_new_tokens, num_return_sequences=params.num_samples,
                      pad_token_id=tok.pad_token_id)
    if params.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k or None)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if params.stop:
        gen_kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
    torch.manual_seed(params.seed)
    results: list[list[str]] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(lm.device)
        # the new tokens start after the padded prompt (causal) or the decoder start token (seq2seq)
        processors = logits_processors(params, tok, 1 if lm.is_seq2seq else enc["input_ids"].shape[1])
        extra = {} if processors is None else {"logits_processor": processors}
        with torch.inference_mode():
            out = model.generate(**enc, **gen_kwargs, **extra)
        # Causal outputs repeat the (padded) prompt; seq2seq outputs are only the decoder side.
        new = out if lm.is_seq2seq else out[:, enc["input_ids"].shape[1]:]
        texts = tok.batch_decode(new, skip_special_tokens=True)
        texts = [truncate_at_stop(t, params.stop).strip() for t in texts]
        k = params.num_samples
        results.extend(texts[i * k:(i + 1) * k] for i in range(len(chunk)))
        bar.update(len(chunk))
    bar.close()
    return results
