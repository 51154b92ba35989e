"""Benchmark (a): ``synthtune.synth.diversity.rouge_l_matrix`` vs rouge-score on all pairs.

Run (repo root):

    .venv/bin/python bench/rouge_bench.py --out bench/results/rouge_bench_cpu.json

For each size (default 300 and 1,000 GSM8K answer texts, sampled with a fixed seed from the full
GSM8K train split when present, else the bundled sample plus perturbed near-duplicates), it times

* fast: ``rouge_l_matrix(texts)`` end to end (tokenization included), best of ``--repeats`` runs,
  with rapidfuzz on all cores and on one worker;
* reference: ``RougeScorer(["rougeL"]).score(target=texts[i], prediction=texts[j])`` for every
  ordered pair (i, j), in one Python thread, as a caller without this module would.

If the full reference would take longer than ``--full-limit-s`` (estimated from a pilot of
``--pilot-pairs`` pairs), only ``--sample-pairs`` random ordered pairs are scored and the total
is extrapolated per pair; such rows are labelled "extrapolated". The max absolute difference is
taken over every pair scored by rouge-score (all pairs, or the sample) and must be 0.0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import rapidfuzz
from rouge_score import rouge_scorer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from synthtune.synth.diversity import rouge_l_matrix  # noqa: E402


def load_texts(n_max: int, seed: int) -> tuple[list[str], str]:
    """Up to ``n_max`` GSM8K answer texts; the label says which data they are."""
    value = os.environ.get("SYNTHTUNE_GSM8K_DIR")
    full = Path(value) if value else REPO.parent / "shared" / "data" / "gsm8k"
    rng = random.Random(seed)
    if (full / "train.jsonl").exists():
        with open(full / "train.jsonl", encoding="utf-8") as fh:
            answers = [json.loads(line)["answer"] for line in fh if line.strip()]
        return rng.sample(
            answers, n_max
        ), f"GSM8K train answer texts ({full / 'train.jsonl'}, {len(answers)} rows)"
    answers = []
    for path in sorted((REPO / "data" / "gsm8k_sample").glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            answers.extend(json.loads(line)["answer"] for line in fh if line.strip())
    texts = list(answers)
    # Only 50 bundled problems: fill up with word-dropped / swapped copies (near-duplicates).
    while len(texts) < n_max:
        words = rng.choice(answers).split()
        for _ in range(rng.randint(1, 3)):
            if len(words) > 2:
                del words[rng.randrange(len(words))]
        k = rng.randrange(len(words) - 1)
        words[k], words[k + 1] = words[k + 1], words[k]
        texts.append(" ".join(words))
    rng.shuffle(texts)
    return texts[:n_max], f"bundled sample ({len(answers)} answers) + perturbed copies (full GSM8K absent)"


def time_fast(texts: list[str], repeats: int, workers: int) -> tuple[np.ndarray, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = rouge_l_matrix(texts, workers=workers)
        times.append(time.perf_counter() - t0)
    return m, times


def score_pairs(texts: list[str], pairs: list[tuple[int, int]]) -> tuple[np.ndarray, float]:
    """rouge-score F for the given ordered (target, prediction) pairs, and the wall time."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    out = np.empty(len(pairs), dtype=np.float64)
    t0 = time.perf_counter()
    for k, (i, j) in enumerate(pairs):
        out[k] = scorer.score(target=texts[i], prediction=texts[j])["rougeL"].fmeasure
    return out, time.perf_counter() - t0


def bench_size(texts: list[str], args: argparse.Namespace, rng: random.Random) -> dict:
    n = len(texts)
    n_pairs = n * n
    fast, fast_times = time_fast(texts, args.repeats, workers=-1)
    _, fast_times_1 = time_fast(texts, args.repeats, workers=1)

    # Pilot on random pairs to decide between the full loop and a sample.
    pilot = [(rng.randrange(n), rng.randrange(n)) for _ in range(min(args.pilot_pairs, n_pairs))]
    _, pilot_s = score_pairs(texts, pilot)
    estimate_s = pilot_s / len(pilot) * n_pairs
    extrapolated = estimate_s > args.full_limit_s and args.sample_pairs < n_pairs and not args.force_full
    if extrapolated:
        pairs = [(rng.randrange(n), rng.randrange(n)) for _ in range(args.sample_pairs)]
    else:
        pairs = [(i, j) for i in range(n) for j in range(n)]
    ref, ref_s = score_pairs(texts, pairs)
    idx = np.array(pairs)
    diff = float(np.max(np.abs(fast[idx[:, 0], idx[:, 1]] - ref)))
    ref_total_s = ref_s / len(pairs) * n_pairs if extrapolated else ref_s

    fast_best = min(fast_times)
    return {
        "n_texts": n,
        "n_pairs": n_pairs,
        "mean_tokens": None,  # filled by the caller
        "fast_s_best": fast_best,
        "fast_s_median": statistics.median(fast_times),
        "fast_s_all": fast_times,
        "fast_1worker_s_best": min(fast_times_1),
        "rouge_score_pairs_scored": len(pairs),
        "rouge_score_s_measured": ref_s,
        "rouge_score_s_total": ref_total_s,
        "rouge_score_extrapolated": extrapolated,
        "rouge_score_pilot_estimate_s": estimate_s,
        "rouge_score_us_per_pair": ref_s / len(pairs) * 1e6,
        "ratio": ref_total_s / fast_best,
        "ratio_1worker": ref_total_s / min(fast_times_1),
        "max_abs_diff": diff,
        "exact_equal": bool(np.array_equal(fast[idx[:, 0], idx[:, 1]], ref)),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| texts | pairs | rouge-score all pairs (s) | `rouge_l_matrix` best (s), all cores | ratio | "
        "`rouge_l_matrix` best (s), 1 worker | ratio (1 worker) | max abs diff (pairs compared) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = f"{r['rouge_score_s_total']:.1f}"
        if r["rouge_score_extrapolated"]:
            ref += (
                f" **extrapolated** ({r['rouge_score_pairs_scored']:,} sampled pairs in "
                f"{r['rouge_score_s_measured']:.1f} s)"
            )
        else:
            ref += " (measured)"
        lines.append(
            f"| {r['n_texts']:,} | {r['n_pairs']:,} | {ref} | {r['fast_s_best']:.4f} | "
            f"{r['ratio']:,.0f}x | {r['fast_1worker_s_best']:.4f} | {r['ratio_1worker']:,.0f}x | "
            f"{r['max_abs_diff']} ({r['rouge_score_pairs_scored']:,}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000])
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of rouge_l_matrix per size (best is reported)"
    )
    parser.add_argument(
        "--full-limit-s", type=float, default=360.0, help="sample rouge-score above this estimate"
    )
    parser.add_argument("--pilot-pairs", type=int, default=2000)
    parser.add_argument("--sample-pairs", type=int, default=50_000)
    parser.add_argument(
        "--force-full", action="store_true", help="score all pairs with rouge-score regardless"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)

    texts_all, data = load_texts(max(args.sizes), args.seed)
    from rouge_score import tokenizers  # only for the token-count column

    tok = tokenizers.DefaultTokenizer(False)
    load_before = os.getloadavg()
    rows = []
    for n in args.sizes:
        texts = texts_all[:n]  # nested samples: the 300 are the first 300 of the 1,000
        row = bench_size(texts, args, random.Random(args.seed + n))
        row["mean_tokens"] = float(np.mean([len(tok.tokenize(t)) for t in texts]))
        rows.append(row)
        print(f"done n={n}: ratio {row['ratio']:,.0f}x, max abs diff {row['max_abs_diff']}", file=sys.stderr)

    result = {
        "benchmark": "rouge_l_matrix vs rouge-score RougeScorer(['rougeL']) on all ordered pairs",
        "data": data,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "rapidfuzz": rapidfuzz.__version__,
            "rouge_score": metadata.version("rouge-score"),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "rows": rows,
    }
    print(f"data: {data}")
    tokens = ", ".join(f"{r['n_texts']} texts: {r['mean_tokens']:.1f}" for r in rows)
    print(f"mean rouge-score tokens per text: {tokens}")
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r["max_abs_diff"] == 0.0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
