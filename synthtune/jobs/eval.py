"""`synthtune eval`: GSM8K accuracy by generation, for a base model, an adapter, or both side by side.

It reports our own numbers, which read answers by value (``42.00`` == ``42``): accuracy (the final
answer as a grader reads it), strict accuracy (the first ``#### n`` line), flexible accuracy (the last
number), parse rate and format rate; with k > 1 samples, maj@k and pass@k. Beside them, under their
own names, it reports lm-evaluation-harness's gsm8k figures on the same completions
(``lm_eval_strict_match``, ``lm_eval_flexible_extract``: its filters, stop sequences and string
match, see :mod:`synthtune.data.lmeval_gsm8k`), the numbers to put beside a leaderboard's. Few-shot
exemplars only ever come from the train split.

It also reports how the completions' arithmetic fared (:func:`calc_summary`): ``calc_checked`` and
``calc_correct``, the calculations ``check_calculations`` read and found right over all completions,
and ``calc_accuracy`` (None when there was nothing to check). With ``--calculator`` on and no change in
accuracy, they say whether the model wrote annotations at all and whether they came out right.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from synthtune import paths
from synthtune.config import EvalConfig
from synthtune.errors import ConfigError
from synthtune.files import atomic_write_text
from synthtune.formats import add_special_tokens, resolve_format, stop_strings, zero_shot_prompt
from synthtune.models import attach_adapter, check_adapter_dir, load_with_adapter
from synthtune.synth.prompts import build_prompt


def eval_inputs(cfg: EvalConfig, lm, rows: list[dict], pool: list[dict]) -> tuple[list[str], bool, tuple[str, ...]]:
    """What the model is fed for ``rows``: prompt texts, whether the tokenizer adds its special
    tokens, and the stop strings. ``shots=0`` is the training prompt itself; with shots, exemplars
    from ``pool`` come first (the question's own block is still the training prompt)."""
    fmt = resolve_format(cfg.prompt_format, lm.tokenizer, lm.is_seq2seq)
    if cfg.shots == 0:
        texts = [zero_shot_prompt(r["question"], lm.tokenizer, fmt=fmt, is_seq2seq=lm.is_seq2seq) for r in rows]
    else:
        texts = [build_prompt(r["question"], pool, k=cfg.shots, fmt=fmt, tokenizer=lm.tokenizer, seed=cfg.seed).text
                 for r in rows]
    return texts, add_special_tokens(fmt), stop_strings(fmt)


def calc_summary(completions) -> dict:
    """``calc_checked``/``calc_correct``: totals of ``check_calculations`` (annotations and plain
    equations) over ``completions``; ``calc_accuracy``: correct / checked, None when nothing was checked.

    >>> calc_summary(["<<3*14=40>>40 and <<2*14=28>>28", "no arithmetic", "5+5 = 10 and 2*3 = 6"])
    {'calc_checked': 4, 'calc_correct': 3, 'calc_accuracy': 0.75}
    >>> calc_summary(["no arithmetic"])["calc_accuracy"] is None
    True
    """
    from synthtune.data.calculator import check_calculations

    checked = correct = 0
    for text in completions:
        report = check_calculations(text)
        checked += report.n_checked
        correct += report.n_correct
    return {"calc_checked": checked, "calc_correct": correct,
            "calc_accuracy": correct / checked if checked else None}


def evaluate_model(cfg: EvalConfig, lm, rows: list[dict], pool: list[dict], progress: bool = True) -> tuple[list, dict]:
    from synthtune.generation.base import SamplingParams
    from synthtune.generation.sampler import complete
    from synthtune.synth.scoring import score_rows

    texts, add_special, stop = eval_inputs(cfg, lm, rows, pool)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature if cfg.k > 1 else 0.0,
                            num_samples=cfg.k, stop=stop, seed=cfg.seed, calculator=cfg.calculator)
    t0 = time.perf_counter()
    comps = complete(lm, texts, params, batch_size=cfg.batch_size, add_special_tokens=add_special,
                     progress=progress, desc=f"eval {lm.name}", sampler=cfg.sampler)
    seconds = time.perf_counter() - t0
    scored, summary = score_rows([{"question": r["question"], "answer": r["answer"], "completions": c}
                                  for r, c in zip(rows, comps, strict=True)])
    summary = {"model": lm.name, "shots": cfg.shots, "k": cfg.k, "calculator": cfg.calculator,
               "seconds": round(seconds, 2), **summary,
               **calc_summary(c for r in comps for c in r)}
    return scored, summary


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict:
    from synthtune.data.gsm8k import load_split
    from synthtune.data.jsonl import write_jsonl

    if cfg.compare and not cfg.adapter:
        raise ConfigError("compare: needs adapter=DIR (the base model is compared with base + adapter)")
    out = Path(cfg.out) if cfg.out else paths.OUTPUTS_DIR / "eval" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = load_split(cfg.split, cfg.source, cfg.gsm8k_dir, limit=cfg.limit).rows
    # Exemplars come from train only; evaluating train with shots would let a question see itself,
    # which build_prompt prevents by excluding the target from its own exemplars.
    pool = load_split("train", cfg.source, cfg.gsm8k_dir).rows if cfg.shots else []
    if cfg.adapter:
        check_adapter_dir(cfg.adapter)  # before any weights load
    runs = [(None, "base")] if cfg.compare else []
    runs.append((cfg.adapter, "adapter" if cfg.adapter else "base"))
    results = {}
    # One copy of the base: --compare evaluates it first, then wraps the same weights with the adapter
    # (loading the base twice would hold two copies at once, a real cost on a GPU).
    lm = load_with_adapter(cfg.model, None, device=cfg.device, seed=cfg.seed)
    for adapter, label in runs:
        if adapter:
            attach_adapter(lm, adapter)
        scored, summary = evaluate_model(replace(cfg, adapter=adapter), lm, rows, pool, progress)
        write_jsonl(out / f"{label}_outputs.jsonl", scored)
        results[label] = summary
    report = {"split": cfg.split, "source": cfg.source, "n_questions": len(rows), "out_dir": str(out), **results}
    atomic_write_text(out / "eval_summary.json", json.dumps(report, indent=2) + "\n")
    return report


METRICS = ("strict_accuracy", "flexible_accuracy", "accuracy", "parse_rate", "format_rate", "maj_at_k", "pass_at_k",
           "lm_eval_strict_match", "lm_eval_flexible_extract", "calc_checked", "calc_accuracy")


def comparison_table(report: dict):
    from rich.table import Table

    labels = [k for k in ("base", "adapter") if k in report]
    table = Table(title=f"GSM8K {report['split']} ({report['n_questions']} questions)")
    table.add_column("metric")
    for label in labels:
        table.add_column(f"{label}: {report[label]['model']}")
    for m in METRICS:
        table.add_row(m, *[_fmt(report[label].get(m)) for label in labels])
    return table


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def run(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """`synthtune eval`'s entry point (the same as :func:`run_eval`)."""
    return run_eval(cfg, progress=progress)
