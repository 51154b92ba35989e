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

from synthtune.config import SynthConfig
from synthtune.errors import ConfigError, DataError, DirectoryInUse
from synthtune.files import LOCK_NAME
from synthtune.formats import PROMPT_VERSION
from synthtune.generation.sampler import Sample
from synthtune.synth.pipeline import KEPT, STATUS, evaluate_question, load_items, run_synthesis

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


def _quiet(cfg, backend=None, log=None):
    return run_synthesis(cfg, backend=backend or ScriptedBackend(), progress=False, log=log or (lambda m: None))


def _snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != LOCK_NAME}


@pytest.mark.parametrize(("change", "named"), [
    (dict(shots=3), "shots: 2 -> 3"),
    (dict(k=4), "k: 5 -> 4"),
    (dict(temperature=1.0), "temperature: 0.7 -> 1.0"),
    (dict(max_new_tokens=64), "max_new_tokens: 256 -> 64"),
    (dict(stop=["\n\n"]), "stop: [] -> ['\\n\\n']"),
    (dict(top_p=0.5, batch_size=2), "top_p: 0.95 -> 0.5, batch_size: 3 -> 2"),
    (dict(presence_penalty=0.5), "presence_penalty: 0.0 -> 0.5"),
    (dict(frequency_penalty=-1.0), "frequency_penalty: 0.0 -> -1.0"),
])
def test_changed_settings_refuse_to_resume_naming_old_and_new_values(tmp_path, change, named):
    _quiet(_cfg(tmp_path, rounds=1, limit=3))
    before = _snapshot(Path(_cfg(tmp_path).out))
    backend = ScriptedBackend()
    with pytest.raises(ConfigError) as info:
        _quiet(_cfg(tmp_path, rounds=1, limit=3, **change), backend)
    assert named in str(info.value) and "--allow-changed-settings" in str(info.value)
    assert backend.calls == 0 and _snapshot(Path(_cfg(tmp_path).out)) == before
    # what may change freely: where and how fast samples are drawn, rounds and questions
    _quiet(_cfg(tmp_path, rounds=2, limit=4, concurrency=2, device="cpu"))


def test_allow_changed_settings_goes_on_and_records_the_change(tmp_path):
    _quiet(_cfg(tmp_path, rounds=1, limit=3))
    logs = []
    summary = _quiet(_cfg(tmp_path, rounds=1, limit=6, k=4, allow_changed_settings=True), log=logs.append)
    assert summary["solved"] == 6
    assert any("changed settings (k: 5 -> 4)" in m for m in logs)
    fp = json.loads((Path(_cfg(tmp_path).out) / "fingerprint.json").read_text())
    assert fp["k"] == 4 and [c["settings"] for c in fp["changes"]] == [{"k": [5, 4]}]
    _quiet(_cfg(tmp_path, rounds=1, limit=6, k=4))  # the new settings are the directory's now


def test_fingerprints_from_before_the_new_keys(tmp_path):
    # An older synthtune fingerprinted fewer settings. Those it lacks are read from the config.yaml
    # that run saved (so a changed k is still caught); with no config.yaml either, the run goes on
    # and says what it could not check, and the fingerprint is completed.
    # (the versions are kept: a fingerprint without them is another test's case)
    old_keys = ("model", "backend", "served_model", "questions", "exemplars", "exemplar_pool_size", "shots",
                "strategy", "prompt_format", "seed", "use_gold", "prompt_version", "check_version")
    cfg = _cfg(tmp_path, rounds=1, limit=3)
    _quiet(cfg)
    out = Path(cfg.out)
    fp = json.loads((out / "fingerprint.json").read_text())
    (out / "fingerprint.json").write_text(json.dumps({k: fp[k] for k in old_keys}))
    with pytest.raises(ConfigError, match="k: 5 -> 4"):
        _quiet(_cfg(tmp_path, rounds=1, limit=3, k=4))
    (out / "config.yaml").unlink()
    logs = []
    _quiet(_cfg(tmp_path, rounds=1, limit=3, k=4), log=logs.append)
    assert any("does not record k, k_growth, temperature" in m and "older synthtune" in m for m in logs)
    assert json.loads((out / "fingerprint.json").read_text())["k"] == 4
    with pytest.raises(ConfigError, match="k: 4 -> 5"):
        _quiet(_cfg(tmp_path, rounds=1, limit=3, k=5))


def test_a_run_from_before_the_penalties_existed_sampled_without_them(tmp_path):
    # a fingerprint (and config.yaml) written before presence/frequency penalties were settings: that
    # run sampled with none, so resuming it with a penalty is a change, and without one is not
    cfg = _cfg(tmp_path, rounds=1, limit=3)
    _quiet(cfg)
    out = Path(cfg.out)
    for name in ("fingerprint.json", "config.yaml"):
        text = (out / name).read_text()
        assert "presence_penalty" in text and "frequency_penalty" in text
    fp = json.loads((out / "fingerprint.json").read_text())
    (out / "fingerprint.json").write_text(json.dumps({k: v for k, v in fp.items() if not k.endswith("_penalty")}))
    (out / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"frequency_penalty: 0\.0 -> 0\.3"):
        _quiet(_cfg(tmp_path, rounds=1, limit=3, frequency_penalty=0.3))
    logs = []
    _quiet(_cfg(tmp_path, rounds=1, limit=4), log=logs.append)
    assert not [m for m in logs if "does not record" in m], logs
    assert json.loads((out / "fingerprint.json").read_text())["presence_penalty"] == 0.0  # completed


def test_a_run_from_before_the_prompt_wording_changed_is_not_silently_mixed(tmp_path):
    # Plain few-shot prompts said "Problem:" before PROMPT_VERSION 2; such a run's fingerprint has no
    # prompt_version, and resuming it with the new wording would mix both in one dataset.
    cfg = _cfg(tmp_path, rounds=1, limit=3)
    _quiet(cfg)
    out = Path(cfg.out)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["prompt_version"] == PROMPT_VERSION == 2
    del fp["prompt_version"]
    (out / "fingerprint.json").write_text(json.dumps(fp))
    with pytest.raises(ConfigError, match="prompt_version: 1 -> 2"):
        _quiet(_cfg(tmp_path, rounds=1, limit=3))
    logs = []
    _quiet(_cfg(tmp_path, rounds=1, limit=3, allow_changed_settings=True), log=logs.append)
    assert any("prompt_version: 1 -> 2" in m for m in logs)
    assert json.loads((out / "fingerprint.json").read_text())["prompt_version"] == 2


def test_a_run_kept_under_older_calculation_rules_is_not_silently_mixed(tmp_path):
    # The calculator check got stricter (CHECK_VERSION 2: "2*2 = <<2*2=4>>2" now fails). A run that
    # filtered on it before recorded no check_version; resuming it would mix rows kept under both rules.
    from synthtune.data.calculator import CHECK_VERSION

    cfg = _cfg(tmp_path, rounds=1, limit=3)
    _quiet(cfg)
    out = Path(cfg.out)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["check_version"] == CHECK_VERSION == 3 and fp["min_calc"] == 1.0
    del fp["check_version"]
    (out / "fingerprint.json").write_text(json.dumps(fp))
    with pytest.raises(ConfigError, match=f"check_version: 1 -> {CHECK_VERSION}"):
        _quiet(cfg)
    logs = []
    _quiet(replace(cfg, allow_changed_settings=True), log=logs.append)
    assert any(f"check_version: 1 -> {CHECK_VERSION}" in m for m in logs)
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["check_version"] == CHECK_VERSION and fp["changes"][-1]["settings"] == {"check_version": [1, CHECK_VERSION]}
    # a run that never filters on the check neither records nor compares its rules
    unchecked = _cfg(tmp_path, out=str(tmp_path / "unchecked"), rounds=1, limit=3, min_calc=0.0)
    _quiet(unchecked)
    fp_path = tmp_path / "unchecked" / "fingerprint.json"
    assert "check_version" not in json.loads(fp_path.read_text())


def _damage_missing_status(out):
    (out / STATUS).unlink()


def _damage_bad_line(out):
    lines = (out / STATUS).read_bytes().split(b"\n")
    lines[2] = b'{"id": "edited by hand'
    (out / STATUS).write_bytes(b"\n".join(lines))


def _damage_lost_records(out):
    # status.jsonl restored from an older backup: its last records (and not just one batch's) are gone
    lines = (out / STATUS).read_bytes().split(b"\n")
    (out / STATUS).write_bytes(b"\n".join(lines[:2]) + b"\n")


def _damage_lost_kept_row(out):
    lines = (out / KEPT).read_bytes().split(b"\n")
    (out / KEPT).write_bytes(b"\n".join(lines[1:]))


@pytest.mark.parametrize(("damage", "message"), [
    (_damage_missing_status, r"status\.jsonl: is missing, but kept\.jsonl holds 12 rows"),
    (_damage_bad_line, r"status\.jsonl:3: is not valid JSON"),
    (_damage_lost_records, r"kept\.jsonl:5: and 7 more rows .* have no record in status\.jsonl"),
    (_damage_lost_kept_row, r"kept\.jsonl: holds 1 rows for question \w+ round 0, but status\.jsonl:1 records 2"),
])
def test_damaged_files_stop_the_resume_and_nothing_is_touched(tmp_path, damage, message):
    # The old resume rewrote kept.jsonl without every row it found no status record for: a
    # missing or truncated status.jsonl emptied the results. Now it stops, and changes nothing.
    cfg = _cfg(tmp_path, rounds=1, limit=6)
    _quiet(cfg)
    out = Path(cfg.out)
    damage(out)
    before = _snapshot(out)
    backend = ScriptedBackend()
    with pytest.raises(DataError, match=message) as info:
        _quiet(cfg, backend)
    assert "nothing was changed" in str(info.value).lower()
    assert backend.calls == 0 and _snapshot(out) == before


def test_a_lone_surrogate_from_a_server_is_stored_as_a_replacement_character(tmp_path):
    # json.loads turns a server's "\\udc80" escape into a lone surrogate, which UTF-8 cannot hold
    class Odd(ScriptedBackend):
        def completions(self, question, k):
            return [Sample(s.text.replace("\n", " \udc80\n", 1), s.n_tokens, s.finish_reason)
                    for s in super().completions(question, k)]

    cfg = _cfg(tmp_path, rounds=1, limit=3)
    assert _quiet(cfg, Odd())["kept_examples"] == 6
    kept = _rows(Path(cfg.out) / KEPT)
    assert all("\ufffd" in r["rationale"] for r in kept)


@pytest.mark.integration  # kills a subprocess mid-run
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
    cfg = SynthConfig(questions="bundled:train", out=str(out), k=5, rounds=1, batch_size=2, shots=2,
                      exemplar_pool_size=12, prompt_format="plain")
    second = ScriptedBackend()
    with pytest.raises(DirectoryInUse, match=f"{out} is in use by another synthesis run: PID {proc.pid} "):
        run_synthesis(cfg, backend=second, progress=False, log=lambda m: None)
    assert second.calls == 0
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(_rows(out / STATUS))
    assert 6 <= done_before < 24, "the kill must land in the middle of the run"
    # the kernel released the killed run's lock: nothing stale to clean up
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
        with open(out / name, "ab") as fh:
            # the torn row of a batch in flight, cut inside a character (the old reader's UnicodeDecodeError)
            fh.write('{"id": "torn-fragment", "round": 0, "question": "caf\u00e9'.encode()[:-1])
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


@pytest.mark.integration  # runs the CLI in a subprocess
def test_synth_cli_on_tiny_model(synthtune_bin, tmp_path):
    # --sampler generate: the path `auto` takes on a GPU, here through the CLI on CPU
    out = tmp_path / "cli"
    proc = subprocess.run([synthtune_bin, "synth", "--model", "tiny-llama", "--questions", "bundled:test",
                           "--k", "2", "--rounds", "1", "--limit", "3", "--out", str(out), "--json",
                           "--sampler", "generate", "max_new_tokens=12", "shots=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sampler: generate" in (out / "config.yaml").read_text()
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
        self.inner, self.stop_at, self.calls, self.seen, self.params = inner, stop_at, 0, {}, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def sample(self, prompts, params):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.params.append(params)
        outs = self.inner.sample(prompts, params)
        for p, samples in zip(prompts, outs, strict=True):
            self.seen.setdefault(p.question, []).append([s.text for s in samples])
        return outs


@pytest.mark.integration  # three synthesis runs, ~9 s
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


@pytest.mark.integration  # two synthesis runs on tiny-llama, ~3 s
def test_penalties_reach_the_hf_backend(tmp_path):
    from synthtune.synth.backends import make_backend

    hf = make_backend("hf", "tiny-llama")  # the stock tiny model repeats its favourite token
    settings = dict(model="tiny-llama", limit=2, batch_size=2, k=2, rounds=1, shots=1, max_new_tokens=10,
                    temperature=0.0)
    plain, penalized = _Recording(hf), _Recording(hf)
    run_synthesis(_cfg(tmp_path, out=str(tmp_path / "plain"), **settings), backend=plain, progress=False,
                  log=lambda m: None)
    run_synthesis(_cfg(tmp_path, out=str(tmp_path / "pen"), presence_penalty=1.5, frequency_penalty=2.0, **settings),
                  backend=penalized, progress=False, log=lambda m: None)
    assert {(p.presence_penalty, p.frequency_penalty) for p in penalized.params} == {(1.5, 2.0)}
    assert {(p.presence_penalty, p.frequency_penalty) for p in plain.params} == {(0.0, 0.0)}
    assert plain.seen.keys() == penalized.seen.keys()
    for q in plain.seen:
        assert plain.seen[q] != penalized.seen[q]


@pytest.fixture
def one_torch_thread():
    # A 1-layer model's steps are microseconds of math: with two threads on a shared 2-core
    # machine, OpenMP's hand-offs make each step ~100x slower than one thread.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.integration  # kills a subprocess mid-write
def test_kill_9_mid_write_with_line_separators_resumes_to_the_uninterrupted_result(tmp_path, one_torch_thread):
    # The done-when: questions holding U+2028/U+2029/U+0085, a real model (hf backend)
    # writing every line breaker and odd character there is, killed with SIGKILL while writing a
    # batch's status line (torn inside a UTF-8 character, after the batch's kept rows), then
    # resumed: the result is the one an uninterrupted run gets, byte for byte.
    from synth_helpers import PATHOLOGICAL, build_chain_model

    from synthtune.synth.backends import make_backend

    model = build_chain_model(tmp_path / "chain")
    questions = tmp_path / "questions.jsonl"
    asked = [("Ann has caf\u00e9 cups\u2028and more\u2029how many?", "42"),
             ("Line\x85next\u2028\u2029 \U0001f9ee counts?", "42"),
             ("Bob \u2028 sells\u2029 \x85 pi\u00e9s?", "7"),  # never reached: goes to round 2
             ("A \"quoted\" {json} \\u2028 question\u2028?", "42")]
    # written as other tools write JSONL: separators raw, as json.dumps(ensure_ascii=False) leaves them
    questions.write_text("".join(json.dumps({"question": q, "answer": f"So.\n#### {a}"}, ensure_ascii=False) + "\n"
                                 for q, a in asked), encoding="utf-8")
    settings = dict(model=str(model), questions=str(questions), exemplars="bundled:train", k=3, rounds=2,
                    batch_size=2, shots=1, max_new_tokens=40, prompt_format="plain", device="cpu")
    hf = make_backend("hf", str(model), device="cpu")
    run_synthesis(SynthConfig(out=str(tmp_path / "whole"), **settings), backend=hf, progress=False, log=lambda m: None)

    cut = tmp_path / "cut"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            f"from synth_helpers import run_until_killed\n"
            f"run_until_killed({str(cut)!r}, {settings!r}, die_at_status_append=2)\n")
    # one torch thread, as in this process (see one_torch_thread)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    torn = (cut / STATUS).read_bytes()
    with pytest.raises(UnicodeDecodeError):  # what the old resume reader died of
        torn.decode("utf-8")
    assert torn.count(b"\n") == 2  # the first batch's records, then the torn one

    run_synthesis(SynthConfig(out=str(cut), **settings), backend=hf, progress=False, log=lambda m: None)
    for name in (KEPT, STATUS):
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    kept = _rows(cut / KEPT)
    assert kept and any("\u2028" in r["question"] for r in kept)
    assert any(set(r["rationale"]) & set("\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\r") for r in kept)
    assert all(set(r["rationale"]) <= set(PATHOLOGICAL) for r in kept)
    raw = (cut / KEPT).read_text(encoding="utf-8")
    assert not set(raw) & set("\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\r")  # escaped, one row per line
    assert len(raw.splitlines()) == len(kept)
