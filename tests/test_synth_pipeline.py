import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import datasets
import pytest

from synthtune.config import ConfigError, SynthConfig
from synthtune.synth.pipeline import KEPT, STATUS, evaluate_question, load_items, run_synthesis
from synthtune.synth.sampler import Sample

sys.path.insert(0, str(Path(__file__).parent))
from synth_helpers import ScriptedBackend  # noqa: E402


def _cfg(tmp_path, **kw):
    base = dict(questions="bundled:train", out=str(tmp_path / "run"), k=5, rounds=2, batch_size=3, shots=2,
                exemplar_pool_size=12, prompt_format="plain")
    base.update(kw)
    return SynthConfig(**base)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_questions_and_exemplars_are_disjoint_and_never_test(tmp_path):
    items, pool, spec = load_items(_cfg(tmp_path))
    assert spec == "bundled:train" and len(pool) == 12 and len(items) == 36 - 12
    asked = {it.question for it in items}
    assert not asked & {r["question"] for r in pool}
    with pytest.raises(ConfigError, match="test split"):
        load_items(_cfg(tmp_path, questions="bundled:test", exemplars="bundled:test"))
    # questions from test, exemplars default to the train split of the same source
    items, pool, spec = load_items(_cfg(tmp_path, questions="bundled:test"))
    assert spec == "bundled:train" and len(pool) == 36 and len(items) == 14


def test_evaluator_keeps_distinct_correct_paths(tmp_path):
    cfg = _cfg(tmp_path)
    items, _, _ = load_items(cfg)
    it = items[0]
    samples = ScriptedBackend().completions(it.question, 5)
    kept, status, scores = evaluate_question(it, samples, cfg, kept_before=[])
    # 0 reference, 1 its duplicate (dropped by ROUGE-L), 2 reworded correct, 3 wrong, 4 no answer
    assert kept == [0, 2]
    assert status["reason"] == "kept" and status["consensus"] is True
    assert status["stages"] == {"sampled": 5, "finished": 5, "parsed": 4, "on_target": 3, "calc_ok": 3,
                                "reward_ok": 3, "kept": 2}
    assert scores["gold"] == [1.0, 1.0, 1.0, 0.0, 0.0]
    # a path already kept in an earlier round blocks its near-copies now
    kept2, status2, _ = evaluate_question(it, samples, cfg, kept_before=[samples[0].text])
    assert kept2 == [2] and status2["stages"]["kept"] == 1


def test_evaluator_rejects_unfinished_and_bad_arithmetic(tmp_path):
    cfg = _cfg(tmp_path)
    it = load_items(cfg)[0][0]
    gold = it.gold.split("####")[-1].strip()
    samples = [Sample(f"2*3 = <<2*3=7>>7\n#### {gold}", 5, "eos"),  # right answer, wrong arithmetic
               Sample(f"so it is #### {gold}", 5, "length")]  # cut off by max_new_tokens
    kept, status, _ = evaluate_question(it, samples, cfg, [])
    assert kept == [] and status["reason"] == "no_passing_path"
    assert status["stages"]["finished"] == 1 and status["stages"]["calc_ok"] == 0


def test_self_consistency_without_gold(tmp_path):
    cfg = _cfg(tmp_path, use_gold=False, min_agreement=0.5)
    it = load_items(cfg)[0][0]
    assert it.gold is None
    agree = [Sample("4 + 4 = 8\n#### 8", 5, "eos"), Sample("Four and four is 8 in all. The answer is 8.", 5, "eos"),
             Sample("#### 9", 2, "eos")]
    kept, status, _ = evaluate_question(it, agree, cfg, [])
    assert status["majority"] == "8" and status["vote_share"] == pytest.approx(2 / 3, abs=1e-4) and kept == [0, 1]
    split = [Sample("#### 1", 2, "eos"), Sample("#### 2", 2, "eos"), Sample("#### 3", 2, "eos")]
    kept, status, _ = evaluate_question(it, split, cfg, [])
    assert kept == [] and status["reason"] == "no_consensus" and status["consensus"] is False


def test_min_reward_filters_and_ranks(tmp_path):
    cfg = _cfg(tmp_path, min_reward=0.5)
    it = load_items(cfg)[0][0]
    samples = ScriptedBackend().completions(it.question, 3)
    reward = lambda q, comps, gold: [0.9 if c.startswith("Let me") else 0.1 for c in comps]  # noqa: E731
    kept, status, scores = evaluate_question(it, samples, cfg, [], reward_fn=reward)
    assert kept == [2] and status["stages"]["reward_ok"] == 1 and scores["reward"][2] == 0.9


def test_rounds_resume_and_dataset(tmp_path):
    cfg = _cfg(tmp_path)
    backend = ScriptedBackend()
    summary = run_synthesis(cfg, backend=backend, progress=False, log=lambda m: None)
    assert summary["questions"] == 24 and summary["solved"] == 24 and summary["kept_examples"] == 48
    assert summary["stages"]["sampled"] == 24 * 5 and len(summary["rounds"]) == 1
    out = Path(cfg.out)
    kept = _rows(out / KEPT)
    assert len(kept) == 48 and len({(r["id"], r["rationale"]) for r in kept}) == 48
    row = kept[0]
    assert row["answer"].endswith(f"#### {row['final_answer']}") and row["final_answer"] == row["gold"]
    assert set(row["provenance"]) >= {"model", "backend", "prompt_sha", "round", "seed"}
    assert (out / "agreement_hist.png").stat().st_size > 1000
    ds = datasets.load_dataset("json", data_files=str(out / KEPT), split="train")
    assert ds.num_rows == 48 and "rationale" in ds.column_names
    # a rerun skips every finished question: no new samples, nothing duplicated
    again = ScriptedBackend()
    summary2 = run_synthesis(cfg, backend=again, progress=False, log=lambda m: None)
    assert again.calls == 0 and summary2["kept_examples"] == 48 and len(_rows(out / KEPT)) == 48


def test_unsolved_questions_go_round_again_then_fail(tmp_path):
    cfg = _cfg(tmp_path, rounds=3, k=2, k_growth=2.0)
    summary = run_synthesis(cfg, backend=ScriptedBackend(mode="wrong"), progress=False, log=lambda m: None)
    assert summary["solved"] == 0 and summary["failed"] == 24 and summary["failed_reasons"] == {"no_passing_path": 24}
    assert [r["k"] for r in summary["rounds"]] == [2, 4, 8]
    assert [r["temperature"] for r in summary["rounds"]] == [0.7, 0.9, 1.1]
    status = _rows(Path(cfg.out) / STATUS)
    assert len(status) == 24 * 3 and {r["status"] for r in status if r["round"] == 2} == {"failed"}
    # more rounds later: the failed questions continue from round 4
    more = ScriptedBackend()
    summary = run_synthesis(_cfg(tmp_path, rounds=4, k=2, k_growth=2.0), backend=more, progress=False,
                            log=lambda m: None)
    assert summary["solved"] == 24 and summary["rounds"][0]["round"] == 4


def test_changed_settings_refuse_to_resume(tmp_path):
    run_synthesis(_cfg(tmp_path, rounds=1), backend=ScriptedBackend(), progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match="other settings.*shots"):
        run_synthesis(_cfg(tmp_path, shots=3), backend=ScriptedBackend(), progress=False, log=lambda m: None)


def test_kill_9_midway_then_rerun_has_no_duplicates(tmp_path):
    out = tmp_path / "killed"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"from synth_helpers import run_in_subprocess\nrun_in_subprocess({str(out)!r}, 0.4)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a few batches are on disk
        if (out / STATUS).exists() and len(_rows(out / STATUS)) >= 6:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(_rows(out / STATUS))
    assert 6 <= done_before < 24, "the kill must land in the middle of the run"
    cfg = SynthConfig(questions="bundled:train", out=str(out), k=5, rounds=1, batch_size=2, shots=2,
                      exemplar_pool_size=12, prompt_format="plain")
    summary = run_synthesis(cfg, backend=ScriptedBackend(), progress=False, log=lambda m: None)
    kept = _rows(out / KEPT)
    status = _rows(out / STATUS)
    assert summary["solved"] == 24 and len(kept) == 48
    assert len({(r["id"], r["rationale"]) for r in kept}) == len(kept)
    assert len({(r["id"], r["round"]) for r in status}) == len(status) == 24


def test_torn_last_lines_are_repaired_so_later_resumes_still_work(tmp_path):
    # A crash mid-write leaves a fragment with no newline at the end of a file. The first resume must
    # drop it *and rewrite the file*, or the next append buries it mid-file and the resume after
    # that refuses the file as corrupted.
    cfg = _cfg(tmp_path, rounds=1, limit=6)
    out = Path(cfg.out)
    run_synthesis(replace(cfg, limit=3), backend=ScriptedBackend(), progress=False, log=lambda m: None)
    n_kept = len(_rows(out / KEPT))
    for name in (STATUS, KEPT):
        with open(out / name, "a") as fh:
            fh.write('{"id": "torn-fragment", "round": 0, "sta')  # the torn row of a batch in flight
    summary = run_synthesis(cfg, backend=ScriptedBackend(), progress=False, log=lambda m: None)
    assert summary["solved"] == 6
    for name in (STATUS, KEPT):
        text = (out / name).read_text()
        assert "torn-fragment" not in text and text.endswith("\n")
    assert len(_rows(out / STATUS)) == 6 and len(_rows(out / KEPT)) == 2 * 6 > n_kept
    # a third run reads both files cleanly and has nothing left to do
    again = ScriptedBackend()
    run_synthesis(cfg, backend=again, progress=False, log=lambda m: None)
    assert again.calls == 0


def test_synth_cli_on_tiny_model(synthtune_bin, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([synthtune_bin, "synth", "--model", "tiny-llama", "--questions", "bundled:test",
                           "--k", "2", "--rounds", "1", "--limit", "3", "--out", str(out), "--json",
                           "max_new_tokens=12", "shots=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["questions"] == 3 and summary["stages"]["sampled"] == 6
    assert len(_rows(out / STATUS)) == 3 and (out / "config.yaml").exists()
    assert summary["new_tokens"] > 0 and summary["tokens_per_s"] > 0


def test_reward_model_scorer_with_a_real_classifier(tmp_path):
    # A tiny random sequence-classification model saved to disk: the scorer loads it like any
    # local path or hub id and returns one float per completion, deterministic and input-dependent.
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from synthtune.models import load_config, resolve_model
    from synthtune.synth.scorers import RewardModelScorer

    cfg = load_config("tiny-llama")
    cfg.num_labels = 1
    import torch

    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(resolve_model("tiny-llama")).save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"), device="cpu", batch_size=2)
    comps = ["4 + 4 = 8\n#### 8", "I give up.", "The answer is 8, because 4 and 4 make 8."]
    a = scorer("What is 4 + 4?", comps)
    assert len(a) == 3 and all(isinstance(x, float) for x in a)
    assert a == scorer("What is 4 + 4?", comps)
    assert len(set(a)) > 1


class _Recording:
    """A real backend, wrapped: records every question's samples, and interrupts (as Ctrl-C would)
    before its ``stop_at``-th call, after the earlier batches were written."""

    def __init__(self, inner, stop_at=None):
        self.inner, self.stop_at, self.calls, self.seen = inner, stop_at, 0, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sample(self, prompts, params):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        outs = self.inner.sample(prompts, params)
        for p, samples in zip(prompts, outs, strict=True):
            self.seen.setdefault(p.question, []).append([s.text for s in samples])
        return outs


def test_a_resumed_run_draws_the_samples_an_uninterrupted_run_draws(tmp_path):
    from synthtune.synth.backends import make_backend

    hf = make_backend("hf", "tiny-llama")  # random weights: nothing is solved, so round 2 runs too
    settings = dict(model="tiny-llama", limit=6, batch_size=2, k=2, rounds=2, shots=1, max_new_tokens=6)
    whole = _Recording(hf)
    run_synthesis(_cfg(tmp_path, out=str(tmp_path / "whole"), **settings), backend=whole, progress=False,
                  log=lambda m: None)
    cfg = _cfg(tmp_path, out=str(tmp_path / "cut"), **settings)
    first = _Recording(hf, stop_at=3)  # round 1 has 3 batches: stop before the last
    with pytest.raises(KeyboardInterrupt):
        run_synthesis(cfg, backend=first, progress=False, log=lambda m: None)
    assert len(_rows(tmp_path / "cut" / STATUS)) == 4
    rest = _Recording(hf)
    run_synthesis(cfg, backend=rest, progress=False, log=lambda m: None)
    assert rest.calls == 1 + 3  # the last batch of round 1, then all of round 2
    joined = {q: first.seen.get(q, []) + rest.seen.get(q, []) for q in whole.seen}
    assert len(whole.seen) == 6 and all(len(v) == 2 for v in whole.seen.values())
    assert joined == whole.seen
