"""The synthesis loop's own cost per completion, with no model: replayed completions through the pipeline.

Run (repo root; the full GSM8K is used when SYNTHTUNE_GSM8K_DIR points at it, as `make` sets it):

    SYNTHTUNE_GSM8K_DIR=../shared/data/gsm8k .venv/bin/python bench/pipeline_overhead_bench.py \
        --completions 50000 --out bench/results/pipeline_overhead_cpu.json

A replay backend answers every prompt at once with k prepared completions built from the gold
solution (the reference, an exact copy, a reworded path, a wrong final answer, a wrong
calculator annotation, no answer, one cut off at the token limit, the steps in another order),
so every evaluator stage has work: answer extraction, the vote, the gold/calculator/vote-share
scorers, greedy ROUGE-L diversity, the kept/status JSONL appends (fsynced per batch), prompt
building with 8 exemplars and the summary. Reported: ms per completion for the whole
`run_synthesis`, and separately for prompt building and for `evaluate_question` (vote + scorers +
ROUGE-L); the rest is row building, I/O and bookkeeping. The loop must stay far below what any
server can generate (a completion of ~150 tokens is milliseconds of GPU time at best).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench_io import emit, machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from synthtune.config import SynthConfig  # noqa: E402
from synthtune.data.gsm8k import load_split, rationale_and_answer  # noqa: E402
from synthtune.data.jsonl import write_jsonl  # noqa: E402
from synthtune.generation.base import SamplingParams  # noqa: E402
from synthtune.generation.sampler import Sample  # noqa: E402
from synthtune.synth.pipeline import evaluate_question, load_items, run_synthesis  # noqa: E402
from synthtune.synth.prompts import build_prompt  # noqa: E402


def replay_completions(gold: str, k: int) -> list[Sample]:
    """k completions of the kinds a real model writes, derived from one gold solution."""
    steps, answer = rationale_and_answer(gold)
    lines = steps.splitlines() or [steps]
    try:
        wrong = str(int(float(answer.replace(",", ""))) + 3)
    except ValueError:
        wrong = answer + "0"
    kinds = [
        (f"{steps}\n#### {answer}", "eos"),
        (f"{steps}\n#### {answer}", "eos"),  # a copy: ROUGE-L drops it
        (f"We work it out step by step.\n{lines[-1]}\nSo the answer is {answer}.", "eos"),
        (f"{steps}\n#### {wrong}", "eos"),
        (f"First 2 * 3 = <<2*3=7>>7.\n{steps}\n#### {answer}", "eos"),  # a wrong calculation
        ("I am not sure how to solve this one.", "eos"),
        (f"{steps[: len(steps) // 2]}", "length"),  # cut off at the token limit
        ("\n".join(reversed(lines)) + f"\n#### {answer}", "stop"),
    ]
    return [Sample(text=t, n_tokens=max(1, len(t) // 4), finish_reason=r) for t, r in
            (kinds[i % len(kinds)] for i in range(k))]


class ReplayBackend:
    """Answers instantly from prepared completions; the loop's cost is all that is left to measure."""

    name = "replay"
    model_name = "replay"
    tokenizer = None
    is_seq2seq = False
    chat_on_server = False

    def __init__(self, gold_by_question: dict[str, str]):
        self.gold = gold_by_question

    def sample(self, prompts, params):
        return [replay_completions(self.gold[p.question], params.num_samples) for p in prompts]


def question_rows(n: int) -> tuple[list[dict], str]:
    """n distinct GSM8K-format rows: the full train split when present, else the bundled sample
    renumbered ("(variant 3)") until there are enough."""
    try:
        rows, source = load_split("train", "dir").rows, "GSM8K train (SYNTHTUNE_GSM8K_DIR)"
    except Exception:  # noqa: BLE001 - any reason the full set is missing means: use the sample
        rows, source = load_split("train", "bundled").rows, "bundled sample, renumbered"
    out = [dict(r) for r in rows[:n]]
    v = 1
    while len(out) < n:
        out += [{**r, "question": f"{r['question']} (variant {v})"} for r in rows[: n - len(out)]]
        v += 1
    return out, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--completions", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    pool_size = 64
    n_questions = -(-args.completions // args.k)
    rows, source = question_rows(n_questions + pool_size)
    with tempfile.TemporaryDirectory(prefix="synthtune-overhead-") as tmp:
        questions = Path(tmp) / "questions.jsonl"
        write_jsonl(questions, rows)  # GSM8K text stays in the temporary folder
        cfg = SynthConfig(questions=str(questions), exemplar_pool_size=pool_size, limit=n_questions, k=args.k,
                          rounds=1, batch_size=args.batch_size, shots=8, prompt_format="plain",
                          out=str(Path(tmp) / "run"))
        items, pool, _ = load_items(cfg)
        backend = ReplayBackend({r["question"]: r["answer"] for r in rows})

        t0 = time.perf_counter()
        summary = run_synthesis(cfg, backend=backend, progress=False, log=lambda m: None)
        total = time.perf_counter() - t0
        n_completions = summary["stages"]["sampled"]

        t0 = time.perf_counter()
        prompts = [build_prompt(it.question, pool, k=8, seed=1) for it in items]
        t_prompts = time.perf_counter() - t0
        samples = backend.sample(prompts, SamplingParams(num_samples=args.k))
        t0 = time.perf_counter()
        for it, s in zip(items, samples, strict=True):
            evaluate_question(it, s, cfg, [])
        t_eval = time.perf_counter() - t0
        kept_bytes = (Path(cfg.out) / "kept.jsonl").stat().st_size

    ms = lambda seconds: round(1000 * seconds / n_completions, 4)  # noqa: E731
    result = {
        **machine(),
        "source": source, "questions": summary["questions"], "k": args.k, "completions": n_completions,
        "batch_size": args.batch_size, "kept_examples": summary["kept_examples"], "stages": summary["stages"],
        "kept_jsonl_bytes": kept_bytes,
        "seconds": {"run_synthesis": round(total, 3), "prompts": round(t_prompts, 3),
                    "evaluate_question": round(t_eval, 3)},
        "ms_per_completion": {"run_synthesis": ms(total), "prompts": ms(t_prompts),
                              "evaluate_question": ms(t_eval),
                              "rest (rows, JSONL I/O, bookkeeping)": ms(total - t_prompts - t_eval)},
        "goal_ms_per_completion": 1.0,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
