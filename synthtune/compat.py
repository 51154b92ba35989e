"""Saved models that transformers 4.x reads as transformers 5 wrote them.

Many serving images (vLLM among them) still ship transformers 4.x, which reads a config saved by
transformers 5 without complaint and wrongly: 5.x keeps ``rope_theta`` only inside
``rope_parameters``, so 4.57 falls back to its default 10000 for a model trained with 500000, and
5.x's ``TokenizersBackend`` tokenizer class does not exist in 4.x at all. :func:`make_readable_by_4x`
adds the 4.x spellings beside the 5.x ones (5.x reads its own and ignores the rest) and says
what cannot be made compatible, with the oldest transformers that reads the directory right.
"""

from __future__ import annotations

import json
from pathlib import Path

from synthtune.files import atomic_write_text

#: The oldest 4.x whose reading of our output we model: 4.43 reads ``rope_scaling`` keyed by
#: ``rope_type`` (the Llama 3.1 release); older versions only knew ``type``.
MIN_4X = "4.43.0"
#: Where a config has no 4.x spelling: the transformers that wrote it is the floor we can vouch for.
MIN_5X = "5.0.0"
#: Architectures whose 4.x config readers we checked key by key (rope, dtype, tied embeddings).
CHECKED_MODEL_TYPES = ("llama", "t5")


def config_for_4x(cfg: dict) -> tuple[dict, list[str]]:
    """``config.json`` with the keys transformers 4.x reads added; and what still reads differently there.

    >>> new, notes = config_for_4x({"model_type": "llama", "dtype": "bfloat16",
    ...                             "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}})
    >>> new["rope_theta"], new["rope_scaling"], new["torch_dtype"], notes
    (500000.0, None, 'bfloat16', [])
    """
    out = dict(cfg)
    notes: list[str] = []
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        if all(isinstance(v, dict) for v in rope.values()):
            # one set per attention type (full / sliding): 4.x has a single rope_theta per model
            notes.append("rope_parameters differ per layer type; transformers 4.x has no spelling for that")
        else:
            if "rope_theta" in rope:
                out["rope_theta"] = rope["rope_theta"]  # 4.x reads it only here, else its default 10000
            kind = rope.get("rope_type", "default")
            # 4.x: rope_scaling None means plain rotary; otherwise the type and its parameters
            out["rope_scaling"] = None if kind == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
            if "partial_rotary_factor" in rope:
                out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        out["torch_dtype"] = cfg["dtype"]  # 4.x before 4.56 reads only torch_dtype (vLLM picks "auto" from it)
    model_type = cfg.get("model_type")
    if model_type == "t5" and cfg.get("scale_decoder_outputs") is False:
        # 5.x always ties T5's lm_head to the embeddings and says "do not scale the decoder
        # output" in scale_decoder_outputs; 4.x reads tie_word_embeddings=true as "tied AND
        # scaled by d_model**-0.5", and with false it would want an lm_head.weight not saved.
        notes.append("T5 without decoder output scaling (T5 v1.1/UL2 style) is saved with tie_word_embeddings=true, "
                     "which transformers 4.x reads as scaled outputs")
    elif model_type not in CHECKED_MODEL_TYPES:
        notes.append(f"model_type {model_type!r} was not checked against transformers 4.x")
    return out, notes


def tokenizer_config_for_4x(cfg: dict, directory: Path) -> tuple[dict, list[str]]:
    """``tokenizer_config.json`` with a class 4.x has, and the chat template where 4.x looks for it."""
    out = dict(cfg)
    notes: list[str] = []
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        if (directory / "tokenizer.json").exists():
            # 5.x's PreTrainedTokenizerFast is TokenizersBackend by another name; in 4.x it is the
            # class that loads any tokenizer.json
            out["tokenizer_class"] = "PreTrainedTokenizerFast"
        else:
            notes.append("tokenizer_class TokenizersBackend without a tokenizer.json has no 4.x class")
    template = directory / "chat_template.jinja"
    if template.exists() and "chat_template" not in cfg:
        # 4.x before the .jinja file existed reads the template only from here; 5.x reads either
        out["chat_template"] = template.read_text(encoding="utf-8")
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):
        # 4.x reads extra_special_tokens as a {name: token} dict and a plain list of extra tokens
        # as additional_special_tokens
        out.pop("extra_special_tokens")
        out["additional_special_tokens"] = extra
    return out, notes


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def make_readable_by_4x(directory: str | Path) -> dict:
    """Rewrite a saved model's ``config.json`` and ``tokenizer_config.json`` for transformers 4.x too.

    Returns ``{"min_transformers": version, "notes": [...]}``: the oldest transformers that reads
    the directory as transformers 5 does, and, when that is 5.x, why.
    """
    directory = Path(directory)
    notes: list[str] = []
    cfg_path = directory / "config.json"
    cfg, found = config_for_4x(json.loads(cfg_path.read_text(encoding="utf-8")))
    _write_json(cfg_path, cfg)
    notes += found
    tok_path = directory / "tokenizer_config.json"
    if tok_path.exists():
        tok, found = tokenizer_config_for_4x(json.loads(tok_path.read_text(encoding="utf-8")), directory)
        _write_json(tok_path, tok)
        notes += found
    return {"min_transformers": MIN_5X if notes else MIN_4X, "notes": notes}
