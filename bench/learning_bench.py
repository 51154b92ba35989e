"""Learning bench: does fine-tuning (and training on the model's own kept rationales) make SmolLM2-135M
better at GSM8K, and does calculator-assisted decoding add to it? Measured with intervals and paired tests.

Run (CPU, real SmolLM2-135M-Instruct weights, the full GSM8K; about 1.5-2 h on 2 cores; resumable):
    SYNTHTUNE_GSM8K_DIR=../shared/data/gsm8k PYTHONPATH=. nohup .venv/bin/python bench/learning_bench.py \
        --out outputs/bench/learning > outputs/bench/learning.log 2>&1 &
    # rerun the same command after an interruption: finished stages and arms are skipped
    PYTHONPATH=. .venv/bin/python bench/learning_bench.py --out outputs/bench/learning --report-only

Arms, each answering the same seeded subset of ``--questions`` (300) GSM8K test questions, greedy, zero-shot in the
training prompt format (``Question: ...\\nAnswer:``), ``--max-new-tokens`` 256:

* ``base``: SmolLM2-135M-Instruct as shipped;
* ``base+calc``: the same with calculator-assisted decoding (``calculator: true``);
* ``sft``: LoRA SFT on ``--sft-examples`` gold train rationales, one epoch;
* ``sft+calc``;
* ``rft``: rejection-sampling fine-tuning (Yuan et al. 2023, "Scaling Relationship on Learning Mathematical
  Reasoning with Large Language Models"): the SFT model (merged) samples ``--rft-k`` rationales for
  ``--rft-questions`` of its own training questions through ``synthtune synth``'s evaluator (gold answer, calculator
  check, ROUGE-L diversity); a fresh LoRA from the base is trained for one epoch on the gold set plus what was kept;
* ``rft+calc``.

Nothing is tuned on the test subset: the training settings are the demo's (LoRA r 16, learning rate 5e-4, batch 8)
and the budget's (one epoch); the held-out train slice (``--heldout`` questions never trained on) gives the eval
loss each run records. Every arm writes ``arms/<arm>/outputs.jsonl`` (question, gold, completion) and
``summary.json``; a rerun skips an arm whose summary exists, and training resumes from its last checkpoint.

The report: strict accuracy (our ``#### n`` value), flexible accuracy (our last-number value), format rate
(``#### n`` written), parse rate (any answer read), and lm-eval's gsm8k strict-match and flexible-extract on the
same completions (``synthtune.data.lmeval_gsm8k``), each with a 95% Wilson interval; for each neighbouring pair
of arms, and for base vs sft+calc, the exact two-sided binomial test on the discordant pairs (McNemar's exact test)
for strict and flexible correctness. Writes ``report.json`` and ``report.md`` in ``--out`` and, with
``--record``, ``bench/results/learning_bench_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import machine, write_json  # noqa: E402

ARMS = ("base", "base+calc", "sft", "sft+calc", "rft", "rft+calc")
#: the pairs the report tests: each neighbour, plus the comparison the issue hopes for
PAIRS = tuple(zip(ARMS, ARMS[1:], strict=False)) + (("base", "sft+calc"),)
MODEL = "smollm2-135m-instruct"
#: per-question columns: ours (by value), then lm-eval's gsm8k figures on the same completions
METRICS = ("strict", "flexible", "format", "parse", "lm_eval_strict_match", "lm_eval_flexible_extract")
RECIPE = "configs/train/smollm2_lora_cpu.yaml"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


#: the standard normal quantile for a two-sided 95% interval
Z95 = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n (Wilson 1927; Newcombe 1998, method 3).

    >>> [round(x, 4) for x in wilson(6, 300)]  # scipy.stats.binomtest(6, 300).proportion_ci(method="wilson")
    [0.0092, 0.0429]
    """
    if n == 0:
        return (0.0, 1.0)
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test: two-sided binomial test of the discordant pairs against p = 1/2.

    At p = 1/2 the binomial is symmetric, so the two-sided p-value is twice the smaller tail (capped
    at 1), as scipy.stats.binomtest(only_second, n, 0.5).pvalue gives.

    >>> mcnemar_exact([True] * 9 + [False] * 3, [False] * 9 + [True] * 3)["p_value"]  # 9 vs 3 discordant
    0.145996
    """
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n if n else 0.5
    return {"only_first": only_a, "only_second": only_b, "p_value": round(min(1.0, 2 * tail), 6)}


# --------------------------------------------------------------------------------------------
# data: the test subset, the train partition
# --------------------------------------------------------------------------------------------


def gsm8k_dir(arg: str | None) -> Path:
    from synthtune import paths

    found = Path(arg) if arg else paths.gsm8k_dir()
    if found is None or not (found / "test.jsonl").exists() or not (found / "train.jsonl").exists():
        sys.exit("learning_bench needs the full GSM8K: set SYNTHTUNE_GSM8K_DIR or --gsm8k-dir to a folder with "
                 "train.jsonl and test.jsonl (the bundled sample has 14 test questions)")
    return found


#: the flags that decide what every arm answers and is trained on: a rerun must repeat them
SETTINGS = ("questions", "heldout", "sft_examples", "rft_questions", "rft_k", "batch_size", "learning_rate",
            "max_new_tokens", "seed")


def plan(args, out: Path) -> dict:
    """The fixed, seeded question sets, written once and reused by every rerun (with the same settings)."""
    path = out / "plan.json"
    settings = {k: getattr(args, k) for k in SETTINGS}
    if path.exists():
        p = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {p['settings'][k]} -> {v}" for k, v in settings.items()
                   if k in p.get("settings", {}) and p["settings"][k] != v]
        if changed:
            sys.exit(f"{out} was run with other settings ({'; '.join(changed)}): its finished arms would be "
                     f"mixed with new ones. Repeat the old flags, or pass a new --out.")
        if "settings" not in p:  # written before plan.json recorded them: the run it holds used the defaults
            p["settings"] = settings
            path.write_text(json.dumps(p) + "\n")
        return p
    from synthtune.data.gsm8k import load_split

    src = str(gsm8k_dir(args.gsm8k_dir))
    test = load_split("test", "dir", src).rows
    train = load_split("train", "dir", src).rows
    rng = random.Random(args.seed)
    test_idx = sorted(rng.sample(range(len(test)), min(args.questions, len(test))))
    order = list(range(len(train)))
    rng.shuffle(order)
    heldout = order[:args.heldout]
    sft = order[args.heldout:args.heldout + args.sft_examples]
    p = {"gsm8k_dir": src, "settings": settings, "seed": args.seed, "test": test_idx, "heldout_train": heldout, "sft_train": sft,
         "rft_questions": sft[:args.rft_questions]}
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "sft_gold.jsonl", [train[i] for i in sft])
    _write_jsonl(out / "heldout.jsonl", [train[i] for i in heldout])
    _write_jsonl(out / "rft_questions.jsonl", [train[i] for i in p["rft_questions"]])
    path.write_text(json.dumps(p) + "\n")
    return p


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from synthtune.data.jsonl import write_jsonl

    write_jsonl(path, [{"question": r["question"], "answer": r["answer"]} for r in rows])


def subset_rows(p: dict) -> list[dict]:
    from synthtune.data.gsm8k import load_split

    rows = load_split("test", "dir", p["gsm8k_dir"]).rows
    return [rows[i] for i in p["test"]]


# --------------------------------------------------------------------------------------------
# training and synthesis
# --------------------------------------------------------------------------------------------


def train_lora(args, data: Path, heldout: Path, out_dir: Path) -> str:
    """One epoch of LoRA on ``data`` from the base model; the adapter directory. Resumes a cut run."""
    from synthtune.config import TrainConfig, load_config
    from synthtune.data.jsonl import read_jsonl
    from synthtune.train.checkpoint import checkpoints
    from synthtune.train.loop import train

    final = out_dir / "final"
    if (final / "adapter_config.json").exists():
        return str(final)
    n = len(read_jsonl(data).rows)
    steps = math.ceil(n / args.batch_size)
    recipe = load_config(TrainConfig, Path(__file__).resolve().parents[1] / RECIPE)
    cfg = replace(recipe, model=MODEL, data=str(data), eval_data=str(heldout), eval_limit=args.heldout,
                  prompt_format="plain", max_length=512, max_steps=steps, per_device_batch_size=args.batch_size,
                  gradient_accumulation_steps=1, learning_rate=args.learning_rate, warmup_steps=min(10, steps),
                  lora_r=16, lora_alpha=32, eval_steps=0, eval_accuracy_samples=0, save_steps=20,
                  save_total_limit=1, logging_steps=5, seed=args.seed, output_dir=str(out_dir),
                  resume_from="latest" if checkpoints(out_dir) else None)
    log(f"train {out_dir.name}: {n} examples, {steps} steps")
    result = train(cfg, progress=False)
    keep = {k: result.get(k) for k in ("steps", "first_train_loss", "final_train_loss", "final_eval_loss",
                                        "tokens_per_s", "train_seconds")}
    (out_dir / "bench_train.json").write_text(json.dumps(keep, indent=2) + "\n")
    return str(final)


def rft_set(args, out: Path, sft_adapter: str) -> Path:
    """Gold rationales plus the SFT model's own kept ones (``synthtune synth`` with the merged SFT model)."""
    from synthtune.config import SynthConfig
    from synthtune.data.jsonl import read_jsonl, write_jsonl
    from synthtune.jobs.merge import merge_adapter
    from synthtune.synth.pipeline import run_synthesis

    path = out / "rft_set.jsonl"
    if path.exists():
        return path
    merged = out / "sft_merged"
    if not (merged / "config.json").exists():
        log("merge the SFT adapter for synthesis")
        if merged.exists():
            import shutil

            shutil.rmtree(merged)
        report = merge_adapter(MODEL, sft_adapter, merged)
        log(f"merged: logits within {report['max_abs_diff_merged']:.3g} of the adapter's "
            f"(tolerance {report['tolerance']:.3g})")
    scfg = SynthConfig(model=str(merged), questions=str(out / "rft_questions.jsonl"), exemplars=str(out / "heldout.jsonl"),
                       shots=0, prompt_format="plain", k=args.rft_k, rounds=1, temperature=0.7, top_p=0.95,
                       max_new_tokens=args.max_new_tokens, batch_size=4, seed=args.seed, out=str(out / "synth"))
    log(f"synthesize: {args.rft_questions} questions x {args.rft_k} samples with the SFT model")
    s = run_synthesis(scfg, log=log)
    (out / "synth_summary.json").write_text(json.dumps(s, indent=2, default=str) + "\n")
    kept = read_jsonl(Path(s["dataset"])).rows if Path(s["dataset"]).exists() else []  # none kept: no file
    gold = read_jsonl(out / "sft_gold.jsonl").rows
    rows = [{"question": r["question"], "answer": r["answer"]} for r in gold]
    seen = {(r["question"].strip(), r["answer"].strip()) for r in rows}
    for r in kept:
        key = (r["question"].strip(), r["answer"].strip())
        if key not in seen:
            seen.add(key)
            rows.append({"question": r["question"], "answer": r["answer"]})
    write_jsonl(path, rows)
    log(f"RFT set: {len(gold)} gold + {len(rows) - len(gold)} synthesized")
    return path


# --------------------------------------------------------------------------------------------
# arms
# --------------------------------------------------------------------------------------------


def adapter_for(arm: str, args, out: Path) -> str | None:
    family = arm.split("+")[0]
    if family == "base":
        return None
    sft = train_lora(args, out / "sft_gold.jsonl", out / "heldout.jsonl", out / "train_sft")
    if family == "sft":
        return sft
    return train_lora(args, rft_set(args, out, sft), out / "heldout.jsonl", out / "train_rft")


def run_arm(arm: str, args, out: Path, rows: list[dict], loaded: dict) -> dict:
    from synthtune.config import EvalConfig
    from synthtune.data.jsonl import write_jsonl
    from synthtune.jobs.eval import evaluate_model
    from synthtune.models import load_with_adapter

    done = out / "arms" / arm / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    adapter = adapter_for(arm, args, out)
    if loaded.get("adapter", "?") != adapter:  # the two arms of a model share one load
        loaded.clear()
        loaded.update(adapter=adapter, lm=load_with_adapter(MODEL, adapter, device="cpu", seed=args.seed))
    calc = arm.endswith("+calc")
    cfg = EvalConfig(model=MODEL, adapter=adapter, split="test", source="dir", shots=0, k=1,
                     max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, prompt_format="plain",
                     seed=args.seed, calculator=calc)
    log(f"arm {arm}: {len(rows)} questions")
    scored, summary = evaluate_model(cfg, loaded["lm"], rows, [], progress=False)
    arm_dir = done.parent
    arm_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(arm_dir / "outputs.jsonl", [{"question": r["question"], "answer": r["answer"],
                                             "completion": r["completions"][0]} for r in scored])
    summary = {"arm": arm, "adapter": adapter, "calculator": calc, **summary}
    done.write_text(json.dumps(summary, indent=2) + "\n")
    log(f"arm {arm}: strict {summary['strict_accuracy']:.3f} flexible {summary['flexible_accuracy']:.3f} "
        f"in {summary['seconds']:.0f} s")
    return summary


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def per_question(arm_dir: Path) -> dict[str, list[bool]]:
    """Each question's strict/flexible correctness, format and parse, recomputed from the stored completions."""
    from synthtune.data.answers import extract_answer, extract_flexible, extract_gold, extract_strict
    from synthtune.data.jsonl import read_jsonl
    from synthtune.data.lmeval_gsm8k import lm_eval_score

    cols: dict[str, list[bool]] = {m: [] for m in METRICS}
    for r in read_jsonl(arm_dir / "outputs.jsonl").rows:
        gold, text = extract_gold(r["answer"]), r["completion"]
        strict = extract_strict(text)
        cols["strict"].append(strict is not None and strict == gold)
        cols["flexible"].append(extract_flexible(text) == gold)
        cols["format"].append(strict is not None)
        cols["parse"].append(extract_answer(text) is not None)
        lm = lm_eval_score(text, r["answer"])  # lm-eval's gsm8k rules, string match (docs/evaluation.md)
        cols["lm_eval_strict_match"].append(lm.strict_correct)
        cols["lm_eval_flexible_extract"].append(lm.flexible_correct)
    return cols


def calculations(arm_dir: Path) -> dict:
    """How the arm's arithmetic fared: every ``<<a*b=c>>`` and ``a op b = c`` in its completions,
    checked by the calculator (``synthtune eval``'s own ``calc_*`` figures)."""
    from synthtune.data.jsonl import read_jsonl
    from synthtune.jobs.eval import calc_summary

    got = calc_summary(r["completion"] for r in read_jsonl(arm_dir / "outputs.jsonl").rows)
    return {"checked": got["calc_checked"], "correct": got["calc_correct"], "rate": got["calc_accuracy"]}


def report(out: Path) -> dict:
    arms = [a for a in ARMS if (out / "arms" / a / "summary.json").exists()]
    cols = {a: per_question(out / "arms" / a) for a in arms}
    table = {}
    for a in arms:
        n = len(cols[a]["strict"])
        table[a] = {"n": n, **{m: {"k": sum(v), "rate": sum(v) / n, "wilson95": wilson(sum(v), n)}
                               for m, v in cols[a].items()},
                    "calculations": calculations(out / "arms" / a)}
    tests = [{"first": x, "second": y, **{m: mcnemar_exact(cols[x][m], cols[y][m]) for m in ("strict", "flexible")}}
             for x, y in PAIRS if x in cols and y in cols]
    extra = {}
    for name in ("synth_summary.json",):
        if (out / name).exists():
            s = json.loads((out / name).read_text())
            extra["rft_synthesis"] = {k: s.get(k) for k in ("questions", "solved", "kept_examples", "samples",
                                                            "tokens_per_s", "stages")}
    for run in ("train_sft", "train_rft"):
        f = out / run / "bench_train.json"
        if f.exists():
            extra[run] = json.loads(f.read_text())
    seconds = {a: json.loads((out / "arms" / a / "summary.json").read_text()).get("seconds") for a in arms}
    result = {"arms": table, "paired_tests": tests, "eval_seconds": seconds, **extra}
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(markdown(result) + "\n")
    return result


def _cell(m: dict) -> str:
    lo, hi = m["wilson95"]
    return f"{m['k']} ({100 * m['rate']:.1f}%, {100 * lo:.1f}-{100 * hi:.1f})"


def markdown(result: dict) -> str:
    lines = ["| arm | strict | flexible | format | parse | lm-eval strict-match | lm-eval flexible-extract | "
             "calculations right |", "|---|---|---|---|---|---|---|---|"]
    for a, t in result["arms"].items():
        c = t["calculations"]
        calc = f"{c['correct']}/{c['checked']} ({100 * c['rate']:.1f}%)" if c["checked"] else "none"
        lines.append(f"| {a} (n={t['n']}) | " + " | ".join(_cell(t[m]) for m in METRICS) + f" | {calc} |")
    lines += ["", "| pair | strict: only first / only second, p | flexible: only first / only second, p |",
              "|---|---|---|"]
    for t in result["paired_tests"]:
        cells = [f"{t[m]['only_first']} / {t[m]['only_second']}, p = {t[m]['p_value']:.3g}" for m in ("strict",
                                                                                                     "flexible")]
        lines.append(f"| {t['first']} vs {t['second']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/bench/learning"))
    ap.add_argument("--gsm8k-dir", default=None, help="default: $SYNTHTUNE_GSM8K_DIR")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--questions", type=int, default=300, help="test questions (seeded subset)")
    ap.add_argument("--heldout", type=int, default=50, help="train questions held out (eval loss)")
    ap.add_argument("--sft-examples", type=int, default=640, help="gold train rationales for SFT (one epoch)")
    ap.add_argument("--rft-questions", type=int, default=160, help="SFT training questions the SFT model samples on")
    ap.add_argument("--rft-k", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="recompute the report from the finished arms")
    ap.add_argument("--record", type=Path, default=None, help="also write the result JSON here "
                    "(bench/results/learning_bench_cpu.json)")
    args = ap.parse_args(argv)
    out = args.out
    t0 = time.perf_counter()
    if not args.report_only:
        p = plan(args, out)
        rows = subset_rows(p)
        loaded: dict = {}
        for arm in args.arms:
            run_arm(arm, args, out, rows, loaded)
            report(out)
    result = report(out)
    print(markdown(result))
    if args.record:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "record"}
        write_json({**machine(), "settings": settings, "session_seconds": round(time.perf_counter() - t0, 1),
                    **result}, args.record)
    log(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
