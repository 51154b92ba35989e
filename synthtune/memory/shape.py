"""A model's shape for memory estimation, read from its config alone.

The model is instantiated on the meta device (no weights, no download beyond ``config.json``),
so parameter counts are exact, tied embeddings are counted once, and LoRA targets are matched
against the real module names with peft's own matcher.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from synthtune import paths
from synthtune.models import is_seq2seq_config, load_config, meta_model, unique_parameter_count

#: Shape (no weights) of google/flan-ul2, the workshop's 20B model; usable as ``--model``.
FLAN_UL2_CONFIG = paths.CONFIGS_DIR / "models" / "flan-ul2" / "config.json"



@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int


@dataclass
class ModelShape:
    """Everything the estimator needs about an architecture."""

    name: str
    model_type: str
    arch: str  # "causal" | "seq2seq"
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int  # decoder layers (causal) / decoder layers (seq2seq)
    enc_layers: int  # 0 for causal
    params: int  # unique parameters (tied weights once)
    embed_params: int  # input embedding(s)
    tied: bool
    mlp_act: str  # "silu", "gelu_new", "relu", ...
    gated_mlp: bool
    dropout: float  # hidden dropout the model applies in train mode (T5: dropout_rate)
    linears: list[Linear] = field(default_factory=list, repr=False)
    output_linear: str = "lm_head"
    # element count of every parameter tensor (tied ones once): ZeRO-3 keeps the small ones whole
    param_numels: list[int] = field(default_factory=list, repr=False)

    @property
    def linear_params(self) -> int:
        """Weights of every nn.Linear, lm_head included (autocast casts all of them to bf16)."""
        return sum(lin.in_features * lin.out_features for lin in self.linears)

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def lora_linears(self, targets: str | list[str]) -> list[Linear]:
        """The linears peft would adapt: its own matcher; ``all-linear`` skips the output layer."""
        from peft import LoraConfig
        from peft.tuners.tuners_utils import check_target_module_exists

        if targets == "all-linear" or targets == ["all-linear"]:
            return [lin for lin in self.linears if lin.name != self.output_linear]
        cfg = LoraConfig(target_modules=list(targets))
        return [lin for lin in self.linears if check_target_module_exists(cfg, lin.name)]

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        # lora_A is r x in, lora_B is out x r (no bias): peft's count for nn.Linear.
        return sum(r * (lin.in_features + lin.out_features) for lin in self.lora_linears(targets))


def parse_targets(targets: str | list[str]) -> str | list[str]:
    """``q,v`` -> ["q", "v"]; ``all-linear`` stays a string (peft's special value)."""
    if isinstance(targets, list):
        return targets
    t = targets.strip()
    if t == "all-linear":
        return t
    return [x.strip() for x in t.split(",") if x.strip()]


def resolve_targets(shape: ModelShape, targets: str | list[str]) -> str | list[str]:
    """Accept the short names q,k,v,o for Llama-style models too (their modules are q_proj...)."""
    targets = parse_targets(targets)
    if isinstance(targets, str):
        return targets
    names = {lin.name.rsplit(".", 1)[-1] for lin in shape.linears}
    out = []
    for t in targets:
        if t not in names and f"{t}_proj" in names:
            t = f"{t}_proj"
        out.append(t)
    return out


def shape_from_config(config, name: str = "", trust_remote_code: bool = False) -> ModelShape:
    """Build a :class:`ModelShape` from a transformers config by meta-device instantiation."""
    import torch

    seq2seq = is_seq2seq_config(config)
    model = meta_model(config, trust_remote_code=trust_remote_code)
    total = unique_parameter_count(model)
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    out_name = next((n for n, m in model.named_modules() if m is out_emb), "lm_head")
    linears = [Linear(n, m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    # A tied lm_head stays among the linears: autocast still casts that matrix for the logits.
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    c = config
    if seq2seq:
        hidden = c.d_model
        heads = c.num_heads
        head_dim = c.d_kv
        kv_heads = heads
        inter = c.d_ff
        layers = getattr(c, "num_decoder_layers", None) or c.num_layers
        enc_layers = c.num_layers
        proj = getattr(c, "feed_forward_proj", "relu")
        gated = proj.startswith("gated-")
        act = proj.split("-")[-1]
        act = "gelu_new" if act == "gelu" else act
        dropout = float(getattr(c, "dropout_rate", 0.0) or 0.0)
    else:
        hidden = c.hidden_size
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or hidden // heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        inter = getattr(c, "intermediate_size", None) or 4 * hidden
        layers = c.num_hidden_layers
        enc_layers = 0
        act = getattr(c, "hidden_act", "silu")
        gated = any(lin.name.endswith("gate_proj") for lin in linears)
        dropout = float(getattr(c, "attention_dropout", 0.0) or 0.0)
    return ModelShape(
        name=name or getattr(c, "_name_or_path", "") or c.model_type, model_type=c.model_type,
        arch="seq2seq" if seq2seq else "causal", hidden=hidden, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=inter, vocab=c.vocab_size, layers=layers, enc_layers=enc_layers,
        params=total, embed_params=in_emb.weight.numel() if in_emb is not None else 0, tied=tied,
        mlp_act=act, gated_mlp=gated, dropout=dropout, linears=linears, output_linear=out_name,
        param_numels=[p.numel() for p in model.parameters()])


def config_from_dict(d: dict[str, Any]):
    """A transformers config from a plain dict with ``model_type`` (the bench's public shapes)."""
    from transformers import AutoConfig

    d = dict(d)
    return AutoConfig.for_model(d.pop("model_type"), **d)


@functools.lru_cache(maxsize=32)
def load_shape(model: str, trust_remote_code: bool = False) -> ModelShape:
    """``--model`` (built-in name, dir, config.json path or hub id) -> shape. Only the config is read."""
    config = load_config(model, trust_remote_code=trust_remote_code)
    return shape_from_config(config, name=model, trust_remote_code=trust_remote_code)
