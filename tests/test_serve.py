"""`synthtune serve` under bad input, abuse and departing clients (issue #12 part 3).

Real `synthtune serve` processes on loopback: tiny-llama behind a key with short limits, and tiny-t5
on ``::1``. Each reproduction from the issue is a test here; the load test is test_serve_load.py and
the parser fuzz test_fuzz_serve.py.

    PYTHONPATH=$PWD python -m pytest tests/test_serve.py -q
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_helpers import (  # noqa: E402
    KEY_ENV,
    concurrently,
    connect,
    http_call,
    http_json,
    proc_status,
    raw_exchange,
    read_until_closed,
    start_servers,
    wait_for,
)

KEY = "sk-serve-test-31c9"
READ_TIMEOUT_S = 2
BUDGET, INFLIGHT = 20000, 40000
#: one prompt "x" with n=128 and max_tokens=140 costs 128 x (2-3 + 140) tokens: just under the budget,
#: so two fit the in-flight limit and a third does not
BIG = {"model": "tiny-llama", "prompt": "x", "n": 128, "max_tokens": 140, "temperature": 1.0}


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def env():
    return {**os.environ, KEY_ENV: KEY}


@pytest.fixture(scope="module")
def server(tmp_path_factory, env):
    log = tmp_path_factory.mktemp("serve") / "llama.log"
    (proc,) = start_servers([(log, ["--api-key-env", KEY_ENV, "--batch-window-ms", "300",
                                    "--read-timeout", str(READ_TIMEOUT_S), "--max-request-tokens", str(BUDGET),
                                    "--max-inflight-tokens", str(INFLIGHT)])], env=env)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def t5_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "t5.log"
    host = "::1" if _ipv6_loopback() else "127.0.0.1"
    (proc,) = start_servers([(log, [])], model="tiny-t5", host=host)
    yield proc
    proc.stop()


def _post(url, body, key=KEY, timeout=120):
    return http_json(f"{url}/completions", "POST", body, key=key, timeout=timeout)


def _status_line(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:120]
    return int(reply[9:12])


def _head(path: str, length: int, key: str | None = KEY, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def _raw_post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    reply = raw_exchange(url, _head("/v1/completions", len(body), key) + body)
    status = _status_line(reply)
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


def _good(i: int) -> dict:
    return {"model": "tiny-llama", "prompt": f"Problem: {i} + {i}?\nAnswer:", "max_tokens": 6, "temperature": 0}


# --------------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------------


@pytest.mark.integration  # spawns synthtune serve processes
def test_a_request_over_the_token_budget_is_refused_naming_the_limit(server):
    # the request: 1,000 prompts x n=128 x 2,000 tokens, ~125 GiB of KV cache
    huge = {"model": "tiny-llama", "prompt": ["Problem: 1+1?"] * 1000, "n": 128, "max_tokens": 2000}
    status, err = _post(server.url, huge)
    assert status == 400 and err["error"]["code"] == "request_too_large"
    assert "max_request_tokens of 20,000" in err["error"]["message"] and "--max-request-tokens" in err["error"]["message"]
    # over the budget only once tokenized: the exact count is named
    # (a prompt within 8 characters a token of what the budget leaves it, 16 tokens here: a longer one
    # is measured on a prefix and refused with "at least", test_a_flood_of_text_is_refused_...)
    words = " ".join(["apples"] * 19)
    status, err = _post(server.url, {**BIG, "prompt": words})
    assert status == 400 and "needs " in err["error"]["message"] and "at least" not in err["error"]["message"]
    status, ok = _post(server.url, {**BIG, "n": 2, "max_tokens": 4})  # the same server still works
    assert status == 200 and len(ok["choices"]) == 2


@pytest.mark.integration  # spawns synthtune serve processes
def test_a_full_server_answers_503_with_retry_after(server):
    def ask(i):
        time.sleep(0.05 * i)  # in order: the first two fill the in-flight budget, the third finds it full
        return http_call(f"{server.url}/completions", "POST", BIG, key=KEY)

    results = concurrently(ask, range(3))
    codes = sorted(r[0] for r in results)
    assert codes == [200, 200, 503], [(r[0], r[2].get("error")) for r in results]
    status, headers, err = next(r for r in results if r[0] == 503)
    assert headers["retry-after"] == "1" and "max_inflight_tokens of 40,000" in err["error"]["message"]
    assert _post(server.url, BIG)[0] == 200  # the budget was given back


# --------------------------------------------------------------------------------------------
# malformed bodies, poisoned batch-mates
# --------------------------------------------------------------------------------------------


@pytest.mark.integration  # spawns synthtune serve processes
def test_malformed_bodies_get_400_and_are_logged(server):
    before = len(server.lines(r'"POST /v1/completions" 400'))
    cases = [
        (b"[" * 200000, "nested deeper"),  # was an uncaught RecursionError
        (b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}', "NaN is not JSON"),
        (b'{"model": "tiny-llama", "prompt": "x", "top_p": Infinity}', "Infinity is not JSON"),
        (b'{"model": "tiny-llama", "prompt": "x", "temperature": 1e999}', "temperature must be a finite number"),
        (b'{"model": "tiny-llama", "prompt": "x", "n": 1' + b"0" * 5000 + b"}", "not valid JSON"),
        (b'{"model": "tiny-llama", "prompt": "x", "seed": 18446744073709551616}', "seed must be an integer"),
        (b'{"model": "tiny-llama", "prompt": "x", "seed": -1}', "seed must be an integer"),
        (b'{"model": "tiny-llama", "prompt": "a\\ud800b"}', "lone UTF-16 surrogate"),
        (b'{"model": "tiny-llama", "prompt": "x", "stop": ["\\udfff"]}', "lone UTF-16 surrogate"),
        (b'{"model": "tiny-llama", "prompt": "\xff\xfe"}', "not valid JSON"),
        (b'"just a string"', "must be a JSON object"),
        (b'{"model": "tiny-llama", "prompt": "x", "n": true}', "n must be an integer"),
        (b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 0}', "max_tokens must be"),
        (b'{"model": "tiny-llama", "prompt": [["x"]]}', "prompt must be"),
    ]
    for body, message in cases:
        status, err = _raw_post(server.url, body)
        assert status == 400 and message in err["error"]["message"], (body[:60], err)
    assert wait_for(lambda: len(server.lines(r'"POST /v1/completions" 400')) - before >= len(cases), 10)
    # framing errors: no trustworthy length means the connection closes after the answer
    for head, code in [(b"Content-Length: +5\r\n", 411), (b"Content-Length: 5\r\nContent-Length: 6\r\n", 411),
                       (b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n", 400), (b"", 411),
                       # a malformed line hides itself and every header after it from the parser
                       (b"Transfer-Encoding : chunked\r\nContent-Length: 2\r\n", 400),
                       (f"Content-Length: {17 << 20}\r\n".encode(), 413)]:
        reply = raw_exchange(server.url, b"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer " + KEY.encode()
                             + b"\r\n" + head + b"\r\n{}")
        assert _status_line(reply) == code and b"Connection: close" in reply, (head, reply[:200])
    assert _status_line(raw_exchange(server.url, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")) == 400


@pytest.mark.integration  # spawns synthtune serve processes
def test_a_poisoned_request_fails_alone(server):
    """Bad requests sent first into a batch window with good ones: only they fail."""
    poison = [b'{"model": "tiny-llama", "prompt": "Problem: 1 + 1?\\nAnswer:", "max_tokens": 6, "temperature": 0, '
              b'"seed": 18446744073709551616}',
              b'{"model": "tiny-llama", "prompt": "Problem: 1 + 1?\\nAnswer:", "max_tokens": 6, "temperature": NaN}',
              b'{"model": "tiny-llama", "prompt": "Problem: \\ud800?", "max_tokens": 6, "temperature": 0}']
    expected = [_post(server.url, _good(i))[1]["choices"][0]["text"] for i in range(3)]
    results: dict = {}

    def bad(i):
        results[("bad", i)] = _raw_post(server.url, poison[i])

    def good(i):
        time.sleep(0.1)  # after the poisoned ones, inside the 300 ms window
        results[("good", i)] = _post(server.url, _good(i))

    threads = [threading.Thread(target=bad, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=good, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i in range(3):
        assert results[("bad", i)][0] == 400, results[("bad", i)]
        status, out = results[("good", i)]
        assert status == 200 and out["choices"][0]["text"] == expected[i]


# --------------------------------------------------------------------------------------------
# the connection layer
# --------------------------------------------------------------------------------------------


@pytest.mark.integration  # spawns synthtune serve processes
def test_the_key_is_checked_before_the_body_is_read(server):
    # a 10 MB body announced and never sent: the server must answer from the headers alone
    with connect(server.url, timeout=15) as sock:
        sock.sendall(_head("/v1/completions", 10_000_000, key="wrong"))
        reply = read_until_closed(sock)
    assert _status_line(reply) == 401 and b"invalid_api_key" in reply
    with connect(server.url, timeout=15) as sock:  # the same for an unknown route
        sock.sendall(_head("/v1/nothing", 10_000_000))
        assert _status_line(read_until_closed(sock)) == 404


@pytest.mark.integration  # spawns synthtune serve processes
def test_half_sent_requests_time_out_and_leave_no_threads(server):
    assert _post(server.url, _good(0))[0] == 200
    baseline = proc_status(server.proc.pid)["Threads"]
    socks = []
    try:
        for i in range(50):
            s = connect(server.url, timeout=READ_TIMEOUT_S + 20)  # a wall-clock guard with a wide margin
            # half a request line, half the headers, or half the body
            s.sendall([b"POST /v1/compl", _head("/v1/completions", 100)[:40], _head("/v1/completions", 100) + b"{"][i % 3])
            socks.append(s)
        replies = [read_until_closed(s) for s in socks]  # socket.timeout here = the server never closed
    finally:
        for s in socks:
            s.close()
    assert all(r == b"" or _status_line(r) == 408 for r in replies)
    assert sum(r != b"" for r in replies) >= 33  # those that sent bytes get an answer before the close
    assert proc_status(server.proc.pid)["Threads"] == baseline
    assert _post(server.url, _good(1))[0] == 200


@pytest.mark.integration  # spawns synthtune serve processes
def test_keep_alive_connections_serve_request_after_request(server):
    # While a request generates, the server watches its socket for a departing client; that watch
    # must be fully cancelled before the connection's next request is read (on Python 3.12+ a
    # pending read made the second request fail and the connection close)
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    errors_before = len(server.lines("error"))
    try:
        for i in range(3):
            conn.request("POST", "/v1/completions", body=json.dumps(_good(i)),
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()[:300]
            assert len(json.loads(resp.read())["choices"]) == 1
    finally:
        conn.close()
    assert len(server.lines("error")) == errors_before


@pytest.mark.integration  # spawns synthtune serve processes
def test_log_lines_escape_what_clients_send(server):
    reply = raw_exchange(server.url, f"GET /v1/\x1b[2J\x1b]0;pwned\x07 HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n"
                         "\r\n".encode())
    assert _status_line(reply) == 404
    status, _ = _post(server.url, {"model": "evil\x1b[31m\nfake log line", "prompt": "x"})
    assert status == 404
    text = server.log.read_text(errors="replace")
    assert "\x1b" not in text and "\x07" not in text and "\nfake log line" not in text
    assert server.logged(r"GET /v1/\\x1b\[2J\\x1b\]0;pwned\\x07") and server.logged(r"evil\\x1b\[31m\\nfake log line")


@pytest.mark.integration  # spawns synthtune serve processes
def test_departed_clients_lose_their_work(server):
    """Queued work of a client that disconnected is dropped; a batch all of whose clients left stops."""
    dropped_before = len(server.lines(r"dropped before generation"))
    stopped_before = len(server.lines(r"generation stopped"))
    busy = threading.Thread(target=lambda: _post(server.url, BIG))
    busy.start()
    time.sleep(0.1)
    body = json.dumps({"model": "tiny-llama", "prompt": "queued", "max_tokens": 5}).encode()
    with connect(server.url) as sock:  # queued behind BIG, then gone
        sock.sendall(_head("/v1/completions", len(body)) + body)
        time.sleep(0.1)
    busy.join(timeout=120)
    assert wait_for(lambda: len(server.lines(r"dropped before generation")) > dropped_before, 30)
    assert server.logged(r'"POST /v1/completions" 499')
    # a long generation (9 x ~2,000 tokens) whose only client leaves part-way stops early
    long = json.dumps({"model": "tiny-llama", "prompt": "x", "n": 9, "max_tokens": 2000}).encode()
    with connect(server.url) as sock:
        sock.sendall(_head("/v1/completions", len(long)) + long)
        time.sleep(0.5)  # the 300 ms batch window, then part of a generation of 2,000 steps (seconds)
    assert wait_for(lambda: len(server.lines(r"generation stopped")) > stopped_before, 60)
    assert _post(server.url, _good(2))[0] == 200


# --------------------------------------------------------------------------------------------
# OpenAI / vLLM parity (issue #16): token-id prompts, max_tokens defaults, routes, roles, chunked bodies
# --------------------------------------------------------------------------------------------


def _chat(url, body, key=KEY):
    return http_json(f"{url}/chat/completions", "POST", body, key=key)


def _plain_ids(tok, text: str) -> list[int]:
    from synthtune.formats import add_special_tokens

    return tok(text, add_special_tokens=add_special_tokens("plain"))["input_ids"]


@pytest.mark.integration  # spawns synthtune serve processes
def test_token_id_prompts_run_like_the_text_they_encode(server, tiny_llama):
    """lm-eval's default local-completions sends token ids, as vLLM accepts (was a 400)."""
    texts = ["Problem: 2 + 3?\nAnswer:", "Tom has 4 apples."]
    ids = [_plain_ids(tiny_llama.tokenizer, t) for t in texts]
    common = {"model": "tiny-llama", "max_tokens": 5, "temperature": 0}
    status, by_text = _post(server.url, {**common, "prompt": texts})
    assert status == 200
    for prompt in (ids, ids[:1], ids[0]):  # a list of lists, a list of one list, one flat list
        status, by_ids = _post(server.url, {**common, "prompt": prompt})
        assert status == 200, by_ids
        want = by_text["choices"][:len(prompt) if isinstance(prompt[0], list) else 1]
        assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in want]
        assert by_ids["usage"]["prompt_tokens"] == sum(len(x) for x in ids[:len(want)])
    status, out = _post(server.url, {**common, "prompt": ids[0], "n": 3, "temperature": 1.0, "seed": 7})
    assert status == 200 and len(out["choices"]) == 3


@pytest.mark.integration  # spawns synthtune serve processes
def test_token_ids_outside_the_vocabulary_or_malformed_get_a_400_naming_where(server):
    vocab = 1024  # the tiny tokenizer's size, which is also its embedding's
    cases = [
        ([[1, 2], [3, vocab]], f"prompt[1][1] is {vocab}, not a token id of this model (its ids run from 0 to 1023)"),
        ([5, 6, vocab + 7], f"prompt[2] is {vocab + 7}, not a token id"),
        ([1, -2], "prompt[1] is -2: a token-id prompt holds only token ids"),
        ([1, True], "prompt[1] is True"),
        ([1, 2.5], "prompt[1] is 2.5"),
        ([[1, 2], []], "prompt[1] is []"),
        ([[1, 2], "text"], "prompt[1] is 'text'"),
        (["text", [1, 2]], "prompt[1] is [1, 2]"),
        ([1, 1 << 40], "prompt[1] is 1099511627776"),
        ([], "prompt must be"),
        ("", "prompt must be"),  # was accepted, then failed as "tokenizes to nothing"
    ]
    for prompt, message in cases:
        status, err = _post(server.url, {"model": "tiny-llama", "prompt": prompt, "max_tokens": 2})
        assert status == 400 and err["error"]["param"] == "prompt" and message in err["error"]["message"], \
            (prompt, err)


@pytest.mark.integration  # spawns synthtune serve processes
def test_max_tokens_defaults_follow_openai_and_vllm(server, tiny_llama):
    """Completions: 16 (was 256). Chat: the rest of the context, so a 1,900-token conversation on a
    2,048-token model is answered (it got 400 'lower max_tokens' for a parameter it never sent)."""
    from synthtune.formats import add_special_tokens, render_chat

    status, out = _post(server.url, {"model": "tiny-llama", "prompt": [5, 6, 7], "temperature": 0})
    assert status == 200 and out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 16
    # 16 does not fit after 2,040 prompt tokens: the default shrinks to the 8 left
    status, out = _post(server.url, {"model": "tiny-llama", "prompt": [5] * 2040, "temperature": 0})
    assert status == 200 and out["usage"]["completion_tokens"] <= 8
    assert out["choices"][0]["finish_reason"] != "length" or out["usage"]["completion_tokens"] == 8

    tok = tiny_llama.tokenizer

    def chat_tokens(words: int) -> tuple[list, int]:
        messages = [{"role": "user", "content": " ".join(["apples"] * words)}]
        return messages, len(tok(render_chat(messages, tok), add_special_tokens=add_special_tokens("chat"))["input_ids"])

    t100, t200 = chat_tokens(100)[1], chat_tokens(200)[1]
    words = 100 + (1890 - t100) * 100 // (t200 - t100)  # the template's own tokens, then some per word
    messages, n_prompt = chat_tokens(words)
    assert 1800 < n_prompt < 2000, n_prompt
    status, out = _chat(server.url, {"model": "tiny-llama", "messages": messages, "temperature": 0})
    assert status == 200, out
    assert out["usage"]["prompt_tokens"] == n_prompt
    left = 2048 - n_prompt
    assert out["usage"]["completion_tokens"] <= left
    assert out["choices"][0]["finish_reason"] != "length" or out["usage"]["completion_tokens"] == left
    # a max_tokens the client did send and that does not fit still gets the 400 it always got
    status, err = _chat(server.url, {"model": "tiny-llama", "messages": messages, "max_tokens": left + 1})
    assert status == 400 and err["error"]["param"] == "max_tokens" and "lower max_tokens" in err["error"]["message"]
    # a prompt that fills the context: a 400 about the prompt, not about a default
    status, err = _post(server.url, {"model": "tiny-llama", "prompt": [5] * 2048})
    assert status == 400 and err["error"]["param"] == "prompt" and "leaves no room" in err["error"]["message"]


@pytest.mark.integration  # spawns synthtune serve processes
def test_model_retrieve_and_health_routes(server):
    status, model = http_json(f"{server.url}/models/tiny-llama", key=KEY)
    assert status == 200 and model["id"] == "tiny-llama" and model["object"] == "model"
    assert isinstance(model["created"], int) and model["owned_by"] == "synthtune"
    assert http_json(f"{server.url}/models/tiny%2Dllama", key=KEY) == (200, model)  # percent-encoded
    status, err = http_json(f"{server.url}/models/gpt-4o", key=KEY)
    assert status == 404 and err["error"]["code"] == "model_not_found" and "gpt-4o" in err["error"]["message"]
    assert http_json(f"{server.url}/models/tiny-llama", key="wrong")[0] == 401
    # /health: no key needed (as vLLM's: load balancers probe without one), empty body, keep-alive
    root = server.url.removesuffix("/v1")
    head = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
    reply = raw_exchange(root, head + head.replace(b"GET", b"HEAD") + b"POST /health HTTP/1.1\r\n\r\n")
    answers = reply.split(b"HTTP/1.1 ")[1:]
    assert [a[:3] for a in answers] == [b"200", b"200", b"405"], reply[:400]
    assert all(b"Content-Length: 0\r\n\r\n" in a for a in answers[:2])
    assert server.logged(r'"GET /health" 200')
    # the absolute form of the target routes by its path (RFC 9112 3.2.2: a server must accept it)
    reply = raw_exchange(root, f"GET {root}/health HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]


@pytest.mark.integration  # spawns synthtune serve processes
def test_developer_is_system_and_tools_are_refused(server):
    base = {"model": "tiny-llama", "max_tokens": 4, "temperature": 0}
    user = {"role": "user", "content": "Problem: 2 + 2?"}
    as_system = _chat(server.url, {**base, "messages": [{"role": "system", "content": "Be brief."}, user]})
    as_developer = _chat(server.url, {**base, "messages": [{"role": "developer", "content": "Be brief."}, user]})
    assert as_developer[0] == 200 and as_system[0] == 200
    assert as_developer[1]["usage"] == as_system[1]["usage"]
    assert as_developer[1]["choices"][0]["message"] == as_system[1]["choices"][0]["message"]
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    for messages in ([user, {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "c1", "content": "4"}],
                     [user, {"role": "assistant", "content": None, "tool_calls": [call]}],
                     [{"role": "function", "name": "add", "content": "4"}]):
        status, err = _chat(server.url, {**base, "messages": messages})
        assert status == 400 and err["error"]["param"] == "messages", err
        assert "tools and function calling are not supported" in err["error"]["message"]
    status, err = _chat(server.url, {**base, "messages": [user], "tools": [{"type": "function", "function": call}]})
    assert status == 400 and err["error"]["param"] == "tools"


@pytest.mark.integration  # spawns synthtune serve processes
def test_parameters_serve_does_not_act_on_get_a_400_naming_them(server):
    """Nothing is silently ignored: a vLLM extension serve does not implement is refused by name."""
    for key, value in [("repetition_penalty", 1.2), ("min_tokens", 4), ("ignore_eos", True), ("guided_json", {})]:
        status, err = _post(server.url, {"model": "tiny-llama", "prompt": "x", "max_tokens": 2, key: value})
        assert status == 400 and err["error"]["param"] == key and "not a parameter" in err["error"]["message"]
    # OpenAI fields clients send switched off are accepted; user is an end-user id with no effect on output
    status, _ = _post(server.url, {"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "stream": False,
                                   "logprobs": None, "echo": False, "user": "alice"})
    assert status == 200


def _chunked(body: bytes, cuts: list[int], ext: bytes = b"", trailer: bytes = b"") -> bytes:
    """``body`` in chunked framing, cut at the offsets ``cuts``, each size line with ``ext``."""
    bounds = [0, *cuts, len(body)]
    parts = [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in parts) + b"0\r\n" + trailer + b"\r\n"


@pytest.mark.integration  # spawns synthtune serve processes
def test_chunked_bodies_are_read_within_the_same_cap(server):
    import http.client
    from urllib.parse import urlsplit

    good = _good(3)
    body = json.dumps(good).encode()
    want = _post(server.url, good)[1]["choices"]
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:  # http.client sends an iterable body chunked; twice on one keep-alive connection
        for _ in range(2):
            conn.request("POST", "/v1/completions", body=iter([body[:9], body[9:30], body[30:]]),
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                         encode_chunked=True)
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["choices"] == want
    finally:
        conn.close()
    assert server.logged(r'"POST /v1/completions" 200')

    head = (f"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n"
            f"Connection: close\r\n\r\n").encode()
    # extensions and trailer fields are allowed and ignored
    data = _chunked(json.dumps({**good, "model": "no-such"}).encode(), [3, 50], b" ;name=value", b"X-Trailer: 1\r\n")
    reply = raw_exchange(server.url, head + data)
    assert _status_line(reply) == 404 and b"'no-such' does not exist" in reply
    over = (16 << 20) + 1
    cases = [
        (b"%x\r\n" % over, 413, b"over 16 MiB"),  # one chunk announced over the cap: refused before its data
        (b"%x\r\n%s\r\n%x\r\n" % (9 << 20, b" " * (9 << 20), 8 << 20), 413, b"over 16 MiB"),  # the sum passes it
        (b"1\r\n \r\n" * ((1 << 16) + 1), 413, b"more than 65,536 chunks"),
        (b"zz\r\n{}\r\n0\r\n\r\n", 400, b"not a chunk size"),
        (b"2\r\n{}xx0\r\n\r\n", 400, b"not followed by CRLF"),
        (b"2" * 5000 + b"\r\n", 400, b"chunk-size line over 4096 bytes"),
    ]
    for data, code, message in cases:
        reply = raw_exchange(server.url, head + data)
        assert _status_line(reply) == code and message in reply and b"Connection: close" in reply, reply[:300]
    for extra, code in [(b"Transfer-Encoding: gzip, chunked\r\n", 501), (b"Transfer-Encoding: chunked, gzip\r\n", 400),
                        (b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", 400)]:
        reply = raw_exchange(server.url, b"POST /v1/completions HTTP/1.1\r\n" + extra + b"\r\n4\r\n{}{}\r\n0\r\n\r\n")
        assert _status_line(reply) == code and b"Connection: close" in reply, (extra, reply[:300])
    # a chunked body that stops coming: 408 within the read timeout, as for a Content-Length one
    with connect(server.url, timeout=READ_TIMEOUT_S + 20) as sock:
        sock.sendall(head + b"20\r\n{\"model\": ")
        assert _status_line(read_until_closed(sock)) == 408
    assert _post(server.url, _good(1))[0] == 200


def test_the_docs_list_exactly_the_parameters_serve_takes():
    """docs/evaluation.md's table of request parameters is the code's ``PARAMETERS`` and ``_UNSUPPORTED``."""
    import re

    from synthtune.jobs.serve import _UNSUPPORTED, PARAMETERS

    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    section = text.split("### Request parameters", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", section, flags=re.M)
    documented = {"completions": [], "chat": []}
    for name, routes in rows:
        for route in ("completions", "chat"):
            if route in routes.split():
                documented[route].append(name)
    assert documented == {route: list(names) for route, names in PARAMETERS.items()}
    off = re.search(r"only switched off: (.+)\.$", section, flags=re.M)
    assert off and re.findall(r"`([a-z_]+)`", off.group(1)) == list(_UNSUPPORTED)


# --------------------------------------------------------------------------------------------
# seq2seq context, IPv6
# --------------------------------------------------------------------------------------------


@pytest.mark.integration  # spawns synthtune serve processes
def test_t5_gets_a_context_check_and_ipv6_loopback_works(t5_server):
    if _ipv6_loopback():
        assert t5_server.url.startswith("http://[::1]:")
    url = t5_server.url
    status, err = _post(url, {"model": "tiny-t5", "prompt": "apple " * 600, "max_tokens": 4}, key=None)
    assert status == 400 and "encoder context of 512" in err["error"]["message"]
    status, err = _post(url, {"model": "tiny-t5", "prompt": "apple", "max_tokens": 600}, key=None)
    assert status == 400 and "decoder context of 512" in err["error"]["message"]
    status, out = _post(url, {"model": "tiny-t5", "prompt": "apple", "max_tokens": 5, "n": 2}, key=None)
    assert status == 200 and len(out["choices"]) == 2


# --------------------------------------------------------------------------------------------
# in-process: the worker's isolation, the connection cap, the limits' checks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from synthtune.jobs.serve import Engine

    return Engine("tiny-llama", device="cpu")


@pytest.mark.integration  # loads a serving engine, ~2 s
def test_a_batch_that_fails_is_rerun_request_by_request(engine):
    """A request that passes validation but breaks generation (a token id past the embedding) is
    batched first with good ones: the batch fails, its members rerun alone, only it fails."""
    from synthtune.jobs.serve import Batcher, parse_request

    logs: list[str] = []
    reqs = [parse_request(_good(i), chat=False, models=engine.names) for i in range(4)]
    for r in reqs:
        engine.prepare(r, BUDGET)
    bad, good = reqs[0], reqs[1:]
    bad.ids = [[engine.lm.model.config.vocab_size + 5]]
    alone = []
    for r in good:
        engine.run([r])
        alone.append(r.samples[0][0][0])
        r.samples = []
    batcher = Batcher(engine, window_s=0.5, max_batch=8, log=logs.append)
    try:
        for r in reqs:
            batcher.submit(r)
        assert all(r.done.wait(60) for r in reqs)
    finally:
        batcher.stop()
    assert bad.error is not None and bad.error.status == 500 and "IndexError" in bad.error.message
    assert [r.error for r in good] == [None] * 3 and [r.samples[0][0][0] for r in good] == alone
    assert any("a batch of 4 requests failed" in line and "one by one" in line for line in logs), logs


@pytest.mark.integration  # loads a second serving engine, ~2 s
def test_the_sampler_option_reaches_the_engine(engine, monkeypatch):
    """--sampler generate (what auto picks on a GPU) serves n samples through HF's batched generate:
    greedy, the same text the shared-prefill sampler gives."""
    import synthtune.generation.sampler as sampler_module
    from synthtune.jobs.serve import Engine, parse_request

    other = Engine("tiny-llama", device="cpu", sampler="generate")
    assert (engine.sampler, other.sampler) == ("shared_prefix", "generate")

    def served(e):
        req = parse_request({**_good(3), "n": 2}, chat=False, models=e.names)
        e.prepare(req, BUDGET)
        e.run([req])
        return [raw for raw, _, _ in req.samples[0]]

    shared = served(engine)

    def refuse(*args, **kwargs):
        raise AssertionError("the shared-prefill path ran")

    monkeypatch.setattr(sampler_module, "_sample_batch_shared", refuse)
    assert served(other) == shared and len(shared) == 2 and shared[0]
    with pytest.raises(AssertionError, match="shared-prefill path ran"):
        served(engine)


@pytest.mark.integration  # loads a serving engine, ~2 s
def test_default_max_tokens_are_fitted_to_the_context_and_the_budget(engine):
    """A request without max_tokens is costed at its fitted default, never refused for it."""
    from synthtune.jobs.serve import CHAT_MAX_TOKENS_NO_CONTEXT, parse_request

    def prepared(body: dict, budget: int, chat: bool = True):
        req = parse_request({"model": "tiny-llama", **body}, chat=chat, models=engine.names)
        engine.prepare(req, budget)
        return req

    messages = [{"role": "user", "content": "Problem: 2 + 2?"}]
    alone = prepared({"messages": messages}, 1 << 20)
    p = alone.prompt_tokens
    assert alone.max_tokens == 2048 - p and alone.cost == 2048  # the rest of the context
    # n=16 of those would cost 32,768: the default shrinks to what the budget of 20,000 leaves
    req = prepared({"messages": messages, "n": 16}, 20000)
    assert req.max_tokens == 20000 // 16 - p and req.cost == 16 * (p + req.max_tokens) <= 20000
    # completions: 16, also when n x prompts is large, as long as the budget holds it
    req = prepared({"prompt": ["x"] * 8, "n": 100}, 20000, chat=False)
    assert req.max_tokens == 16 and req.cost <= 20000
    req = prepared({"prompt": ["x"] * 10, "n": 128}, 20000, chat=False)  # 16 would pass the budget
    assert req.max_tokens < 16 and req.cost <= 20000
    # a model that names no context: the documented cap, then the budget
    saved, engine.context = engine.context, None
    try:
        assert prepared({"messages": messages}, 1 << 20).max_tokens == CHAT_MAX_TOKENS_NO_CONTEXT
        assert prepared({"messages": messages}, 1000).max_tokens == 1000 - p
    finally:
        engine.context = saved


class _Recording:
    """A tokenizer that records the length of each text it is asked to tokenize."""

    def __init__(self, tok):
        self._tok, self.lengths = tok, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self._tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.integration  # loads a serving engine, ~2 s
def test_a_flood_of_text_is_refused_after_tokenizing_a_prefix(engine, monkeypatch):
    """A 16 MiB prompt was tokenized whole (~12 s on the one parsing thread, every other client
    waiting) before the budget refused it; a prefix now shows it is over the budget."""
    from synthtune.jobs.serve import PREFIX_CHARS_PER_TOKEN, RequestError, parse_request

    rec = _Recording(engine.lm.tokenizer)
    monkeypatch.setattr(engine.lm, "tokenizer", rec)
    budget = 4096
    flood = "word " * 400_000  # 2 MB, 400k tokens
    # " kilometers" is one token of 11 characters: a first piece of it holds fewer tokens than the
    # budget, and the flood comes after it
    disguised = " kilometers" * 3000 + flood
    for body, chat in (({"prompt": flood, "max_tokens": 16}, False),
                       ({"messages": [{"role": "user", "content": flood}], "max_tokens": 16}, True),
                       ({"prompt": disguised, "max_tokens": 16}, False)):
        req = parse_request({"model": "tiny-llama", **body}, chat=chat, models=engine.names)
        rec.lengths.clear()
        with pytest.raises(RequestError) as err:
            engine.prepare(req, budget)
        assert (err.value.status, err.value.code) == (400, "request_too_large")
        assert "needs at least" in err.value.message
        assert max(rec.lengths) <= PREFIX_CHARS_PER_TOKEN * budget and sum(rec.lengths) < len(flood) // 20
    # many prompts, each short: the running total refuses before the rest are tokenized
    req = parse_request({"model": "tiny-llama", "prompt": ["word " * 100] * 1000, "max_tokens": 1}, chat=False,
                        models=engine.names)
    rec.lengths.clear()
    with pytest.raises(RequestError, match="needs at least"):
        engine.prepare(req, budget)
    assert len(rec.lengths) < 50
    # a max_tokens that leaves a prompt a token or two: pieces of a few KB, not of a few characters
    # (counting then cost more than tokenizing it all); past the context: refused untokenized
    saved, engine.context = engine.context, None
    try:
        req = parse_request({"model": "tiny-llama", "prompt": flood, "max_tokens": 65535}, chat=False,
                            models=engine.names)
        rec.lengths.clear()
        with pytest.raises(RequestError, match="needs at least"):
            engine.prepare(req, 65536)
        assert len(rec.lengths) == 1
    finally:
        engine.context = saved
    req = parse_request({"model": "tiny-llama", "prompt": flood, "max_tokens": 2048}, chat=False, models=engine.names)
    rec.lengths.clear()
    with pytest.raises(RequestError, match=r"max_tokens \(2048\) plus a prompt of at least one token exceeds the model's context"):
        engine.prepare(req, 1 << 20)
    assert rec.lengths == []
    # text of more characters per token than the pieces allow for, within the budget, still runs
    dense = " kilometers" * 1000
    req = parse_request({"model": "tiny-llama", "prompt": dense, "max_tokens": 16}, chat=False, models=engine.names)
    rec.lengths.clear()
    engine.prepare(req, 1216)
    assert req.prompt_tokens == 1000 and len(rec.lengths) == 3  # two pieces, then the whole


@pytest.mark.integration  # runs a server in this process
def test_connections_over_the_cap_get_a_quick_503(engine):
    from synthtune.config import ServeConfig
    from synthtune.jobs.serve import ServerThread, build_app

    logs: list[str] = []
    app = build_app(engine, ServeConfig(max_connections=4), log=logs.append)
    server = ServerThread(app)
    idle = []
    try:
        idle = [connect(server.url) for _ in range(4)]
        assert wait_for(lambda: len(app.connections) == 4, 10)
        reply = raw_exchange(server.url, b"GET /v1/models HTTP/1.1\r\n\r\n")
        assert _status_line(reply) == 503 and b"Retry-After: 1" in reply and b"4 connections open" in reply
        for s in idle:
            s.close()
        assert wait_for(lambda: not app.connections, 10)
        assert http_json(f"{server.url}/models")[0] == 200
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_limits_that_cannot_work_are_refused_by_name(tmp_path):
    from synthtune.config import ServeConfig, load_config
    from synthtune.errors import ConfigError
    from synthtune.jobs.serve import check_limits

    path = tmp_path / "serve.yaml"
    path.write_text("max_request_tokens: 5000\nmax_inflight_tokens: 4000\n")
    cfg = load_config(ServeConfig, path)
    with pytest.raises(ConfigError, match=r"max_inflight_tokens must be >= max_request_tokens \(5000\)"):
        check_limits(cfg)
    # flags override the file
    check_limits(load_config(ServeConfig, path, max_inflight_tokens=6000))
    for key, value in [("read_timeout", 0.0), ("read_timeout", float("nan")), ("max_connections", 0),
                       ("context_length", 1)]:
        with pytest.raises(ConfigError, match=key):
            check_limits(ServeConfig(**{key: value}))


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_t5"])
def test_sampling_stops_at_the_step_after_abort_turns_true(model, request):
    """The hook a departed batch uses: the shared-prefill path (causal) and generate() (seq2seq)."""
    from synthtune.generation.base import SamplingParams
    from synthtune.generation.sampler import Aborted, sample_k

    lm = request.getfixturevalue(model)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, num_samples=2, seed=0)
    polls = []

    def abort():
        polls.append(1)
        return len(polls) > 3

    with pytest.raises(Aborted):
        sample_k(lm, ["Problem: 1 + 1?"], params, abort=abort)
    assert len(polls) <= 6  # stopped within a step or two of the fourth poll, not after 24 tokens
    full = sample_k(lm, ["Problem: 1 + 1?"], params, abort=lambda: False)
    assert sample_k(lm, ["Problem: 1 + 1?"], params) == full  # a hook that never fires changes nothing


@pytest.mark.integration  # loads the model to serve, ~2 s
def test_a_server_key_a_header_cannot_carry_fails_naming_the_variable_not_the_key(monkeypatch):
    """A key file saved with CRLF leaves a trailing \\r: every client would get 401 with no hint why."""
    from synthtune.errors import ConfigError
    from synthtune.jobs.serve import serve

    monkeypatch.setenv("SERVE_TEST_KEY", "sk-serve-secret-123\r")
    with pytest.raises(ConfigError) as err:
        serve("tiny-llama", api_key_env="SERVE_TEST_KEY", port=0)
    assert "$SERVE_TEST_KEY" in str(err.value)
    assert "sk-serve-secret" not in str(err.value)


# --------------------------------------------------------------------------------------------
# presence_penalty, frequency_penalty, logit_bias
# --------------------------------------------------------------------------------------------


def _parse(**extra):
    from synthtune.jobs.serve import parse_request

    return parse_request({"model": "tiny-llama", "prompt": "x", **extra}, chat=False, models=["tiny-llama"])


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be a finite number in [-2.0, 2.0]"),
    ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty must be a finite number in [-2.0, 2.0]"),
    ({"frequency_penalty": "1"}, "frequency_penalty", "frequency_penalty must be a finite number"),
    ({"presence_penalty": True}, "presence_penalty", "presence_penalty must be a finite number"),
    ({"logit_bias": [[29, -100]]}, "logit_bias", "logit_bias must be a JSON object of token ids to biases"),
    ({"logit_bias": {"the": -100}}, "logit_bias", "logit_bias key 'the' is not a token id"),
    ({"logit_bias": {"-1": -100}}, "logit_bias", "logit_bias key '-1' is not a token id"),
    ({"logit_bias": {" 29": -100}}, "logit_bias", "logit_bias key ' 29' is not a token id"),
    ({"logit_bias": {"\u0662\u0669": 1}}, "logit_bias", "is not a token id"),  # Arabic-Indic "29": int() takes it
    ({"logit_bias": {"29": 101}}, "logit_bias", "logit_bias['29'] must be a number in [-100, 100], got 101"),
    ({"logit_bias": {"29": "-100"}}, "logit_bias", "logit_bias['29'] must be a number"),
    ({"logit_bias": {"29": None}}, "logit_bias", "logit_bias['29'] must be a number"),
    ({"logit_bias": {"29": 1, "029": 2}}, "logit_bias", "logit_bias names token 29 twice"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "logit_bias has 301 entries; at most 300"),
    # max_completion_tokens was copied into max_tokens (errors named that) or, beside it, ignored
    ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be"),
    ({"max_completion_tokens": "abc", "max_tokens": 5}, "max_completion_tokens", "max_completion_tokens must be"),
    ({"max_completion_tokens": 4, "max_tokens": 5}, "max_completion_tokens",
     "max_tokens (5) and max_completion_tokens (4) differ; send one of them"),
    ({"max_completion_tokens": 1, "max_tokens": True}, "max_tokens", "max_tokens must be an integer"),
    ({"max_completion_tokens": 1, "max_tokens": 1.0}, "max_tokens", "max_tokens must be an integer"),
])
def test_bad_penalties_and_logit_bias_get_a_400_naming_them(extra, param, message):
    from synthtune.jobs.serve import RequestError

    with pytest.raises(RequestError) as info:
        _parse(**extra)
    assert info.value.status == 400 and info.value.param == param and message in info.value.message


def test_max_completion_tokens_is_max_tokens():
    assert _parse(max_completion_tokens=7).max_tokens == 7
    assert _parse(max_completion_tokens=7, max_tokens=7).max_tokens == 7


def test_penalties_and_logit_bias_parse_and_split_batches():
    req = _parse(presence_penalty=-2, frequency_penalty=1.5, logit_bias={"29": -100, "7": 2.5, "300": 100})
    assert (req.presence_penalty, req.frequency_penalty) == (-2.0, 1.5)
    assert req.logit_bias == ((7, 2.5), (29, -100.0), (300, 100.0))
    assert _parse(logit_bias={str(i): 1 for i in range(300)}).logit_bias[-1] == (299, 1.0)
    plain = _parse()
    assert (plain.presence_penalty, plain.frequency_penalty, plain.logit_bias) == (0.0, 0.0, ())
    assert _parse(logit_bias={}).group_key() == _parse(logit_bias=None).group_key() == plain.group_key()
    # requests that sample differently are never one batch (one sample_k call takes one setting)
    for other in (_parse(presence_penalty=0.5), _parse(frequency_penalty=0.5), _parse(logit_bias={"29": -100}),
                  _parse(logit_bias={"29": -99})):
        assert other.group_key() != plain.group_key()
    assert _parse(logit_bias={"29": -100, "7": 1}).group_key() == _parse(logit_bias={"7": 1, "29": -100}).group_key()


@pytest.mark.integration  # spawns synthtune serve processes
def test_logit_bias_and_penalties_change_what_the_server_generates(server, tiny_llama):
    """The issue: logit_bias {"29": -100} still yielded token 29. Each served answer is checked against
    the local sampler's on the same (seed-0) tiny model, whose token ids the server does not return."""
    from synthtune.generation.base import SamplingParams
    from synthtune.generation.sampler import sample_k

    prompt = "Problem: 3 + 4?\nAnswer:"
    tok = tiny_llama.tokenizer

    def served(**extra):
        status, out = _post(server.url, {"model": "tiny-llama", "prompt": prompt, "max_tokens": 12,
                                         "temperature": 0, **extra})
        assert status == 200, out
        return out["choices"][0]["text"]

    def local(**extra):
        return sample_k(tiny_llama, [prompt], SamplingParams(max_new_tokens=12, **extra))[0][0].token_ids

    plain = local()
    assert served() == tok.decode(plain, skip_special_tokens=True)
    top = plain[0]
    assert plain.count(top) > 1, "the stock tiny model repeats its favourite token"
    banned = local(logit_bias={top: -100})
    assert top not in banned
    assert served(logit_bias={str(top): -100}) == tok.decode(banned, skip_special_tokens=True) != served()
    forced = next(t for t in range(100, 1000) if t not in plain)
    assert served(logit_bias={str(forced): 100}) == tok.decode([forced] * 12, skip_special_tokens=True)
    fresh = local(frequency_penalty=2.0)
    assert len(set(fresh)) == 12
    assert served(frequency_penalty=2) == tok.decode(fresh, skip_special_tokens=True)
    assert served(presence_penalty=2.0) == tok.decode(local(presence_penalty=2.0), skip_special_tokens=True)

    # biased and unbiased requests arriving in one batch window each keep their own settings (the two
    # unbiased ones run as one batch of 2, which shows the window held them all)
    bodies = [{}, {"logit_bias": {str(top): -100}}, {"frequency_penalty": 2}, {}]
    want = [served(**b) for b in bodies]
    before = len(server.lines(r"batch=[2-9]"))
    assert concurrently(lambda b: served(**b), bodies) == want
    assert wait_for(lambda: len(server.lines(r"batch=[2-9]")) > before, 10)

    # ids the model does not have: 400 naming logit_bias (checked against the model, not the parser)
    status, err = _post(server.url, {"model": "tiny-llama", "prompt": prompt, "logit_bias": {"1024": -100}})
    assert status == 400 and err["error"]["param"] == "logit_bias"
    assert "token id 1024, outside this model's vocabulary of 1024 tokens" in err["error"]["message"]
    status, err = _post(server.url, {"model": "tiny-llama", "prompt": prompt, "presence_penalty": 2.01})
    assert status == 400 and err["error"]["param"] == "presence_penalty"


def test_openai_spellings_of_off_are_accepted_and_a_participant_name_is_refused():
    from synthtune.jobs.serve import RequestError, parse_request

    for off in ({"response_format": {"type": "text"}}, {"tool_choice": "none"}, {"stream": False}):
        assert _parse(**off).prompts == ["x"]
    for on, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                      ({"tool_choice": "auto"}, "tool_choice")):
        with pytest.raises(RequestError, match=f"{param} is not supported") as err:
            _parse(**on)
        assert err.value.param == param
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi", "name": "ann"}]}
    with pytest.raises(RequestError, match=r"messages\[0\]\.name is not supported"):
        parse_request(body, chat=True, models=["tiny-llama"])
    body["messages"][0]["name"] = ""
    assert parse_request(body, chat=True, models=["tiny-llama"]).prompts[0][0]["content"] == "hi"
