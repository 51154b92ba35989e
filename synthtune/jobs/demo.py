"""`synthtune demo` (`make demo`): the README's whole pipeline on one small model, in one run.

1. synthesize rationales for train questions (k samples, vote, evaluator), as ``synthtune synth``;
   with ``rationalize`` (STaR), questions no sample solved are asked again with the gold answer as
   a hint, and the checked rationales are kept without it;
2. build the SFT set: the kept rationales plus the train split's gold rationales;
3. preprocess it, as ``synthtune prep``: label masks, length statistics, histogram;
4. LoRA fine-tune for a short run with the memory trace, as ``synthtune train``;
5. evaluate base against tuned on the held-out test split, as ``synthtune eval --compare``, and the
   tuned model once more with calculator-assisted decoding (``eval_calculator``).

Each stage calls the same library function as its command and writes into its own folder under
``outputs/demo/<timestamp>/``. ``report.md`` there is rewritten after every stage, so a run that
stops part-way still shows what it finished; it ends with the commands that repeat each stage by
hand and at full scale on a GPU box.
"""

from __future__ import annotations

import json
import platform
import shlex
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from synthtune import paths
from synthtune.config import DemoConfig, cli_overrides, load_config, save_config
from synthtune.errors import ConfigError
from synthtune.files import atomic_write_text

STAGES = ("synthesize", "sft set", "preprocess", "fine-tune", "evaluate")
#: the training recipe the demo starts from; its own keys are overridden by the demo's
TRAIN_RECIPE = "configs/train/smollm2_lora_cpu.yaml"
#: what each synthesis funnel stage counts (synth.pipeline.STAGES, RATIONALE_STAGES)
FUNNEL = {"sampled": "drawn", "finished": "ended before the token budget",
          "hint_free": "rationales only: it never mentions the hint", "parsed": "a final answer could be read",
          "on_target": "that answer is the gold one",
          "derived": "rationales only: a checked calculation computes the answer", "calc_ok": "and every calculation in it is right",
          "reward_ok": "and the reward model (when set) accepts it", "kept": "and it differs from the paths kept"}
#: the synthesis routes, as the report's funnel columns name them (synth.pipeline.ROUTES)
ROUTES = {"direct": "direct samples", "rationalized": "rationales (answer as hint)"}
#: base vs tuned rows of the report, in this order
REPORT_METRICS = (("format_rate", "`#### n` format followed"), ("parse_rate", "an answer could be extracted"),
                  ("strict_accuracy", "strict accuracy (`#### n` is right, by value)"),
                  ("flexible_accuracy", "flexible accuracy (last number is right, by value)"),
                  ("lm_eval_strict_match", "lm-eval's gsm8k strict-match (its string match)"),
                  ("lm_eval_flexible_extract", "lm-eval's gsm8k flexible-extract (its string match)"))


@dataclass
class DemoRun:
    """What the demo has done so far; the report is rendered from it after every stage."""

    cfg: DemoConfig
    out: Path
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    synth: dict | None = None
    synth_cmd: str | None = None
    sft: dict | None = None
    prep: dict | None = None
    prep_cmd: str | None = None
    train: dict | None = None
    train_cmd: str | None = None
    eval: dict | None = None
    eval_cmd: str | None = None
    eval_calc: dict | None = None  # the tuned model with calculator-assisted decoding
    eval_calc_cmd: str | None = None
    examples: list[dict] = field(default_factory=list)

    def rel(self, path: str | Path | None) -> str:
        """A path relative to the report, so the folder can be moved or zipped whole."""
        if path is None:
            return ""
        try:
            return str(Path(path).resolve().relative_to(self.out.resolve()))
        except ValueError:
            return str(path)


def _data_spec(cfg: DemoConfig, split: str) -> str:
    return f"{'gsm8k' if cfg.source == 'auto' else cfg.source}:{split}"


def _repo_relative(word: str) -> str:
    """``key=/abs/repo/outputs/x`` -> ``key=outputs/x``: the commands run from the repo root, and a
    report should not carry this machine's paths (outputs elsewhere stay absolute: they must)."""
    key, sep, value = word.rpartition("=")
    if value.startswith("/"):
        try:
            value = str(Path(value).resolve().relative_to(paths.REPO_ROOT.resolve()))
        except ValueError:
            pass
    return f"{key}{sep}{value}"


def _command(program: str, words: list[str]) -> str:
    return " ".join([program, *(shlex.quote(_repo_relative(w)) for w in words)])


def run_demo(cfg: DemoConfig, console=None) -> dict:
    """Run the five stages; return the summary that is also written to ``summary.json``."""
    say = (lambda m: console.print(m, soft_wrap=True, markup=False, highlight=False)) if console is not None else print
    out = Path(cfg.output_dir) if cfg.output_dir else paths.OUTPUTS_DIR / "demo" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, output_dir=str(out))
    save_config(cfg, out / "config.yaml")
    run = DemoRun(cfg, out)
    say(f"demo: {cfg.model}, {cfg.source} GSM8K -> {out}")
    for i, (name, stage) in enumerate(zip(STAGES, (_synthesize, _sft_set, _preprocess, _fine_tune, _evaluate),
                                          strict=True), 1):
        say(f"[{i}/{len(STAGES)}] {name}")
        t0 = time.perf_counter()
        line = stage(run, say)
        run.seconds[name] = round(time.perf_counter() - t0, 1)
        say(f"      {line} ({run.seconds[name]:.0f} s)")
        write_report(run)
    if console is not None:
        from synthtune.jobs.eval import comparison_table

        console.print(comparison_table(run.eval))
    summary = _summary(run)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    say(f"report: {out / 'report.md'}")
    return summary


# --------------------------------------------------------------------------------------------
# the stages: each calls the library function behind its command
# --------------------------------------------------------------------------------------------


def _synthesize(run: DemoRun, say) -> str:
    from synthtune.config import SynthConfig
    from synthtune.synth.pipeline import run_synthesis

    c = run.cfg
    scfg = SynthConfig(model=c.model, questions=_data_spec(c, "train"), gsm8k_dir=c.gsm8k_dir,
                       limit=c.synth_questions, shots=c.shots, k=c.k, rounds=c.rounds, temperature=c.temperature,
                       max_new_tokens=c.synth_max_new_tokens, seed=c.seed, device=c.device,
                       rationalize=c.rationalize, calculator=c.synth_calculator, out=str(run.out / "synth"))
    run.synth_cmd = _command("synthtune synth", cli_overrides(scfg))
    s = run_synthesis(scfg, log=lambda m: say(f"      {m}"))
    run.synth = s
    speed = (f"{s['samples']} samples at {s['tokens_per_s']} tok/s" if s["samples"]
             else "resumed: every question was already done")
    by_route = ", ".join(f"{n} {route}" for route, n in kept_by_route(s).items())
    return (f"{s['solved']} of {s['questions']} questions solved, {s['kept_examples']} rationales kept ({by_route}; "
            f"{speed})")


def kept_by_route(synth_summary: dict) -> dict[str, int]:
    """Kept rationales per synthesis route, from the summary's per-route funnel."""
    return {route: r["stages"]["kept"] for route, r in synth_summary["routes"].items()}


def build_sft_set(kept_path: Path, gold_rows: list[dict], out_path: Path) -> dict:
    """Kept rationales plus gold ones as one question/answer JSONL; exact repeats are dropped."""
    from synthtune.data.jsonl import read_jsonl, write_jsonl

    kept = read_jsonl(kept_path, required=("question", "answer")).rows if kept_path.exists() else []
    rows, seen = [], set()
    for origin, source in (("synthesized", kept), ("gold", gold_rows)):
        for r in source:
            key = (r["question"].strip(), r["answer"].strip())
            if key not in seen:
                seen.add(key)
                rows.append({"question": r["question"], "answer": r["answer"], "origin": origin})
    write_jsonl(out_path, rows)
    counts = {o: sum(r["origin"] == o for r in rows) for o in ("synthesized", "gold")}
    return {"path": str(out_path), "n": len(rows), **counts}


def _sft_set(run: DemoRun, say) -> str:
    from synthtune.data.gsm8k import load_source

    c = run.cfg
    gold = load_source(_data_spec(c, "train"), c.gsm8k_dir, limit=c.gold_limit).rows if c.gold_rationales else []
    run.sft = build_sft_set(Path(run.synth["dataset"]), gold, run.out / "sft.jsonl")
    if run.sft["n"] == 0:
        raise ConfigError("gold_rationales: the SFT set is empty (synthesis kept nothing and gold_rationales=false); "
                          "set gold_rationales=true, or raise k / rounds")
    return f"{run.sft['n']} examples ({run.sft['synthesized']} synthesized, {run.sft['gold']} gold) -> sft.jsonl"


def _preprocess(run: DemoRun, say) -> str:
    from synthtune.jobs.prep import run_prep

    c = run.cfg
    run.prep = p = run_prep(c.model, run.sft["path"], fmt=c.train_format, max_length=c.max_length,
                            out=run.out / "prep")
    run.prep_cmd = _command("synthtune prep", ["--model", c.model, "--data", run.sft["path"], "--format",
                                               c.train_format, "--max-length", str(c.max_length), "--out",
                                               str(run.out / "prep")])
    return (f"{p['n_kept']} of {p['n']} examples kept, mean {p['mean']:.0f} / p99 {p['p99']} / max {p['max']} "
            f"tokens, recommended max_length {p['recommended_max_length']}")


def demo_train_config(cfg: DemoConfig, data: str, output_dir: Path):
    """The demo's training config: the CPU LoRA recipe with the demo's model, data and budget."""
    from synthtune.config import TrainConfig

    recipe = load_config(TrainConfig, paths.REPO_ROOT / TRAIN_RECIPE)
    # Base vs tuned accuracy is measured once, in stage 5, with the same code as `synthtune eval`;
    # during training only the eval loss is tracked, so the short run spends its time learning.
    tcfg = replace(recipe, model=cfg.model, data=data, eval_data=_data_spec(cfg, "test"),
                   eval_limit=cfg.eval_questions, gsm8k_dir=cfg.gsm8k_dir,
                   prompt_format=cfg.train_format, max_length=cfg.max_length, max_steps=cfg.train_steps,
                   per_device_batch_size=cfg.train_batch_size, gradient_accumulation_steps=1,
                   learning_rate=cfg.learning_rate, warmup_steps=min(3, cfg.train_steps), lora_r=cfg.lora_r,
                   lora_alpha=2 * cfg.lora_r, eval_steps=max(1, cfg.train_steps // 3), eval_accuracy_samples=0,
                   save_steps=0,
                   logging_steps=max(1, min(5, cfg.train_steps // 6)), seed=cfg.seed, device=cfg.device,
                   output_dir=str(output_dir))
    return recipe, tcfg


def _fine_tune(run: DemoRun, say) -> str:
    from synthtune.train.loop import train

    recipe, tcfg = demo_train_config(run.cfg, run.sft["path"], run.out / "train")
    run.train_cmd = _command(f"synthtune train --config {TRAIN_RECIPE}", cli_overrides(tcfg, base=recipe))
    t = train(tcfg)
    t.pop("data", None)
    run.train = t
    mem = t["memory"]
    est = (mem.get("estimate") or {}).get("per_gpu_gib")
    return (f"{t['steps']} steps, train loss {t['first_train_loss']:.3f} -> {t['final_train_loss']:.3f}, eval loss "
            f"{t.get('final_eval_loss', float('nan')):.3f}, {t['tokens_per_s']:.0f} tok/s, peak RSS "
            f"{mem.get('peak_rss_gib')} GiB (estimate {est} GiB)")


def _evaluate(run: DemoRun, say) -> str:
    from synthtune.config import EvalConfig
    from synthtune.data.jsonl import read_jsonl
    from synthtune.jobs.eval import run_eval

    c = run.cfg
    ecfg = EvalConfig(model=c.model, adapter=run.train["final_dir"], split="test", source=c.source,
                      gsm8k_dir=c.gsm8k_dir, limit=c.eval_questions, shots=0, k=1,
                      max_new_tokens=c.eval_max_new_tokens, batch_size=c.eval_batch_size,
                      prompt_format=c.train_format, compare=True, seed=c.seed, device=c.device,
                      out=str(run.out / "eval"))
    run.eval_cmd = _command("synthtune eval", cli_overrides(ecfg))
    run.eval = e = run_eval(ecfg)
    base = read_jsonl(Path(e["out_dir"]) / "base_outputs.jsonl").rows
    tuned = read_jsonl(Path(e["out_dir"]) / "adapter_outputs.jsonl").rows
    run.examples = [{"question": b["question"], "gold": b["answer"], "base": b["completions"][0],
                     "tuned": t["completions"][0], "base_correct": b["correct"][0], "tuned_correct": t["correct"][0]}
                    for b, t in zip(base, tuned, strict=True)]
    calc = ""
    if c.eval_calculator:
        # The tuned model again, a calculator writing each <<expr=>> result: what is left wrong is
        # the reasoning, not the arithmetic. Its own folder and command, as `synthtune eval` runs it.
        ccfg = replace(ecfg, compare=False, calculator=True, out=str(run.out / "eval_calculator"))
        run.eval_calc_cmd = _command("synthtune eval", cli_overrides(ccfg))
        run.eval_calc = run_eval(ccfg)
        calc = f" ({run.eval_calc['adapter']['flexible_accuracy']:.0%} with the calculator)"
    plot_comparison(e, run.out / "eval" / "base_vs_tuned.png", run.eval_calc)
    b, t = e["base"], e["adapter"]
    return (f"format {b['format_rate']:.0%} -> {t['format_rate']:.0%}, parse {b['parse_rate']:.0%} -> "
            f"{t['parse_rate']:.0%}, accuracy {b['flexible_accuracy']:.0%} -> {t['flexible_accuracy']:.0%}{calc} "
            f"on {e['n_questions']} test questions")


# --------------------------------------------------------------------------------------------
# verdict, plots, report
# --------------------------------------------------------------------------------------------


def learned(eval_report: dict) -> list[str]:
    """The held-out metrics that rose from base to tuned (empty: the model learned nothing visible)."""
    base, tuned = eval_report["base"], eval_report["adapter"]
    return [name for name, _ in REPORT_METRICS if (tuned.get(name) or 0) > (base.get(name) or 0)]


def plot_comparison(eval_report: dict, path: Path, calc_report: dict | None = None) -> Path:
    """Base vs tuned bars per metric, and tuned + calculator beside them when ``calc_report`` is given."""
    from synthtune.plotting import png

    names = [n for n, _ in REPORT_METRICS]
    bars = [("base", eval_report["base"], "#8c8c8c"), ("tuned (LoRA)", eval_report["adapter"], "#4c72b0")]
    if calc_report is not None:
        bars.append(("tuned + calculator", calc_report["adapter"], "#55a868"))
    width = 0.8 / len(bars)
    with png(path, (6.5, 3.4)) as (_, ax):
        x = range(len(names))
        for j, (label, rates, color) in enumerate(bars):
            offset = (j - (len(bars) - 1) / 2) * width
            ax.bar([i + offset for i in x], [rates.get(n) or 0 for n in names], width=width, color=color,
                   label=label)
        # wrapped: six names side by side overlap on one line each
        ax.set_xticks(list(x), [textwrap.fill(n.replace("_", " "), 13) for n in names], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(f"share of {eval_report['n_questions']} test answers")
        ax.set_title("Held-out GSM8K: base vs tuned")
        ax.legend(fontsize=8)
    return path


def _count(rate, n: int, pct: bool = True) -> str:
    """``7/14 (50%)``: on a small test set the count says more than the percentage."""
    if rate is None:
        return "-"
    return f"{round(rate * n)}/{n}" + (f" ({rate:.0%})" if pct else "")


def _excerpt(text: str, n: int = 260) -> str:
    text = " ".join(text.split())
    return (text[:n] + " …") if len(text) > n else text


def funnel_rows(synth_summary: dict) -> list[str]:
    """The funnel as table rows, one column per route (``-``: a stage the route does not have)."""
    routes = synth_summary["routes"]
    order = list(dict.fromkeys(k for r in routes.values() for k in r["stages"]))
    order.sort(key=lambda k: list(FUNNEL).index(k) if k in FUNNEL else len(FUNNEL))
    return [f"| {k} | " + " | ".join(str(r["stages"].get(k, "-")) for r in routes.values()) + f" | {FUNNEL.get(k, '')} |"
            for k in order]


def largest_drop(stages: dict[str, int]) -> tuple[str, str, int] | None:
    """The funnel step that lost the most: (from stage, to stage, how many), or None when none lost any."""
    items = list(stages.items())
    drops = [(a[0], b[0], a[1] - b[1]) for a, b in zip(items, items[1:], strict=False) if a[1] > b[1]]
    return max(drops, key=lambda d: d[2]) if drops else None


#: what the first funnel stage with nothing left says of a route's samples (why_nothing_kept)
NONE_PASSED = {"finished": "none ended before the token budget (`finished`: raise the max new tokens)",
               "hint_free": "every one mentioned the hint (`hint_free`)",
               "parsed": "no final answer could be read in any (`parsed`)",
               "on_target": "none was the gold answer (`on_target`)",
               "derived": "in none did a checked calculation compute the answer: they copied it, and a copied "
                          "answer is no rationale to learn from (`derived`)",
               "calc_ok": "each had a wrong calculation (`calc_ok`)",
               "reward_ok": "the reward model turned each away (`reward_ok`)",
               "kept": "each repeated a path already kept (`kept`)"}


def why_nothing_kept(s: dict, rationalizing: bool) -> list[str]:
    """Why a synthesis run kept no rationale, read from its funnel: the check that turned away the
    last samples of each route."""
    parts = []
    for route, r in s["routes"].items():
        if route == "rationalized" and not rationalizing:
            continue
        stages = list(r["stages"].items())
        if not stages or not stages[0][1]:
            continue
        zero = next((i for i, (_, n) in enumerate(stages) if n == 0), None)
        if zero is None:
            continue
        before, n = stages[zero - 1]
        said = f"{ROUTES[route].capitalize()}: of {stages[0][1]} drawn"
        said += ", " if before == "sampled" else f", {n} passed `{before}`, and "
        said += NONE_PASSED.get(stages[zero][0], f"none passed `{stages[zero][0]}`")
        if route == "direct" and stages[zero][0] == "on_target":
            said += ": the model does not yet chain the steps these questions need"
        parts.append(said + ".")
    return ["**Why nothing was kept.** " + " ".join(parts) + " The SFT set is gold rationales only. More samples "
            "(`k`, `rationalize_k`), more rounds or a larger model keep more; so does sampling from the tuned "
            "model (rejection-sampling fine-tuning, as `bench/learning_bench.py` does)."]


def _section_synth(run: DemoRun) -> list[str]:
    s = run.synth
    routes = s["routes"]
    rationalizing = run.cfg.rationalize
    lines = ["## 1. Synthesize", "",
             f"{s['questions']} train questions, {run.cfg.shots}-shot prompts, k={run.cfg.k}, {run.cfg.rounds} "
             f"round(s)" + (f": {s['samples']} samples, {s['new_tokens']} new tokens at {s['tokens_per_s']} tok/s."
                             if s["samples"] else " (resumed from an earlier run in this folder)."), ""]
    if rationalizing:
        lines += [f"STaR rationalization is on: the {routes['rationalized']['questions']} questions no direct "
                  "sample solved were asked again with the gold answer as a hint (each exemplar with its own, as "
                  "in STaR's prompts). Their rationales pass the same "
                  "checks, plus two: one that mentions the hint is dropped (`hint_free`), and so is one whose "
                  "checked calculations never compute the answer, which it was handed (`derived`); kept ones are "
                  "stored without the hint.", ""]
    lines += ["| stage | " + " | ".join(ROUTES[r] for r in routes) + " | meaning |",
              "|---|" + "---|" * len(routes) + "---|", *funnel_rows(s)]
    kept = kept_by_route(s)
    lines += ["", f"**{s['solved']} of {s['questions']} questions solved, {s['kept_examples']} rationales kept: "
              + ", ".join(f"{n} {ROUTES[r]}" for r, n in kept.items()) + ".** "
              "A rationale is kept when it reaches the gold answer, its arithmetic checks out and it differs from "
              "the other kept ones (ROUGE-L).", ""]
    for route, r in routes.items():
        if route == "rationalized" and not rationalizing:
            continue
        drop = largest_drop(r["stages"])
        if drop:
            src, dst, n = drop
            lines += [f"{ROUTES[route].capitalize()}: the largest loss is between `{src}` and `{dst}`, {n} of "
                      f"{r['stages']['sampled']}."]
    if not s["kept_examples"]:
        lines += ["", *why_nothing_kept(s, rationalizing)]
    lines += [""]
    hist = Path(s["out_dir"]) / "agreement_hist.png"
    if hist.exists():
        lines += [f"![agreement]({run.rel(hist)})", ""]
    return lines


def _section_sft_prep(run: DemoRun) -> list[str]:
    lines = ["## 2. SFT set", "",
             f"`{run.rel(run.sft['path'])}`: {run.sft['n']} examples, {run.sft['synthesized']} synthesized and "
             f"{run.sft['gold']} gold rationales from the train split (never test).", ""]
    if run.prep:
        p = run.prep
        lines += ["## 3. Preprocess", "",
                  f"Format `{p['format']}`, causal labels mask the prompt with -100 and keep EOS. "
                  f"{p['n_kept']} of {p['n']} examples fit `max_length={p['max_length']}` "
                  f"({p['n_truncated']} truncated, {p['n_dropped']} dropped).", "",
                  "| mean | p50 | p90 | p99 | max | recommended max_length |", "|---|---|---|---|---|---|",
                  f"| {p['mean']:.0f} | {p['p50']} | {p['p90']} | {p['p99']} | {p['max']} | "
                  f"{p['recommended_max_length']} |", "", f"![length histogram]({run.rel(p['histogram'])})", ""]
    return lines


def _section_train(run: DemoRun) -> list[str]:
    t = run.train
    mem = t["memory"]
    est = mem.get("estimate") or {}
    lines = ["## 4. Fine-tune (LoRA)", "",
             f"{t['steps']} steps on {t['processes']} process(es), {t['trainable_params']:,} trainable of "
             f"{t['total_params']:,} parameters ({100 * t['trainable_params'] / t['total_params']:.2f}%), "
             f"{t['tokens_per_s']:.0f} tokens/s, {t['train_seconds']:.0f} s.", "",
             "| | value |", "|---|---|",
             f"| train loss, first log -> last | {t['first_train_loss']:.3f} -> {t['final_train_loss']:.3f} |",
             f"| eval loss (held-out test) | {t.get('final_eval_loss', float('nan')):.3f} |",
             f"| peak process memory (RSS) | {mem.get('peak_rss_gib')} GiB |",
             f"| `synthtune memory` estimate (model states + activations; RSS adds the runtime) | "
             f"{est.get('per_gpu_gib', '-')} GiB |",
             f"| adapter | `{run.rel(t['final_dir'])}` |", ""]
    if t.get("loss_png"):
        lines += [f"![training curve]({run.rel(t['loss_png'])})", ""]
    if mem.get("png"):
        lines += [f"![memory trace]({run.rel(mem['png'])})", ""]
    return lines


def _section_eval(run: DemoRun) -> list[str]:
    e = run.eval
    base, tuned = e["base"], e["adapter"]
    gained = learned(e)
    lines = ["## 5. Base vs tuned", "",
             f"{e['n_questions']} held-out test questions, greedy, the training prompt format.", "",
             "| metric | base | tuned |" + (" tuned + calculator |" if run.eval_calc else ""),
             "|---|---|---|" + ("---|" if run.eval_calc else "")]
    n = e["n_questions"]
    calc = run.eval_calc["adapter"] if run.eval_calc else None
    lines += [f"| {label} | {_count(base.get(m), n)} | {_count(tuned.get(m), n)} |"
              + (f" {_count(calc.get(m), n)} |" if calc else "") for m, label in REPORT_METRICS]
    if gained:
        names = [f"{m.replace('_', ' ')} {_count(base.get(m), n, pct=False)} -> {_count(tuned.get(m), n, pct=False)}"
                 for m in gained]
        verdict = ("**The tuned model learned:** " + (", ".join(names[:-1]) + " and " if len(names) > 1 else "")
                   + f"{names[-1]} rose on questions it never saw. With {n} questions one answer moves a rate by "
                   f"{1 / n:.0%}, so read a change of one or two answers as noise; a jump in the format rate is "
                   "the model taking on the training data's form.")
    else:
        verdict = ("**No held-out metric rose.** Lower loss alone does not show learning: try more train_steps, "
                   "a higher learning_rate, or more data (source=auto with the full GSM8K).")
    if calc:
        lines += ["", "*tuned + calculator*: the same tuned model, with a calculator writing the result of every "
                  "`<<a*b=` it opens (GSM8K's own decoding, Cobbe et al. 2021), so its arithmetic slips no longer "
                  "count against its reasoning."]
    lines += ["", verdict, "", f"![base vs tuned]({run.rel(Path(e['out_dir']) / 'base_vs_tuned.png')})", ""]
    for ex in run.examples[:3]:
        lines += [f"> **Q:** {_excerpt(ex['question'], 400)}", ">",
                  f"> **base** ({'right' if ex['base_correct'] else 'wrong'}): {_excerpt(ex['base'])}", ">",
                  f"> **tuned** ({'right' if ex['tuned_correct'] else 'wrong'}): {_excerpt(ex['tuned'])}", ""]
    lines += [f"Every answer: `{run.rel(Path(e['out_dir']) / 'base_outputs.jsonl')}`, "
              f"`{run.rel(Path(e['out_dir']) / 'adapter_outputs.jsonl')}`"
              + (f", `{run.rel(Path(run.eval_calc['out_dir']) / 'adapter_outputs.jsonl')}`" if calc else "")
              + ".", ""]
    return lines


#: The same five stages at full scale, with the recipes shipped in configs/. Hosts are the user's.
FULL_SCALE = """\
```bash
# 1. synthesize on GPU servers: one `vllm serve` per machine, synthtune spreads requests over them
vllm serve meta-llama/Llama-3.1-8B-Instruct --port 8000
synthtune synth --backend openai --endpoint http://gpu-1:8000/v1 --endpoint http://gpu-2:8000/v1 \\
    --model meta-llama/Llama-3.1-8B-Instruct --questions gsm8k:train --k 16 --rounds 3 --concurrency 64 batch_size=128
# 2-3. the SFT set is the kept.jsonl (add gold rationales as the demo does), then check lengths
synthtune prep --model meta-llama/Llama-3.1-8B-Instruct --data outputs/synth/<run>/kept.jsonl --max-length 512
# how much memory will it take? (per GPU, 4 GPUs, ZeRO-3)
synthtune memory --model meta-llama/Llama-3.1-8B-Instruct --method lora --lora-targets all-linear \\
    --batch-size 4 --seq-len 512 --zero-stage 3 --gpus 4
# 4. LoRA under DeepSpeed ZeRO-3 on 4 GPUs (the workshop's Flan-UL2 run: configs/train/flan_ul2_lora.yaml)
accelerate launch --config_file configs/accelerate/zero3.yaml fine_tune/train.py \\
    --config configs/train/llama_8b_lora_zero3.yaml data=outputs/synth/<run>/kept.jsonl
# 5. the full GSM8K test split, base vs tuned; then merge for serving
synthtune eval --model meta-llama/Llama-3.1-8B-Instruct --adapter outputs/train/<run>/final --compare
synthtune merge --model meta-llama/Llama-3.1-8B-Instruct --adapter outputs/train/<run>/final --out merged/
```"""


def write_report(run: DemoRun) -> Path:
    """Render ``report.md`` from the stages done so far."""
    c = run.cfg
    total = time.perf_counter() - run.started
    done = len(run.seconds)
    head = [f"# synthtune demo: {c.model}", "",
            f"{time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} ({_cpu_line()}). "
            + ("All five stages finished" if done == len(STAGES) else f"Stages finished: {done} of {len(STAGES)}")
            + f" in {total:.0f} s.", "",
            "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in run.seconds.items()], ""]
    body: list[str] = []
    if run.eval:
        body += _section_eval(run)
    if run.synth:
        body += _section_synth(run)
    if run.sft:
        body += _section_sft_prep(run)
    if run.train:
        body += _section_train(run)
    cmds = [("the whole demo", _command("synthtune demo", cli_overrides(c, skip=("output_dir",)))), ("1. synthesize", run.synth_cmd),
            ("3. preprocess", run.prep_cmd), ("4. fine-tune (or: accelerate launch --config_file "
                                              "configs/accelerate/cpu.yaml fine_tune/train.py --config ...)",
                                              run.train_cmd), ("5. evaluate", run.eval_cmd),
            ("5. the tuned model with the calculator", run.eval_calc_cmd)]
    tail = ["## Repeat it", "", "Each stage by hand, exactly as run here (stage 2 is `sft.jsonl`: kept + gold rows):",
            "", "```bash"]
    for label, cmd in cmds:
        if cmd:
            tail += [f"# {label}", cmd]
    tail += ["```", "", "At full scale on a GPU box:", "", FULL_SCALE, ""]
    path = run.out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(head + body + tail))
    tmp.replace(path)  # never a half-written report
    return path


def _cpu_line() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} torch threads"


def _summary(run: DemoRun) -> dict:
    e = run.eval
    return {
        "model": run.cfg.model, "output_dir": str(run.out), "report": str(run.out / "report.md"),
        "seconds": run.seconds, "total_s": round(time.perf_counter() - run.started, 1),
        "synth": {k: run.synth[k] for k in ("questions", "solved", "kept_examples", "samples", "tokens_per_s")}
        | {"kept_by_route": kept_by_route(run.synth)},
        "sft": run.sft,
        "prep": {k: run.prep[k] for k in ("n", "n_kept", "mean", "p99", "max", "recommended_max_length")},
        "train": {k: run.train.get(k) for k in ("steps", "first_train_loss", "final_train_loss", "final_eval_loss",
                                                "tokens_per_s", "final_dir")}
        | {"peak_rss_gib": run.train["memory"].get("peak_rss_gib")},
        "eval": {label: {n: e[label].get(n) for n, _ in REPORT_METRICS} for label in ("base", "adapter")}
        | ({"adapter_calculator": {n: run.eval_calc["adapter"].get(n) for n, _ in REPORT_METRICS}}
           if run.eval_calc else {}),
        "learned": learned(e),
    }


def run(cfg: DemoConfig, console=None) -> dict:
    """`synthtune demo`'s entry point (the same as :func:`run_demo`)."""
    return run_demo(cfg, console=console)
