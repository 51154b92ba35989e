"""The `openai` backend against real `synthtune serve` processes (tiny-llama on 127.0.0.1, free ports).

Two servers serve tiny-llama and a LoRA adapter ("math") behind an API key. On top of them:
round-robin synthesis over both, a server killed mid-run and a rerun against its replacement, a
real proxy process that injects 429/503 responses or drops `n`, and a wrong key.

The random tiny model almost never ends a sample by itself, so the synthesis settings stop at the
letter "s" and accept any self-consistent answer: samples then finish, often holding a number,
and kept rows exist to check for duplicates.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from synthtune.config import SynthConfig
from synthtune.data.gsm8k import load_split
from synthtune.errors import ConfigError
from synthtune.generation.base import SamplingParams
from synthtune.synth.backends import HFBackend, backend_for
from synthtune.synth.openai_backend import (
    Endpoint,
    EndpointError,
    OpenAIBackend,
    finish_reason,
    parse_retry_after,
    retry_delay,
    split_tokens,
)
from synthtune.synth.pipeline import KEPT, STATUS, run_synthesis
from synthtune.synth.prompts import build_prompt

sys.path.insert(0, str(Path(__file__).parent))
from server_helpers import (  # noqa: E402
    KEY_ENV,
    SYNTHTUNE,
    concurrently,
    http_json,
    start_proxy,
    start_servers,
    wait_for,
)

KEY = "sk-test-7c1f0e9a5d"
SYNTH_TIMEOUT_S = 300
# settings that make the random model's samples finish and be kept (see the module docstring)
LOOSE = ["use_gold=false", "min_agreement=0", "min_calc=0", "diversity=none", "stop=[s]", "max_new_tokens=16",
         "shots=2", "exemplar_pool_size=12"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _cfg(endpoints, out, **kw) -> SynthConfig:
    base = dict(backend="openai", model="tiny-llama", endpoints=list(endpoints), out=str(out), questions="bundled:train",
                k=2, rounds=1, batch_size=4, concurrency=4, shots=2, exemplar_pool_size=12, max_new_tokens=16,
                use_gold=False, min_agreement=0.0, min_calc=0.0, diversity="none", stop=["s"],
                api_key_env=KEY_ENV, request_timeout=60, max_retries=3, retry_backoff=0.05)
    base.update(kw)
    return SynthConfig(**base)


def _assert_no_duplicates(out: Path, n_questions: int, rounds: int) -> None:
    status = _rows(out / STATUS)
    assert len({(r["id"], r["round"]) for r in status}) == len(status), "a (question, round) recorded twice"
    final = {r["id"] for r in status if r["status"] in ("done", "failed")}
    assert len(final) == n_questions and {r["id"] for r in status} == final
    kept = _rows(out / KEPT)
    assert len({(r["id"], r["provenance"]["round"], r["provenance"]["sample_index"]) for r in kept}) == len(kept)
    assert {r["id"] for r in kept} == {r["id"] for r in status if r["status"] == "done"}
    assert max(r["round"] for r in status) < rounds


def _secret_free(root: Path, *texts: str) -> None:
    """The API key is written nowhere: no file under ``root``, no captured output."""
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"
    for text in texts:
        assert KEY not in text


@pytest.fixture(scope="module")
def key_env():
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    yield {**os.environ}
    if old is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = old


@pytest.fixture(scope="module")
def lively_adapter(tmp_path_factory):
    """A LoRA adapter with large random weights: greedy decoding through it varies with the prompt
    (the stock tiny model repeats one token), so exact comparisons mean something."""
    import torch
    from peft import LoraConfig, get_peft_model

    from synthtune.models import load_model

    out = tmp_path_factory.mktemp("adapter") / "math"
    lm = load_model("tiny-llama", device="cpu")
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=256, target_modules=targets,
                                                init_lora_weights=False))
    model.save_pretrained(out)  # safetensors
    return out


@pytest.fixture(scope="module")
def servers(tmp_path_factory, key_env, lively_adapter):
    logs = tmp_path_factory.mktemp("servers")
    args = ["--api-key-env", KEY_ENV, "--adapter", f"math={lively_adapter}"]
    # b: a batch closes after 250 ms or at 4 prompts, so the 4 requests of the batching test meet
    # in one batch even when the machine is busy, without waiting out the window
    procs = start_servers([(logs / "a.log", [*args, "--batch-window-ms", "50"]),
                           (logs / "b.log", [*args, "--batch-window-ms", "250", "--max-batch", "4"])], env=key_env)
    yield procs
    for p in procs:
        p.stop()


# --------------------------------------------------------------------------------------------
# the pure pieces
# --------------------------------------------------------------------------------------------


def test_retry_delay_backs_off_with_jitter_and_honours_retry_after():
    assert retry_delay(0, 1.0, rand=lambda: 0.0) == 0.5 and retry_delay(0, 1.0, rand=lambda: 1.0) == 1.0
    assert retry_delay(3, 1.0, rand=lambda: 1.0) == 8.0  # doubles each retry
    assert retry_delay(20, 1.0, rand=lambda: 1.0) == 60.0  # capped
    assert retry_delay(0, 0.1, "7", rand=lambda: 1.0) == 7.0  # the server asked for longer: it wins
    assert retry_delay(4, 1.0, "1", rand=lambda: 1.0) == 16.0  # our backoff is longer: it wins
    assert retry_delay(0, 0.1, "100000", rand=lambda: 0.0) == 300.0  # one header cannot stall a run for a day
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after(None) is None and parse_retry_after("later") is None


def test_token_split_and_finish_reasons():
    # one "length" choice counts max_tokens; the rest shares the remainder by text length, exactly
    counts = split_tokens(40, ["aaaa", "aaaaaaaaaaaa", "x" * 50], ["eos", "stop", "length"], 16)
    assert counts[2] == 16 and sum(counts) == 40 and counts[1] == 3 * counts[0]
    assert split_tokens(7, ["a"], ["eos"], 16) == [7] and split_tokens(None, ["a", "b"], ["eos", "eos"], 4) == [0, 0]
    assert sum(split_tokens(5, ["ab", "cd", "ef"], ["eos"] * 3, 8)) == 5
    assert finish_reason({"finish_reason": "stop", "stop_reason": "\nProblem:"}) == "stop"
    assert finish_reason({"finish_reason": "stop", "stop_reason": None}) == "eos"
    assert finish_reason({"finish_reason": "stop"}) == "eos"  # OpenAI's own API
    assert finish_reason({"finish_reason": "eos_token"}) == "eos" and finish_reason({"finish_reason": "length"}) == "length"
    assert finish_reason({"finish_reason": "stop_sequence"}) == "stop"  # TGI
    assert finish_reason({"finish_reason": "content_filter"}) == "length"  # unfinished: the evaluator drops it


def test_endpoint_urls_and_config_errors(monkeypatch):
    assert Endpoint.parse("http://h:8000").url == "http://h:8000/v1"
    assert Endpoint.parse("https://api.example.com/api/v1/").url == "https://api.example.com/api/v1"
    assert Endpoint.parse("https://api.example.com/api/v1/").port == 443
    for bad, msg in (("h:8000", "not an http"), ("http://u:p@h/v1", "credentials"), ("http://h/v1?x=1", "query")):
        with pytest.raises(ConfigError, match=msg):
            Endpoint.parse(bad)
    with pytest.raises(ConfigError, match="at least one endpoint"):
        backend_for(SynthConfig(backend="openai"))
    with pytest.raises(ConfigError, match="only used by backend=openai"):
        backend_for(SynthConfig(endpoints=["http://127.0.0.1:9/v1"]))
    monkeypatch.delenv("SYNTHTUNE_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\$SYNTHTUNE_UNSET_KEY is not set"):
        OpenAIBackend(["http://127.0.0.1:9/v1"], "m", api_key_env="SYNTHTUNE_UNSET_KEY", check=False)
    with pytest.raises(ConfigError, match="listed twice"):
        OpenAIBackend(["http://127.0.0.1:9/v1", "http://127.0.0.1:9"], "m", check=False)


def test_unreachable_endpoint_gives_up_with_a_clear_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIBackend([f"http://127.0.0.1:{port}/v1"], "m", max_retries=2, retry_backoff=0.01, check=False)
    try:
        with pytest.raises(EndpointError, match=r"after 3 attempts.*connection refused.*rerun the same command"):
            backend.sample([build_prompt("q?", [], k=0)], SamplingParams(max_new_tokens=4))
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------
# the server's API
# --------------------------------------------------------------------------------------------


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_serve_models_completions_chat_and_errors(servers):
    url = servers[0].url
    status, models = http_json(f"{url}/models", key=KEY)
    assert status == 200
    assert [(m["id"], m["parent"]) for m in models["data"]] == [("tiny-llama", None), ("math", "tiny-llama")]
    body = {"model": "tiny-llama", "prompt": ["Problem: 2+2?\nAnswer:", "Problem: 3+4?\nAnswer:"], "n": 3,
            "max_tokens": 12, "temperature": 1.0, "stop": ["e"], "seed": 5}
    status, out = http_json(f"{url}/completions", "POST", body, key=KEY)
    assert status == 200 and out["object"] == "text_completion"
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert all("e" not in c["text"] for c in out["choices"])  # cut before the stop string
    for c in out["choices"]:
        assert c["finish_reason"] in ("stop", "length")
        assert (c["stop_reason"] == "e") == (c["finish_reason"] == "stop" and c["stop_reason"] is not None)
    assert out["usage"]["prompt_tokens"] > 0 and 6 <= out["usage"]["completion_tokens"] <= 6 * 12
    status, chat = http_json(f"{url}/chat/completions", "POST",
                             {"model": "math", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 5,
                              "temperature": 0}, key=KEY)
    assert status == 200 and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] == 5
    bad = [({"model": "tiny-llama", "prompt": "x", "n": 0}, 400, "n must be"),
           ({"model": "tiny-llama", "prompt": "x", "temperature": -1}, 400, "temperature must be"),
           ({"model": "tiny-llama", "prompt": "x", "top_p": 0}, 400, "top_p must be"),
           ({"model": "tiny-llama", "prompt": "x", "max_tokens": 4000}, 400, "exceeds the model's context"),
           ({"model": "tiny-llama", "prompt": "x", "stream": True}, 400, "stream is not supported"),
           ({"model": "tiny-llama", "prompt": [1, 99999]}, 400, "prompt[1] is 99999, not a token id"),
           ({"model": "tiny-llama", "prompt": [["x"]]}, 400, "prompt must be"),
           ({"model": "nope", "prompt": "x"}, 404, "does not exist")]
    for body, code, msg in bad:
        status, err = http_json(f"{url}/completions", "POST", body, key=KEY)
        assert status == code and msg in err["error"]["message"], (body, err)
    status, err = http_json(f"{url}/chat/completions", "POST", {"model": "math", "messages": [{"role": "x"}]}, key=KEY)
    assert status == 400 and "role" in err["error"]["message"]
    status, err = http_json(f"{url}/completions", "POST", raw=b"{not json", key=KEY)
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    assert http_json(f"{url}/completions", "POST", {"model": "nope", "prompt": "x"}, key=KEY)[1]["error"]["code"] == \
        "model_not_found"
    for key in ("wrong", None):
        status, err = http_json(f"{url}/models", key=key)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
    # a body without a usable length is refused and the connection closed (it cannot be skipped)
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}")
        reply = b""
        while chunk := sock.recv(4096):  # ends when the server closes the connection
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 411") or reply.startswith(b"HTTP/1.1 411"), reply[:80]
    # one line per request, and never the key
    assert len(servers[0].logged(r'"POST /v1/completions" 400', n=6)) >= 6
    assert KEY not in servers[0].log.read_text()


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_adapter_is_selected_by_model_name(servers, lively_adapter):
    from synthtune.generation.sampler import sample_k
    from synthtune.models import load_with_adapter

    prompt = "Problem: Tom has 3 apples and buys 4 more. How many?\nAnswer:"

    def served(model):
        status, out = http_json(f"{servers[1].url}/completions", "POST",
                                {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}, key=KEY)
        assert status == 200
        return out["choices"][0]["text"]

    local = load_with_adapter("tiny-llama", str(lively_adapter), device="cpu")
    ref = sample_k(local, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0))[0][0]
    assert served("math").strip() == ref.text and len(set(ref.token_ids)) > 3
    assert served("tiny-llama") != served("math")  # the base model answers without the adapter


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_concurrent_requests_are_batched_and_routed_back(servers):
    url = servers[1].url
    prompts = [f"Problem: {a} + {a} = ?\nAnswer:" for a in (3, 17, 250, 4096)]

    def ask(p):
        status, out = http_json(f"{url}/completions", "POST",
                                {"model": "math", "prompt": p, "max_tokens": 10, "temperature": 0}, key=KEY)
        assert status == 200
        return out["choices"][0]["text"]

    alone = [ask(p) for p in prompts]
    assert len(set(alone)) == len(prompts)
    before = len(servers[1].lines(r"batch=[2-9]"))
    # batched together, each request still gets its own answer (greedy: the same as alone)
    assert concurrently(ask, prompts) == alone
    assert wait_for(lambda: len(servers[1].lines(r"batch=[2-9]")) > before, 10)


# --------------------------------------------------------------------------------------------
# the backend against the servers
# --------------------------------------------------------------------------------------------


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_openai_backend_reproduces_the_hf_backend(servers, tiny_llama, key_env):
    """Same prompts, same seed: samples through serve equal in-process samples, plain and chat."""
    pool = load_split("train", "bundled").rows
    questions = [r["question"] for r in load_split("test", "bundled").rows[:2]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, num_samples=3, stop=(" the",), seed=11)
    remote = OpenAIBackend([servers[0].url], "tiny-llama", api_key_env=KEY_ENV, concurrency=1)
    local = HFBackend(tiny_llama)
    try:
        groups = []
        for fmt in ("plain", "chat"):
            server_side = [build_prompt(q, pool, k=2, fmt=fmt, render_chat=False) for q in questions]
            rendered = [build_prompt(q, pool, k=2, fmt=fmt, tokenizer=tiny_llama.tokenizer) for q in questions]
            got = remote.sample(server_side, params)
            for prompt, samples in zip(rendered, got, strict=True):
                # one request per prompt, each seeded with params.seed: compare prompt by prompt
                ref = local.sample([prompt], params)[0]
                assert [(s.text, s.finish_reason) for s in samples] == [(s.text, s.finish_reason) for s in ref]
                assert sum(s.n_tokens for s in samples) == sum(s.n_tokens for s in ref)
            groups += [tuple(s.text for s in g) for g in got]
        # real, varied samples, not a degenerate repeat: every prompt's samples differ from each
        # other, and the prompts do not all get the same ones (the random tiny model barely reads
        # its context, so a count over all prompts would measure the prompt wording, not the backend)
        assert all(len(set(g)) == params.num_samples for g in groups)
        assert len(set(groups)) > 1
    finally:
        remote.close()


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_openai_backend_sends_penalties_and_logit_bias(servers, tiny_llama, key_env):
    """The penalties and logit_bias go to the server, which applies them as the local sampler does."""
    pool = load_split("train", "bundled").rows
    prompts = [build_prompt(r["question"], pool, k=1, fmt="plain") for r in load_split("test", "bundled").rows[:2]]
    remote = OpenAIBackend([servers[0].url], "tiny-llama", api_key_env=KEY_ENV, concurrency=1)
    local = HFBackend(tiny_llama)
    try:
        plain = SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=2, seed=3)
        favourite = local.sample(prompts[:1], replace(plain, temperature=0.0))[0][0].token_ids[0]
        greedy = replace(plain, temperature=0.0)
        # (params, whether it must change the samples): sampled with small penalties on the stock
        # model's flat logits may draw the same tokens; the others change what is generated
        for params, changes in ((replace(plain, presence_penalty=-2.0, frequency_penalty=0.5), False),
                                (replace(greedy, frequency_penalty=2.0), True),
                                (replace(greedy, logit_bias={favourite: -100.0}), True),
                                (replace(plain, logit_bias={favourite: 100.0}), True)):
            got = remote.sample(prompts, params)
            for prompt, samples in zip(prompts, got, strict=True):
                ref = local.sample([prompt], params)[0]
                assert [s.text for s in samples] == [s.text for s in ref]
                if changes:
                    unpenalized = replace(params, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None)
                    assert [s.text for s in samples] != [s.text for s in local.sample([prompt], unpenalized)[0]]
    finally:
        remote.close()


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_synth_over_two_endpoints_resumes_anywhere_and_never_writes_the_key(servers, key_env, tmp_path):
    out = tmp_path / "two"
    a, b = servers
    cmd = [SYNTHTUNE, "synth", "--backend", "openai", "--endpoint", a.url, "--endpoint", b.url, "--model", "tiny-llama",
           "--served-model", "tiny-llama", "--api-key-env", KEY_ENV, "--concurrency", "4", "--questions",
           "bundled:train", "--limit", "8", "--k", "3", "--rounds", "2", "--out", str(out), "--json", "batch_size=4",
           *LOOSE]
    posts = [len(s.lines(r'"POST /v1/chat/completions" 200')) for s in servers]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S, env=key_env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["questions"] == 8 and summary["stages"]["sampled"] >= 8 * 3 and summary["new_tokens"] > 0
    assert summary["kept_examples"] > 0 and summary["config"]["backend"] == "openai"
    # round-robin: both servers answered, chat prompts went to the chat endpoint (the last access
    # lines can land a moment after the run has its replies)
    def grown():
        return [len(s.lines(r'"POST /v1/chat/completions" 200')) - n for s, n in zip(servers, posts, strict=True)]

    wait_for(lambda: sum(grown()) >= summary["stages"]["sampled"] // 3, 10)
    grew = grown()
    assert min(grew) >= 2 and sum(grew) == summary["stages"]["sampled"] // 3
    kept = _rows(out / KEPT)
    assert kept[0]["provenance"]["backend"] == "openai" and kept[0]["provenance"]["model"] == "tiny-llama"
    _assert_no_duplicates(out, 8, 2)
    # a rerun against other endpoints resumes the same run: nothing is left to do
    again = subprocess.run([*cmd[:5], b.url, *cmd[8:]], capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S,
                           env=key_env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["kept_examples"] == summary["kept_examples"] and len(_rows(out / KEPT)) == len(kept)
    assert [len(s.lines(r'"POST /v1/chat/completions" 200')) - n for s, n in zip(servers, posts, strict=True)] == grew
    _secret_free(out, proc.stdout, proc.stderr, again.stdout, again.stderr)
    assert "api_key_env: " + KEY_ENV in (out / "config.yaml").read_text()


@pytest.mark.integration  # spawns servers and kills one mid-run
def test_server_killed_mid_run_then_rerun_completes_without_duplicates(tmp_path, key_env):
    out, logs = tmp_path / "killed", tmp_path / "logs"
    logs.mkdir()
    # a 150 ms batching window makes each one-question batch take at least that long, so the
    # kill below lands while most of the run is still ahead
    (first,) = start_servers([(logs / "c.log", ["--batch-window-ms", "150"])])
    run = None
    try:
        cmd = [SYNTHTUNE, "synth", "--backend", "openai", "--endpoint", first.url, "--model", "tiny-llama",
               "--questions", "bundled:train", "--limit", "12", "--k", "2", "--rounds", "1", "--concurrency", "1",
               "--out", str(out), "--json", "batch_size=1", "prompt_format=plain", "max_retries=1",
               "retry_backoff=0.1", *LOOSE]
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=key_env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_rows(out / STATUS)) < 3 and run.poll() is None:
            time.sleep(0.02)
        first.stop(signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=SYNTH_TIMEOUT_S)
    finally:
        first.stop(signal.SIGKILL)
        if run is not None and run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    done_before = len(_rows(out / STATUS))
    assert run.returncode == 2, stderr
    assert 3 <= done_before < 12, "the kill must land in the middle of the run"
    assert "error:" in stderr and "gave up on POST /completions" in stderr and "rerun the same command" in stderr
    assert "Traceback" not in stderr
    # the replacement server listens elsewhere: the endpoint is not part of the run's identity
    (second,) = start_servers([(logs / "d.log", [])])
    try:
        cmd[cmd.index(first.url)] = second.url
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S, env=key_env)
    finally:
        second.stop()
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["questions"] == 12 and summary["pending"] == 0
    # only the unfinished questions were asked again
    assert summary["samples"] == 2 * (12 - done_before)
    assert len(second.lines(r'"POST /v1/completions" 200')) == 12 - done_before
    _assert_no_duplicates(out, 12, 1)


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_retries_on_injected_429_and_503(servers, tmp_path, key_env):
    proxy = start_proxy(servers[0].url, tmp_path / "proxy.log", "--fail-429", "2", "--fail-503", "2")
    try:
        summary = run_synthesis(_cfg([proxy.url], tmp_path / "retried", limit=6), progress=False, log=lambda m: None)
        _, stats = http_json(proxy.url.removesuffix("/v1") + "/proxy/stats")
    finally:
        proxy.stop()
    assert stats["429"] == 2 and stats["503"] == 2
    assert summary["questions"] == 6 and summary["stages"]["sampled"] == 6 * 2
    assert stats["forwarded"] == 1 + 6  # the model check, then one request per question after its retry
    _assert_no_duplicates(tmp_path / "retried", 6, 1)
    # without retries, the same failure stops the run with the server's message
    strict = start_proxy(servers[0].url, tmp_path / "strict.log", "--fail-429", "1")
    try:
        with pytest.raises(EndpointError, match=r"after 1 attempt .*HTTP 429: injected 429 by the test proxy"):
            run_synthesis(_cfg([strict.url], tmp_path / "strict", limit=2, max_retries=0), progress=False,
                          log=lambda m: None)
    finally:
        strict.stop()


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_server_that_ignores_n_gets_single_requests(servers, tmp_path, key_env):
    proxy = start_proxy(servers[0].url, tmp_path / "proxy.log", "--ignore-n")
    backend = OpenAIBackend([proxy.url], "tiny-llama", api_key_env=KEY_ENV, concurrency=1)
    try:
        pool = load_split("train", "bundled").rows
        prompts = [build_prompt(q["question"], pool, k=1, fmt="plain") for q in load_split("test", "bundled").rows[:2]]
        got = backend.sample(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=3, seed=3))
        _, stats = http_json(proxy.url.removesuffix("/v1") + "/proxy/stats")
    finally:
        backend.close()
        proxy.stop()
    assert [len(g) for g in got] == [3, 3]
    assert all(len({s.text for s in g}) == 3 for g in got)  # each single request has its own seed
    # the first answer showed that n is ignored; from then on single requests: 1 + 2 + 3 in all
    assert stats["n_dropped"] == 1 and stats["forwarded"] == 1 + 6


@pytest.mark.integration  # spawns synthtune serve processes (module fixture)
def test_wrong_key_and_unknown_model_fail_clearly(servers, tmp_path, key_env):
    out = tmp_path / "wrong"
    env = {**key_env, KEY_ENV: "sk-wrong-key"}
    proc = subprocess.run([SYNTHTUNE, "synth", "--backend", "openai", "--endpoint", servers[0].url, "--model",
                           "tiny-llama", "--api-key-env", KEY_ENV, "--out", str(out), "--limit", "2"],
                          capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S, env=env)
    assert proc.returncode == 2
    assert f"endpoint {servers[0].url} rejected the API key (HTTP 401: invalid API key" in proc.stderr
    assert f"${KEY_ENV}" in proc.stderr and "Traceback" not in proc.stderr
    assert "sk-wrong-key" not in proc.stderr + proc.stdout
    assert not any(b"sk-wrong-key" in p.read_bytes() for p in out.rglob("*") if p.is_file())
    with pytest.raises(EndpointError, match=r"does not serve model 'nope'; it serves: tiny-llama, math"):
        backend_for(replace(_cfg([servers[0].url], tmp_path / "x"), served_model="nope"))


@pytest.mark.integration  # spawns a process
def test_the_client_imports_without_torch():
    # a synthesis client for remote servers should not pay torch's ~1 s import (or need torch at all)
    code = "import sys, synthtune.synth.openai_backend; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# the API key never leaks: a malformed key, and a server that echoes the Authorization header
# --------------------------------------------------------------------------------------------

ECHO_KEY = "sk-echo-" + "5e0c9d2b7a41f3e8" * 3  # long enough that a leaked fragment is still recognizable


def _leaks(text: str | bytes, key: str = ECHO_KEY) -> list[str]:
    """Every 10-character piece of the key's random part found in ``text`` (a cut key leaks too)."""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    secret = key.removeprefix("sk-echo-")
    return sorted({secret[i:i + 10] for i in range(len(secret) - 9) if secret[i:i + 10] in text})


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    """A careless server: it lists model "m", then answers every POST by echoing the headers back.

    ``server.mode``: "cut" (HTTP 400 whose message is long, with the key across the 400-character
    point where the backend cuts messages), "no-choices" (HTTP 200 whose JSON has no choices but
    the headers), "503" (retryable errors quoting the header).
    """

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the test reads the client's output, not the server's
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        auth = self.headers.get("Authorization", "")
        mode = self.server.mode
        if mode == "cut":
            lead = "rejected request; headers were: Authorization: "
            pad = "x" * (400 - len(lead) - len("Bearer ") - 16)  # 16 key characters before the cut
            self._send(400, {"error": {"message": pad + lead + auth + " (end)"}})
        elif mode == "no-choices":
            self._send(200, {"object": "debug", "headers": {"authorization": auth}})
        else:
            self._send(503, {"error": {"message": f"overloaded; you sent Authorization: {auth}"}})


@pytest.fixture
def echo_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _synth_cli(url: str, out: Path, env_value: str, verbose: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYNTHTUNE_ECHO_KEY": env_value}
    cmd = [SYNTHTUNE, *(["--verbose"] if verbose else []), "synth", "--backend", "openai", "--endpoint", url, "--served-model", "m", "--model",
           "tiny-llama", "--api-key-env", "SYNTHTUNE_ECHO_KEY", "--out", str(out), "--limit", "1", "--json",
           "k=1", "rounds=1", "shots=0", "prompt_format=plain", "max_retries=1", "retry_backoff=0.01"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S, env=env)


@pytest.mark.integration  # runs synthtune synth in a subprocess
def test_key_with_a_carriage_return_fails_naming_the_variable_not_the_key(tmp_path, monkeypatch):
    """Regression: a key ending in \\r made http.client raise a ValueError quoting the header, and the
    CLI printed the traceback, key included."""
    key = ECHO_KEY + "\r"
    monkeypatch.setenv("SYNTHTUNE_ECHO_KEY", key)
    with pytest.raises(ConfigError, match=r"\$SYNTHTUNE_ECHO_KEY holds a carriage return") as err:
        OpenAIBackend(["http://127.0.0.1:9/v1"], "m", api_key_env="SYNTHTUNE_ECHO_KEY", check=False)
    assert not _leaks(str(err.value))
    for bad, what in ((" " + ECHO_KEY, "a space at character 1 of"), (ECHO_KEY[:9] + "\n" + ECHO_KEY[9:], "line feed"),
                      (ECHO_KEY + "\x1b", "control character (U+001B)"), (ECHO_KEY + "é", "non-ASCII")):
        monkeypatch.setenv("SYNTHTUNE_ECHO_KEY", bad)
        with pytest.raises(ConfigError, match=re.escape(what)) as err:
            OpenAIBackend(["http://127.0.0.1:9/v1"], "m", api_key_env="SYNTHTUNE_ECHO_KEY", check=False)
        assert not _leaks(str(err.value))
    # through the CLI, as the issue ran it: one clear line, exit 2, no traceback, no key
    proc = _synth_cli("http://127.0.0.1:9/v1", tmp_path / "out", key)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "$SYNTHTUNE_ECHO_KEY holds a carriage return (\\r)" in proc.stderr and "Traceback" not in proc.stderr
    assert not _leaks(proc.stdout + proc.stderr)


@pytest.mark.integration  # runs a server and synthtune synth in a subprocess
@pytest.mark.parametrize("mode", ["cut", "no-choices", "503"])
def test_a_server_echoing_the_key_never_gets_it_printed_logged_or_written(echo_server, tmp_path, mode):
    """Regression ("cut", "no-choices"): the key was scrubbed only after a message was cut to 400
    characters (leaving its start), and not at all from a 200 answer without choices."""
    echo_server.mode = mode
    url = f"http://127.0.0.1:{echo_server.server_address[1]}/v1"
    out = tmp_path / "out"
    proc = _synth_cli(url, out, ECHO_KEY, verbose=mode == "503")  # debug logs: more to leak through
    assert proc.returncode == 2, proc.stderr[-2000:]
    expected = {"cut": "refused POST /completions (HTTP 400: xxx", "no-choices": "with no choices",
                "503": "gave up on POST /completions after 2 attempts"}[mode]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert "***" in proc.stderr  # the echo is there, the key is not
    if mode == "503":
        assert "retry 1/1" in proc.stderr  # the logged warning went through the redaction too
    assert not _leaks(proc.stdout + proc.stderr), proc.stderr[-2000:]
    assert not [p for p in out.rglob("*") if p.is_file() and _leaks(p.read_bytes())]


def test_server_messages_are_redacted_before_they_are_cut():
    from synthtune.redact import register_secret
    from synthtune.synth.openai_backend import server_message

    key = "sk-cut-" + "0f1e2d3c4b5a6978" * 2
    register_secret(key)
    body = json.dumps({"error": {"message": "y" * 390 + "Bearer " + key + " and more" * 5}}).encode()
    msg = server_message(body)
    assert key[:12] not in msg and msg.endswith("...")
    # the JSON-escaped spelling of a key holding a quote is hidden too
    odd = 'sk-q"uote-' + "9" * 20
    register_secret(odd)
    assert "***" in server_message(json.dumps({"detail": {"auth": odd}}).encode())


@pytest.mark.integration  # spawns a process
def test_log_records_and_cli_tracebacks_never_show_a_read_key(tmp_path):
    """Second line of defence: whatever message a key slips into, the CLI's logs and tracebacks hide it."""
    import io
    import logging

    from synthtune.cli import install_log_redaction
    from synthtune.redact import register_secret

    key = "sk-log-" + "a1b2c3d4e5f60718" * 2
    register_secret(key)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_log_redaction()
        log = logging.getLogger("synthtune.test_redaction")
        log.warning("header was %s", f"Bearer {key}")
        try:
            raise ValueError(f"Invalid header value b'Bearer {key}\\r'")
        except ValueError:
            log.exception("request failed")
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert "header was Bearer ***" in text and "ValueError: Invalid header value b'Bearer ***" in text
    assert key not in text
    # an unexpected error (a bug's traceback) in a CLI process that has read a key: printed redacted
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"question": "q", "answer": "1", "completion": "#### 1"}) + "\n")
    target = tmp_path / f"out-{key}"
    target.mkdir()  # --out is a directory: os.replace fails with IsADirectoryError, path (key) included
    code = ("import sys\nfrom synthtune.redact import register_secret\nregister_secret(sys.argv[1])\n"
            "from synthtune.cli import main\nsys.argv = ['synthtune', *sys.argv[2:]]\nmain()")
    proc = subprocess.run([sys.executable, "-c", code, key, "score", str(rows), "--out", str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "IsADirectoryError" in proc.stderr
    assert "out-***" in proc.stderr and key not in proc.stdout + proc.stderr
