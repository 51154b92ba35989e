"""`synthtune merge`: fold a LoRA adapter into its base model, and prove the result is the same model.

Users keep reporting merged models that behave differently from the adapter (a different base
revision, a dtype round-trip, tied embeddings). So the merge is checked twice: the merged
module's logits against the adapter model's, then the saved directory, reloaded with plain
transformers (what vLLM and everyone else will do), against the same logits.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from synthtune.config import MergeConfig
from synthtune.errors import ConfigError, MergeMismatch
from synthtune.files import current_umask
from synthtune.formats import plain_prompt

#: Our metadata in a merged directory: its origin and the oldest transformers that reads it right.
MERGE_METADATA = "synthtune_merge.json"

# Two prompts in the training format, and a bare phrase.
PROBES = (plain_prompt("Ann has 3 apples and buys 4 more. How many apples does she have?"),
          plain_prompt("A train travels 60 miles per hour for 2 hours. How far does it go?"),
          "The answer is")


def _logits(model, tokenizer, is_seq2seq: bool):
    import torch

    enc = tokenizer(list(PROBES), return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        if is_seq2seq:
            start = torch.full((enc["input_ids"].shape[0], 1), model.config.decoder_start_token_id,
                               device=model.device)
            return model(**enc, decoder_input_ids=start).logits.float()
        return model(**enc).logits.float()


def merge_adapter(model: str | None, adapter: str, out: str | Path, *, atol: float = 1e-4, rtol: float = 1e-5,
                  dtype: str | None = None) -> dict:
    """Merge, save as safetensors with tokenizer and generation config, and verify; returns a report.

    The logits may differ by ``atol + rtol * max|logit|``. The relative part is there because fp32
    rounding grows with the logits' scale: SmolLM2-135M's logits reach ~30, and its exactly merged
    adapter differed by 1.25e-4, while a real mismatch (bf16 round trip, wrong base) is 1e-2 or more.

    ``model=None`` merges into the base the adapter records (:func:`synthtune.models.adapter_base`).
    """
    from peft import PeftModel

    from synthtune.models import adapter_base, load_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty; merging would overwrite it. Pick a new directory.")
    if not (Path(adapter) / "adapter_config.json").exists():
        raise ConfigError(f"--adapter {adapter} holds no adapter_config.json (pass a training run's final/)")
    seed = 0
    if model is None:
        model, seed = adapter_base(adapter)
    # fp32 on CPU unless asked: the check compares logits, and bf16 rounding would blur it.
    lm = load_model(model, device="cpu", dtype=dtype or "fp32", seed=seed)
    peft_model = PeftModel.from_pretrained(lm.model, adapter).eval()
    before = _logits(peft_model, lm.tokenizer, lm.is_seq2seq)
    merged = peft_model.merge_and_unload().eval()
    after = _logits(merged, lm.tokenizer, lm.is_seq2seq)
    diff_merge = float((before - after).abs().max())
    tol = atol + rtol * float(before.abs().max())
    if diff_merge > tol:
        raise MergeMismatch(f"merged logits differ from the adapter's by {diff_merge:.3g} (> {tol:.3g} = --atol {atol} "
                            f"+ --rtol {rtol} x max|logit|); nothing saved. Check that --model is the adapter's base; "
                            f"raise --atol/--rtol only if the difference is rounding.")
    # A unique sibling (same filesystem, so the final rename is atomic): two merges into one parent
    # never share, or delete, each other's work in progress.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    # mkdtemp makes it owner-only (0700); the merged model is for other accounts too (a vLLM server)
    tmp.chmod(0o777 & ~current_umask())
    try:
        diff_reload, compat = _save_and_verify(merged, lm, tmp, before, tol)
        _write_metadata(tmp, model, adapter, compat)
        # rename() replaces an empty directory atomically and refuses a non-empty one, so a
        # directory that filled up meanwhile is never overwritten
        try:
            tmp.rename(out)
        except OSError:
            raise ConfigError(f"--out {out} was created and filled while merging; the merged model was not "
                              f"saved. Pick a new directory.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"model": model, "adapter": adapter, "out": str(out), "max_abs_diff_merged": diff_merge,
            "max_abs_diff_reloaded": diff_reload, "atol": atol, "rtol": rtol, "tolerance": tol, "probes": len(PROBES),
            "min_transformers": compat["min_transformers"], "transformers_4x_notes": compat["notes"],
            "files": sorted(p.name for p in out.iterdir())}


def _save_and_verify(merged, lm, tmp: Path, before, tol: float) -> tuple[float, dict]:
    """Save the merged model into ``tmp``, readable by transformers 4.x where it can be; return how far
    its reloaded logits are from ``before``, and :func:`synthtune.models.make_readable_by_4x`'s report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from synthtune.models import make_readable_by_4x, save_tokenizer

    merged.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(lm.tokenizer, tmp)
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.save_pretrained(tmp)
    compat = make_readable_by_4x(tmp)
    # what is checked is the directory as it will be served: the 4.x spellings included
    cls = AutoModelForSeq2SeqLM if lm.is_seq2seq else AutoModelForCausalLM
    reloaded = cls.from_pretrained(tmp, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    ids = [tokenizer(p)["input_ids"] for p in PROBES]
    if ids != [lm.tokenizer(p)["input_ids"] for p in PROBES]:
        raise MergeMismatch(f"the saved tokenizer, reloaded with transformers, encodes the probes differently "
                            f"from {lm.path}'s; nothing saved")
    diff_reload = float((_logits(reloaded, tokenizer, lm.is_seq2seq) - before).abs().max())
    if diff_reload > tol:
        raise MergeMismatch(f"the saved merged model, reloaded with transformers in fp32, differs from the adapter by "
                            f"{diff_reload:.3g} (> {tol:.3g}, from --atol and --rtol); nothing saved. A low-precision "
                            f"--dtype rounds the saved weights (merge in fp32), or this transformers reads the "
                            f"saved config differently (see `synthtune env`).")
    return diff_reload, compat


def _write_metadata(directory: Path, model: str, adapter: str, compat: dict) -> None:
    """What the merged directory came from, and the oldest transformers that reads it right."""
    from synthtune import __version__
    from synthtune.files import atomic_write_text
    from synthtune.models import read_adapter_metadata

    record = {"synthtune_version": __version__, "base_model": model, "adapter": str(Path(adapter).resolve()),
              "adapter_base": read_adapter_metadata(adapter), **compat}
    atomic_write_text(directory / MERGE_METADATA, json.dumps(record, indent=2) + "\n")


def run(cfg: MergeConfig, log=None) -> dict:
    """`synthtune merge`'s entry point: :func:`merge_adapter` with the command's config.

    ``log`` gets one line naming the oldest transformers that reads the output right.
    """
    report = merge_adapter(cfg.model, cfg.adapter, cfg.out, atol=cfg.atol, rtol=cfg.rtol)
    if log is not None:
        why = "; ".join(report["transformers_4x_notes"])
        log(f"{report['out']} needs transformers >= {report['min_transformers']}" + (f" ({why})" if why else ""))
    return report
