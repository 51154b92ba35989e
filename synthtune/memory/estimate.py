"""Analytical, LoRA-aware estimate of the peak GPU memory of one training step.

The estimate follows what PyTorch actually keeps alive, phase by phase:

* **before the forward:** weights + optimizer states (+ ZeRO sharding / offload);
* **forward:** + the tensors autograd saves for the backward (walked op by op below, with the
  dedup that autograd does: a tensor saved by two ops is stored once), + the bf16 weight copies
  autocast makes, + the logits and the loss's fp32 upcast;
* **backward:** the logits' gradient at the start; at the end, all gradients (+ the embedding's
  dense gradient); with checkpointing, one recomputed layer on top;
* **optimizer step:** weights + states + gradients + the foreach temporaries.

The peak is the largest of these. Each term's byte count is derived from the modelling code
(transformers' Llama/Qwen2/T5 layers, peft's LoRA layer, torch's autocast rules) and checked
against measurements: saved-tensor bytes on CPU (``synthtune.memory.measure``) and
``torch.cuda.max_memory_allocated`` on an H200 (``bench/results/memory_gpu_h200.jsonl``).
``bench/memory_validation.py`` prints estimate vs measurement for every row.

Not modelled: padding masks that make SDPA repeat GQA keys/values (a few % on GQA models),
allocator fragmentation (``reserved`` is typically 5-25% above ``allocated``), fp16 loss scaling,
tensor/pipeline parallelism.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from synthtune.memory.shape import ModelShape, resolve_targets

GIB = float(1 << 30)

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16", "bf16-mixed")
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
OFFLOADS = ("none", "optimizer", "all")
ATTNS = ("sdpa", "flash", "eager")
LOSS_IMPLS = ("standard", "chunked")
#: The chunked loss's tokens per chunk: synthtune.train.loss.LOSS_CHUNK_TOKENS (a test keeps them equal;
#: the training code sits above this package and cannot be imported from here).
LOSS_CHUNK_TOKENS = 1024

#: The one constant read off the H200 table rather than derived: what a process holds besides
#: tensors (cuBLAS workspaces: the 0.0625 GiB that persists between configs in
#: ``memory_gpu_h200.jsonl``'s ``baseline_gib``).
OVERHEAD_GIB = 0.0625


@dataclass
class Setup:
    """One training configuration, as on the command line."""

    method: str = "full"  # full | lora | qlora (4-bit NF4 base, bf16 compute)
    lora_r: int = 8
    lora_targets: str = "q,v"  # comma list of module names, or all-linear
    lora_dropout: float = 0.0  # >0 stores a 1-byte mask and its own input copy per adapted linear
    precision: str = "bf16-mixed"  # fp32 | bf16 (bf16 weights + autocast) | bf16-mixed (fp32 weights + autocast)
    optimizer: str = "adamw"  # adamw | adamw-8bit | sgd (no momentum)
    zero_stage: int = 0
    offload: str = "none"  # none | optimizer | all (ZeRO-3: parameters too)
    gpus: int = 1  # per node
    nodes: int = 1
    batch_size: int = 1  # micro-batch per GPU
    seq_len: int = 256  # causal: tokens; seq2seq: encoder length
    target_len: int | None = None  # seq2seq decoder length (default: seq_len)
    grad_ckpt: bool = False
    attn: str = "sdpa"  # sdpa | flash | eager
    loss_impl: str = "standard"  # standard | chunked (the logits of LOSS_CHUNK_TOKENS tokens at a time)
    # ZeRO-3 keeps parameters of at most this many elements whole on every rank (besides their
    # partition; DeepSpeed's test is ds_numel <= threshold): DeepSpeed's stage3_param_persistence_threshold, default 1e5. LoRA matrices of
    # r x hidden usually fall under it; accelerate sets 10 x hidden only where a config says auto.
    persistence_threshold: int = 100_000

    def check(self) -> None:
        for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("optimizer", OPTIMIZERS),
                              ("offload", OFFLOADS), ("attn", ATTNS), ("loss_impl", LOSS_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError("zero_stage must be 0, 1, 2 or 3")
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError("offload needs ZeRO (zero_stage >= 1; 'all' needs 3)")
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError("offload=all (parameters too) needs zero_stage 3")
        if self.loss_impl == "chunked" and self.zero_stage == 3:
            raise ValueError("loss_impl=chunked runs the lm_head outside the forward, which ZeRO-3 does not gather "
                             "for: the training loop refuses it; use loss_impl=standard with zero_stage 3")
        if min(self.gpus, self.nodes, self.batch_size, self.seq_len) < 1:
            raise ValueError("gpus, nodes, batch_size and seq_len must be >= 1")

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


@dataclass
class Estimate:
    per_gpu_gib: float
    params: int
    trainable_params: int
    breakdown: dict[str, float]  # GiB at the peak moment; sums to per_gpu_gib
    peak_phase: str
    phases_gib: dict[str, float]
    model_states_gib: dict[str, float]  # full sizes per GPU: weights, gradients, optimizer
    # the same in bytes, unrounded: what one rank's DeepSpeed partitions hold (padding aside),
    # compared with the real partitions in tests/test_multirank_extra.py
    model_states_bytes: dict[str, int]
    cpu_gib: float  # host memory for offloaded states
    bytes_per_param: float  # model states per trainable-or-not parameter, before sharding
    notes: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return d


# ---------------------------------------------------------------------------------------------
# saved activations: an op-by-op walk, per token, with autograd's dedup
# ---------------------------------------------------------------------------------------------


class _Saved:
    """Bytes that autograd keeps, keyed by tensor so that a tensor saved twice counts once."""

    def __init__(self) -> None:
        self.items: dict[str, float] = {}

    def add(self, key: str, nbytes: float) -> None:
        self.items[key] = max(self.items.get(key, 0.0), nbytes)

    def total(self) -> float:
        return sum(self.items.values())


@dataclass
class _Ctx:
    shape: ModelShape
    setup: Setup
    auto: bool  # autocast to bf16 is on
    a: int  # bytes of a matmul output (bf16 under autocast, else fp32)
    resid: int  # bytes of the residual stream (dtype of the embeddings' output)
    full: bool
    adapted: set  # module leaf names with a LoRA adapter
    r: int
    dropout: float


def _ctx(shape: ModelShape, s: Setup) -> _Ctx:
    auto = s.precision != "fp32"
    # bf16 weights make a bf16 residual stream; fp32 weights (bf16-mixed, fp32) an fp32 one.
    # QLoRA keeps embeddings and norms in bf16 here (prepare_model_for_kbit_training would
    # upcast them to fp32: then choose --precision bf16-mixed).
    resid = 2 if (s.precision == "bf16" or (s.method == "qlora" and s.precision != "fp32")) else 4
    adapted: set = set()
    if s.method in ("lora", "qlora"):
        adapted = {lin.name.rsplit(".", 1)[-1] for lin in shape.lora_linears(resolve_targets(shape, s.lora_targets))}
    return _Ctx(shape=shape, setup=s, auto=auto, a=2 if auto else 4, resid=resid, full=s.method == "full",
                adapted=adapted, r=s.lora_r, dropout=s.lora_dropout)


def _linear_input(S: _Saved, c: _Ctx, key: str, in_bytes: int, in_f: int, module: str) -> None:
    """What a linear keeps of its input: only what its weight gradient needs."""
    if c.full:
        # dW = dY^T X needs X. Autocast casts an fp32 input to bf16 for each linear separately
        # (it caches casts of weights only), so q/k/v each keep their own copy.
        if c.auto and in_bytes == 4:
            S.add(f"{key}>{module}", 2 * in_f)
        else:
            S.add(key, in_bytes * in_f)
    if module in c.adapted:
        # peft casts x to the adapter dtype (fp32) and applies dropout; lora_A then runs under
        # autocast, which casts back to bf16: every adapted linear keeps its own copy of x.
        if c.auto:
            S.add(f"{key}>{module}.lora", 2 * in_f)
        elif c.dropout > 0:
            S.add(f"{key}>{module}.drop", 4 * in_f)
        else:
            S.add(key, 4 * in_f)
        if c.dropout > 0:
            S.add(f"{key}>{module}.mask", in_f)  # bool dropout mask
        S.add(f"{module}.lora_mid", c.a * c.r)  # lora_B's input
    # a frozen, unadapted linear keeps nothing: dX = dY W needs only W.


def _rms_norm(S: _Saved, c: _Ctx, tag: str, h: int, trainable: bool) -> tuple[str, int]:
    """Llama/T5 RMSNorm: fp32 variance, then weight * normalized."""
    # x.to(fp32) (a copy for a bf16 stream, the stream itself for fp32) is kept by pow/mul.
    S.add(f"{tag}.x32", 4 * h)
    S.add(f"{tag}.rsqrt", 4)
    if trainable:
        # dweight needs the normalized input: bf16 after .to(bf16) on a bf16 stream, else fp32.
        S.add(f"{tag}.normed", (2 if c.resid == 2 else 4) * h)
    return f"{tag}.out", c.resid


def _causal_layer(c: _Ctx) -> tuple[float, float]:
    """Bytes per token for one Llama-style decoder layer: (linear part, per-key-position part)."""
    sh, a = c.shape, c.a
    h, q, kv, i = sh.hidden, sh.inner, sh.kv_dim, sh.intermediate
    S = _Saved()
    x, xb = _rms_norm(S, c, "n1", h, c.full)
    for m in ("q_proj", "k_proj", "v_proj"):
        _linear_input(S, c, x, xb, h, m)
    quad = 0.0
    if c.setup.attn in ("sdpa", "flash") and c.auto:
        # flash / memory-efficient SDPA keep q (after RoPE), k, v, the output and the logsumexp;
        # GQA is native (enable_gqa), so k and v stay at kv width. Only the token count matters.
        S.add("q_rot", a * q)
        S.add("k_rot", a * kv)
        S.add("v", a * kv)
        S.add("attn_out", a * q)
        S.add("lse", 4 * sh.heads)
    elif c.setup.attn in ("sdpa", "flash"):
        # fp32 without autocast: flash needs half precision, so SDPA falls back to a path that
        # keeps the fp32 probabilities (measured on the H200: ~4 bytes x heads x S per token).
        S.add("q_rot", a * q)
        S.add("k_rot", a * kv)
        S.add("v", a * kv)
        S.add("attn_out", a * q)
        quad = sh.heads * 4
    else:
        # eager: repeat_kv copies k and v to all heads; softmax runs in fp32 and keeps its output,
        # the bf16 cast of the probabilities is kept by probs @ v: S x S per head.
        S.add("q_rot", a * q)
        S.add("k_rep", a * q)
        S.add("v_rep", a * q)
        quad = sh.heads * (4 + (2 if c.auto else 0))
    _linear_input(S, c, "attn_ctx", a, q, "o_proj")
    x, xb = _rms_norm(S, c, "n2", h, c.full)
    if sh.gated_mlp:
        _linear_input(S, c, x, xb, h, "gate_proj")
        _linear_input(S, c, x, xb, h, "up_proj")
        S.add("gate", a * i)  # silu keeps its input
        S.add("act", a * i)  # act * up keeps both factors
        S.add("up", a * i)
        _linear_input(S, c, "prod", a, i, "down_proj")
    else:
        _linear_input(S, c, x, xb, h, "fc1")
        S.add("fc1_out", a * i)
        _linear_input(S, c, "act", a, i, "fc2")
    return S.total(), quad


def _t5_block_ff(S: _Saved, c: _Ctx, tag: str, d: int, f: int) -> None:
    sh, a, p = c.shape, c.a, c.shape.dropout
    x, xb = _rms_norm(S, c, f"{tag}.ffn", d, c.full)
    if sh.gated_mlp:
        _linear_input(S, c, x, xb, d, "wi_0")
        _linear_input(S, c, x, xb, d, "wi_1")
        if sh.mlp_act == "gelu_new":
            # 0.5*x*(1+tanh(k*(x+0.044715*x**3))): autocast runs pow in fp32, and every factor
            # of the two products is kept: fp32 x, 0.5x, tanh, 1+tanh, gelu(x) (fp32).
            S.add(f"{tag}.gelu", (4 + 2 + 4 + 4 + 4) * f if c.auto else 20 * f)
        else:
            S.add(f"{tag}.act_in", a * f)
            S.add(f"{tag}.act", (4 if c.auto and c.resid == 4 else a) * f)
        S.add(f"{tag}.lin", a * f)  # wi_1 output, kept by the gating product
    else:
        _linear_input(S, c, x, xb, d, "wi")
        S.add(f"{tag}.act_in", a * f)
    if p > 0:
        S.add(f"{tag}.ff_mask", f)
    # T5 casts the FF output to wo's dtype: bf16 with bf16 weights, fp32 with fp32 ones.
    _linear_input(S, c, f"{tag}.ff_out", 2 if c.resid == 2 else 4, f, "wo")
    if p > 0:
        S.add(f"{tag}.res_mask", d)


def _t5_attention(S: _Saved, c: _Ctx, tag: str, d: int, kv_from_encoder: bool) -> float:
    """Self- or cross-attention: returns the per-key-position bytes (T5 keeps the S x S probs)."""
    sh, a, p = c.shape, c.a, c.shape.dropout
    inner = sh.inner
    x, xb = _rms_norm(S, c, f"{tag}.n", d, c.full)
    _linear_input(S, c, x, xb, d, "q")
    if not kv_from_encoder:
        _linear_input(S, c, x, xb, d, "k")
        _linear_input(S, c, x, xb, d, "v")
        S.add(f"{tag}.k", a * inner)
        S.add(f"{tag}.v", a * inner)
    S.add(f"{tag}.q", a * inner)
    S.add(f"{tag}.out", a * inner)
    _linear_input(S, c, f"{tag}.ctx", a, inner, "o")
    if p > 0:
        S.add(f"{tag}.res_mask", d)
    # T5 adds a learned relative-position bias (a float mask that needs a gradient), which keeps
    # SDPA on its math path: fp32 softmax output, dropout mask, and the bf16 probs for @ v.
    return sh.heads * (4 + (1 if p > 0 else 0) + (2 if c.auto else (4 if p > 0 else 0)))


def _t5_layers(c: _Ctx) -> dict[str, float]:
    """Per-token bytes of one encoder and one decoder layer, plus per-key-position parts."""
    sh = c.shape
    d, f = sh.hidden, sh.intermediate
    enc = _Saved()
    enc_quad = _t5_attention(enc, c, "sa", d, False)
    _t5_block_ff(enc, c, "ff", d, f)
    dec = _Saved()
    dec_self_quad = _t5_attention(dec, c, "sa", d, False)
    dec_cross_quad = _t5_attention(dec, c, "ca", d, True)
    _t5_block_ff(dec, c, "ff", d, f)
    # cross-attention keys/values: computed per decoder layer from every encoder token.
    per_enc_tok = _Saved()
    _linear_input(per_enc_tok, c, "enc_out", c.resid, d, "k")
    _linear_input(per_enc_tok, c, "enc_out", c.resid, d, "v")
    per_enc_tok.add("ck", c.a * sh.inner)
    per_enc_tok.add("cv", c.a * sh.inner)
    return dict(enc=enc.total(), enc_quad=enc_quad, dec=dec.total(), dec_self_quad=dec_self_quad,
                dec_cross_quad=dec_cross_quad, cross_kv_per_enc_token=per_enc_tok.total())


def _head(c: _Ctx) -> float:
    """Final norm + lm_head input, per output token (the logits are counted apart)."""
    S = _Saved()
    x, xb = _rms_norm(S, c, "final", c.shape.hidden, c.full)
    if c.full:
        _linear_input(S, c, x, xb, c.shape.hidden, "lm_head")
    return S.total()


@dataclass
class _Act:
    saved: float  # bytes kept from the forward to the backward (without weight copies)
    layer: float  # one layer recomputed under checkpointing (its saved bytes)
    ckpt_inputs: float  # checkpointed layer inputs (grad ckpt only)
    logits_tokens: int
    notes: list[str]


def _activations(shape: ModelShape, s: Setup) -> _Act:
    c = _ctx(shape, s)
    b = s.batch_size
    notes: list[str] = []
    if shape.arch == "causal":
        tok = b * s.seq_len
        lin, quad = _causal_layer(c)
        per_layer = tok * lin + b * quad * s.seq_len * s.seq_len
        head = tok * _head(c)
        layers = shape.layers
        full_saved = layers * per_layer + head
        # checkpointing keeps each layer's input (the residual stream) and recomputes the rest.
        ckpt_in = layers * tok * c.resid * shape.hidden + head
        one_layer = per_layer
        logits_tokens = tok
    else:
        t = s.target_len or s.seq_len
        enc_tok, dec_tok = b * s.seq_len, b * t
        L = _t5_layers(c)
        enc_layer = enc_tok * L["enc"] + b * L["enc_quad"] * s.seq_len ** 2
        dec_layer = (dec_tok * L["dec"] + b * L["dec_self_quad"] * t * t + b * L["dec_cross_quad"] * t * s.seq_len
                     + enc_tok * L["cross_kv_per_enc_token"])
        head = dec_tok * _head(c) + enc_tok * 4 * shape.hidden  # + encoder final norm
        drop = (enc_tok + dec_tok) * shape.hidden if shape.dropout > 0 else 0  # embedding dropout masks
        full_saved = shape.enc_layers * enc_layer + shape.layers * dec_layer + head + drop
        # layer inputs, plus the encoder output that every decoder layer takes as an input
        ckpt_in = ((shape.enc_layers * enc_tok + shape.layers * dec_tok) * c.resid
                   + enc_tok * c.resid) * shape.hidden + head + drop
        one_layer = max(enc_layer, dec_layer)
        logits_tokens = dec_tok
    if s.attn == "eager" and shape.arch == "causal":
        notes.append("eager attention keeps B*heads*S*S fp32+bf16 probabilities per layer: use sdpa/flash")
    if s.grad_ckpt:
        return _Act(saved=ckpt_in, layer=one_layer, ckpt_inputs=ckpt_in, logits_tokens=logits_tokens, notes=notes)
    return _Act(saved=full_saved, layer=0.0, ckpt_inputs=0.0, logits_tokens=logits_tokens, notes=notes)


# ---------------------------------------------------------------------------------------------
# model states
# ---------------------------------------------------------------------------------------------


def _qlora_weight_bytes(shape: ModelShape) -> float:
    # NF4: 4 bits per weight + double-quantized absmax (8-bit per 64 weights + fp32 per 256
    # blocks) = 4.127 bits (QLoRA paper, Dettmers et al. 2023). lm_head, embeddings and norms
    # stay in bf16.
    quant = shape.linear_params - shape.vocab * shape.hidden
    return quant * 4.127 / 8 + (shape.params - quant) * 2


def _persistent_bytes(shape: ModelShape, s: Setup, base_bytes_per_param: float) -> float:
    """ZeRO-3's whole copies of small parameters, held on every rank next to their partitions
    (DeepSpeed's ``ds_persist``: norms, biases, LoRA matrices; measured on 2 ranks)."""
    thr = s.persistence_threshold
    small = sum(n for n in shape.param_numels if n <= thr) * base_bytes_per_param
    if s.method in ("lora", "qlora"):
        for lin in shape.lora_linears(resolve_targets(shape, s.lora_targets)):
            small += 4.0 * sum(n for n in (s.lora_r * lin.in_features, lin.out_features * s.lora_r) if n <= thr)
    return small


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """Peak allocated GPU memory per GPU for one training step of ``setup`` on ``shape``."""
    s = setup
    s.check()
    if s.method == "qlora" and s.zero_stage == 3:
        raise ValueError("qlora with ZeRO-3 is not supported by this estimator (bitsandbytes 4-bit + ZeRO-3)")
    N = s.world
    notes: list[str] = []
    P = shape.params
    lora = s.method in ("lora", "qlora")
    T = shape.lora_params(s.lora_r, resolve_targets(shape, s.lora_targets)) if lora else P
    total_params = P + (T if lora else 0)

    # ---- bytes per parameter of each state (before sharding)
    deepspeed = s.zero_stage > 0
    if s.method == "full":
        if s.precision == "bf16-mixed" and deepspeed:
            # DeepSpeed bf16: bf16 working weights, fp32 master copy held by the optimizer.
            w_bytes, master, g_bytes = 2.0 * P, 4.0 * T, 4.0 * T
        else:
            pb = 2 if s.precision == "bf16" else 4
            w_bytes, master, g_bytes = float(pb * P), 0.0, float(pb * T)
        state_b = 2 if s.precision == "bf16" else 4  # AdamW states follow the parameter dtype
    else:
        base = _qlora_weight_bytes(shape) if s.method == "qlora" else (2 if s.precision != "fp32" else 4) * P
        if s.method == "lora" and s.precision == "bf16-mixed" and not deepspeed:
            base = 4.0 * P  # fp32 base under autocast (DeepSpeed's bf16 mode casts it to bf16)
        # peft keeps adapter weights in fp32 (autocast_adapter_dtype=True).
        w_bytes, master, g_bytes = base + 4.0 * T, 0.0, 4.0 * T
        state_b = 4
    if deepspeed and s.precision == "fp32":
        # DeepSpeed's ZeRO optimizers step an fp32 master partition that is a clone of the
        # trainable weights even when those are fp32 already: stage 1/2 always clone
        # (stage_1_and_2.py, weights_partition = ....clone()); stage 3 means to reuse fp32 weights
        # but tests `tensor.device == self.device` with a device *string* (stage3.py,
        # _create_fp32_partitions), which is never equal, so it clones too (DeepSpeed 0.19.8;
        # measured on 2 ranks, tests/test_multirank_extra.py).
        master = 4.0 * T
    if s.optimizer == "adamw":
        o_bytes = 2.0 * state_b * T
        opt_temp = float(state_b * T)  # foreach sqrt(exp_avg_sq): one state-sized temporary
    elif s.optimizer == "adamw-8bit":
        # bitsandbytes blockwise 8-bit: 1 byte per state + fp32 absmax per 2048-block; the update
        # runs in-kernel, no state-sized temporary.
        o_bytes = 2.0 * T * (1 + 4 / 2048)
        opt_temp = 0.0
    else:
        o_bytes = 0.0  # SGD without momentum (momentum adds one state: 4 bytes/param)
        opt_temp = 0.0
    o_bytes += master

    # ---- autocast's bf16 copies of fp32 weights (bf16-mixed / LoRA on fp32 base)
    copies = 0.0
    if s.precision == "bf16-mixed" and not deepspeed and s.method != "qlora":
        copies = 2.0 * shape.linear_params
    # model states + the bf16 working copy: 18 for bf16-mixed AdamW, whichever way it is built
    bytes_per_param = (w_bytes + g_bytes + o_bytes + copies) / P
    lm_head_copy = 2.0 * shape.vocab * shape.hidden if copies else 0.0

    # ---- sharding and offload
    w_gpu, g_gpu, o_gpu, cpu = w_bytes, g_bytes, o_bytes, 0.0
    if s.zero_stage >= 1:
        o_gpu = o_bytes / N
        # DeepSpeed steps its partition in sub-groups of sub_group_size (1e9 elements) at a time
        opt_temp = min(opt_temp / N, 4.0 * 1e9)
    if s.zero_stage >= 2:
        g_gpu = g_bytes / N
    gathered = 0.0
    if s.zero_stage == 3:
        if lora:
            w_gpu = (w_bytes - 4.0 * T) / N + 4.0 * T / N
        else:
            w_gpu = w_bytes / N
        if s.offload != "all":
            w_gpu += _persistent_bytes(shape, s, (w_bytes - (4.0 * T if lora else 0.0)) / P)
        # ZeRO-3 gathers one layer ahead (prefetch) plus the current one, in the compute dtype;
        # the untied lm_head / embedding matrices are gathered whole when used.
        n_layers = shape.layers + shape.enc_layers
        per_layer_p = (shape.linear_params - shape.vocab * shape.hidden) / max(n_layers, 1)
        gathered = 2 * 2.0 * per_layer_p + 2.0 * shape.vocab * shape.hidden
    if s.offload in ("optimizer", "all"):
        cpu += o_bytes / N * s.gpus  # host RAM per node
        o_gpu, opt_temp = 0.0, 0.0
        if s.zero_stage >= 2:
            cpu += 4.0 * T / N * s.gpus  # fp32 gradient partition lives on the CPU side
    if s.offload == "all":
        cpu += w_bytes / N * s.gpus
        w_gpu = 0.0
    if N > 1 and s.zero_stage == 0:
        # DDP keeps its own flat copy of the gradients in its all-reduce buckets
        # (gradient_as_bucket_view=False by default).
        g_gpu += g_bytes
        notes.append("DDP: gradient buckets add one gradient-sized copy")

    act = _activations(shape, s)
    notes += act.notes
    V = shape.vocab
    lt = act.logits_tokens
    upcast = 6.0 if s.precision != "fp32" else 4.0  # the logits (bf16 under autocast) + their fp32 copy
    if s.loss_impl == "chunked":
        # Each chunk of tokens runs lm_head + cross-entropy under checkpointing: nothing of the logits
        # is kept after the forward; one chunk's exist at a time, in the forward and again in the
        # backward (recomputed: log_softmax kept, then d(log_softmax) and d(logits)).
        ct = min(lt, LOSS_CHUNK_TOKENS)
        logits_saved = 0.0
        fwd_logit_tmp = (upcast + 4.0) * V * ct
        bwd_logit_tmp = (upcast + 4.0 + 8.0) * V * ct
    else:
        # The loss: logits (bf16 under autocast) -> .float() -> log_softmax (its fp32 output is kept).
        logits_saved = 4.0 * V * lt
        fwd_logit_tmp = upcast * V * lt
        bwd_logit_tmp = 8.0 * V * lt  # d(log_softmax) and d(logits) in fp32 at the start of backward
    # The embedding's backward builds a dense V x h gradient (fp32 accumulation on CUDA even for
    # bf16 weights: +1.47 GiB at the end of Llama-3.2-3B's backward in both precisions) before it
    # is added into .grad; ZeRO-2/3 also produce it whole before reduce-scattering it.
    emb_grad_tmp = 4.0 * shape.vocab * shape.hidden if s.method == "full" else 0.0

    persistent_copies = (copies if not s.grad_ckpt else lm_head_copy) if copies else 0.0
    if s.zero_stage == 3:
        persistent_copies = 0.0
    layer_copies = copies / max(shape.layers + shape.enc_layers, 1) if copies else 0.0
    overhead = OVERHEAD_GIB * GIB

    phases: dict[str, dict[str, float]] = {}
    # Under checkpointing autocast still caches the bf16 copy of every trainable weight until the
    # autocast region ends: they peak during the forward, then go (trainable weights only).
    fwd_extra = (copies - lm_head_copy) if (s.grad_ckpt and copies and s.method == "full") else 0.0
    phases["forward"] = dict(weights=w_gpu + persistent_copies + fwd_extra + gathered, gradients=0.0,
                             optimizer=o_gpu, activations=act.saved, logits=logits_saved + fwd_logit_tmp)
    phases["backward_start"] = dict(weights=w_gpu + persistent_copies + gathered, gradients=0.0, optimizer=o_gpu,
                                    activations=act.saved, logits=logits_saved + bwd_logit_tmp)
    end_act = act.ckpt_inputs + act.layer if s.grad_ckpt else 0.0
    phases["backward_end"] = dict(weights=w_gpu + (layer_copies if s.grad_ckpt else 0.0) + gathered,
                                  gradients=g_gpu + emb_grad_tmp, optimizer=o_gpu, activations=end_act, logits=0.0)
    phases["optimizer_step"] = dict(weights=w_gpu, gradients=g_gpu, optimizer=o_gpu + opt_temp, activations=0.0,
                                    logits=0.0)
    totals = {k: sum(v.values()) + overhead for k, v in phases.items()}
    peak_phase = max(totals, key=totals.get)
    bd = {k: v / GIB for k, v in phases[peak_phase].items()}
    bd["overhead"] = overhead / GIB
    per_gpu = sum(bd.values())
    if s.grad_ckpt:
        notes.append("gradient checkpointing: ~30% slower; keeps one input per layer and recomputes")
    states = {"weights": w_gpu + persistent_copies, "gradients": g_gpu, "optimizer": o_gpu}
    return Estimate(
        per_gpu_gib=round(per_gpu, 4), params=int(total_params), trainable_params=int(T),
        breakdown={k: round(v, 4) for k, v in bd.items()}, peak_phase=peak_phase,
        phases_gib={k: round(v / GIB, 4) for k, v in totals.items()},
        model_states_gib={k: round(v / GIB, 4) for k, v in states.items()},
        model_states_bytes={k: int(round(v)) for k, v in states.items()},
        cpu_gib=round(cpu / GIB, 4), bytes_per_param=round(bytes_per_param, 3), notes=notes,
        setup=asdict(s), model=shape.name)


def saved_bytes(shape: ModelShape, setup: Setup) -> float:
    """What autograd keeps after the forward (activations + kept logits + autocast weight copies).

    This is the quantity ``synthtune.memory.measure.saved_tensor_bytes`` counts on CPU.
    """
    act = _activations(shape, setup)
    copies = 0.0
    if setup.precision == "bf16-mixed" and setup.method != "qlora":
        copies = 2.0 * shape.linear_params if not setup.grad_ckpt else 2.0 * shape.vocab * shape.hidden
    kept_logits = 0.0 if setup.loss_impl == "chunked" else 4.0 * shape.vocab * act.logits_tokens
    return act.saved + kept_logits + copies


def rule_of_thumb_bytes(params: float, bytes_per_param: float = 18.0) -> float:
    """Model-state bytes by the back-of-the-envelope rule: mixed-precision AdamW needs 18 bytes per parameter.

    4 (fp32 weights) + 2 (bf16/fp16 working copy) + 4 (fp32 gradients) + 8 (two fp32 Adam
    moments); activations excluded. The 2023 workshop sized Flan-UL2 this way.

    >>> rule_of_thumb_bytes(15e9) / 1e9  # GB, decimal
    270.0
    >>> rule_of_thumb_bytes(135e6, bytes_per_param=2.0) / 1e6  # bf16 weights alone
    270.0
    """
    return params * bytes_per_param


def workshop_rule(params: float, bytes_per_param: float = 18.0) -> float:
    """Deprecated name of :func:`rule_of_thumb_bytes` (notebooks written before the rename use it)."""
    warnings.warn("synthtune.memory.workshop_rule is renamed rule_of_thumb_bytes; the old name will go",
                  DeprecationWarning, stacklevel=2)
    return rule_of_thumb_bytes(params, bytes_per_param)
