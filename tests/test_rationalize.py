"""STaR rationalization in the synthesis loop: unsolved questions asked again with the gold answer
as a hint; rationales kept by the same evaluator, stored without the hint.

Run: pytest tests/test_rationalize.py
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from synthtune.config import SynthConfig
from synthtune.data.gsm8k import rationale_and_answer
from synthtune.errors import ConfigError
from synthtune.formats import HINT_VERSION, hinted_question, rationalization_hint
from synthtune.generation.sampler import Sample
from synthtune.synth.pipeline import KEPT, RATIONALE_STAGES, STAGES, STATUS, SUMMARY, run_synthesis
from synthtune.synth.prompts import build_prompt, leaks_hint

sys.path.insert(0, str(Path(__file__).parent))
from synth_helpers import ScriptedBackend  # noqa: E402

#: words of the hint that no stored file may hold (its answer is in every correct rationale anyway)
HINT_WORDS = rationalization_hint("0").split("0", 1)[1].split("0")[0].strip()  # ". Write ... ending with ####"


class HintReader(ScriptedBackend):
    """Reads the prompt text as a model would: with the question's own hint in it, it writes the
    rationales below; without one it fails the questions of ``fails`` (the rest it solves)."""

    def __init__(self, fails=lambda q: True, stop_at: int | None = None):
        super().__init__()
        self.fails, self.stop_at, self.hinted, self.plain = fails, stop_at, [], []

    def rationales(self, question: str, k: int) -> list[Sample]:
        rationale, answer = rationale_and_answer(self.gold[question])
        hint = rationalization_hint(answer)
        variants = [f"{rationale}\n#### {answer}",  # a real path: kept
                    f"As the hint says, it is {answer}.\n#### {answer}",  # names the hint: dropped
                    f"{hint}\n{rationale}\n#### {answer}",  # copies the hint: dropped
                    f"So it is {answer}.\n#### {answer}",  # the answer with no working: dropped (derived)
                    f"Then {rationale.splitlines()[-1]} so we get\n#### {int(answer) + 1}"]  # wrong: dropped
        return [Sample(variants[i % len(variants)], 20 + i, "eos") for i in range(k)]

    def sample(self, prompts, params):
        if self.stop_at is not None and self.calls + 1 == self.stop_at:
            raise KeyboardInterrupt  # as Ctrl-C would, after the earlier batches were written
        self.calls += 1
        outs = []
        for p in prompts:
            answer = rationale_and_answer(self.gold[p.question])[1]
            # the question's own hint (a hinted prompt's exemplars carry theirs, which may say the same answer)
            if hinted_question(p.question, rationalization_hint(answer)) in p.text:
                self.hinted.append((p.question, params.num_samples, params.seed))
                outs.append(self.rationales(p.question, params.num_samples))
            else:
                self.plain.append((p.question, params.num_samples, params.seed))
                solved = self.completions(p.question, params.num_samples)
                outs.append([Sample(f"It is {int(answer) + 2}.\n#### {int(answer) + 2}", 7, "eos")
                             for _ in solved] if self.fails(p.question) else solved)
        return outs


def _cfg(tmp_path, name="run", **kw):
    base = dict(questions="bundled:train", out=str(tmp_path / name), k=5, rounds=1, batch_size=2, shots=2,
                exemplar_pool_size=12, prompt_format="plain", limit=6, rationalize=True)
    return SynthConfig(**{**base, **kw})


def _run(cfg, backend):
    return run_synthesis(cfg, backend=backend, progress=False, log=lambda m: None)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _half(question: str) -> bool:
    return len(question) % 2 == 0  # a fixed split of the questions: these fail when asked directly


def test_rationales_are_kept_by_the_evaluator_and_stored_without_the_hint(tmp_path):
    cfg = _cfg(tmp_path)
    backend = HintReader()
    summary = _run(cfg, backend)
    out = Path(cfg.out)
    kept, status = _rows(out / KEPT), _rows(out / STATUS)
    # every question failed directly, was asked again with its hint, and kept its one real path
    assert len(backend.plain) == len(backend.hinted) == 6 and {n for _, n, _ in backend.hinted} == {5}
    assert summary["solved"] == 6 and summary["kept_examples"] == len(kept) == 6
    questions = {r["question"] for r in status}
    for row in kept:
        rationale, answer = rationale_and_answer(backend.gold[row["question"]])
        assert row["rationale"] == f"{rationale}\n#### {answer}" and row["final_answer"] == answer
        assert row["provenance"]["rationalized"] is True and row["question"] in questions
    # the stored records: the hint-free question and prompt; the hint's words nowhere on disk
    by_id = {r["id"]: r for r in status}
    for row in kept:
        rec = by_id[row["id"]]
        assert row["provenance"]["prompt_sha"] == rec["prompt_sha"] != rec["rationalization"]["prompt_sha"]
        assert row["provenance"]["hinted_prompt_sha"] == rec["rationalization"]["prompt_sha"]
        assert row["question"] == rec["question"] and "The correct answer" not in row["question"]
    for path in out.iterdir():
        if path.is_file() and path.suffix in (".jsonl", ".json", ".yaml"):
            text = path.read_text()
            assert HINT_WORDS not in text and "the hint" not in text, path.name
    # the funnel per route: direct samples all wrong; rationales: 5 drawn, 2 mention the hint, 1 wrong,
    # 1 the answer alone
    rec = status[0]
    assert rec["status"] == "done" and rec["stages"]["kept"] == 0
    assert rec["rationalization"]["stages"] == {"sampled": 5, "finished": 5, "hint_free": 3, "parsed": 3,
                                                "on_target": 2, "derived": 1, "calc_ok": 1, "reward_ok": 1,
                                                "kept": 1}
    assert rec["rationalization"]["hint_version"] == HINT_VERSION and rec["rationalization"]["k"] == 5
    routes = summary["routes"]
    assert routes["direct"]["stages"] == {**{k: 6 * 5 for k in STAGES[:3]}, **{k: 0 for k in STAGES[3:]}}
    assert routes["rationalized"] == {"questions": 6, "stages": {"sampled": 30, "finished": 30, "hint_free": 18,
                                                                 "parsed": 18, "on_target": 12, "derived": 6,
                                                                 "calc_ok": 6, "reward_ok": 6, "kept": 6}}
    assert summary["rounds"][0]["rationalized_examples"] == summary["rounds"][0]["kept_examples"] == 6
    assert list(routes["rationalized"]["stages"]) == list(RATIONALE_STAGES)


def test_rationalize_k_and_the_reward_model_apply_to_rationales(tmp_path):
    backend = HintReader()
    # a reward model that turns every rationale down: the same evaluator, so none is kept
    summary = run_synthesis(_cfg(tmp_path, rationalize_k=3, min_reward=0.5), backend=backend, progress=False,
                            log=lambda m: None, reward_fn=lambda q, comps, gold: [0.0] * len(comps))
    assert {n for _, n, _ in backend.hinted} == {3} and summary["solved"] == 0
    st = summary["routes"]["rationalized"]["stages"]
    assert st["calc_ok"] > 0 and st["reward_ok"] == st["kept"] == 0


def test_only_unsolved_questions_are_rationalized_and_the_direct_route_is_unchanged(tmp_path):
    on, off = HintReader(fails=_half), HintReader(fails=_half)
    _run(_cfg(tmp_path, "on"), on)
    _run(_cfg(tmp_path, "off", rationalize=False), off)
    failing = {q for q, _, _ in on.plain if _half(q)}
    assert 0 < len(failing) < 6 and {q for q, _, _ in on.hinted} == failing
    assert off.hinted == [] and off.plain == on.plain  # same prompts, same seeds
    # off: the old results; on: the same direct rows and records, plus the rationales
    kept_on, kept_off = _rows(tmp_path / "on" / KEPT), _rows(tmp_path / "off" / KEPT)
    assert [r for r in kept_on if not r["provenance"]["rationalized"]] == kept_off
    assert {r["question"] for r in kept_on if r["provenance"]["rationalized"]} == failing
    st_on, st_off = _rows(tmp_path / "on" / STATUS), _rows(tmp_path / "off" / STATUS)
    assert all("rationalization" not in r for r in st_off)
    assert [{k: v for k, v in r.items() if k not in ("status", "rationalization")} for r in st_on] == \
           [{k: v for k, v in r.items() if k != "status"} for r in st_off]
    assert {r["status"] for r in st_on} == {"done"} and {r["status"] for r in st_off if _half(r["question"])} == {
        "failed"}


def test_rationalization_waits_for_the_last_direct_round(tmp_path):
    backend = HintReader(fails=_half)
    _run(_cfg(tmp_path, rounds=3, k=2), backend)
    status = _rows(tmp_path / "run" / STATUS)
    # the unsolved questions get both direct retries first; only the last round asks with the hint
    assert {r["round"] for r in status if "rationalization" in r} == {2}
    failing = {q for q, _, _ in backend.plain if _half(q)}
    assert [sum(q == f for q, _, _ in backend.plain) for f in sorted(failing)] == [3] * len(failing)
    assert sorted(q for q, _, _ in backend.hinted) == sorted(failing)


def test_rationalize_needs_gold(tmp_path):
    with pytest.raises(ConfigError, match="rationalize=true needs use_gold=true"):
        _run(_cfg(tmp_path, use_gold=False), HintReader())
    assert not (tmp_path / "run").exists()


def test_a_resumed_rationalizing_run_ends_as_an_uninterrupted_one(tmp_path):
    whole = _cfg(tmp_path, "whole", rounds=2, k=3)
    _run(whole, HintReader())
    # every question fails directly: round 1 is three direct calls, round 2 a direct call then a
    # hinted one per batch. Interrupted at round 2's second hinted call: round 1 and round 2's first
    # batch are on disk, its second batch is redone
    cut = replace(whole, out=str(tmp_path / "cut"))
    with pytest.raises(KeyboardInterrupt):
        _run(cut, HintReader(stop_at=7))
    assert len(_rows(tmp_path / "cut" / STATUS)) == 6 + 2
    rest = HintReader()
    _run(cut, rest)
    for name in (KEPT, STATUS):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # killed between a batch's kept rows (rationales among them) and its status lines: the rows are
    # dropped as the batch in flight and redone, to the same bytes
    dead = tmp_path / "dead"
    shutil.copytree(tmp_path / "whole", dead)
    lines = (dead / STATUS).read_bytes().splitlines(keepends=True)
    last = [json.loads(line) for line in lines[-2:]]  # the last batch (batch_size=2)
    assert all(r["round"] == 1 and r["rationalization"]["stages"]["kept"] == 1 for r in last)
    (dead / STATUS).write_bytes(b"".join(lines[:-2]))
    logs = []
    run_synthesis(replace(whole, out=str(dead)), backend=HintReader(), progress=False, log=logs.append)
    assert any("dropped" in m and "in flight" in m for m in logs)
    for name in (KEPT, STATUS):
        assert (dead / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # a finished run is finished: a rerun samples nothing (the rationales count as vouched rows)
    again = HintReader()
    assert _run(whole, again)["solved"] == 6 and again.calls == 0


@pytest.mark.parametrize(("first", "then", "named"), [
    (dict(rationalize=False), dict(rationalize=True), "rationalize: False -> True"),
    (dict(), dict(rationalize=False), "rationalize: True -> False"),
    (dict(), dict(rationalize_k=2), "rationalize_k: None -> 2"),
])
def test_rationalize_is_part_of_the_fingerprint(tmp_path, first, then, named):
    _run(_cfg(tmp_path, limit=2, **first), HintReader())
    backend = HintReader()
    with pytest.raises(ConfigError, match=named):
        _run(_cfg(tmp_path, limit=2, **then), backend)
    assert backend.calls == 0


def test_a_run_with_another_hint_text_is_not_resumed(tmp_path):
    cfg = _cfg(tmp_path, limit=2)
    _run(cfg, HintReader())
    fp_path = Path(cfg.out) / "fingerprint.json"
    fp = json.loads(fp_path.read_text())
    assert fp["hint_version"] == HINT_VERSION and fp["rationalize"] is True
    fp_path.write_text(json.dumps({**fp, "hint_version": HINT_VERSION - 1}))
    with pytest.raises(ConfigError, match=f"hint_version: {HINT_VERSION - 1} -> {HINT_VERSION}"):
        _run(cfg, HintReader())
    # without rationalization the hint's text does not matter: not recorded, not checked
    _run(_cfg(tmp_path, "plain", limit=2, rationalize=False), HintReader())
    assert "hint_version" not in json.loads((tmp_path / "plain" / "fingerprint.json").read_text())


def test_summaries_of_runs_before_rationalization_still_resume(tmp_path):
    # status records written before rationalization have no "rationalization" block; a fingerprint
    # without the keys is read as rationalize off
    cfg = _cfg(tmp_path, limit=4, rationalize=False)
    _run(cfg, HintReader(fails=_half))
    fp_path = Path(cfg.out) / "fingerprint.json"
    fp = json.loads(fp_path.read_text())
    fp_path.write_text(json.dumps({k: v for k, v in fp.items() if not k.startswith("rationalize")}))
    (Path(cfg.out) / "config.yaml").unlink()
    logs = []
    summary = run_synthesis(replace(cfg, limit=6), backend=HintReader(fails=_half), progress=False, log=logs.append)
    assert summary["questions"] == 6 and not [m for m in logs if "does not record" in m]
    assert json.loads((Path(cfg.out) / SUMMARY).read_text())["routes"]["rationalized"]["questions"] == 0


@pytest.mark.parametrize("text", ["the hint: 12", "HINTS aside, #### 3", "So. " + rationalization_hint("72"),
                                  "3 * 24 = <<3*24=72>>72\nThe correct answer is 72.\n#### 72",
                                  "write a step-by-step solution that reaches it, ending with\n#### 72"])
def test_leaks(text):
    assert leaks_hint(text, rationalization_hint("72"))


@pytest.mark.parametrize("text", ["So the answer is 72.\n#### 72", "He hinted nothing. #### 72", "#### 72",
                                  "Write a step-by-step solution: 70 + 2 = 72"])
def test_no_leaks(text):
    assert not leaks_hint(text, rationalization_hint("72"))


@pytest.mark.integration  # a real tiny model, ~5 s
def test_hinted_prompts_reach_a_real_model_in_its_chat_template(tmp_path):
    from synthtune.synth.backends import make_backend

    class Recording:
        def __init__(self, inner):
            self.inner, self.texts = inner, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def sample(self, prompts, params):
            self.texts += [p.text for p in prompts]
            return self.inner.sample(prompts, params)

    backend = Recording(make_backend("hf", "tiny-llama"))
    cfg = _cfg(tmp_path, model="tiny-llama", prompt_format="chat", k=2, limit=2, shots=1, max_new_tokens=6)
    summary = _run(cfg, backend)
    status = _rows(Path(cfg.out) / STATUS)
    # random weights solve nothing: both questions were asked again, each with its own answer, as the
    # last user turn of the template
    hinted = backend.texts[2:]
    assert len(backend.texts) == 4 and summary["routes"]["rationalized"]["stages"]["sampled"] == 4
    for rec, text in zip(status, hinted, strict=True):
        hint = rationalization_hint(rec["gold"])
        asked = text.index(hinted_question(rec["question"], hint))
        assert text.index(HINT_WORDS) < asked  # the exemplar's own hint comes first
        assert rec["rationalization"]["stages"]["sampled"] == 2
    assert not any(HINT_WORDS in text for text in backend.texts[:2])
    assert summary["new_tokens"] > 0


def test_a_hinted_prompt_gives_every_exemplar_its_own_answer_as_a_hint():
    from synthtune.models import load_tokenizer, resolve_model

    # STaR's rationalization prompts: worked exemplars that reach a given answer without citing it
    pool = [{"question": f"Q{i}: what is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(1, 7)] + [{"question": "Q7: no final line", "answer": "It is seven."}]
    for fmt in ("plain", "chat"):
        tok = load_tokenizer(resolve_model("tiny-llama")) if fmt == "chat" else None
        plain = build_prompt("Q0: what is 5 + 4?", pool, k=7, fmt=fmt, tokenizer=tok, seed=3)
        hinted = build_prompt("Q0: what is 5 + 4?", pool, k=7, fmt=fmt, tokenizer=tok, seed=3,
                              hint=rationalization_hint("9"))
        assert hinted.exemplar_ids == plain.exemplar_ids and hinted.question == plain.question
        assert HINT_WORDS not in plain.text and hinted_question("Q0: what is 5 + 4?", rationalization_hint("9")) in hinted.text
        for i in range(1, 7):
            assert hinted_question(pool[i - 1]["question"], rationalization_hint(str(2 * i))) in hinted.text
        # an exemplar whose answer cannot be read is left as it is
        assert hinted.text.count(HINT_WORDS) == 7 and "Q7: no final line" in hinted.text
