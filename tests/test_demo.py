"""The demo's own pieces: the SFT set, the learned-or-not verdict, the commands it prints, plots.

Run: pytest tests/test_demo.py   (the whole demo on tiny-llama runs in tests/test_cli.py)
"""

from __future__ import annotations

import json
import shlex

from synthtune import paths
from synthtune.config import DemoConfig, SynthConfig, TrainConfig, cli_overrides, load_config
from synthtune.jobs.demo import TRAIN_RECIPE, build_sft_set, demo_train_config, learned
from synthtune.train.plots import plot_history


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_set_puts_kept_first_keeps_gold_and_drops_exact_repeats(tmp_path):
    kept = _jsonl(tmp_path / "kept.jsonl", [
        {"question": "Q1", "answer": "a model's path\n#### 3", "rationale": "...", "scores": {}},
        {"question": "Q1", "answer": "a model's path\n#### 3"},  # a repeat (e.g. two runs into one folder)
    ])
    gold = [{"question": "Q1", "answer": "the gold path\n#### 3"}, {"question": "Q2 ", "answer": "x\n#### 1"},
            {"question": "Q2", "answer": "x\n#### 1"}]  # same after stripping: one row
    info = build_sft_set(kept, gold, tmp_path / "sft.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert [(r["question"].strip(), r["origin"]) for r in rows] == [("Q1", "synthesized"), ("Q1", "gold"),
                                                                     ("Q2", "gold")]
    assert set(rows[0]) == {"question", "answer", "origin"}  # scores/provenance stay in kept.jsonl
    assert info == {"path": str(tmp_path / "sft.jsonl"), "n": 3, "synthesized": 1, "gold": 2}


def test_sft_set_without_a_kept_file_is_gold_only(tmp_path):
    info = build_sft_set(tmp_path / "missing.jsonl", [{"question": "Q", "answer": "#### 1"}], tmp_path / "s.jsonl")
    assert (info["n"], info["synthesized"], info["gold"]) == (1, 0, 1)


def test_learned_lists_only_metrics_that_rose():
    base = {"format_rate": 0.0, "parse_rate": 0.93, "strict_accuracy": 0.0, "flexible_accuracy": 0.07}
    assert learned({"base": base, "adapter": {**base, "format_rate": 1.0, "parse_rate": 1.0}}) == [
        "format_rate", "parse_rate"]
    assert learned({"base": base, "adapter": {**base, "flexible_accuracy": 0.0}}) == []
    assert learned({"base": base, "adapter": {**base, "strict_accuracy": None}}) == []


def test_cli_overrides_rebuild_the_config():
    cfg = SynthConfig(k=3, limit=5, stop=["\nQ:", "a b"], min_reward=0.5, out="out dir/x", use_gold=False)
    words = cli_overrides(cfg)
    assert load_config(SynthConfig, None, words) == cfg
    assert all(w.split("=")[0] in {"k", "limit", "stop", "min_reward", "out", "use_gold"} for w in words)
    assert cli_overrides(SynthConfig()) == []


def test_the_printed_train_command_reproduces_the_demo_training_config(tmp_path):
    recipe, tcfg = demo_train_config(DemoConfig(model="tiny-llama", train_steps=7), "data/sft.jsonl", tmp_path / "t")
    assert (tcfg.max_steps, tcfg.eval_accuracy_samples, tcfg.gradient_accumulation_steps) == (7, 0, 1)
    assert (tcfg.eval_data, tcfg.eval_limit) == ("bundled:test", DemoConfig().eval_questions)
    words = shlex.split(" ".join(cli_overrides(tcfg, base=recipe)))  # as a shell would split the report's line
    assert load_config(TrainConfig, paths.REPO_ROOT / TRAIN_RECIPE, words) == tcfg


def test_plot_history_draws_losses_and_rates(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("pdf")  # any backend the user chose, as a notebook's inline one
    hist = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
            {"step": 2, "eval/loss": 1.7, "eval/accuracy": 0.1, "eval/format_rate": 0.5}]
    path = plot_history(hist, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # library plots never switch the process's backend (a notebook's inline plots would stop showing)
    assert matplotlib.get_backend() == "pdf"
    matplotlib.use(backend)
    assert plot_history([{"step": 3, "eval/accuracy": 0.2}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()



def test_latest_run_is_found_under_train_and_under_demo_runs(tmp_path):
    import os

    from synthtune.train.checkpoint import find_latest_run

    def finished(path, mtime):
        (path / "final").mkdir(parents=True)
        (path / "summary.json").write_text("{}")
        os.utime(path / "summary.json", (mtime, mtime))
        return path

    assert find_latest_run(tmp_path / "train", tmp_path / "demo") is None  # neither exists yet
    finished(tmp_path / "train" / "smoke", 1_000)
    (tmp_path / "train" / "crashed").mkdir()  # no final/: never a candidate
    demo = finished(tmp_path / "demo" / "20261128-064000" / "train", 2_000)
    assert find_latest_run(tmp_path / "train", tmp_path / "demo") == demo
    assert find_latest_run(tmp_path / "train") == tmp_path / "train" / "smoke"


def _synth_summary(direct_kept=0, rationalized_kept=2):
    from synthtune.synth.pipeline import RATIONALE_STAGES, STAGES

    direct = dict(zip(STAGES, (32, 30, 25, 4, 3, 3, direct_kept), strict=True))
    rat = dict(zip(RATIONALE_STAGES, (28, 27, 26, 26, 9, 7, 5, 5, rationalized_kept), strict=True))
    return {"questions": 8, "solved": 3, "kept_examples": direct_kept + rationalized_kept, "samples": 60,
            "new_tokens": 9000, "tokens_per_s": 40.0, "out_dir": "/nowhere", "stages": direct,
            "routes": {"direct": {"questions": 8, "stages": direct}, "rationalized": {"questions": 7, "stages": rat}}}


def test_the_funnel_has_a_column_per_route_and_says_what_each_kept():
    from synthtune.jobs.demo import FUNNEL, funnel_rows, kept_by_route, largest_drop

    s = _synth_summary(direct_kept=1)
    rows = funnel_rows(s)
    assert rows[0].startswith("| sampled | 32 | 28 |")
    assert rows[2].startswith("| hint_free | - | 26 |")  # a stage of the rationale route only
    assert rows[5].startswith("| derived | - | 7 |")
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == list(FUNNEL)
    assert rows[-1].startswith("| kept | 1 | 2 |")
    assert kept_by_route(s) == {"direct": 1, "rationalized": 2}
    assert largest_drop(s["routes"]["direct"]["stages"]) == ("parsed", "on_target", 21)
    assert largest_drop({"sampled": 2, "kept": 2}) is None


def test_a_run_that_kept_nothing_says_which_check_failed():
    from synthtune.jobs.demo import why_nothing_kept
    from synthtune.synth.pipeline import RATIONALE_STAGES, STAGES

    def why(direct, rat, rationalizing=True):
        s = {"routes": {"direct": {"stages": dict(zip(STAGES, direct, strict=True))},
                        "rationalized": {"stages": dict(zip(RATIONALE_STAGES, rat, strict=True))}}}
        return " ".join(why_nothing_kept(s, rationalizing))

    # the demo's case: nothing on target directly; handed the answer, 8 end on it and none computes it
    copied = why((32, 32, 32, 0, 0, 0, 0), (32, 31, 31, 31, 8, 0, 0, 0, 0))
    assert "Direct samples: of 32 drawn, 32 passed `parsed`, and none was the gold answer" in copied
    assert "chain the steps" in copied
    assert "of 32 drawn, 8 passed `on_target`, and in none did a checked calculation compute the answer" in copied
    # nothing could be read; every rationale named the hint; computed but with a wrong calculation
    unread = why((32, 30, 0, 0, 0, 0, 0), (32, 0, 0, 0, 0, 0, 0, 0, 0))
    assert "30 passed `finished`, and no final answer could be read" in unread and "chain the steps" not in unread
    assert "Rationales (answer as hint): of 32 drawn, none ended before the token budget" in unread
    named = why((32, 32, 32, 2, 0, 0, 0), (32, 31, 0, 0, 0, 0, 0, 0, 0))
    assert "2 passed `on_target`, and each had a wrong calculation" in named
    assert "31 passed `finished`, and every one mentioned the hint" in named
    wrong = why((32, 32, 32, 0, 0, 0, 0), (32, 31, 31, 31, 8, 3, 0, 0, 0))
    assert "3 passed `derived`, and each had a wrong calculation (`calc_ok`)" in wrong
    off = why((32, 32, 32, 0, 0, 0, 0), (0,) * 9, rationalizing=False)
    assert "Rationales" not in off and "Direct samples" in off


def _demo_run(tmp_path, calc: bool):
    from synthtune.jobs.demo import DemoRun

    rates = {"format_rate": 0.5, "parse_rate": 1.0, "strict_accuracy": 2 / 14, "flexible_accuracy": 3 / 14}
    run = DemoRun(DemoConfig(), tmp_path)
    run.synth = _synth_summary(rationalized_kept=0)
    run.eval = {"n_questions": 14, "out_dir": str(tmp_path / "eval"), "base": {**rates, "format_rate": 0.0},
                "adapter": rates}
    if calc:
        run.eval_calc = {"n_questions": 14, "out_dir": str(tmp_path / "eval_calculator"),
                         "adapter": {**rates, "flexible_accuracy": 5 / 14}}
    return run


def test_the_report_shows_tuned_with_the_calculator_beside_tuned(tmp_path):
    from synthtune.jobs.demo import write_report

    text = write_report(_demo_run(tmp_path, calc=True)).read_text()
    assert "| metric | base | tuned | tuned + calculator |" in text
    assert "| flexible accuracy (last number is right, by value) | 3/14 (21%) | 3/14 (21%) | 5/14 (36%) |" in text
    assert "eval_calculator/adapter_outputs.jsonl" in text
    # the funnel: both routes, what each kept, and with nothing kept, where each lost the most
    assert "| stage | direct samples | rationales (answer as hint) | meaning |" in text
    assert "0 direct samples, 0 rationales (answer as hint)" in text
    assert "Rationales (answer as hint): the largest loss is between `on_target` and `calc_ok`" not in text
    assert "Rationales (answer as hint): the largest loss is between `parsed` and `on_target`, 17 of 28." in text
    plain = write_report(_demo_run(tmp_path, calc=False)).read_text()
    assert "| metric | base | tuned |\n" in plain and "calculator" not in plain.split("## 1.")[0]
