"""Fast k-sample sampling for causal LMs: each prompt's prefill runs once, the prefix is never copied.

Why not ``generate``: ``generate(num_return_sequences=k)`` prefills the (~2,000-token) few-shot
prompt k times, and repeating a prefilled ``DynamicCache`` k times still makes every decoding step
concatenate k copies of the whole prefix. Here the k samples of a prompt attend to ONE copy of
the prefix keys/values:

* The prompt tokens shared by every prompt of a batch (the **prefix**) are prefilled once, with
  the model's usual SDPA attention; each layer's keys/values are kept as a single
  ``[kv_heads, C, head_dim]`` tensor.
* Each **row** (one sample) owns a preallocated ``[kv_heads, R + max_new_tokens, head_dim]``
  buffer holding its prompt's remainder (the tokens after the prefix, left-padded so every row's
  last prompt token sits in the same slot and ``logits_to_keep=1`` works) and its new tokens,
  written in place each step.
* Attention for all rows is computed against the prefix in one batched matmul (all rows' queries
  of one kv head against the same keys: the prefix is read once per step, whatever k is), then
  against the per-row buffer, and the two partial softmaxes are merged with the usual
  log-sum-exp rescaling. This runs inside the model's own forward through transformers'
  ``AttentionInterface`` (the model is switched to it for the call and switched back), so the
  model code, RoPE, MLPs and logits are transformers' own; the model is called with
  ``use_cache=False`` and no cache object: the K/V store lives in this module.
* The remainders are prefilled for one row per prompt, then repeated k times (a copy of a few
  hundred tokens, once); finished rows are dropped from the batch, so work shrinks as samples end.
* Greedy decoding (temperature 0) is deterministic, so one row per prompt is decoded and its
  result repeated k times.

When every prompt of a call shares a long common prefix (fixed exemplars), it is prefilled once
for the whole call and reused by every batch (see ``_plan_prefix``).

Seq2seq models, and causal models whose attention this can't reproduce (sliding windows, logit
soft-capping, non-"full_attention" layers), fall back to ``generate(num_return_sequences=k)``
with the same ``Sample`` results.

Which path runs is ``sample_k``'s ``sampler`` (``pick_sampler``): ``auto`` takes this sampler on CPU
and HF's batched ``generate`` on an accelerator, where a small model is launch-bound and this
attention's many small ops per layer lost to SDPA (bench/RESULTS.md, "k-sample sampling").

Presence/frequency penalties and ``logit_bias`` (``synthtune.generation.penalties``) apply on both
paths with the same fp32 arithmetic: per-row counts here, a logits processor inside ``generate``.

With ``SamplingParams.calculator``, GSM8K's calculator writes each annotation's result
(``synthtune.generation.calc_decoding``): here per-row queues of forced ids, taken instead of the
picked token at the next steps (no re-prefill, other rows' draws unchanged); a logits processor in
``generate``.

This module imports only torch, transformers and ``synthtune.generation.base`` (tqdm),
``.penalties`` (torch) and ``.calc_decoding`` (stdlib and ``synthtune.data.calculator``, itself
stdlib only), so the GPU benchmark runs it from a bare checkout (repo root on ``sys.path``) where
synthtune's other dependencies are missing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence

import torch

from synthtune.generation import penalties
from synthtune.generation.base import (  # noqa: F401 (Sample: re-export)
    Sample,
    SamplingParams,
    generate,
    logits_processors,
    truncate_at_stop,
)
from synthtune.generation.calc_decoding import Injector

ATTN_NAME = "synthtune_shared_prefix"
# Prompt remainders longer than this are prefilled in chunks, bounding the [rows, heads, chunk,
# keys] score tensor of the hand-written attention.
_PREFILL_CHUNK = 256
# Finite "minus infinity" for masked scores: a fully masked row (a padding query) then yields a
# finite garbage value instead of NaN, and NaN must not reach padding slots' values, since
# 0 * NaN would poison every row that merely masks them.
_MASKED = -1e30


#: ``sample_k``'s ``sampler`` choices. ``auto``: ``shared_prefix`` on CPU, where it measured 4.8x the
#: workshop's one ``generate`` per sample and 3.5x HF's ``generate(num_return_sequences=k)`` (k=8, a
#: 2,101-token 8-shot prompt, 2 idle cores); ``generate`` on any accelerator: on an H200 (random-init
#: SmolLM2-135M shape, bf16, a random 2,057-token prompt, best of 2) this took 2.05 s against 1.67 s for
#: HF's batched ``generate`` (0.81x), a 135M model being bound by kernel launches there. Both paths
#: return the same ``Sample``s, and agree token for token when greedy (tested on CPU in fp32) unless the
#: model's ``generation_config`` adds processors of its own, which only ``generate`` applies.
SAMPLERS = ("auto", "shared_prefix", "generate")


def pick_sampler(sampler: str, device) -> str:
    """The path ``sampler`` means on ``device``: ``shared_prefix`` or ``generate`` (see :data:`SAMPLERS`).

    >>> pick_sampler("auto", "cpu"), pick_sampler("auto", "cuda:1"), pick_sampler("shared_prefix", "cuda")
    ('shared_prefix', 'generate', 'shared_prefix')
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if sampler != "auto":
        return sampler
    return "shared_prefix" if torch.device(device).type == "cpu" else "generate"


class Aborted(Exception):
    """``sample_k``'s ``abort()`` returned true: nobody wants these samples any more (e.g. every
    client of a server batch disconnected), so the call stopped at the next decoding step."""


# --------------------------------------------------------------------------------------------
# the K/V store and the attention function
# --------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[_KVStore | None] = contextvars.ContextVar("synthtune_kv_store", default=None)


class _KVStore:
    """Per-layer keys/values: one shared prefix copy plus preallocated per-row buffers.

    The model is called with ``use_cache=False``; the attention function receives the new
    tokens' (RoPE-applied) keys/values and stores them here, so no ``transformers.Cache`` is
    involved and nothing depends on the Cache API, which changed across 5.x releases.
    """

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.prefix_k: list[torch.Tensor | None] = [None] * n_layers  # [KVH, C, D]
        self.prefix_v: list[torch.Tensor | None] = [None] * n_layers
        self.row_k: list[torch.Tensor | None] = [None] * n_layers  # [N, KVH, L, D]
        self.row_v: list[torch.Tensor | None] = [None] * n_layers
        self.mode = "prefix"
        self.n_rows = 0
        self.capacity = 0  # L, slots per row
        self.row_bias: torch.Tensor | None = None  # [N, L] fp32: 0 for a real token, _MASKED for padding
        # set before each rows-mode forward:
        self.t0 = 0  # first slot written by this forward
        self.bias: torch.Tensor | None = None  # [N, 1, 1, q, t0+q] mask for this forward

    @property
    def prefix_len(self) -> int:
        k = self.prefix_k[0]
        return 0 if k is None else k.shape[1]

    def start_rows(self, n_rows: int, capacity: int, device) -> None:
        self.mode = "rows"
        self.n_rows, self.capacity = n_rows, capacity
        self.row_k = [None] * self.n_layers
        self.row_v = [None] * self.n_layers
        self.row_bias = torch.full((n_rows, capacity), _MASKED, dtype=torch.float32, device=device)

    def prepare_step(self, t0: int, q: int, valid: torch.Tensor | None = None) -> None:
        """Mark slots [t0, t0+q) (those ``valid`` says are real) and build this forward's mask."""
        if valid is None:
            self.row_bias[:, t0:t0 + q] = 0.0
        else:
            self.row_bias[:, t0:t0 + q] = torch.where(valid, 0.0, _MASKED)
        self.t0 = t0
        t1 = t0 + q
        bias = self.row_bias[:, :t1]
        if q == 1:
            self.bias = bias[:, None, None, None, :]  # a view: no per-step allocation
        else:
            # causal inside the row segment: query a (slot t0+a) sees slots <= t0+a
            slots = torch.arange(t1, device=bias.device)
            qpos = torch.arange(t0, t1, device=bias.device)
            causal = torch.where(slots[None, :] <= qpos[:, None], 0.0, _MASKED)  # [q, t1]
            self.bias = (bias[:, None, :] + causal[None]).clamp_min(_MASKED)[:, None, None]

    def repeat_rows(self, k: int) -> None:
        """One row per prompt -> k rows per prompt (a copy of the row buffers only, once)."""
        if k == 1:
            return
        for i in range(self.n_layers):
            self.row_k[i] = self.row_k[i].repeat_interleave(k, dim=0)
            self.row_v[i] = self.row_v[i].repeat_interleave(k, dim=0)
        self.row_bias = self.row_bias.repeat_interleave(k, dim=0)
        self.n_rows *= k

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop finished rows so later steps do no work for them."""
        for i in range(self.n_layers):
            self.row_k[i] = self.row_k[i].index_select(0, keep)
            self.row_v[i] = self.row_v[i].index_select(0, keep)
        self.row_bias = self.row_bias.index_select(0, keep)
        self.n_rows = keep.numel()

    # -- called from inside the model's forward -------------------------------------------------

    def attend(self, module, query, key, value, scaling, kwargs):
        layer = module.layer_idx
        if self.mode == "prefix":
            # Keep one contiguous copy per layer (batch is 1) for the decode-time matmuls.
            self.prefix_k[layer] = key[0].contiguous()
            self.prefix_v[layer] = value[0].contiguous()
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            # The model's own causal SDPA, as generate's prefill would run it.
            return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True)
        return self._attend_rows(layer, query, key, value, scaling)

    def _attend_rows(self, layer, query, key, value, scaling):
        n, h, q, d = query.shape
        kvh = key.shape[1]
        g = h // kvh
        t0, t1 = self.t0, self.t0 + q
        if self.row_k[layer] is None:  # first rows-mode forward: allocate the whole buffer once
            shape = (n, kvh, self.capacity, d)
            self.row_k[layer] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.row_v[layer] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        rk, rv = self.row_k[layer], self.row_v[layer]
        rk[:, :, t0:t1] = key  # in place: no per-step concatenation
        rv[:, :, t0:t1] = value
        if scaling is None:
            scaling = d ** -0.5
        # Query head j*g+i uses kv head j (transformers' repeat_kv layout), so grouping the g
        # query heads of a kv head lets one matmul serve them without expanding K/V g times.
        qg = query.reshape(n, kvh, g * q, d)
        # --- per-row segment: remainder + generated tokens
        s_r = torch.matmul(qg, rk[:, :, :t1].transpose(-1, -2)).float() * scaling  # [n, kvh, g*q, t1]
        s_r = (s_r.view(n, kvh, g, q, t1) + self.bias).view(n, kvh, g * q, t1)
        m = s_r.amax(-1, keepdim=True)
        pk = self.prefix_k[layer]
        if pk is None:  # no shared prefix: plain softmax over the row segment
            e_r = torch.exp(s_r - m)
            out = torch.matmul(e_r.to(rv.dtype), rv[:, :, :t1]).float() / e_r.sum(-1, keepdim=True)
        else:
            # --- shared prefix: all n rows' queries of a kv head against its single key copy
            qp = qg.permute(1, 0, 2, 3).reshape(kvh, n * g * q, d)
            s_p = torch.matmul(qp, pk.transpose(-1, -2)).float() * scaling  # [kvh, n*g*q, c]
            m_p = s_p.amax(-1, keepdim=True)
            e_p = torch.exp(s_p - m_p)
            l_p = e_p.sum(-1, keepdim=True)
            o_p = torch.matmul(e_p.to(value.dtype), self.prefix_v[layer]).float()  # [kvh, n*g*q, d]
            # back to the row layout (small tensors: d or 1 wide, never the c-long scores)
            o_p = o_p.view(kvh, n, g * q, d).transpose(0, 1)
            l_p = l_p.view(kvh, n, g * q, 1).transpose(0, 1)
            m_p = m_p.view(kvh, n, g * q, 1).transpose(0, 1)
            # log-sum-exp merge of the two partial softmaxes
            m_all = torch.maximum(m, m_p)
            e_r = torch.exp(s_r - m_all)
            a_p = torch.exp(m_p - m_all)
            num = torch.matmul(e_r.to(rv.dtype), rv[:, :, :t1]).float() + o_p * a_p
            out = num / (e_r.sum(-1, keepdim=True) + l_p * a_p)
        # [n, kvh, g*q, d] -> [n, q, h, d], the layout attention functions return
        out = out.to(query.dtype).view(n, h, q, d).transpose(1, 2).contiguous()
        return out, None


def _shared_prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    store = _ACTIVE.get()
    if store is None:
        # Outside sample_k (e.g. the model is used elsewhere while switched): behave as sdpa.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return store.attend(module, query, key, value, scaling, kwargs)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, _shared_prefix_attention)
        _REGISTERED = True


def _supports_shared_prefix(model, total_len: int) -> bool:
    """Whether the hand-written attention reproduces this model's attention exactly."""
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and total_len > window:
        return False
    if getattr(cfg, "attn_logit_softcapping", None) or getattr(cfg, "attention_sink", None):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    if not hasattr(model, "set_attn_implementation"):
        return False
    # every attention module must expose its layer index (the store is keyed by it)
    attn = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    return bool(attn) and all(isinstance(getattr(m, "layer_idx", None), int) for m in attn)


def resolve_sampler(lm, sampler: str = "auto") -> str:
    """What ``sample_k(lm, ..., sampler=sampler)`` runs, for logs: :func:`pick_sampler`'s answer, or
    ``generate`` for a model the shared-prefill sampler cannot reproduce (seq2seq, and the other
    cases of ``_supports_shared_prefix``; a sliding window counts only for prompts longer than it)."""
    path = pick_sampler(sampler, lm.device)
    if path == "shared_prefix" and (lm.is_seq2seq or not _supports_shared_prefix(lm.model, 0)):
        return "generate"
    return path


# --------------------------------------------------------------------------------------------
# sampling and finishing
# --------------------------------------------------------------------------------------------


def _eos_ids(lm) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(lm.model, "generation_config", None)
    for src in (getattr(gen_cfg, "eos_token_id", None), getattr(lm.tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        ids.update(int(i) for i in (src if isinstance(src, (list, tuple)) else [src]))
    return ids


def _pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from fp32 logits [n, vocab]."""
    if params.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass, so the
        # most likely token always survives
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class _Track:
    """One sample's tokens and when it ends (EOS, a stop string, or length)."""

    __slots__ = ("tokens", "reason")

    def __init__(self):
        self.tokens: list[int] = []
        self.reason: str | None = None


class _Finisher:
    def __init__(self, tokenizer, params: SamplingParams, eos: set[int], ignore_eos: bool):
        self.tok = tokenizer
        self.stop = tuple(s for s in params.stop if s)
        self.eos = set() if ignore_eos else eos
        self.ignore_eos = ignore_eos
        self.eos_all = sorted(eos)  # masked out of the logits when ignore_eos
        self.max_new = params.max_new_tokens
        # A stop string ending at the newest token lies within its last len(stop)+1 tokens
        # (every token decodes to at least one character), so only that tail is decoded each
        # step instead of the whole growing completion.
        self.window = max((len(s) for s in self.stop), default=0) + 1

    def push(self, tr: _Track, token: int) -> bool:
        tr.tokens.append(token)
        if token in self.eos:
            tr.reason = "eos"
        elif self.stop and not self.ignore_eos and self._hit_stop(tr.tokens):
            tr.reason = "stop"
        elif len(tr.tokens) >= self.max_new:
            tr.reason = "length"
        return tr.reason is not None

    def _hit_stop(self, tokens: list[int]) -> bool:
        tail = self.tok.decode(tokens[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stop)

    def sample(self, tr: _Track) -> Sample:
        toks = tr.tokens[:-1] if tr.reason == "eos" else tr.tokens
        text = self.tok.decode(toks, skip_special_tokens=True)
        text = truncate_at_stop(text, self.stop).strip()
        return Sample(text=text, n_tokens=len(tr.tokens), finish_reason=tr.reason or "length",
                      token_ids=list(tr.tokens))


# --------------------------------------------------------------------------------------------
# the shared-prefix path
# --------------------------------------------------------------------------------------------


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _plan_prefix(batch: Sequence[Sequence[int]], call_prefix: int) -> int:
    """Prefix length for a batch: the call-wide one (already prefilled) or the batch's own.

    Every prompt keeps at least one token outside the prefix: the forward over the remainders
    yields each prompt's first-token logits. The call-wide prefix is reused when the extra
    remainder tokens it costs the batch (prefilled with the hand-written attention, counted 1.5x)
    are fewer than the tokens a fresh batch prefix would cost.
    """
    own = min(_common_prefix_len(batch), min(len(s) for s in batch) - 1)
    if call_prefix <= 0 or call_prefix >= own:  # (it is never longer: it is common to all prompts)
        return own
    extra = 1.5 * len(batch) * (own - call_prefix)
    return call_prefix if extra < own else own


def _forward(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def _sample_batch_shared(lm, batch_ids: list[list[int]], params: SamplingParams, gen, finisher: _Finisher,
                         prefix_cache: dict, abort: Callable[[], bool] | None = None) -> list[list[Sample]]:
    model, device = lm.model, lm.device
    k = params.num_samples
    rows_per_prompt = 1 if params.temperature <= 0 else k  # greedy rows are identical: decode one
    call_len, call_store = prefix_cache.get("len", 0), prefix_cache.get("store")
    c = _plan_prefix(batch_ids, call_len if call_store is not None else 0)
    n_layers = model.config.num_hidden_layers

    store = _KVStore(n_layers)
    token = _ACTIVE.set(store)
    try:
        # 1) the shared prefix, once
        if call_store is not None and c == call_len:
            store.prefix_k, store.prefix_v = list(call_store.prefix_k), list(call_store.prefix_v)
        elif c > 0:
            ids = torch.tensor([batch_ids[0][:c]], device=device)
            pos = torch.arange(c, device=device)[None]
            model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1)
        # 2) each prompt's remainder, one row per prompt, left-padded so the last prompt tokens
        # share a slot; chunked to bound the hand-written attention's score tensor
        rem = [s[c:] for s in batch_ids]
        b, r = len(rem), max(len(x) for x in rem)
        pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        ids = torch.full((b, r), pad_id, dtype=torch.long, device=device)
        pos = torch.full((b, r), c, dtype=torch.long, device=device)
        valid = torch.zeros((b, r), dtype=torch.bool, device=device)
        for i, x in enumerate(rem):
            ids[i, r - len(x):] = torch.tensor(x, device=device)
            pos[i, r - len(x):] = torch.arange(c, c + len(x), device=device)
            valid[i, r - len(x):] = True
        store.start_rows(b, r + params.max_new_tokens, device)
        for t0 in range(0, r, _PREFILL_CHUNK):
            t1 = min(r, t0 + _PREFILL_CHUNK)
            store.prepare_step(t0, t1 - t0, valid[:, t0:t1])
            logits = _forward(model, ids[:, t0:t1], pos[:, t0:t1])
        # 3) decode: k rows per prompt, the prefix still one copy
        store.repeat_rows(rows_per_prompt)
        logits = logits.repeat_interleave(rows_per_prompt, dim=0)
        next_pos = torch.tensor([c + len(x) for x in rem], device=device).repeat_interleave(rows_per_prompt)
        tracks = [_Track() for _ in range(b * rows_per_prompt)]
        alive = list(range(len(tracks)))  # track index of each live row
        # each row (sample) counts its own generated tokens; None with the defaults: no extra work
        counts = (penalties.RowCounts(params, len(tracks), logits.shape[-1], device)
                  if penalties.active(params) else None)
        # the calculator's forced ids, queued per track; None when off: no per-step decoding
        injector = Injector(lm.tokenizer) if params.calculator else None
        slot = r
        while True:
            if abort is not None and abort():
                raise Aborted("sampling aborted by its caller")
            if counts is not None:
                logits = counts.apply(logits)
            if finisher.ignore_eos and finisher.eos_all:
                logits[:, finisher.eos_all] = float("-inf")
            nxt = _pick(logits, params, gen)  # drawn for every row: forcing one leaves the others' draws
            if injector is not None and injector.queues:
                _force(nxt, alive, injector)
            if counts is not None:
                counts.record(nxt)
            keep = []
            for j, tok_id in enumerate(nxt.tolist()):
                track = tracks[alive[j]]
                if not finisher.push(track, tok_id):
                    keep.append(j)
                    if injector is not None:
                        injector.after(alive[j], track.tokens)
                elif injector is not None:
                    injector.drop(alive[j])
            if not keep:
                break
            if len(keep) < len(alive):
                keep_t = torch.tensor(keep, device=device)
                store.keep_rows(keep_t)
                if counts is not None:
                    counts.keep(keep_t)
                nxt, next_pos = nxt[keep_t], next_pos[keep_t]
                alive = [alive[j] for j in keep]
            store.prepare_step(slot, 1)
            logits = _forward(model, nxt[:, None], next_pos[:, None])
            next_pos = next_pos + 1
            slot += 1
    finally:
        _ACTIVE.reset(token)
    samples = [finisher.sample(t) for t in tracks]
    if rows_per_prompt == 1 and k > 1:
        return [[Sample(s.text, s.n_tokens, s.finish_reason, list(s.token_ids)) for _ in range(k)] for s in samples]
    return [samples[i * k:(i + 1) * k] for i in range(b)]


def _force(nxt: torch.Tensor, alive: list[int], injector: Injector) -> None:
    """Replace, in place, the picked token of each row with a queued calculator id (logits ignored)."""
    for j, track in enumerate(alive):
        forced = injector.pop(track)
        if forced is not None:
            nxt[j] = forced


# --------------------------------------------------------------------------------------------
# the generate() fallback (seq2seq, unsupported attention)
# --------------------------------------------------------------------------------------------


def _sample_batch_generate(lm, batch_ids: list[list[int]], params: SamplingParams, finisher: _Finisher,
                           seed_offset: int, abort: Callable[[], bool] | None = None) -> list[list[Sample]]:
    tok, model, device = lm.tokenizer, lm.model, lm.device
    k = params.num_samples
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    b, width = len(batch_ids), max(len(x) for x in batch_ids)
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((b, width), dtype=torch.long, device=device)
    for i, x in enumerate(batch_ids):
        # left padding for decoder-only models keeps each prompt's last token next to its first
        # new one; the encoder of a seq2seq model ignores the side through the mask
        ids[i, width - len(x):] = torch.tensor(x, device=device)
        mask[i, width - len(x):] = 1
    # greedy rows are identical: decode one per prompt and repeat it (generate also refuses
    # num_return_sequences > 1 without sampling)
    rows = k if params.temperature > 0 else 1
    kw = dict(max_new_tokens=params.max_new_tokens, num_return_sequences=rows, pad_token_id=pad_id)
    if params.temperature > 0:
        kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if finisher.ignore_eos:
        kw.update(min_new_tokens=params.max_new_tokens)
    elif finisher.stop:
        kw.update(stop_strings=list(finisher.stop), tokenizer=tok)
    if abort is not None:
        kw.update(stopping_criteria=_abort_criteria(abort))
    # generated tokens start after the decoder start token (seq2seq) or the padded prompts
    processor = logits_processors(params, tok, 1 if lm.is_seq2seq else width)
    if processor is not None:
        kw.update(logits_processor=processor)
    torch.manual_seed(params.seed + seed_offset)
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    if abort is not None and abort():
        raise Aborted("sampling aborted by its caller")
    # seq2seq outputs start with the decoder start token; causal ones repeat the prompt
    new = out[:, 1:] if lm.is_seq2seq else out[:, width:]
    results = []
    for i in range(b):
        group = []
        for row in new[i * rows:(i + 1) * rows].tolist():
            tr = _Track()
            for t in row:  # replay through the same rules, so reasons and counts match the fast path
                if finisher.push(tr, t):
                    break
            group.append(finisher.sample(tr))
        if rows < k:
            group = [Sample(s.text, s.n_tokens, s.finish_reason, list(s.token_ids)) for s in group * k]
        results.append(group)
    return results


def _abort_criteria(abort: Callable[[], bool]):
    """A stopping criterion that ends every row of ``generate`` once ``abort()`` is true."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Abort(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(abort()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Abort()])


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def sample_k(lm, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams, *, add_special_tokens: bool = True,
             batch_size: int = 1, progress: bool = False, ignore_eos: bool = False,
             abort: Callable[[], bool] | None = None, sampler: str = "auto") -> list[list[Sample]]:
    """``params.num_samples`` samples for each prompt, in prompt order.

    ``lm`` is a ``synthtune.models.LoadedModel`` (or anything with ``.model``, ``.tokenizer``,
    ``.is_seq2seq``, ``.device``). ``ignore_eos`` (for benchmarks) forbids EOS and ignores
    stop strings, so every sample has exactly ``max_new_tokens`` tokens.
    Sampling is reproducible for a given seed, prompts and batch_size (one generator drives the
    whole call, so a different batch_size draws differently).
    ``abort`` is polled once per decoding step; when it returns true the call raises ``Aborted``.
    ``sampler`` picks the path (:func:`pick_sampler`); ``shared_prefix`` still falls back to
    ``generate`` for a model whose attention the shared-prefill sampler cannot reproduce.
    """
    if params.num_samples < 1:
        raise ValueError("num_samples must be >= 1")
    if params.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    # bad values fail here, before any forward pass; token ids are checked against the logits' width
    # once there are logits (the tokenizer's length can differ from the model's vocabulary)
    penalties.check(params)
    path = pick_sampler(sampler, lm.device)
    if not prompts:
        return []
    tok, model = lm.tokenizer, lm.model
    # a prompt may also be given as token ids (already tokenized; the tokenizer then only decodes)
    all_ids = [tok(p, add_special_tokens=add_special_tokens)["input_ids"] if isinstance(p, str) else [int(t) for t in p]
               for p in prompts]
    if any(len(x) == 0 for x in all_ids):
        raise ValueError("a prompt tokenized to nothing; pass non-empty prompts or add_special_tokens=True")
    eos = _eos_ids(lm)
    finisher = _Finisher(tok, params, eos, ignore_eos)
    total = max(len(x) for x in all_ids) + params.max_new_tokens
    fast = path == "shared_prefix" and not lm.is_seq2seq and _supports_shared_prefix(model, total)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="sampling", unit="prompt")
        except ImportError:
            bar = None
    batch_size = max(1, batch_size)
    results: list[list[Sample]] = []
    with torch.inference_mode():
        if not fast:
            for start in range(0, len(all_ids), batch_size):
                batch = all_ids[start:start + batch_size]
                results.extend(_sample_batch_generate(lm, batch, params, finisher, start, abort))
                if bar is not None:
                    bar.update(len(batch))
        else:
            _register()
            gen = None
            if params.temperature > 0:
                gen = torch.Generator(device=torch.device(lm.device)).manual_seed(params.seed)
            # a prefix common to the whole call is prefilled by the first batch that uses it, then reused
            want = min(_common_prefix_len(all_ids), min(len(x) for x in all_ids) - 1) if len(all_ids) > 1 else 0
            prefix_cache: dict = {"want": want}
            previous = model.config._attn_implementation
            model.set_attn_implementation(ATTN_NAME)
            try:
                for start in range(0, len(all_ids), batch_size):
                    batch = all_ids[start:start + batch_size]
                    if want >= 32 and prefix_cache.get("store") is None and _plan_prefix(batch, want) == want:
                        _prefill_call_prefix(lm, all_ids[0][:want], prefix_cache)
                    results.extend(_sample_batch_shared(lm, batch, params, gen, finisher, prefix_cache, abort))
                    if bar is not None:
                        bar.update(len(batch))
            finally:
                model.set_attn_implementation(previous)
    if bar is not None:
        bar.close()
    return results


def _prefill_call_prefix(lm, ids: list[int], prefix_cache: dict) -> None:
    """Prefill the prefix shared by every prompt of the call, once, for all batches."""
    store = _KVStore(lm.model.config.num_hidden_layers)
    token = _ACTIVE.set(store)
    try:
        t = torch.tensor([ids], device=lm.device)
        lm.model(input_ids=t, position_ids=torch.arange(len(ids), device=lm.device)[None], use_cache=False,
                 logits_to_keep=1)
    finally:
        _ACTIVE.reset(token)
    prefix_cache.update(len=len(ids), store=store)


def complete(lm, prompts: Sequence[str], params: SamplingParams, *, batch_size: int = 8,
             add_special_tokens: bool = True, progress: bool = True, desc: str = "generating",
             sampler: str = "auto") -> list[list[str]]:
    """``params.num_samples`` completions per prompt: batched greedy/sampled ``generate`` for one,
    ``sample_k`` for several (the shared-prefill sampler, or ``generate``: ``sampler``)."""
    pick_sampler(sampler, lm.device)  # a bad choice fails whatever num_samples is
    if params.num_samples == 1:
        return generate(lm, prompts, params, batch_size=batch_size, add_special_tokens=add_special_tokens,
                        progress=progress, desc=desc)
    return [[s.text for s in samples] for samples in
            sample_k(lm, prompts, params, add_special_tokens=add_special_tokens, progress=progress, sampler=sampler)]
