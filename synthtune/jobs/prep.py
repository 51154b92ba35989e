"""``synthtune prep``: tokenize a dataset for a model and write the arrow dataset, stats and a histogram.

    synthtune prep --model smollm2-135m-instruct --data gsm8k:train --format auto --max-length 512
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from synthtune import paths
from synthtune.config import PrepConfig
from synthtune.errors import ConfigError
from synthtune.formats import resolve_format
from synthtune.train.tokenize import load_tokenizer_for, padding_waste, plot_length_histogram, tokenize_rows

logger = logging.getLogger(__name__)


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-." else "-" for c in (Path(text).name or text))
    return keep.strip("-.")[:60] or "data"


def default_prep_dir(model: str, data: str, fmt: str, max_length: int) -> Path:
    return paths.OUTPUTS_DIR / "prep" / f"{_slug(model)}_{_slug(data)}_{fmt}_{max_length}"


def run_prep(model: str, data: str, *, fmt: str = "auto", max_length: int = 512,
             max_target_length: int | None = None, truncation: str = "drop", out: Path | str | None = None,
             limit: int | None = None, cache_dir: Path | None = None) -> dict:
    """Tokenize ``data`` for ``model`` and write ``dataset/`` (arrow), ``stats.json``, ``length_hist.png``."""
    import tempfile

    from synthtune.data.gsm8k import load_source
    from synthtune.files import atomic_write_text, replace_dir

    tokenizer, is_seq2seq = load_tokenizer_for(model)
    fmt = resolve_format(fmt, tokenizer, is_seq2seq)
    rows = load_source(data, limit=limit)
    prepared = tokenize_rows(rows, tokenizer, is_seq2seq=is_seq2seq, fmt=fmt, max_length=max_length,
                             max_target_length=max_target_length, truncation=truncation, cache_dir=cache_dir)
    out_dir = Path(out) if out else default_prep_dir(model, data, fmt, max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_dir = out_dir / "dataset"
    # Saved beside it, then swapped in whole: a rerun killed mid-save leaves the previous dataset,
    # never a half-written one that load_from_disk would trip over (or, worse, half-load).
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".dataset-") as tmp:
        prepared.dataset.save_to_disk(str(Path(tmp) / "dataset"))  # arrow + json metadata, never pickled
        replace_dir(Path(tmp) / "dataset", ds_dir)
    hist = out_dir / "length_hist.png"
    side = "encoder input" if is_seq2seq else "prompt + answer + EOS"
    plot_length_histogram(prepared.lengths, hist, max_length, title=f"{_slug(data)} ({side})")
    stats = {**prepared.stats, "model": model, "data": data, "from_cache": prepared.from_cache,
             "padding_waste_at_max_length": round(padding_waste(prepared.lengths, max_length), 4)}
    stats_path = out_dir / "stats.json"
    atomic_write_text(stats_path, json.dumps(stats, indent=2) + "\n")
    keys = ("n", "n_kept", "n_truncated", "n_dropped", "truncated_fraction", "mean", "p50", "p90", "p99", "max",
            "recommended_max_length", "format", "kind", "max_length", "truncation", "from_cache")
    summary = {k: stats[k] for k in keys}
    if is_seq2seq:
        summary["recommended_max_target_length"] = stats["recommended_max_target_length"]
        summary["target_p99"] = stats["target"]["p99"]
    summary.update(out=str(out_dir), dataset=str(ds_dir), stats=str(stats_path), histogram=str(hist))
    return summary


def run(cfg: PrepConfig) -> dict:
    """`synthtune prep`'s entry point: :func:`run_prep` with the command's config."""
    try:
        return run_prep(cfg.model, cfg.data, fmt=cfg.prompt_format, max_length=cfg.max_length,
                        max_target_length=cfg.max_target_length, truncation=cfg.truncation, out=cfg.out,
                        limit=cfg.limit)
    except ValueError as err:
        if type(err) is not ValueError:  # DataError and friends already say where
            raise
        # a setting that does not fit this model (the chat format on a seq2seq model): the user's to fix
        raise ConfigError(f"prep: {err}") from None
