"""Fuzz the serve request parser and validator: whatever bytes arrive, the answer is a valid request
or a ``RequestError`` with a message (a 4xx), never another exception.

Bodies come from arbitrary JSON values, OpenAI-shaped bodies whose fields take any value (huge and
negative numbers, NaN/Infinity, lone surrogates, odd Unicode, wrong types), deep brackets and raw
bytes. Prepared requests then go through tokenization and the budget on a real tiny model.

    PYTHONPATH=$PWD python -m pytest tests/test_fuzz_serve.py -q
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthtune.jobs.serve import (
    _OFF,
    _UNSUPPORTED,
    MAX_N,
    MAX_STOP,
    PARAMETERS,
    SEED_MAX,
    GenRequest,
    RequestError,
    _clean,
    parse_body,
)

MODELS = ("tiny-llama", "math")
FIELDS = ("model", "prompt", "messages", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "stop", "seed", "best_of", "stream", "echo", "logprobs", "user", "tool_choice", "repetition_penalty",
          "presence_penalty", "frequency_penalty", "logit_bias", "calculator")

# every code point, lone surrogates (category Cs) and controls included
ANY_CHAR = st.characters(exclude_categories=())
TEXT = st.text(ANY_CHAR, max_size=20)
NUMBERS = (st.integers() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, -1, 2**63, 2**64, 1e308, -0.0]))
SCALARS = st.none() | st.booleans() | NUMBERS | TEXT
TOKEN_ID = st.integers(-2, 1 << 32) | st.integers(0, 2000) | st.booleans()
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=20)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant", "tool", 3]),
                                 "content": TEXT | JSON | st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image"]), "text": TEXT}), max_size=3)})
FIELD_VALUES = {
    "model": st.sampled_from(MODELS) | TEXT | JSON,
    "prompt": TEXT | st.lists(TEXT, max_size=4) | JSON | st.lists(TOKEN_ID, max_size=4)
    | st.lists(st.lists(TOKEN_ID, max_size=3), max_size=3),
    "messages": st.lists(MESSAGE, max_size=4) | JSON,
    "stop": TEXT | st.lists(TEXT, max_size=MAX_STOP + 2) | JSON,
    "calculator": st.booleans() | NUMBERS | JSON,
    # mostly well-formed keys (digit strings, some padded or signed) so the value checks get reached
    "logit_bias": st.dictionaries(st.integers(-5, 10**13).map(str) | st.sampled_from(["029", " 1", "+1", "\u0661"])
                                  | TEXT, NUMBERS | JSON, max_size=5) | JSON,
}
BODIES = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=8).flatmap(
    lambda base: st.fixed_dictionaries({}, optional={k: FIELD_VALUES.get(k, NUMBERS | JSON) for k in FIELDS})
    .map(lambda extra: {**base, **extra}))


def _encode(value) -> bytes:
    # Python writes NaN/Infinity (not JSON) and \ud800 escapes for lone surrogates: both must be refused cleanly
    return json.dumps(value, allow_nan=True).encode()


def _check(raw: bytes, chat: bool) -> None:
    try:
        req = parse_body(raw, chat=chat, models=MODELS)
    except RequestError as err:
        assert err.status in (400, 404) and err.message
        err.message.encode("utf-8")  # printable in a response and a log line
        json.dumps(err.body())
        assert _clean(err.message).isprintable()
        return
    assert isinstance(req, GenRequest) and req.model in MODELS and req.chat is chat
    body = json.loads(raw)
    # nothing accepted is ignored unseen: every field is one serve acts on, or an off switch
    assert all(k in PARAMETERS["chat" if chat else "completions"] or (k in _UNSUPPORTED and (v in (None, False, 0) or v == _OFF.get(k)))
               for k, v in body.items())
    assert 1 <= req.n <= MAX_N and isinstance(req.n, int) and not isinstance(req.n, bool)
    # no max_tokens: 16 for completions, for chat fitted once tokenized (Engine.prepare)
    assert req.fit_max_tokens == (body.get("max_tokens") is None and body.get("max_completion_tokens") is None)
    assert (req.max_tokens is None) == (chat and req.fit_max_tokens)
    assert req.max_tokens is None or 1 <= req.max_tokens <= 1 << 20
    if body.get("max_completion_tokens") is not None:  # the newer name is read, never dropped
        assert req.max_tokens == body["max_completion_tokens"]
    assert math.isfinite(req.temperature) and 0 <= req.temperature <= 2
    assert 0 < req.top_p <= 1 and req.top_k >= 0
    assert req.seed is None or 0 <= req.seed <= SEED_MAX
    assert all(isinstance(s, str) and s for s in req.stop) and len(req.stop) <= MAX_STOP
    for penalty in (req.presence_penalty, req.frequency_penalty):
        assert isinstance(penalty, float) and -2 <= penalty <= 2
    ids = [tok for tok, _ in req.logit_bias]
    assert len(ids) <= 300 and ids == sorted(set(ids)) and all(isinstance(t, int) and t >= 0 for t in ids)
    assert all(isinstance(b, float) and -100 <= b <= 100 for _, b in req.logit_bias)
    assert req.calculator is (body.get("calculator") is True)  # only JSON true turns it on; 1 or "true" is a 400
    hash(req.group_key())
    if chat:
        assert len(req.prompts) == 1
        for m in req.prompts[0]:
            assert m["role"] in ("system", "user", "assistant")
            m["content"].encode("utf-8")
    else:
        assert req.prompts and all(isinstance(p, str) and p.encode("utf-8") for p in req.prompts) or all(
            isinstance(p, list) and p and all(type(t) is int and t >= 0 for t in p) for p in req.prompts)


@settings(max_examples=400, deadline=None)
@given(body=BODIES, chat=st.booleans())
def test_openai_shaped_bodies_parse_or_fail_with_a_message(body, chat):
    _check(_encode(body), chat)


@settings(max_examples=200, deadline=None)
@given(value=JSON, chat=st.booleans())
def test_any_json_value_parses_or_fails_with_a_message(value, chat):
    _check(_encode(value), chat)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200) | TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")), chat=st.booleans())
def test_raw_bytes_parse_or_fail_with_a_message(raw, chat):
    _check(raw, chat)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 300_000), opener=st.sampled_from([b"[", b'{"a":', b'{"model": [']))
def test_deep_nesting_is_a_400_at_any_depth(depth, opener):
    _check(opener * depth, chat=False)


@settings(max_examples=60, deadline=None)
@given(digits=st.integers(1, 20_000), field=st.sampled_from(["n", "seed", "max_tokens", "temperature"]))
def test_huge_numbers_are_refused_by_range_or_by_the_json_reader(digits, field):
    raw = b'{"model": "tiny-llama", "prompt": "x", "%s": %s}' % (field.encode(), b"9" * digits)
    _check(raw, chat=False)


# --------------------------------------------------------------------------------------------
# through tokenization and the budget, on the real tiny model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    from synthtune.jobs.serve import Engine

    return Engine("tiny-llama", device="cpu")


def _prepared(engine, body: dict, chat: bool, budget: int):
    req = parse_body(_encode(body), chat=chat, models=("tiny-llama",))
    engine.prepare(req, budget)
    return req


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.text(ANY_CHAR, min_size=1, max_size=60), min_size=1, max_size=3)
       | st.lists(st.lists(st.integers(0, 1023), min_size=1, max_size=2100), min_size=1, max_size=3),
       messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"]),
                                                "content": TEXT}), min_size=1, max_size=3),
       n=st.integers(1, 4) | st.integers(1, MAX_N), max_tokens=st.none() | st.integers(1, 2100), chat=st.booleans(),
       budget=st.sampled_from([20000, 1 << 20]))
def test_prepared_requests_fit_the_budget_and_context_or_fail_alone(engine, prompts, messages, n, max_tokens, chat,
                                                                     budget):
    body = {"model": "tiny-llama", "n": n, "max_tokens": max_tokens}
    body.update({"messages": messages} if chat else {"prompt": prompts})
    try:
        req = _prepared(engine, body, chat, budget)
    except RequestError as err:
        assert err.status == 400 and err.message
        if max_tokens is None:
            # a default never causes a 400 by itself: the same request asking for 1 token fails too
            with pytest.raises(RequestError):
                _prepared(engine, {**body, "max_tokens": 1}, chat, budget)
        return
    assert 1 <= req.max_tokens and (max_tokens is None or req.max_tokens == max_tokens)
    assert req.cost <= budget and req.cost == sum(n * (len(x) + req.max_tokens) for x in req.ids)
    assert all(0 < len(x) and len(x) + req.max_tokens <= engine.context for x in req.ids)
    if max_tokens is None and not chat:
        assert req.max_tokens <= 16
    if max_tokens is None:
        # the default is the largest that fits: one more token passes the context or the budget
        more = req.max_tokens + 1
        assert (req.cost + n * len(req.ids) > budget or any(len(x) + more > engine.context for x in req.ids)
                or (not chat and req.max_tokens == 16))


# --------------------------------------------------------------------------------------------
# raw HTTP at a real (in-process) server
# --------------------------------------------------------------------------------------------

HEADER_LINES = st.sampled_from([b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 99999999999999",
                                b"Content-Length: 2", b"Transfer-Encoding: chunked", b"Expect: 100-continue",
                                b"Connection: close", b"Authorization: Bearer x", b"Host: \xff\x00"]) | st.binary(max_size=40)


@pytest.fixture(scope="module")
def live(engine):
    from synthtune.config import ServeConfig
    from synthtune.jobs.serve import ServerThread, build_app

    logs: list[str] = []
    server = ServerThread(build_app(engine, ServeConfig(read_timeout=2), log=logs.append))
    yield server, logs
    server.stop()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from([b"GET", b"POST", b"PUT", b"", b"G\x00T"]) | st.binary(max_size=8),
       target=st.sampled_from([b"/v1/models", b"/v1/completions", b"/v1/chat/completions", b"*", b""])
       | st.binary(max_size=30),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"", b"HTTP/1.1 extra"]),
       headers=st.lists(HEADER_LINES, max_size=5), body=st.binary(max_size=40))
def test_any_request_head_gets_a_status_line_or_a_close(live, method, target, version, headers, body):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from server_helpers import raw_exchange

    server, logs = live
    data = b" ".join([method, target, version]) + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    reply = raw_exchange(server.url, data, timeout=20)
    assert reply == b"" or (reply.startswith(b"HTTP/1.1 ") and reply[9:12].isdigit()), reply[:80]
    assert not [line for line in logs if line.startswith("error:")], logs[-3:]
    assert all(line.isprintable() for line in logs)


@pytest.mark.parametrize("body", [b"", b"ab"])
def test_a_client_that_closes_before_its_body_arrives_is_no_server_error(live, body):
    """Found by the fuzz test above: EOF mid-body once escaped as 'error: ... _Closed'."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from server_helpers import raw_exchange

    server, logs = live
    before = len(logs)
    head = b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
    assert raw_exchange(server.url, head + body, timeout=20) == b""
    assert not [line for line in logs[before:] if line.startswith("error:")], logs[before:]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12),
       data=st.data(), upper=st.booleans(), zeros=st.integers(0, 3),
       ext=st.sampled_from([b"", b";a=1", b" ; x", b';q="v"']),
       trailer=st.sampled_from([b"", b"X-Check: 1\r\n", b"A: b\r\nC: d\r\n"]))
def test_any_chunking_of_a_body_reads_back_the_same_body(live, name, data, upper, zeros, ext, trailer):
    """Chunked framing, however the body is cut (sizes in either case, leading zeros, extensions,
    trailers): the server reads the exact JSON, shown by the 404 naming the unknown model it holds."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from server_helpers import raw_exchange

    server, logs = live
    body = json.dumps({"model": f"m-{name}", "prompt": "x"}).encode()
    cuts = sorted(data.draw(st.sets(st.integers(1, len(body) - 1), max_size=8)))
    bounds = [0, *cuts, len(body)]
    framed = b""
    for a, b in zip(bounds, bounds[1:], strict=False):
        size = (b"0" * zeros + b"%x" % (b - a))
        framed += (size.upper() if upper else size) + ext + b"\r\n" + body[a:b] + b"\r\n"
    framed += b"0" * zeros + b"0" + ext + b"\r\n" + trailer + b"\r\n"
    head = b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    reply = raw_exchange(server.url, head + framed, timeout=20)
    assert reply.startswith(b"HTTP/1.1 404 "), reply[:200]
    message = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    assert message.startswith(f"the model {f'm-{name}'!r} does not exist")
