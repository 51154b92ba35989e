"""`synthtune demo`: few-shot GSM8K on the embedded model, scored, with everything written out.

Today it runs the first half of the workshop on a laptop: load the embedded instruct model,
build 8-shot prompts from the *train* split, answer held-out *test* questions, and score them
with the same code `synthtune score` uses. Synthesis, fine-tuning and base-vs-tuned evaluation
join it as those stages land.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import constants
from synthtune.config import DemoConfig, save_config
from synthtune.data.gsm8k import load_split
from synthtune.data.jsonl import write_jsonl
from synthtune.generation import SamplingParams, generate
from synthtune.models import load_model
from synthtune.score import score_rows
from synthtune.synth.prompts import PLAIN_STOP, build_prompt, default_format


def run_demo(cfg: DemoConfig, console=None) -> dict:
    """Run the demo; return the summary that is also written to ``summary.json``."""
    say = console.print if console is not None else print
    t0 = time.perf_counter()
    out_dir = Path(cfg.output_dir) if cfg.output_dir else (
        constants.OUTPUTS_DIR / "demo" / time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, output_dir=str(out_dir))
    save_config(cfg, out_dir / "config.yaml")

    say(f"[1/4] loading model {cfg.model}")
    lm = load_model(cfg.model, device=cfg.device, seed=cfg.seed)
    fmt = default_format(lm.tokenizer, lm.is_seq2seq) if cfg.prompt_format == "auto" else cfg.prompt_format
    say(f"      {lm.kind} model from {lm.path} on {lm.device} ({str(lm.dtype).replace('torch.', '')}), "
        f"prompt format: {fmt}")

    # Exemplars come from train and questions from test: never the same split (the 2023 code
    # drew both from GSM8K test, then evaluated on it).
    train = load_split("train", cfg.source, cfg.gsm8k_dir)
    test = load_split("test", cfg.source, cfg.gsm8k_dir, limit=cfg.n_questions)
    say(f"[2/4] building {cfg.shots}-shot prompts: {len(train)} train exemplars ({train.source}), "
        f"{len(test)} test questions")
    prompts = [build_prompt(row["question"], train.rows, k=cfg.shots, fmt=fmt, tokenizer=lm.tokenizer,
                            seed=cfg.seed) for row in test]
    n_tok = [len(lm.tokenizer(p.text, add_special_tokens=p.add_special_tokens)["input_ids"]) for p in prompts]
    say(f"      prompt length: {min(n_tok)}-{max(n_tok)} tokens")

    say(f"[3/4] answering with greedy decoding (max {cfg.max_new_tokens} new tokens)")
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop=PLAIN_STOP if fmt == "plain" else (),
                            seed=cfg.seed)
    t_gen = time.perf_counter()
    completions = generate(lm, [p.text for p in prompts], params, batch_size=cfg.batch_size,
                           add_special_tokens=prompts[0].add_special_tokens, desc="answering")
    gen_s = time.perf_counter() - t_gen

    say("[4/4] scoring")
    rows = [{"question": row["question"], "answer": row["answer"], "completions": comp,
             "prompt_sha": p.sha, "exemplar_ids": list(p.exemplar_ids)}
            for row, comp, p in zip(test.rows, completions, prompts, strict=True)]
    scored, summary = score_rows(rows)
    write_jsonl(out_dir / "answers.jsonl", scored)
    summary = {**summary, "model": cfg.model, "prompt_format": fmt, "shots": cfg.shots,
               "generation_s": round(gen_s, 2), "total_s": round(time.perf_counter() - t0, 2),
               "output_dir": str(out_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_table(scored, console)
    return summary


def _print_table(rows: list[dict], console) -> None:
    if console is None:
        for r in rows:
            print(f"{r['majority']!s:>8}  {'ok' if r['majority_correct'] else 'wrong':5}  {r['question'][:70]}")
        return
    from rich.table import Table

    table = Table(title="demo answers", show_lines=False)
    for col in ("question", "gold", "model", "ok"):
        table.add_column(col, overflow="fold" if col == "question" else "ellipsis")
    from synthtune.data.answers import extract_gold

    for r in rows:
        table.add_row(r["question"][:80] + ("..." if len(r["question"]) > 80 else ""),
                      str(extract_gold(r["answer"])), str(r["majority"]),
                      "[green]yes[/]" if r["majority_correct"] else "[red]no[/]")
    console.print(table)
