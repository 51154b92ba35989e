"""`synthtune serve`: a small OpenAI-compatible HTTP server for a local model and its LoRA adapters.

It is for local use and for tests: the ``openai`` synthesis backend talks to it exactly as it talks
to vLLM, which is what to run at GPU scale (see docs/scaling.md, "Synthesis against vLLM servers").

* Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``, ``POST
  /v1/chat/completions`` with the fields in ``PARAMETERS`` (any other is a 400 naming it), and ``GET
  /health`` (200, empty; no key needed, as vLLM's). ``presence_penalty``, ``frequency_penalty`` and
  ``logit_bias`` take OpenAI's ranges; the penalties count each sample's generated tokens, as vLLM's do.
  ``calculator: true`` is synthtune's own extension (clients send it as an extra body field):
  when a sample writes ``<<expr=``, the exact result and ``>>`` are forced in as tokens, which
  count as completion tokens and toward ``max_tokens``. Errors use OpenAI's ``{"error": {...}}`` shape:
  400 for a bad parameter, 404 ``model_not_found``, 401 for a wrong key.
* As vLLM: a completions ``prompt`` may be token ids (a list of ints, or a list of such lists);
  without ``max_tokens`` a completion gets 16 tokens and a chat reply the rest of the context, at
  most ``CHAT_MAX_TOKENS_NO_CONTEXT``, cut to fit the budget; the chat role
  ``developer`` is ``system``. Bodies come with a Content-Length or chunked.
* Adapters: each ``--adapter NAME=DIR`` is a peft LoRA adapter (safetensors only) on the one base
  model, chosen per request by ``model=NAME``, as with vLLM's ``--lora-modules``.
* HTTP: one asyncio event loop owns every connection, so a connection costs a socket and a few KB,
  never a thread: slow or half-sent requests cannot exhaust threads. Each request (headers and
  body) must arrive within ``read_timeout``; at most ``max_connections`` are open at once. The key
  is checked from the headers, before the body is read. Parsing, validation and tokenization run
  on one helper thread, so the loop stays responsive.
* Limits: a request's cost is prompts x n x (prompt tokens + max_tokens), checked against
  ``max_request_tokens`` (400) and, summed over the work queued or running, ``max_inflight_tokens``
  (503 with Retry-After). Every architecture gets a context check (seq2seq: encoder input and
  decoder length).
* Batching: one worker thread owns the model. It gathers the requests that arrive within
  ``batch_window_ms`` of the first (up to ``max_batch`` prompts and ``max_request_tokens`` of cost),
  groups those with the same model and sampling settings, and runs each group through one
  ``sample_k`` call, so concurrent requests share forward passes. Requests are validated alone
  before they are batched; a group that still fails is rerun request by request, so one bad
  request fails alone.
* Cancellation: a client that disconnects has its queued request dropped before generation, and a
  running group stops at its next decoding step once every client in it has gone.
* Seeds: a group is sampled with one generator, seeded by its first request's ``seed``. A request
  is therefore reproducible when it runs alone, not when batched with others (vLLM seeds each
  request on its own).
* One log line per request on stderr, never with headers; client-controlled text in it is escaped.
  Binds 127.0.0.1 unless told otherwise (IPv6 addresses such as ``::1`` work).
"""

from __future__ import annotations

import asyncio
import hmac
import http
import http.client
import io
import ipaddress
import itertools
import json
import math
import queue
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from synthtune import __version__
from synthtune.config import ServeConfig
from synthtune.errors import ConfigError
from synthtune.formats import add_special_tokens, has_chat_template, render_chat
from synthtune.redact import secret_from_env

MAX_N = 128
MAX_STOP = 16
#: OpenAI's bounds: penalties in [-2, 2], at most 300 logit_bias entries, each in [-100, 100]
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 300
MAX_BIAS = 100.0
MAX_BODY_BYTES = 16 << 20
#: request line plus headers; more is answered 431 (http.server allows 64 KiB per line and 100 headers)
MAX_HEAD_BYTES = 64 << 10
#: /v1/completions without max_tokens: OpenAI's and vLLM's default
COMPLETIONS_MAX_TOKENS = 16
#: /v1/chat/completions without max_tokens gets the rest of the context (as vLLM), but at most this
#: many, with or without a known context (the budget may lower it further): a request reserves its
#: max_tokens of --max-inflight-tokens and of KV memory up front, and vLLM's paged KV pays only for
#: what is generated, so the whole rest of a 128k context would starve other clients here
CHAT_MAX_TOKENS_NO_CONTEXT = 4096
#: seeds are int64 as in vLLM, non-negative so that torch (which takes uint64) accepts seed + offset
SEED_MAX = (1 << 63) - 1
#: A request waits at most this long for the worker; the client then gets a retryable 503.
WAIT_S = 600.0
#: after an error that leaves a body unread: how long (and how much) to drain before closing, so the
#: client reads the error instead of a connection reset (closing with unread input sends RST)
LINGER_S, LINGER_BYTES = 1.0, 1 << 20
#: A prompt longer than this many characters per token it may hold is counted piece by piece first
#: (text runs about 4 characters a token): a body of 16 MiB of text is refused after tokenizing some
#: 8 characters per token of the budget, where tokenizing it all held the one parsing thread, and with
#: it every other client's request, for seconds.
PREFIX_CHARS_PER_TOKEN = 8
#: tokens a cut can add to a piece (a word split in two): pieces over the cap by more than this each
#: are a whole prompt over it
PREFIX_CUT_SLACK = 8
#: the least characters a piece holds: with a cap of a few tokens, pieces of a few characters each
#: made the count cost more than one whole tokenization
MIN_PIECE_CHARS = 4096
#: T5 and its kin have relative positions and name no context; they were pretrained on 512 tokens
SEQ2SEQ_DEFAULT_CONTEXT = 512
#: chat roles and the role the chat template sees; OpenAI's ``developer`` is its newer name for ``system``
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: roles of tool and function calling, which serve does not do
_TOOL_ROLES = ("tool", "function")
#: Every request field serve reads, per route. docs/evaluation.md lists the same ones (a test
#: compares them); any other field gets a 400 naming it, so nothing a client sends is ignored unseen.
PARAMETERS = {
    "completions": ("model", "prompt", "n", "best_of", "max_tokens", "max_completion_tokens", "temperature",
                    "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user",
                    "calculator"),
    "chat": ("model", "messages", "n", "best_of", "max_tokens", "max_completion_tokens", "temperature", "top_p",
             "top_k", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "user", "calculator"),
}
#: OpenAI fields that clients send at their "off" value (false, null, 0): accepted only at that value
_UNSUPPORTED = ("stream", "stream_options", "echo", "suffix", "logprobs", "top_logprobs", "tools", "tool_choice",
                "functions", "function_call", "response_format")
#: the other spellings of "off" that OpenAI's clients send for some of those fields
_OFF = {"response_format": {"type": "text"}, "tool_choice": "none"}
#: the largest id a token-id prompt may hold before the model's own vocabulary is checked
_MAX_TOKEN_ID = (1 << 31) - 1


class RequestError(Exception):
    """A request the server will not run; becomes an OpenAI-style JSON error.

    ``close``: the connection cannot carry another request (e.g. a body left unread).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.close = close

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(eq=False)
class GenRequest:
    """One validated request, and what the worker fills in."""

    chat: bool
    model: str
    prompts: list  # completions: prompt strings or token-id lists; chat: one messages list
    n: int
    max_tokens: int | None  # None: a chat default, set by Engine.prepare
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    fit_max_tokens: bool = False  # max_tokens is the route's default: Engine.prepare fits it to the context and budget
    flat_ids: bool = False  # ``prompt`` was one list of token ids (error messages name prompt[j], not prompt[i][j])
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # sorted (token id, bias) pairs: hashable for group_key
    calculator: bool = False  # synthtune's extension: calculator-assisted decoding (SamplingParams.calculator)
    ids: list = field(default_factory=list)  # token ids per prompt (Engine.prepare)
    cost: int = 0  # prompts x n x (prompt tokens + max_tokens), summed over the prompts
    done: threading.Event = field(default_factory=threading.Event)
    samples: list = field(default_factory=list)  # per prompt: [(raw text, Sample, stop_reason)]
    prompt_tokens: int = 0
    batch_prompts: int = 0
    error: RequestError | None = None
    cancelled: bool = False  # its client went away or gave up waiting; the worker skips or aborts it
    on_done: list = field(default_factory=list)  # callables run by the worker when it finishes

    def group_key(self) -> tuple:
        return (self.model, self.chat, self.n, self.max_tokens, self.temperature, self.top_p, self.top_k, self.stop,
                self.presence_penalty, self.frequency_penalty, self.logit_bias, self.calculator)

    def finish(self) -> None:
        self.done.set()
        for fn in self.on_done:
            fn()


# --------------------------------------------------------------------------------------------
# validation (pure)
# --------------------------------------------------------------------------------------------


def _show(value, limit: int = 60) -> str:
    """A client value for an error message: repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    # NaN compares false with everything, so it is rejected by name, not by the bounds
    if (isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value))
            or (value <= lo if lo_open else value < lo) or value > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
        kind = "an integer" if integer else "a finite number"
        raise RequestError(400, f"{key} must be {kind} in {bounds}, got {_show(value)}", param=key)
    return value


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: a JSON object of token-id strings to numbers in [-100, 100], at most
    300 entries; as sorted (id, bias) pairs. Whether the ids exist is checked against the model
    (``Engine.prepare``)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestError(400, f'logit_bias must be a JSON object of token ids to biases, e.g. {{"29": -100}}, '
                           f"got {_show(value)}", param="logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise RequestError(400, f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS} are allowed",
                           param="logit_bias")
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        # ASCII digits only: int() would also take " 29", "+29" and other scripts' digits
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12):
            raise RequestError(400, f"logit_bias key {_show(key)} is not a token id; keys are token ids written as "
                               f'strings of digits, e.g. "29"', param="logit_bias")
        tok = int(key)
        if tok in pairs:
            raise RequestError(400, f"logit_bias names token {tok} twice (as {_show(key)} too); give each token once",
                               param="logit_bias")
        if (isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias)
                or not -MAX_BIAS <= bias <= MAX_BIAS):
            raise RequestError(400, f"logit_bias[{_show(key)}] must be a number in [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                               f"got {_show(bias)}", param="logit_bias")
        pairs[tok] = float(bias)
    return tuple(sorted(pairs.items()))


def _string(value: str, where: str, param: str) -> str:
    """``value`` if it can be encoded as UTF-8; JSON's ``\\ud800`` escapes make lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(400, f"{where} holds a lone UTF-16 surrogate ({value[err.start]!r} at character "
                           f"{err.start}); send valid Unicode", param=param) from None
    return value


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return _string(content, f"{where}.content", "messages")
    # OpenAI's content-parts form: keep the text parts
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(_string(p["text"], f"{where}.content[{i}].text", "messages") for i, p in enumerate(content))
    raise RequestError(400, f"{where}.content must be a string (or a list of text parts)", param="messages")


def _check_fields(body: dict, chat: bool) -> None:
    """Refuse any field serve would not act on, naming it (after the model: a 404 comes first)."""
    route = "chat" if chat else "completions"
    known = PARAMETERS[route]
    for key, value in body.items():
        if key in known:
            continue
        if key in _UNSUPPORTED:
            if value in (None, False, 0) or value == _OFF.get(key):
                continue
            raise RequestError(400, f"{key} is not supported by synthtune serve; leave it out", param=key)
        raise RequestError(400, f"{_show(key)} is not a parameter synthtune serve takes on /v1/"
                           f"{'chat/' if chat else ''}completions; leave it out (it takes {', '.join(known)})",
                           param=key)


def _messages(messages) -> list[dict]:
    """A chat request's messages as ``{role, content}`` for the chat template (``developer`` -> ``system``)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content}", param="messages")
    clean = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role in _TOOL_ROLES or (role == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            what = f"role {role!r}" if role in _TOOL_ROLES else "tool_calls"
            raise RequestError(400, f"messages[{i}] has {what}: tools and function calling are not supported by "
                               f"synthtune serve; send only {', '.join(_ROLES)} messages with text content",
                               param="messages")
        if not isinstance(role, str) or role not in _ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}", param="messages")
        if m.get("name") not in (None, ""):
            # the chat template has no place for a participant's name: dropping it would change whose turn
            # the model reads without telling the client
            raise RequestError(400, f"messages[{i}].name is not supported by synthtune serve (the chat template "
                               f"has no participant names); leave it out or put the name in the content",
                               param="messages")
        clean.append({"role": _ROLES[role], "content": _text(m.get("content"), f"messages[{i}]")})
    return clean


def _token_ids(value, where: str) -> list[int] | None:
    """``value`` as a token-id prompt (a non-empty list of ints), or None when it holds no int."""
    if not isinstance(value, list) or not any(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return None
    for j, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _MAX_TOKEN_ID:
            raise RequestError(400, f"{where}[{j}] is {_show(t)}: a token-id prompt holds only token ids "
                               f"(integers >= 0)", param="prompt")
    return value


def _prompts(prompt) -> tuple[list, bool]:
    """A completions ``prompt`` as a list of prompts (strings or token-id lists), and whether it was
    one flat list of ids. Accepted as vLLM does: a string, a list of strings, a list of token ids,
    or a list of such lists."""
    shapes = "a non-empty string, a list of them, a list of token ids, or a list of such lists"
    if isinstance(prompt, str) and prompt:  # "" falls through to the error below
        return [_string(prompt, "prompt[0]", "prompt")], False
    flat = _token_ids(prompt, "prompt")
    if flat is not None:
        return [flat], True
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(400, f"prompt must be {shapes}", param="prompt")
    kind = str if isinstance(prompt[0], str) else list
    out = []
    for i, p in enumerate(prompt):
        if kind is str and isinstance(p, str) and p:
            out.append(_string(p, f"prompt[{i}]", "prompt"))
            continue
        ids = _token_ids(p, f"prompt[{i}]") if kind is list else None
        if ids is None:
            raise RequestError(400, f"prompt[{i}] is {_show(p)}; prompt must be {shapes} (not a mix)",
                               param="prompt")
        out.append(ids)
    return out, False


def parse_request(body, *, chat: bool, models: Sequence[str]) -> GenRequest:
    """Validate a completions / chat completions body; raise ``RequestError`` naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, f"model is required: one of {', '.join(models)}", param="model")
    if model not in models:
        raise RequestError(404, f"the model {_show(model)} does not exist here; served models: {', '.join(models)}",
                           param="model", code="model_not_found")
    _check_fields(body, chat)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or best_of != n):
        raise RequestError(400, "best_of is not supported by synthtune serve; leave it out or equal to n",
                           param="best_of")
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name for max_tokens, checked as itself
        newer = _number(body, "max_completion_tokens", None, 1, 1 << 20, integer=True)
        older = _number(body, "max_tokens", None, 1, 1 << 20, integer=True)
        if older is not None and older != newer:
            raise RequestError(400, f"max_tokens ({older}) and max_completion_tokens ({newer}) differ; send one "
                               f"of them", param="max_completion_tokens")
        body = {**body, "max_tokens": newer}
    # without max_tokens: OpenAI's 16 for completions, the rest of the context for chat (as vLLM),
    # fitted by Engine.prepare so that a default alone never makes a request fail
    default = None if chat else COMPLETIONS_MAX_TOKENS
    max_tokens = _number(body, "max_tokens", default, 1, 1 << 20, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True))
    top_k = _number(body, "top_k", -1, -1, 1 << 20, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them",
                           param="stop")
    for i, s in enumerate(stop):
        _string(s, f"stop[{i}]", "stop")
    seed = _number(body, "seed", None, 0, SEED_MAX, integer=True)
    presence_penalty = float(_number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY))
    frequency_penalty = float(_number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY))
    logit_bias = _logit_bias(body.get("logit_bias"))
    calculator = body.get("calculator")
    if calculator is not None and not isinstance(calculator, bool):
        raise RequestError(400, f"calculator must be true or false (synthtune's extension: true computes each "
                           f"<<expr=result>> annotation's result while decoding), got {_show(calculator)}",
                           param="calculator")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(400, f"user must be a string, got {_show(user)}", param="user")
    flat = False
    if chat:
        prompts = [_messages(body.get("messages"))]
    else:
        prompts, flat = _prompts(body.get("prompt"))
    return GenRequest(chat=chat, model=model, prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, top_k=0 if top_k in (-1, 0) else top_k, stop=tuple(stop), seed=seed,
                      fit_max_tokens=body.get("max_tokens") is None, flat_ids=flat,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logit_bias=logit_bias,
                      calculator=bool(calculator))


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (use a finite number)")


def decode_json(raw: bytes):
    """The JSON value of a request body; ``RequestError`` 400 for anything that is not strict JSON."""
    try:
        # NaN/Infinity are Python's extension to JSON, not JSON: refuse them like any other bad token
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # e.g. "[" * 200000: the C scanner nests one call per bracket
        raise RequestError(400, "request body is not valid JSON: nested deeper than this server parses "
                           f"(about {sys.getrecursionlimit()} levels)") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int digit limit, the constants above
        raise RequestError(400, f"request body is not valid JSON: {err}"[:300]) from None


def parse_body(raw: bytes, *, chat: bool, models: Sequence[str]) -> GenRequest:
    """Bytes of a POST body -> a validated ``GenRequest``, or ``RequestError`` (never another exception)."""
    return parse_request(decode_json(raw), chat=chat, models=models)


# --------------------------------------------------------------------------------------------
# the model and the batching worker
# --------------------------------------------------------------------------------------------


def parse_adapter(spec: str) -> tuple[str, str]:
    """``NAME=DIR`` (vLLM's --lora-modules form) or ``DIR`` (named after the folder)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec.rstrip("/")).name, spec
    if not name or not path:
        raise ConfigError(f"--adapter {spec!r}: use NAME=DIR (e.g. math=outputs/train/run1/final) or DIR")
    return name, path


def context_length(lm, override: int | None = None) -> int | None:
    """Tokens the model attends over: the override, the config's, else 512 for seq2seq models that
    name none (T5's relative positions), else ``None`` (unknown: only the token budget bounds requests)."""
    if override:
        return override
    cfg = lm.model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    # tokenizers without a limit report a huge sentinel (int(1e30))
    value = getattr(lm.tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10_000_000:
        return value
    return SEQ2SEQ_DEFAULT_CONTEXT if lm.is_seq2seq else None


def logit_width(lm) -> int | None:
    """How many token ids the model scores: the width of its logits (``logit_bias`` ids must be below it)."""
    head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    value = getattr(lm.model.config, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else None


class Engine:
    """The base model with its adapters; only the worker thread calls ``run``."""

    def __init__(self, model: str, adapters: Sequence[str] = (), *, served_name: str | None = None,
                 device: str | None = None, seed: int = 0, context: int | None = None, sampler: str = "auto"):
        from synthtune.generation.sampler import resolve_sampler
        from synthtune.models import check_adapter_dir, load_with_adapter

        self.base_name = served_name or model
        named = [parse_adapter(a) for a in adapters]
        names = [self.base_name] + [n for n, _ in named]
        if len(set(names)) != len(names):
            raise ConfigError(f"served model names must be distinct, got {', '.join(names)}; name adapters with "
                              f"--adapter NAME=DIR")
        for _, path in named:
            check_adapter_dir(path)
        first = named[0] if named else (None, None)
        self.lm = load_with_adapter(model, first[1], device=device, seed=seed, adapter_name=first[0] or "default")
        for name, path in named[1:]:
            self.lm.model.load_adapter(path, adapter_name=name)
        self.lm.model.eval()
        # what sample_k runs (shared_prefix or generate), resolved once for this model on its device
        self.sampler = resolve_sampler(self.lm, sampler)
        self.adapters = dict(named)
        self.names = names
        self.context = context_length(self.lm, context)
        # two limits, which differ when the embedding is padded past the tokenizer: ids a prompt may hold
        # (the tokenizer decodes them and the model embeds them), and ids logit_bias may name (scored ones)
        self.prompt_ids = min(len(self.lm.tokenizer), self.lm.model.get_input_embeddings().num_embeddings)
        self.logit_width = logit_width(self.lm)
        self._seeds = itertools.count(seed)

    # ---- per request, on the parsing thread: everything that can fail for one request alone

    def prepare(self, req: GenRequest, max_request_tokens: int) -> None:
        """Tokenize ``req``, fit a default ``max_tokens``, and check it against the context and the token
        budget (``RequestError``)."""
        self._check_logit_bias(req)
        # every prompt is at least one token, and a default max_tokens at least one
        floor = len(req.prompts) * req.n * (1 + (1 if req.fit_max_tokens else req.max_tokens))
        if floor > max_request_tokens:  # refuse before tokenizing a huge list
            raise self._over_budget(req, floor, max_request_tokens, at_least=True)
        least_new = 1 if req.fit_max_tokens else req.max_tokens
        if self.context is not None and not self.lm.is_seq2seq and least_new >= self.context:
            # no prompt can fit beside it: refused before any text is tokenized
            raise RequestError(400, f"max_tokens ({least_new}) plus a prompt of at least one token exceeds the "
                               f"model's context of {self.context} tokens; lower max_tokens", param="max_tokens")
        k = len(req.prompts)
        # the prompt tokens the request may hold: n x (their sum + k x least_new) within the budget
        room = max_request_tokens // req.n - k * least_new
        used = 0
        ids = []
        for i, p in enumerate(req.prompts):
            later = k - i - 1  # prompts still to come, at least a token each
            try:
                x = self._encode(p, req.chat, room - used - later)
            except RequestError:
                raise
            except _TooLong as err:
                raise self._over_budget(req, req.n * (used + err.tokens + later + k * least_new), max_request_tokens,
                                        at_least=True) from None
            except Exception as err:  # a template or tokenizer refusing this client's text
                raise RequestError(400, f"{'messages' if req.chat else f'prompt[{i}]'} could not be tokenized: "
                                   f"{type(err).__name__}: {err}"[:300], param="messages" if req.chat else "prompt") from None
            if not x:
                raise RequestError(400, f"prompt[{i}] tokenizes to nothing", param="prompt")
            if not req.chat and isinstance(p, list):
                self._check_ids(req, i, x)
            ids.append(x)
            used += len(x)
            if used + later > room:  # over already: the prompts after this one are not tokenized
                raise self._over_budget(req, req.n * (used + later + k * least_new), max_request_tokens,
                                        at_least=later > 0 or req.fit_max_tokens)
        if req.fit_max_tokens:
            req.max_tokens = self.default_max_tokens(req, [len(x) for x in ids], max_request_tokens)
        for i, x in enumerate(ids):
            self._check_context(i, len(x), req.max_tokens, param="messages" if req.chat else "prompt")
        req.ids = ids
        req.prompt_tokens = sum(len(x) for x in ids)
        req.cost = sum(req.n * (len(x) + req.max_tokens) for x in ids)
        if req.cost > max_request_tokens:
            raise self._over_budget(req, req.cost, max_request_tokens)

    def _check_ids(self, req: GenRequest, i: int, ids: list[int]) -> None:
        vocab = self.prompt_ids
        for j, t in enumerate(ids):
            if t >= vocab:
                where = f"prompt[{j}]" if req.flat_ids else f"prompt[{i}][{j}]"
                raise RequestError(400, f"{where} is {t}, not a token id of this model (its ids run from 0 to "
                                   f"{vocab - 1}); tokenize with the served model's tokenizer", param="prompt")

    def default_max_tokens(self, req: GenRequest, lengths: Sequence[int], max_request_tokens: int) -> int:
        """``max_tokens`` for a request that named none: the route's default (16 for completions; for
        chat the rest of the context, at most ``CHAT_MAX_TOKENS_NO_CONTEXT``), cut to what the context
        and the budget leave. At least 1: a prompt with no room left fails on
        its own length, not on a parameter the client never sent."""
        limits = [req.max_tokens if req.max_tokens is not None else CHAT_MAX_TOKENS_NO_CONTEXT]
        if self.context is not None:
            # seq2seq: the decoder holds its start token beside the completion; causal: the prompt too
            limits += [self.context - 1] if self.lm.is_seq2seq else [self.context - n for n in lengths]
        # the budget: n x sum(prompt tokens + max_tokens) <= max_request_tokens
        limits.append((max_request_tokens // req.n - sum(lengths)) // len(lengths))
        return max(1, min(limits))

    def _check_context(self, i: int, n_prompt: int, max_tokens: int, *, param: str = "prompt") -> None:
        ctx = self.context
        if ctx is None:
            return
        if not self.lm.is_seq2seq:
            if n_prompt >= ctx:  # whatever max_tokens is (a default is fitted below the rest of the context)
                what = "the conversation" if param == "messages" else f"prompt {i}"
                raise RequestError(400, f"{what} ({n_prompt} tokens) leaves no room for a reply in the model's "
                                   f"context of {ctx} tokens; shorten it", param=param)
            if n_prompt + max_tokens > ctx:
                raise RequestError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                   f"model's context of {ctx} tokens; shorten the prompt or lower max_tokens",
                                   param="max_tokens")
            return
        if n_prompt > ctx:
            raise RequestError(400, f"prompt {i} ({n_prompt} tokens) exceeds the model's encoder context of {ctx} "
                               f"tokens; shorten the prompt", param=param)
        if max_tokens + 1 > ctx:  # the decoder also holds its start token
            raise RequestError(400, f"max_tokens ({max_tokens}) plus the decoder start token exceeds the model's "
                               f"decoder context of {ctx} tokens; lower max_tokens", param="max_tokens")

    def _check_logit_bias(self, req: GenRequest) -> None:
        width = self.logit_width
        outside = [tok for tok, _ in req.logit_bias if width is not None and tok >= width]
        if outside:
            raise RequestError(400, f"logit_bias names token id {outside[0]}, outside this model's vocabulary of "
                               f"{width} tokens (ids 0 to {width - 1})", param="logit_bias")

    @staticmethod
    def _over_budget(req: GenRequest, cost: int, limit: int, at_least: bool = False) -> RequestError:
        if req.fit_max_tokens:  # no max_tokens sent: the default was already cut to the least it can be
            tokens, fix, param = "max_tokens at least 1, none sent", "", "messages" if req.chat else "prompt"
        else:
            tokens, fix, param = f"max_tokens {req.max_tokens}", " or max_tokens", "max_tokens"
        return RequestError(
            400, f"this request needs {'at least ' if at_least else ''}{cost:,} tokens (prompts {len(req.prompts)} x "
            f"n {req.n} x (prompt tokens + {tokens})), over the server's max_request_tokens of "
            f"{limit:,}; send fewer prompts or a smaller n{fix} (or start the server with a larger "
            f"--max-request-tokens)", param=param, code="request_too_large")

    # ---- on the worker thread

    def run(self, group: list[GenRequest], abort: Callable[[], bool] | None = None) -> None:
        """Generate for prepared requests that share a group key, in one ``sample_k`` call."""
        from synthtune.generation.base import SamplingParams
        from synthtune.generation.sampler import sample_k

        first = group[0]
        ids = [x for req in group for x in req.ids]
        seed = first.seed if first.seed is not None else next(self._seeds)
        params = SamplingParams(max_new_tokens=first.max_tokens, temperature=first.temperature, top_p=first.top_p,
                                top_k=first.top_k, num_samples=first.n, stop=first.stop, seed=seed,
                                presence_penalty=first.presence_penalty, frequency_penalty=first.frequency_penalty,
                                logit_bias=dict(first.logit_bias) or None, calculator=first.calculator)
        with self._adapter(first.model):
            out = sample_k(self.lm, ids, params, batch_size=len(ids), abort=abort, sampler=self.sampler)
        results, pos = [], 0
        for req in group:
            results.append([[self._raw(s, first.stop) for s in out[pos + j]] for j in range(len(req.ids))])
            pos += len(req.ids)
        for req, samples in zip(group, results, strict=True):  # only once all decoded: a failure leaves no half-filled request
            req.samples = samples
            req.batch_prompts = len(ids)

    def _encode(self, prompt, chat: bool, cap: int | None = None) -> list[int]:
        """Prompt ids: a completions prompt verbatim (encoded as a plain-format prompt is), a chat
        conversation rendered by the chat format, as training and ``synthtune eval`` render it.
        ``_TooLong`` when the text, counted in pieces (:meth:`_count_within`), has more than ``cap`` tokens."""
        tok = self.lm.tokenizer
        if not chat and isinstance(prompt, list):  # token ids: used as sent, as vLLM does
            return list(prompt)
        if chat and not has_chat_template(tok):
            raise RequestError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                               param="messages")
        text = render_chat(prompt, tok) if chat else prompt
        if cap is not None and len(text) > PREFIX_CHARS_PER_TOKEN * (cap + 1):
            self._count_within(text, cap)
        return tok(text, add_special_tokens=add_special_tokens("chat" if chat else "plain"))["input_ids"]

    def _count_within(self, text: str, cap: int) -> None:
        """Tokenize ``text`` piece by piece, each of ``PREFIX_CHARS_PER_TOKEN x cap`` characters (at least
        ``MIN_PIECE_CHARS``) cut at whitespace, and raise ``_TooLong`` as soon as the pieces so far hold more than ``cap`` tokens:
        a flood of text costs one piece or a few, however long the body."""
        step = max(PREFIX_CHARS_PER_TOKEN * (cap + 1), MIN_PIECE_CHARS)
        counted = pieces = start = 0
        while start < len(text):
            end = start + step
            if end < len(text):
                # at whitespace, so that a piece's words are words of the whole text
                cut = max(text.rfind(c, start + step // 2, end) for c in " \n\t")
                end = cut if cut > start else end
            counted += len(self.lm.tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
            pieces += 1
            if counted > cap + PREFIX_CUT_SLACK * pieces:
                raise _TooLong(counted - PREFIX_CUT_SLACK * pieces)
            start = end

    def _raw(self, sample, stop: tuple[str, ...]) -> tuple[str, object, str | None]:
        """The completion as OpenAI returns it: unstripped, cut before the stop string that ended it."""
        from synthtune.generation.base import truncate_at_stop

        tokens = sample.token_ids[:-1] if sample.finish_reason == "eos" else sample.token_ids
        text = self.lm.tokenizer.decode(tokens, skip_special_tokens=True)
        reason = None
        if sample.finish_reason == "stop":
            hits = [(text.find(s), s) for s in stop if s in text]
            reason = min(hits)[1] if hits else None
        return truncate_at_stop(text, stop), sample, reason

    def _adapter(self, name: str):
        model = self.lm.model
        if not self.adapters:
            return nullcontext()
        if name == self.base_name:
            return model.disable_adapter()
        model.set_adapter(name)
        return nullcontext()


class Batcher:
    """The worker thread: gathers requests for ``window_s``, groups them, runs each group.

    A batch holds at most ``max_batch`` prompts and ``max_batch_tokens`` of cost (its first request
    alone may reach the cost), so the memory of one generation call is bounded by one budget.
    """

    def __init__(self, engine: Engine, *, window_s: float = 0.005, max_batch: int = 32,
                 max_batch_tokens: int | None = None, max_queue: int = 256, log: Callable[[str], None] = print):
        self.engine, self.window_s, self.max_batch, self.log = engine, window_s, max_batch, log
        self.max_batch_tokens = max_batch_tokens
        self.queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self._carry: GenRequest | None = None  # taken from the queue but over the last batch's limits
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="synthtune-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, req: GenRequest) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise RequestError(503, f"server busy: {self.queue.maxsize} requests queued; retry later",
                               kind="server_error") from None

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _gather(self) -> list[GenRequest]:
        if self._carry is not None:
            first, self._carry = self._carry, None
        else:
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                return []
        batch = [first]
        n_prompts, cost = len(first.prompts), first.cost
        deadline = time.monotonic() + self.window_s
        while n_prompts < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                req = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if (n_prompts + len(req.prompts) > self.max_batch
                    or (self.max_batch_tokens is not None and cost + req.cost > self.max_batch_tokens)):
                self._carry = req  # first in the next batch: order is kept
                break
            batch.append(req)
            n_prompts += len(req.prompts)
            cost += req.cost
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._gather()
            groups: dict[tuple, list[GenRequest]] = {}
            for req in batch:
                groups.setdefault(req.group_key(), []).append(req)
            for group in groups.values():
                try:
                    self._run_group(group)
                except Exception as err:  # the worker must outlive a bug: its requests were answered 500
                    self.log(f"error: the worker failed on a batch: {_clean(type(err).__name__)}: {_clean(str(err))}")

    def _run_group(self, group: list[GenRequest]) -> None:
        # checked here, not at gather time: an earlier group may have run for minutes
        live = [r for r in group if not r.cancelled]
        try:
            for req in group:
                if req.cancelled:
                    req.error = RequestError(499, "the client went away before generation; dropped")
                    self.log(f"dropped before generation: model={_clean(req.model, 80)} prompts={len(req.prompts)} "
                             f"n={req.n} (its client went away)")
            if live:
                self._run_isolated(live)
        except Exception as err:
            self._fail(group, self._error(err))
            raise
        finally:
            for req in group:
                req.finish()

    def _run_isolated(self, group: list[GenRequest]) -> None:
        from synthtune.generation.sampler import Aborted

        def abort(reqs=group):
            return all(r.cancelled for r in reqs)

        try:
            self.engine.run(group, abort=abort)
            return
        except Aborted:
            self.log(f"generation stopped: every client of a batch of {len(group)} requests went away")
            self._fail(group, RequestError(499, "every client of this batch went away; generation stopped"))
            return
        except Exception as err:  # a bug or an OOM must fail these requests, not the server
            if len(group) == 1:
                self._fail(group, self._error(err))
                return
            self.log(f"error: a batch of {len(group)} requests failed ({_clean(type(err).__name__)}: "
                     f"{_clean(str(err))}); rerunning them one by one")
        # a request that fails alone must not take its batch-mates down with it
        for req in group:
            if req.cancelled:
                req.error = RequestError(499, "the client went away before generation; dropped")
                continue
            try:
                self.engine.run([req], abort=lambda r=req: r.cancelled)
            except Aborted:
                self.log("generation stopped: the client of a request went away")
                req.error = RequestError(499, "the client went away; generation stopped")
            except Exception as err:
                req.error = self._error(err)

    def _error(self, err: Exception) -> RequestError:
        self.log(f"error: generation failed: {_clean(type(err).__name__)}: {_clean(str(err))}")
        return RequestError(500, f"generation failed: {type(err).__name__}: {err}"[:500], kind="server_error")

    @staticmethod
    def _fail(group: list[GenRequest], err: RequestError) -> None:
        for req in group:
            req.error = req.error or err


class Admission:
    """The server-wide budget: the summed cost of the requests queued or running."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()  # released from the worker thread, taken on the event loop

    def acquire(self, cost: int) -> bool:
        with self._lock:
            if self.used + cost > self.limit:
                return False
            self.used += cost
            return True

    def release(self, cost: int) -> None:
        with self._lock:
            self.used -= cost


def check_limits(cfg: ServeConfig) -> None:
    """Refuse limits that cannot work, naming the key and its allowed range."""
    checks = [("max_request_tokens", cfg.max_request_tokens >= 1, ">= 1"),
              ("max_inflight_tokens", cfg.max_inflight_tokens >= cfg.max_request_tokens,
               f">= max_request_tokens ({cfg.max_request_tokens}), or no request could ever run"),
              ("max_connections", cfg.max_connections >= 1, ">= 1"),
              ("read_timeout", math.isfinite(cfg.read_timeout) and cfg.read_timeout > 0, "a finite number > 0"),
              ("context_length", cfg.context_length is None or cfg.context_length >= 2, ">= 2 (or unset)")]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"serve: {key} must be {allowed}, got {getattr(cfg, key)!r} "
                              f"(--{key.replace('_', '-')} or {key}: in the serve config)")


# --------------------------------------------------------------------------------------------
# HTTP (asyncio: a connection is a coroutine, never a thread)
# --------------------------------------------------------------------------------------------

_PRINTABLE_ESCAPES = {'"': '\\"'}  # a quote would blur where the quoted request line ends


def _clean(text: str, limit: int = 300) -> str:
    """Client-controlled text made safe for one log line: control, format and surrogate characters
    (terminal escapes, newlines, bidi overrides) escaped, quotes escaped, length capped. Backslashes
    stay as they are, so error notes that hold a ``repr`` read naturally."""
    out = []
    for c in text[:limit]:
        if c in _PRINTABLE_ESCAPES:
            out.append(_PRINTABLE_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        else:
            code = ord(c)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    if len(text) > limit:
        out.append(f"...(+{len(text) - limit} chars)")
    return "".join(out)


class _TooLong(Exception):
    """A prompt has at least ``tokens`` tokens, more than its request's budget leaves it."""

    def __init__(self, tokens: int):
        super().__init__(tokens)
        self.tokens = tokens


@dataclass
class App:
    engine: Engine
    batcher: Batcher
    api_key: str | None
    log: Callable[[str], None]
    limits: ServeConfig = field(default_factory=ServeConfig)
    max_connections: int = 0  # after the open-file limit; 0 = limits.max_connections
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.admission = Admission(self.limits.max_inflight_tokens)
        self.max_connections = self.max_connections or self.limits.max_connections
        self.connections: set[asyncio.StreamWriter] = set()
        # parsing, validation and tokenization: one thread, so the event loop never runs them
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthtune-serve-parse")

    def prepare(self, raw: bytes, chat: bool) -> GenRequest:
        """On the parsing thread: body bytes -> a tokenized request within the budget."""
        req = parse_body(raw, chat=chat, models=self.engine.names)
        try:
            self.engine.prepare(req, self.limits.max_request_tokens)
        except RequestError:
            raise
        except Exception as err:  # a bug must answer this request, not kill the connection silently
            raise RequestError(500, f"could not prepare the request: {type(err).__name__}: {err}"[:300],
                               kind="server_error") from None
        return req

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        if len(self.connections) >= self.max_connections:
            await conn.refuse()
            return
        self.connections.add(writer)
        try:
            await conn.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as err:  # a bug: one escaped line, never a traceback, and the server goes on
            self.log(f"error: the connection from {_clean(conn.peer)} failed: {_clean(type(err).__name__)}: "
                     f"{_clean(str(err))}")
        finally:
            self.connections.discard(writer)
            writer.close()


class _Closed(ConnectionError):
    """The client closed its side of the connection.

    A ``ConnectionError``: wherever it surfaces (before a request, or mid-body once the head promised
    more bytes than came), the connection just ends, as for a reset; it is not a server error.
    """


@dataclass
class _Head:
    method: str
    target: str
    version: str
    headers: http.client.HTTPMessage

    @property
    def path(self) -> str:
        target = self.target
        if target[:7].lower() == "http://" or target[:8].lower() == "https://":
            # the absolute form ("POST http://host/v1/completions"), which RFC 9112 (3.2.2) says a
            # server must accept though clients send it mostly to proxies: its path routes
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        return target.split("?", 1)[0].rstrip("/")


_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: asyncio.wait_for raises asyncio.TimeoutError, a class of its own before Python 3.11
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)
_DIGITS = re.compile(r"[0-9]{1,12}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: a body "length" meaning Transfer-Encoding: chunked (-1 means no body framing at all)
CHUNKED = -2
#: a chunk-size line (size and extensions); the chunks of one body. A body sent one byte per chunk
#: costs the event loop a step per byte: a cap keeps that bounded like a Content-Length body.
MAX_CHUNK_LINE, MAX_CHUNKS = 4096, 1 << 16


class _Connection:
    def __init__(self, app: App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.app, self.reader, self.writer = app, reader, writer
        self.buf = bytearray()
        peer = writer.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        self.loop = asyncio.get_running_loop()

    # ---- reading

    async def _more(self, deadline: float) -> None:
        left = deadline - self.loop.time()
        if left <= 0:
            raise asyncio.TimeoutError
        data = await asyncio.wait_for(self.reader.read(1 << 16), left)
        if not data:
            raise _Closed
        self.buf += data

    async def _read_head(self, deadline: float) -> _Head:
        scanned = 0  # the end of the headers is looked for in new bytes only: a 1-byte trickle stays linear
        while True:
            if self.buf[:1] in (b"\r", b"\n"):  # CRLFs between requests (RFC 9112 2.2)
                del self.buf[:len(self.buf) - len(self.buf.lstrip(b"\r\n"))]
                scanned = 0
            match = _HEAD_END.search(self.buf, max(0, scanned - 3), MAX_HEAD_BYTES + 4)
            if match:
                break
            scanned = len(self.buf)
            if len(self.buf) > MAX_HEAD_BYTES:
                raise RequestError(431, f"request line and headers over {MAX_HEAD_BYTES >> 10} KiB", close=True)
            await self._more(deadline)
        raw = bytes(self.buf[:match.start()])
        del self.buf[:match.end()]
        line, _, rest = raw.partition(b"\n")
        parts = line.rstrip(b"\r").decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise RequestError(400, f"bad request line {_show(line.decode('latin-1'))}", close=True)
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise RequestError(505, f"HTTP version {_show(version)} is not supported; use HTTP/1.1", close=True)
        try:
            headers = http.client.parse_headers(io.BytesIO(rest + b"\r\n\r\n"))
        except http.client.HTTPException as err:
            raise RequestError(431, f"bad headers: {type(err).__name__}", close=True) from None
        if headers.defects:
            # the parser stops at a line it cannot read (e.g. "Transfer-Encoding : chunked") and drops it
            # and every line after it, framing headers included: answering would read the body wrongly
            raise RequestError(400, f"malformed header line ({type(headers.defects[0]).__name__}): a header is "
                               f"'Name: value' with no space before the colon", close=True)
        return _Head(method, target, version, headers)

    def _content_length(self, head: _Head) -> int:
        """The body's length from the headers: bytes, ``CHUNKED``, or -1 when there is no body framing.

        Framing that cannot be trusted closes the connection after the answer (RFC 9112 6.1, 6.3):
        a body that cannot be measured cannot be skipped, and would be read as the next request.
        """
        codings = [c.strip().lower() for v in head.headers.get_all("Transfer-Encoding") or [] for c in v.split(",")]
        values = head.headers.get_all("Content-Length") or []
        if codings:
            if head.version != "HTTP/1.1":
                raise RequestError(400, "Transfer-Encoding needs HTTP/1.1", close=True)
            if values:  # both: the classic request-smuggling shape, refused rather than guessed
                raise RequestError(400, "send either Content-Length or Transfer-Encoding, not both", close=True)
            if codings[-1] != "chunked":
                raise RequestError(400, "Transfer-Encoding must end with chunked (or send a Content-Length)",
                                   close=True)
            if len(codings) > 1:
                raise RequestError(501, f"Transfer-Encoding {_show(', '.join(codings[:-1]))} is not supported; send "
                                   f"the body chunked only, or with a Content-Length", close=True)
            return CHUNKED
        if not values:
            return -1
        if len(set(v.strip() for v in values)) != 1 or not _DIGITS.fullmatch(values[0].strip()):
            raise RequestError(411, "a Content-Length header with a byte count is required", close=True)
        return int(values[0])

    async def _read_body(self, length: int, deadline: float) -> bytes:
        if length == CHUNKED:
            return await self._read_chunked(deadline)
        while len(self.buf) < length:
            await self._more(deadline)
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return body

    async def _read_line(self, deadline: float, limit: int, what: str) -> bytes:
        """One CRLF-terminated line of chunked framing, without its CRLF (400 when over ``limit``)."""
        scanned = 0  # only new bytes are searched: a trickled line stays linear
        while True:
            end = self.buf.find(b"\r\n", max(0, scanned - 1), limit + 2)
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                return line
            if len(self.buf) >= limit + 2:
                raise RequestError(400, f"bad chunked body: {what} over {limit} bytes", close=True)
            scanned = len(self.buf)
            await self._more(deadline)

    async def _read_chunked(self, deadline: float) -> bytes:
        """A ``Transfer-Encoding: chunked`` body (RFC 9112 7.1) within ``MAX_BODY_BYTES`` (413 past it).

        Chunk extensions and trailer fields are read and ignored; malformed framing is a 400 and
        closes the connection, since where the next request would start is then unknown.
        """
        body = bytearray()
        for _ in range(MAX_CHUNKS + 1):
            line = await self._read_line(deadline, MAX_CHUNK_LINE, "a chunk-size line")
            size_text = line.split(b";", 1)[0].rstrip(b" \t")
            if not _HEX.fullmatch(size_text):
                raise RequestError(400, f"bad chunked body: {_show(line.decode('latin-1'))} is not a chunk size "
                                   f"(hex digits, then optional ;extensions)", close=True)
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY_BYTES:
                raise RequestError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", close=True)
            while len(self.buf) < size + 2:
                await self._more(deadline)
            if self.buf[size:size + 2] != b"\r\n":
                raise RequestError(400, f"bad chunked body: a chunk of {size} bytes is not followed by CRLF",
                                   close=True)
            body += self.buf[:size]
            del self.buf[:size + 2]
        else:
            raise RequestError(413, f"request body in more than {MAX_CHUNKS:,} chunks; send larger chunks or a "
                               f"Content-Length", close=True)
        trailers = 0
        while line := await self._read_line(deadline, MAX_HEAD_BYTES, "a trailer line"):
            trailers += len(line) + 2
            if trailers > MAX_HEAD_BYTES:
                raise RequestError(431, f"trailer fields over {MAX_HEAD_BYTES >> 10} KiB", close=True)
        return bytes(body)

    # ---- the connection's life

    async def run(self) -> None:
        timeout = self.app.limits.read_timeout
        while True:
            deadline = self.loop.time() + timeout
            t0 = time.perf_counter()
            try:
                head = await self._read_head(deadline)
            except (_Closed, ConnectionError):
                return
            except _TIMEOUTS:
                if self.buf:  # part of a request came, the rest did not
                    await self._reply(408, RequestError(408, f"the request did not arrive within {timeout:g} s")
                                      .body(), t0, "request timeout", close=True, command="-")
                    await self._linger()
                return
            except RequestError as err:
                await self._reply(err.status, err.body(), t0, err.message, close=True, command="-")
                await self._linger()
                return
            keep = await self._serve(head, deadline, t0)
            if not keep:
                return

    async def _serve(self, head: _Head, deadline: float, t0: float) -> bool:
        keep = head.version == "HTTP/1.1"
        conn = (head.headers.get("Connection") or "").lower()
        keep = (keep and "close" not in conn) or (not keep and "keep-alive" in conn)
        command = f"{head.method} {head.target}"
        req = None
        body_unread = True
        try:
            length = self._content_length(head)
            body_unread = length > 0 or length == CHUNKED
            routes = {"/v1/completions": False, "/v1/chat/completions": True}
            if head.path == "/health":
                # before the key, as vLLM's: load balancers probe without one, and it says nothing but "up"
                if head.method not in ("GET", "HEAD"):
                    raise RequestError(405, f"method {_show(head.method)} is not allowed on /health; use GET",
                                       close=body_unread)
                keep = keep and not body_unread  # a GET body is never read; it must not be taken as the next request
                sent = await self._reply(200, None, t0, "", close=not keep, command=command)
                return keep and sent
            # the key, the method and the route come from the headers: refuse before reading a body
            self._authorize(head)
            if head.method == "GET":
                keep = keep and not body_unread  # a GET body is never read; it must not be taken as the next request
                body = self._get(head)
                sent = await self._reply(200, body, t0, "", close=not keep, command=command)
                return keep and sent
            if head.method != "POST":
                raise RequestError(405, f"method {_show(head.method)} is not allowed; use GET /v1/models or POST",
                                   close=body_unread)
            if head.path not in routes:
                raise RequestError(404, f"no route POST {_show(head.target)}; use /v1/completions or "
                                   f"/v1/chat/completions", code="not_found", close=body_unread)
            if length == -1:
                raise RequestError(411, "send the body with a Content-Length header (a byte count) or "
                                   "Transfer-Encoding: chunked", close=True)
            if length > MAX_BODY_BYTES:
                raise RequestError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB", close=True)
            if head.version == "HTTP/1.1" and (head.headers.get("Expect") or "").lower() == "100-continue":
                self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                raw = await self._read_body(length, deadline)
            except _TIMEOUTS:
                raise RequestError(408, f"the request body did not arrive within {self.app.limits.read_timeout:g} s",
                                   close=True) from None
            body_unread = False
            req = await self.loop.run_in_executor(self.app.pool, self.app.prepare, raw, routes[head.path])
            if not await self._generate(req):
                self._log(499, command, t0, "client closed the connection; its work was dropped or stopped", req)
                return False
            if req.error is not None:
                raise req.error
            sent = await self._reply(200, completion_response(req), t0, "", req, close=not keep, command=command)
            return keep and sent
        except RequestError as err:
            close = err.close or not keep
            sent = await self._reply(err.status, err.body(), t0, err.message, req, close=close, command=command)
            if close and body_unread:
                await self._linger()
            return sent and not close

    def _authorize(self, head: _Head) -> None:
        key = self.app.api_key
        if key is None:
            return
        got = head.headers.get("Authorization") or ""
        token = got[7:] if got.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), key.encode()):
            raise RequestError(401, "invalid API key: send the server's key as 'Authorization: Bearer <key>'",
                               code="invalid_api_key", close=True)

    def _get(self, head: _Head) -> dict:
        """The body of a GET on a /v1 route (``RequestError`` 404 for another route or an unknown model)."""
        if head.path == "/v1/models":
            return {"object": "list", "data": [self._model(name) for name in self.app.engine.names]}
        if head.path.startswith("/v1/models/"):
            # the official client puts the id in the path as it is ("org/name" stays two segments);
            # others percent-encode it
            name = urllib.parse.unquote(head.path[len("/v1/models/"):], errors="surrogateescape")
            if name in self.app.engine.names:
                return self._model(name)
            raise RequestError(404, f"the model {_show(name)} does not exist here; served models: "
                               f"{', '.join(self.app.engine.names)}", param="model", code="model_not_found")
        raise RequestError(404, f"no route GET {_show(head.target)}; try GET /v1/models", code="not_found")

    def _model(self, name: str) -> dict:
        """OpenAI's Model object, with vLLM's ``root`` (an adapter's directory) and ``parent`` (its base)."""
        engine = self.app.engine
        return {"id": name, "object": "model", "created": self.app.created, "owned_by": "synthtune",
                "root": name if name == engine.base_name else engine.adapters[name],
                "parent": None if name == engine.base_name else engine.base_name}

    async def _generate(self, req: GenRequest) -> bool:
        """Queue ``req`` and wait for it; False when the client went away meanwhile."""
        app = self.app
        if not app.admission.acquire(req.cost):
            raise RequestError(503, f"server busy: this request's {req.cost:,} tokens would pass the server's "
                               f"max_inflight_tokens of {app.admission.limit:,} ({app.admission.used:,} in flight); "
                               f"retry later", kind="server_error")
        done = self.loop.create_future()

        def finished():  # on the worker thread
            app.admission.release(req.cost)
            try:
                self.loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:  # the loop closed during shutdown
                pass

        req.on_done.append(finished)
        try:
            app.batcher.submit(req)
        except RequestError:
            app.admission.release(req.cost)
            raise
        end = self.loop.time() + WAIT_S
        while not done.done():
            left = end - self.loop.time()
            if left <= 0:
                # a queued request nobody waits for would still cost a generation, and the client's
                # retry would queue it again: mark it so the worker drops it
                req.cancelled = True
                raise RequestError(503, f"generation did not finish within {WAIT_S:.0f} s; retry later",
                                   kind="server_error", close=True)
            if len(self.buf) > MAX_HEAD_BYTES:  # a client pipelining without reading: stop watching it
                await asyncio.wait({done}, timeout=left)
                continue
            # watch the socket while waiting: EOF means the client is gone, so its work is not wanted
            watch = asyncio.ensure_future(self.reader.read(1 << 16))
            await asyncio.wait({done, watch}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not watch.done():
                watch.cancel()  # a cancelled StreamReader.read consumes nothing
                # Wait until the cancel has landed: until then the read still holds the reader's
                # waiter, and the next read on this connection (the keep-alive request) raises
                # "read() called while another coroutine is already waiting" (seen on Python 3.12+,
                # where wait_for runs the handler inline and drain() rarely yields).
                await asyncio.wait({watch})
                continue
            try:
                data = watch.result()
            except (ConnectionError, OSError):
                data = b""
            if not data:
                req.cancelled = True
                return False
            self.buf += data  # a pipelined next request: kept for later
        return True

    # ---- writing

    async def _reply(self, status: int, body: dict | None, t0: float, note: str, req: GenRequest | None = None, *,
                     close: bool = False, command: str = "-") -> bool:
        """Send one response (``body`` None: an empty one); False when it could not be delivered within
        ``read_timeout``."""
        data = b"" if body is None else json.dumps(body).encode()
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        lines = [f"HTTP/1.1 {status} {phrase}", f"Server: synthtune/{__version__}",
                 *(["Content-Type: application/json"] if body is not None else []), f"Content-Length: {len(data)}"]
        if status == 503:
            lines.append("Retry-After: 1")
        if close:
            lines.append("Connection: close")
        what = ""
        if req is not None and status == 200 and body is not None:
            usage = body.get("usage", {})
            what = (f" tokens={usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} "
                    f"batch={req.batch_prompts}")
        # logged before the reply goes out, so a client that has its answer can rely on the line
        # being there (tests and operators reading the log right after a request)
        self._log(status, command, t0, note, req, what)
        sent = True
        try:
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
            await asyncio.wait_for(self.writer.drain(), self.app.limits.read_timeout)
        except (ConnectionError, OSError, *_TIMEOUTS):  # the client went away or stopped reading
            sent = False
        return sent

    def _log(self, status: int, command: str, t0: float, note: str, req: GenRequest | None = None,
             what: str = "") -> None:
        if req is not None:
            what = f" model={_clean(req.model, 80)} prompts={len(req.prompts)} n={req.n}{what}"
        self.app.log(f"{_clean(self.peer)} \"{_clean(command)}\" {status}{what} {time.perf_counter() - t0:.3f}s"
                     f"{' ' + _clean(note) if note else ''}")

    async def _linger(self) -> None:
        """Close after an error that left input unread: shut our side, drain a little, then close."""
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            end = self.loop.time() + LINGER_S
            drained = 0
            while drained < LINGER_BYTES and (left := end - self.loop.time()) > 0:
                data = await asyncio.wait_for(self.reader.read(1 << 16), left)
                if not data:
                    break
                drained += len(data)
        except (ConnectionError, OSError, *_TIMEOUTS):
            pass

    async def refuse(self) -> None:
        """Over ``max_connections``: a quick 503, then close; nothing of the request is read."""
        t0 = time.perf_counter()
        err = RequestError(503, f"server busy: {self.app.max_connections} connections open; retry later",
                           kind="server_error")
        await self._reply(503, err.body(), t0, err.message, close=True, command="-")
        await self._linger()
        self.writer.close()


def completion_response(req: GenRequest) -> dict:
    """The OpenAI response body for a finished request (choices ordered prompt by prompt)."""
    choices = []
    completion_tokens = 0
    for group in req.samples:
        for text, sample, stop_reason in group:
            # OpenAI has no "eos": both EOS and a stop string are "stop"; stop_reason (as in vLLM)
            # names the string, null for EOS
            reason = "length" if sample.finish_reason == "length" else "stop"
            choice = {"index": len(choices), "finish_reason": reason, "stop_reason": stop_reason}
            if req.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice.update(text=text, logprobs=None)
            choices.append(choice)
            completion_tokens += sample.n_tokens
    prefix, obj = ("chatcmpl", "chat.completion") if req.chat else ("cmpl", "text_completion")
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": req.model,
            "choices": choices, "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": req.prompt_tokens + completion_tokens}}


# --------------------------------------------------------------------------------------------
# listening
# --------------------------------------------------------------------------------------------


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on the first address ``host`` resolves to (IPv4 or IPv6)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}; give an IP address or a "
                          f"resolvable host name to --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port "
                          f"(0 = any free one)") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fit_connections(wanted: int, log: Callable[[str], None]) -> int:
    """Raise the soft open-file limit so ``wanted`` connections fit; cap them when the hard limit can't."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to raise
        return wanted
    reserve = 128  # model files, the log, the listening socket, torch's own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + reserve
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        capped = max(1, soft - reserve)
        log(f"warning: the open-file limit ({soft}) allows {capped} connections, not max_connections={wanted}; "
            f"raise it with ulimit -n")
        return capped
    return wanted


async def _serve_until(app: App, sock: socket.socket, stop: asyncio.Event, ready: Callable[[str], None]) -> None:
    server = await asyncio.start_server(app.handle, sock=sock)
    ready(url_of(sock))
    try:
        await stop.wait()
    finally:
        server.close()
        for writer in list(app.connections):
            writer.transport.abort()


def build_app(engine: Engine, limits: ServeConfig, *, api_key: str | None = None, max_batch: int = 32,
              batch_window_ms: float = 5.0, log: Callable[[str], None] = print) -> App:
    check_limits(limits)
    if max_batch < 1 or not (batch_window_ms >= 0):
        raise ConfigError(f"max_batch must be >= 1 and batch_window_ms >= 0, got {max_batch} and {batch_window_ms}")
    max_connections = fit_connections(limits.max_connections, log)
    batcher = Batcher(engine, window_s=batch_window_ms / 1000, max_batch=max_batch,
                      max_batch_tokens=limits.max_request_tokens, log=log)
    return App(engine, batcher, api_key, log, limits, max_connections)


class ServerThread:
    """An app served on its own event-loop thread (tests, notebooks): ``url``, then ``stop()``."""

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        sock = listen_socket(host, port)
        self.url = url_of(sock)
        started = threading.Event()

        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await _serve_until(app, sock, self._stop, lambda _: started.set())

        # asyncio.run: at the end it cancels and finishes the connections' tasks
        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="synthtune-serve-loop", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the server thread did not start within 30 s")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.app.batcher.stop()
        self.app.pool.shutdown(wait=False)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def serve(model: str, adapters: Sequence[str] = (), *, host: str = "127.0.0.1", port: int = 8000,
          served_name: str | None = None, api_key_env: str | None = None, device: str | None = None,
          seed: int = 0, max_batch: int = 32, batch_window_ms: float = 5.0, threads: int | None = None,
          limits: ServeConfig | None = None, log: Callable[[str], None] = _stderr) -> None:
    """Load the model, serve until SIGTERM/SIGINT, then stop cleanly."""
    limits = limits or ServeConfig()
    check_limits(limits)
    if max_batch < 1 or not (batch_window_ms >= 0):
        raise ConfigError(f"max_batch must be >= 1 and batch_window_ms >= 0, got {max_batch} and {batch_window_ms}")
    api_key = None
    if api_key_env:
        # the client's reader: a key a header cannot carry (e.g. a trailing \r) fails here, naming the
        # variable only, and the key is registered so that no log line or traceback shows it
        api_key = secret_from_env(api_key_env)
    sock = listen_socket(host, port)  # before loading the model: a taken port fails in a second
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        engine = Engine(model, adapters, served_name=served_name, device=device, seed=seed,
                        context=limits.context_length, sampler=limits.sampler)
        app = build_app(engine, limits, api_key=api_key, max_batch=max_batch, batch_window_ms=batch_window_ms,
                        log=log)
    except BaseException:
        sock.close()
        raise

    def ready(url: str) -> None:
        if not _is_loopback(host) and api_key is None:
            log(f"warning: listening on {host} without an API key: anyone who can reach this port can use the model")
        ctx = f"context {engine.context} tokens" if engine.context else "context unknown (only the budget bounds it)"
        log(f"models: {', '.join(engine.names)} ({engine.lm.device}, sampler {engine.sampler}); batching up to "
            f"{max_batch} prompts within {batch_window_ms:g} ms; {ctx}; max_request_tokens={limits.max_request_tokens} "
            f"max_inflight_tokens={limits.max_inflight_tokens} max_connections={app.max_connections} "
            f"read_timeout={limits.read_timeout:g}s")
        log(f"serving on {url}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await _serve_until(app, sock, stop, ready)

    try:
        asyncio.run(main())
    finally:
        log("stopping")
        app.batcher.stop()
        app.pool.shutdown(wait=False)
        log("stopped")



def run(cfg: ServeConfig, log: Callable[[str], None] = _stderr) -> None:
    """`synthtune serve`'s entry point: :func:`serve` with the command's config (its limits included)."""
    serve(cfg.model, cfg.adapters, host=cfg.host, port=cfg.port, served_name=cfg.served_model_name,
          api_key_env=cfg.api_key_env, device=cfg.device, seed=cfg.seed, max_batch=cfg.max_batch,
          batch_window_ms=cfg.batch_window_ms, threads=cfg.threads, limits=cfg, log=log)


#: What a started server prints once it accepts requests (a supervisor waits for this line).
READY = r"serving on (http://\S+/v1)"
