"""Calculator-assisted decoding over the OpenAI API: ``synthtune serve``'s ``calculator`` field and
the ``openai`` synthesis backend's client-side calculator (stop at ``=``, inject, continue).

The integration tests serve the memorizing model of ``calc_models`` (it answers its one question
with wrong arithmetic) and check that the annotations come back right with the calculator and
wrong without it.

    PYTHONPATH=$PWD python -m pytest tests/test_calc_openai.py -q
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthtune.config import SynthConfig
from synthtune.errors import ConfigError
from synthtune.formats import chat_messages
from synthtune.generation.base import SamplingParams, truncate_at_stop
from synthtune.models import load_tokenizer
from synthtune.synth.openai_backend import CALC_STOP, OpenAIBackend, calc_step, continuation_seed, stop_string
from synthtune.synth.pipeline import KEPT, run_synthesis
from synthtune.synth.prompts import build_prompt

openai = pytest.importorskip("openai")

sys.path.insert(0, str(Path(__file__).parent))
from calc_models import (  # noqa: E402
    RIGHT_RESULTS,
    SHORT_QUESTION,
    WRONG_COMPLETION,
    calc_questions,
    plain_prompts,
    wrong_calc_model_dir,
)
from server_helpers import concurrently, start_servers  # noqa: E402

# --------------------------------------------------------------------------------------------
# the pure pieces of the client-side chain
# --------------------------------------------------------------------------------------------


def _no_calc(_text: str) -> None:
    return None


def _server(rest: str, sent: list[str]) -> tuple[str, str | None, str]:
    """A model that writes ``rest`` whatever it is asked: (the piece, the stop that ended it, what is left).

    The first stop string to start wins (of two at one place, the shorter: it is complete first).
    """
    hits = [(i, len(s), s) for s in sent if (i := rest.find(s)) != -1]
    if not hits:
        return rest, None, ""
    i, n, s = min(hits)
    return rest[:i], s, rest[i + n:]


def _chain(full: str, stops: list[str], inject=_no_calc, budget: int = 10**6) -> tuple[str, str, int]:
    """``full`` written through calc_step's chain, one character a token: (text, finish reason, requests)."""
    sent = [*stops, CALC_STOP] if CALC_STOP not in stops else list(stops)
    text, rest, used, requests = "", full, 0, 0
    while True:
        requests += 1
        piece, ended, rest = _server(rest, sent)
        if budget - used < len(piece) + (ended is not None):  # the length limit comes first
            piece, ended, reason = piece[:budget - used], None, "length"
        else:
            reason = "stop" if ended else "eos"
        used += len(piece) + (ended is not None)
        text, done = calc_step(text, piece, ended, reason, stops, budget - used, inject)
        if done:
            return text, done, requests


# stop strings none of which holds another: then the first to complete is the first to start, so
# one uninterrupted request ends where truncate_at_stop cuts
STOPS = st.lists(st.text("ab=<>\n", min_size=1, max_size=3), max_size=3, unique=True).filter(
    lambda stops: not any(a != b and a in b for a in stops for b in stops))


@settings(max_examples=300, deadline=None)
@given(full=st.text("ab=<>\n12", max_size=40), stops=STOPS)
def test_stopping_at_equals_and_continuing_changes_nothing_without_an_injection(full, stops):
    """Split at every "=" and stitched back, the text is what one request would return: the user's
    stop strings are found across the seams too (a stop such as "a=b" spans one)."""
    text, reason, requests = _chain(full, stops)
    assert text == truncate_at_stop(full, stops)
    assert reason == ("stop" if text != full else "eos")
    assert requests <= full.count(CALC_STOP) + 1


def test_the_injection_goes_in_after_the_equals_and_the_chain_ends_on_the_users_stop():
    # the model would write wrong results; what it writes after "<<expr=" is never read: the
    # continuation is asked from the injected text on (here the fake model just goes on)
    def calc(text):
        return {"<<3*14=": "42>>", "<<2*14=": "28>>"}.get(text[text.rfind("<<"):]) if text.endswith("=") else None

    text, reason, _ = _chain("3*14 = <<3*14=", ["\n"], calc)
    assert (text, reason) == ("3*14 = <<3*14=42>>", "eos")
    # a stop string inside the injected text ends the sample there, as a forced token would
    assert calc_step("", "<<2*14", "=", "stop", [">"], 9, calc) == ("<<2*14=28", "stop")
    # the "=" was the last token the budget allowed: the sample ends at it, with nothing forced after
    assert calc_step("", "<<2*14", "=", "stop", [], 0, calc) == ("<<2*14=", "length")
    # "=" is one of the user's stops: it ends the sample, and no continuation is asked for
    assert calc_step("x ", "<<2*14", "=", "stop", ["="], 9, calc) == ("x <<2*14", "stop")


@settings(max_examples=100, deadline=None)
@given(full=st.text("ab=<>", max_size=60), budget=st.integers(1, 30))
def test_a_chain_never_spends_more_than_the_budget(full, budget):
    text, reason, requests = _chain(full, [], budget=budget)
    assert requests <= budget + 1 and len(text) <= budget
    assert reason == "length" or text == full


def test_stop_string_tells_its_equals_from_eos_and_refuses_to_guess():
    assert stop_string({"finish_reason": "stop", "stop_reason": "="}, ["\n", "="]) == "="
    assert stop_string({"finish_reason": "stop", "stop_reason": None}, ["="]) is None  # vLLM, serve: EOS
    assert stop_string({"finish_reason": "stop", "stop_reason": 2}, ["="]) is None  # vLLM: a stop token id
    assert stop_string({"finish_reason": "length", "stop_reason": None}, ["="]) is None
    assert stop_string({"finish_reason": "stop_sequence"}, ["="]) == "="  # TGI, one stop string: no doubt
    for choice, sent in (({"finish_reason": "stop"}, ["="]), ({"finish_reason": "stop_sequence"}, ["\n", "="])):
        try:
            stop_string(choice, sent)
        except ValueError as err:
            assert "no stop_reason" in str(err)
        else:
            raise AssertionError(f"{choice} with stops {sent} cannot be told apart, yet got an answer")


def test_continuation_seeds_are_distinct_and_in_range():
    seeds = {continuation_seed(7, j, piece) for j in range(50) for piece in range(1, 50)}
    assert len(seeds) == 50 * 49
    assert all(0 <= s < 2**63 for s in seeds) and not seeds & {7 + j for j in range(50)}
    assert continuation_seed(7, 3, 2) == continuation_seed(7, 3, 2)  # a rerun asks for the same samples


def test_serve_parses_the_calculator_field_and_batches_by_it():
    from synthtune.jobs.serve import RequestError, parse_request

    for chat, body in ((False, {"model": "m", "prompt": "x"}),
                       (True, {"model": "m", "messages": [{"role": "user", "content": "x"}]})):
        def parse(body=body, chat=chat, **extra):
            return parse_request({**body, **extra}, chat=chat, models=["m"])

        plain, on = parse(), parse(calculator=True)
        assert (plain.calculator, on.calculator) == (False, True)
        assert parse(calculator=False).group_key() == parse(calculator=None).group_key() == plain.group_key()
        assert on.group_key() != plain.group_key()  # one sample_k call takes one setting
        for bad in ("true", 1, 0, [True], {}):
            with pytest.raises(RequestError) as info:
                parse(calculator=bad)
            assert (info.value.status, info.value.param) == (400, "calculator")
            assert "calculator must be true or false" in info.value.message


# --------------------------------------------------------------------------------------------
# against a real `synthtune serve` of the wrong-arithmetic model
# --------------------------------------------------------------------------------------------

#: what the memorizing model writes into its two annotations by itself
WRONG_RESULTS = {"3*14": "40", "2*14": "36"}
NAME = "wrong-calc"


def _results(text: str) -> dict[str, str]:
    """Each ``<<expr=result>>`` annotation of ``text`` as expr -> result (the prose around them the model
    still writes from memory, wrong: only the annotations are the calculator's)."""
    import re

    return dict(re.findall(r"<<([^<>=]+)=([^<>]*)>>", text))


def _computed(text: str) -> list[tuple[str, str]]:
    """(written, calculator's) results of each annotation of ``text`` the calculator can compute; one it
    refuses (``<<3*14It 8=``, the model's to finish) is left out."""
    import re

    from synthtune.generation.calc_decoding import injection

    pairs = [(m.group(2) + ">>", injection(text[:m.start(2)])) for m in re.finditer(r"<<([^<>=]*)=([^<>]*)>>", text)]
    return [(got, want) for got, want in pairs if want is not None]


@pytest.fixture(scope="module")
def calc_server(tmp_path_factory):
    """`synthtune serve` of the wrong-arithmetic model (no key, loopback); a 250 ms batching window so
    that requests sent together meet in one gather."""
    log = tmp_path_factory.mktemp("serve") / "calc.log"
    (proc,) = start_servers([(log, ["--served-model-name", NAME, "--batch-window-ms", "250"])],
                            model=str(wrong_calc_model_dir()))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(calc_server):
    with openai.OpenAI(base_url=calc_server.url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.mark.integration  # spawns a synthtune serve process
def test_serve_calculator_field_with_the_openai_client(client, calc_server):
    prompt = plain_prompts([SHORT_QUESTION])[0]
    off = client.completions.create(model=NAME, prompt=prompt, max_tokens=48, temperature=0)
    on = client.completions.create(model=NAME, prompt=prompt, max_tokens=48, temperature=0,
                                   extra_body={"calculator": True})
    assert off.choices[0].text == WRONG_COMPLETION and _results(off.choices[0].text) == WRONG_RESULTS
    assert _results(on.choices[0].text) == RIGHT_RESULTS and on.choices[0].finish_reason == "stop"
    # the forced results are completion tokens: "42>>" and "28>>" stand where the model wrote "40>>" and
    # "36>>", as many tokens, so the count is the same
    assert on.usage.completion_tokens == off.usage.completion_tokens and on.choices[0].text.endswith("#### 76")
    # chat: the same field on /v1/chat/completions, the conversation the model was trained on
    messages = chat_messages(SHORT_QUESTION)
    chat = {c: client.chat.completions.create(model=NAME, messages=messages, max_tokens=48, temperature=0,
                                              **({"extra_body": {"calculator": True}} if c else {}))
            for c in (False, True)}
    assert _results(chat[False].choices[0].message.content) == WRONG_RESULTS
    assert _results(chat[True].choices[0].message.content) == RIGHT_RESULTS
    # false is the default, spelled out
    same = client.completions.create(model=NAME, prompt=prompt, max_tokens=48, temperature=0,
                                     extra_body={"calculator": False})
    assert same.choices[0].text == off.choices[0].text
    for bad in ("true", 1, [True]):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=NAME, prompt=prompt, max_tokens=4, extra_body={"calculator": bad})
        assert err.value.param == "calculator" and "calculator must be true or false" in err.value.message


@pytest.mark.integration  # spawns a synthtune serve process
def test_requests_with_and_without_the_calculator_never_share_a_batch(client, calc_server):
    """Sent together, they are gathered together, and each still gets its own setting."""
    prompt = plain_prompts([SHORT_QUESTION])[0]

    def ask(calculator: bool) -> str:
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=48, temperature=0,
                                        extra_body={"calculator": calculator})
        return out.choices[0].text

    texts = concurrently(ask, [True, False, True, False])
    assert [_results(t) for t in texts] == [RIGHT_RESULTS, WRONG_RESULTS] * 2
    assert not calc_server.lines(r"batch=[3-9]")  # never the four in one group


def _backend(server) -> OpenAIBackend:
    return OpenAIBackend([server.url], NAME, concurrency=4, request_timeout=120, max_retries=0)


@pytest.mark.integration  # spawns a synthtune serve process
def test_openai_backend_calculator_against_a_server_without_one(calc_server, client):
    """The server runs no calculator: the backend's own chain (stop at "=", inject, continue) makes the
    annotations right, and greedy gives the text the server's own calculator gives."""
    prompts = [build_prompt(q, [], k=0, fmt="plain") for q in (SHORT_QUESTION, calc_questions()[1])]
    backend = _backend(calc_server)
    posts = len(calc_server.lines(r'"POST /v1/completions" 200'))
    try:
        greedy = SamplingParams(max_new_tokens=48, temperature=0.0, num_samples=2, seed=5, stop=("\n\n",))
        off = backend.sample(prompts, greedy)
        on = backend.sample(prompts, replace(greedy, calculator=True))
        reply = client.completions.create(model=NAME, prompt=prompts[0].text, max_tokens=48, temperature=0,
                                          extra_body={"calculator": True})
        server_side = reply.choices[0].text
        # what the server forced in; the client appends it to the next prompt instead: not generated tokens
        tok = load_tokenizer(str(wrong_calc_model_dir()))
        forced = sum(len(tok(r + ">>", add_special_tokens=False)["input_ids"]) for r in RIGHT_RESULTS.values())
        for samples in off:
            assert [_results(s.text) for s in samples] == [WRONG_RESULTS] * 2
        for samples in on:
            assert [_results(s.text) for s in samples] == [RIGHT_RESULTS] * 2
            assert {(s.text, s.finish_reason) for s in samples} == {(server_side.strip(), "eos")}
            assert [s.n_tokens for s in samples] == [reply.usage.completion_tokens - forced] * 2
        # every sample stopped at its two "=" and was continued after each: three requests a sample,
        # not one request for the pair (n=2) as without the calculator
        want = len(prompts) + 2 * len(prompts) * 3 + 1
        grew = len(calc_server.logged(r'"POST /v1/completions" 200', n=posts + want)) - posts
        assert grew == want
        # sampled: every annotation the calculator can compute holds its result. One request at a
        # time, so serve runs each alone: then the same seeds give the same samples
        sampled = replace(greedy, temperature=1.2, num_samples=4, calculator=True)
        alone = OpenAIBackend([calc_server.url], NAME, concurrency=1, request_timeout=120, max_retries=0)
        try:
            first, again = alone.sample(prompts[:1], sampled), alone.sample(prompts[:1], sampled)
        finally:
            alone.close()
        assert [[s.text for s in g] for g in first] == [[s.text for s in g] for g in again]
        texts = [s.text for g in first for s in g]
        computed = [pair for t in texts for pair in _computed(t)]
        assert len(set(texts)) > 1 and len(computed) >= len(texts)  # real samples, most with annotations
        assert all(got == want for got, want in computed)
        unaided = [pair for g in backend.sample(prompts[:1], replace(sampled, calculator=False)) for s in g
                   for pair in _computed(s.text)]
        assert any(got != want for got, want in unaided)
        # the budget holds across the chain: a sample cut by max_new_tokens ends on "length"
        short = backend.sample(prompts[:1], replace(greedy, max_new_tokens=9, calculator=True))[0]
        assert [(s.finish_reason, s.n_tokens) for s in short] == [("length", 9)] * 2
    finally:
        backend.close()


def test_openai_backend_refuses_the_calculator_with_chat_prompts():
    chat = build_prompt(SHORT_QUESTION, [], k=0, fmt="chat", render_chat=False)
    backend = OpenAIBackend(["http://127.0.0.1:9/v1"], NAME, check=False)  # refused before any request
    try:
        with pytest.raises(ConfigError, match=r"calculator: true.*prompt_format: plain"):
            backend.sample([chat], SamplingParams(max_new_tokens=8, calculator=True))
    finally:
        backend.close()


def _synth_cfg(server, out: Path, **kw) -> SynthConfig:
    """Zero-shot plain prompts of two bundled questions the model was trained on, k=2, everything kept."""
    base = dict(backend="openai", model=NAME, endpoints=[server.url], out=str(out), questions="bundled:train",
                limit=2, k=2, rounds=1, shots=0, prompt_format="plain", temperature=0.0, max_new_tokens=48,
                use_gold=False, min_agreement=0.0, min_calc=0.0, diversity="none", concurrency=4,
                request_timeout=120, max_retries=0)
    return SynthConfig(**{**base, **kw})


@pytest.mark.integration  # spawns a synthtune serve process
def test_synthesis_with_the_calculator_over_the_openai_backend(calc_server, tmp_path):
    quiet = {"progress": False, "log": lambda m: None}
    on = run_synthesis(_synth_cfg(calc_server, tmp_path / "on", calculator=True), **quiet)
    off = run_synthesis(_synth_cfg(calc_server, tmp_path / "off"), **quiet)
    assert on["questions"] == off["questions"] == 2
    assert "calculator: true" in (tmp_path / "on" / "config.yaml").read_text()
    kept = {name: [json.loads(x) for x in (tmp_path / name / KEPT).read_text().splitlines()] for name in ("on", "off")}
    assert kept["on"] and all(_results(r["rationale"]) == RIGHT_RESULTS for r in kept["on"])
    assert kept["off"] and all(_results(r["rationale"]) == WRONG_RESULTS for r in kept["off"])
    # the setting is part of the run's identity: resuming with the other value is refused, naming it
    with pytest.raises(ConfigError, match=r"calculator: True -> False"):
        run_synthesis(_synth_cfg(calc_server, tmp_path / "on"), **quiet)
    with pytest.raises(ConfigError, match=r"calculator: False -> True"):
        run_synthesis(_synth_cfg(calc_server, tmp_path / "off", calculator=True), **quiet)


def test_synthesis_refuses_the_calculator_with_chat_prompts_before_it_starts(tmp_path):
    for fmt in ("chat", "auto"):  # auto means chat on a server that applies the template
        cfg = SynthConfig(backend="openai", endpoints=["http://127.0.0.1:9/v1"], out=str(tmp_path / fmt),
                          prompt_format=fmt, calculator=True)
        with pytest.raises(ConfigError, match=r"calculator: true.*chat.*prompt_format: plain"):
            run_synthesis(cfg, progress=False, log=lambda m: None)
        assert not (tmp_path / fmt).exists()  # refused before anything was written
