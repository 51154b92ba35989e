"""`synthtune serve`: a small OpenAI-compatible HTTP server for a local model and its LoRA adapters.

It is for local use and for tests: the ``openai`` synthesis backend talks to it exactly as it talks
to vLLM, which is what to run at GPU scale (see the README, "Synthesis against vLLM servers").

* Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` with ``n``,
  ``temperature``, ``top_p``, ``top_k``, ``max_tokens``, ``stop`` and ``seed``. Errors use OpenAI's
  ``{"error": {...}}`` shape: 400 for a bad parameter, 404 ``model_not_found``, 401 for a wrong key.
* Adapters: each ``--adapter NAME=DIR`` is a peft LoRA adapter (safetensors only) on the one base
  model, chosen per request by ``model=NAME``, as with vLLM's ``--lora-modules``.
* Batching: HTTP threads only parse and validate. One worker thread owns the model. It gathers
  the requests that arrive within ``batch_window_ms`` of the first (up to ``max_batch`` prompts),
  groups those with the same model and sampling settings, and runs each group through one
  ``sample_k`` call, so concurrent requests share forward passes.
* Seeds: a group is sampled with one generator, seeded by its first request's ``seed``. A request
  is therefore reproducible when it runs alone, not when batched with others (vLLM seeds each
  request on its own).
* One log line per request on stderr, never with headers. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hmac
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from synthtune import __version__
from synthtune.config import ConfigError

MAX_N = 128
MAX_STOP = 16
MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_TOKENS = 256
#: A request waits at most this long for the worker; the client then gets a retryable 503.
WAIT_S = 600.0
_ROLES = ("system", "user", "assistant")
_UNSUPPORTED = ("stream", "echo", "suffix", "logprobs", "top_logprobs", "tools", "functions", "response_format")


class RequestError(Exception):
    """A request the server will not run; becomes an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(eq=False)
class GenRequest:
    """One validated request, and what the worker fills in."""

    chat: bool
    model: str
    prompts: list  # completions: prompt strings; chat: one messages list
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    done: threading.Event = field(default_factory=threading.Event)
    samples: list = field(default_factory=list)  # per prompt: [(raw text, Sample, stop_reason)]
    prompt_tokens: int = 0
    batch_prompts: int = 0
    error: RequestError | None = None
    cancelled: bool = False  # its HTTP thread gave up waiting; the worker skips it

    def group_key(self) -> tuple:
        return (self.model, self.chat, self.n, self.max_tokens, self.temperature, self.top_p, self.top_k, self.stop)


# --------------------------------------------------------------------------------------------
# validation (pure)
# --------------------------------------------------------------------------------------------


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, integer: bool = False,
            lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (value <= lo if lo_open else value < lo) or value > hi:
        bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"{key} must be {kind} in {bounds}, got {value!r}", param=key)
    return value


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    # OpenAI's content-parts form: keep the text parts
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"{where}.content must be a string (or a list of text parts)", param="messages")


def parse_request(body, *, chat: bool, models: Sequence[str]) -> GenRequest:
    """Validate a completions / chat completions body; raise ``RequestError`` naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, f"model is required: one of {', '.join(models)}", param="model")
    if model not in models:
        raise RequestError(404, f"the model {model!r} does not exist here; served models: {', '.join(models)}",
                           param="model", code="model_not_found")
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False, 0):
            raise RequestError(400, f"{key} is not supported by synthtune serve; leave it out", param=key)
    n = _number(body, "n", 1, 1, MAX_N, integer=True)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise RequestError(400, "best_of is not supported by synthtune serve; leave it out or equal to n",
                           param="best_of")
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    max_tokens = _number(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True))
    top_k = _number(body, "top_k", -1, -1, 1 << 20, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them",
                           param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"seed must be an integer, got {seed!r}", param="seed")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages must be a non-empty list of {role, content}", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise RequestError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)}", param="messages")
            clean.append({"role": m["role"], "content": _text(m.get("content"), f"messages[{i}]")})
        prompts = [clean]
    else:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise RequestError(400, "prompt must be a non-empty string or a list of them (token-id prompts are "
                               "not supported)", param="prompt")
    return GenRequest(chat=chat, model=model, prompts=prompts, n=n, max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, top_k=0 if top_k in (-1, 0) else top_k, stop=tuple(stop), seed=seed)


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


class Engine:
    """The base model with its adapters; only the worker thread calls ``run``."""

    def __init__(self, model: str, adapters: Sequence[str] = (), *, served_name: str | None = None,
                 device: str | None = None, seed: int = 0):
        from synthtune.evaluate import check_adapter_dir, load_with_adapter

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
        self.adapters = dict(named)
        self.names = names
        self.context = getattr(self.lm.model.config, "max_position_embeddings", None)
        self._seeds = itertools.count(seed)

    def run(self, group: list[GenRequest]) -> None:
        """Generate for requests that share a group key, in one ``sample_k`` call."""
        from synthtune.generation import SamplingParams
        from synthtune.synth.sampler import sample_k

        first = group[0]
        live, ids = [], []
        for req in group:
            try:
                req_ids = [self._encode(p, req.chat) for p in req.prompts]
            except RequestError as err:
                req.error = err
                continue
            for x in req_ids:
                if self.context and len(x) + req.max_tokens > self.context:
                    req.error = RequestError(400, f"the prompt ({len(x)} tokens) plus max_tokens ({req.max_tokens}) "
                                             f"exceeds the model's context of {self.context} tokens; shorten the "
                                             f"prompt or lower max_tokens", param="max_tokens")
                    break
            else:
                live.append(req)
                ids.extend(req_ids)
                req.prompt_tokens = sum(len(x) for x in req_ids)
        if not live:
            return
        seed = first.seed if first.seed is not None else next(self._seeds)
        params = SamplingParams(max_new_tokens=first.max_tokens, temperature=first.temperature, top_p=first.top_p,
                                top_k=first.top_k, num_samples=first.n, stop=first.stop, seed=seed)
        with self._adapter(first.model):
            out = sample_k(self.lm, ids, params, batch_size=len(ids))
        pos = 0
        for req in live:
            for _ in req.prompts:
                req.samples.append([self._raw(s, first.stop) for s in out[pos]])
                pos += 1
            req.batch_prompts = len(ids)

    def _encode(self, prompt, chat: bool) -> list[int]:
        tok = self.lm.tokenizer
        if not chat:
            return tok(prompt, add_special_tokens=True)["input_ids"]
        if not getattr(tok, "chat_template", None):
            raise RequestError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                               param="messages")
        # the rendered template holds its own BOS/role tokens: adding them again would double the BOS
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def _raw(self, sample, stop: tuple[str, ...]) -> tuple[str, object, str | None]:
        """The completion as OpenAI returns it: unstripped, cut before the stop string that ended it."""
        from synthtune.generation import truncate_at_stop

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
    """The worker thread: gathers requests for ``window_s``, groups them, runs each group."""

    def __init__(self, engine: Engine, *, window_s: float = 0.005, max_batch: int = 32, max_queue: int = 256,
                 log: Callable[[str], None] = print):
        self.engine, self.window_s, self.max_batch, self.log = engine, window_s, max_batch, log
        self.queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
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
        try:
            batch = [self.queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        n_prompts = len(batch[0].prompts)
        deadline = time.monotonic() + self.window_s
        while n_prompts < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                req = self.queue.get(timeout=left)
            except queue.Empty:
                break
            batch.append(req)
            n_prompts += len(req.prompts)
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._gather()
            groups: dict[tuple, list[GenRequest]] = {}
            for req in batch:
                if req.cancelled:
                    req.done.set()
                    continue
                groups.setdefault(req.group_key(), []).append(req)
            for group in groups.values():
                try:
                    self.engine.run(group)
                except Exception as err:  # a bug or an OOM must fail these requests, not the server
                    self.log(f"error: generation failed: {type(err).__name__}: {err}")
                    for req in group:
                        req.error = req.error or RequestError(500, f"generation failed: {type(err).__name__}: {err}",
                                                              kind="server_error")
                for req in group:
                    req.done.set()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass
class App:
    engine: Engine
    batcher: Batcher
    api_key: str | None
    log: Callable[[str], None]
    created: int = field(default_factory=lambda: int(time.time()))


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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection for many requests
    server_version = f"synthtune/{__version__}"

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, format, *args):  # noqa: A002 - the one line per request is written by _reply
        pass

    def do_GET(self):
        t0 = time.perf_counter()
        try:
            self._authorize()
            if self.path.rstrip("/") != "/v1/models":
                raise RequestError(404, f"no route GET {self.path}; try GET /v1/models", code="not_found")
            data = [{"id": name, "object": "model", "created": self.app.created, "owned_by": "synthtune",
                     "root": name if name == self.app.engine.base_name else self.app.engine.adapters[name],
                     "parent": None if name == self.app.engine.base_name else self.app.engine.base_name}
                    for name in self.app.engine.names]
            self._reply(200, {"object": "list", "data": data}, t0, "")
        except RequestError as err:
            self._reply(err.status, err.body(), t0, err.message)

    def do_POST(self):
        t0 = time.perf_counter()
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        req = None
        try:
            body = self._read_body()
            self._authorize()
            path = self.path.rstrip("/")
            if path not in routes:
                raise RequestError(404, f"no route POST {self.path}; use /v1/completions or /v1/chat/completions",
                                   code="not_found")
            req = parse_request(body, chat=routes[path], models=self.app.engine.names)
            self.app.batcher.submit(req)
            if not req.done.wait(WAIT_S):
                # a queued request nobody waits for would still cost a generation, and the client's
                # retry would queue it again: mark it so the worker drops it
                req.cancelled = True
                raise RequestError(503, f"generation did not finish within {WAIT_S:.0f} s; retry later",
                                   kind="server_error")
            if req.error is not None:
                raise req.error
            self._reply(200, completion_response(req), t0, "", req)
        except RequestError as err:
            self._reply(err.status, err.body(), t0, err.message, req)

    def _read_body(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            # with no usable length the body cannot be skipped: close rather than read it as a request
            self.close_connection = True
            raise RequestError(411, "a Content-Length header with a byte count is required")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(413, f"request body over {MAX_BODY_BYTES >> 20} MiB")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"request body is not valid JSON: {err}") from None

    def _authorize(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        got = self.headers.get("Authorization", "")
        token = got[7:] if got.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise RequestError(401, "invalid API key: send the server's key as 'Authorization: Bearer <key>'",
                               code="invalid_api_key")

    def _reply(self, status: int, body: dict, t0: float, note: str, req: GenRequest | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 503:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client went away; nothing to tell it
            self.close_connection = True
        what = ""
        if req is not None:
            usage = body.get("usage", {})
            what = (f" model={req.model} prompts={len(req.prompts)} n={req.n} "
                    f"tokens={usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} "
                    f"batch={req.batch_prompts}")
        self.app.log(f"{self.client_address[0]} \"{self.command} {self.path}\" {status}{what} "
                     f"{time.perf_counter() - t0:.3f}s{' ' + note if note else ''}")


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a client holding a keep-alive connection must not block shutdown

    def __init__(self, address: tuple[str, int], app: App):
        self.app = app
        super().__init__(address, _Handler)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def serve(model: str, adapters: Sequence[str] = (), *, host: str = "127.0.0.1", port: int = 8000,
          served_name: str | None = None, api_key_env: str | None = None, device: str | None = None,
          seed: int = 0, max_batch: int = 32, batch_window_ms: float = 5.0, threads: int | None = None,
          log: Callable[[str], None] = _stderr) -> None:
    """Load the model, serve until SIGTERM/SIGINT, then stop cleanly."""
    if max_batch < 1 or batch_window_ms < 0:
        raise ConfigError(f"max_batch must be >= 1 and batch_window_ms >= 0, got {max_batch} and {batch_window_ms}")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"--api-key-env {api_key_env}: ${api_key_env} is not set (or empty); export the key "
                              f"clients must send, or drop the flag to serve without one")
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = Engine(model, adapters, served_name=served_name, device=device, seed=seed)
    batcher = Batcher(engine, window_s=batch_window_ms / 1000, max_batch=max_batch, log=log)
    try:
        server = Server((host, port), App(engine, batcher, api_key, log))
    except OSError as err:
        batcher.stop()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --port "
                          f"(0 = any free one)") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log(f"warning: listening on {host} without an API key: anyone who can reach this port can use the model")
    log(f"models: {', '.join(engine.names)} ({engine.lm.device}); batching up to {max_batch} prompts within "
        f"{batch_window_ms:g} ms")
    log(f"serving on http://{bound_host}:{bound_port}/v1")
    while not stop.wait(1.0):
        pass
    log("stopping")
    server.shutdown()
    server.server_close()
    batcher.stop()
    log("stopped")


# --------------------------------------------------------------------------------------------
# as a child process (tests, benchmarks, scripts)
# --------------------------------------------------------------------------------------------

READY = r"serving on (http://\S+/v1)"


@dataclass
class ServerProcess:
    """A child process that printed a readiness line holding its URL; its output goes to ``log``."""

    proc: subprocess.Popen
    url: str
    log: Path

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if re.search(pattern, line)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process group and wait; SIGKILL if it does not exit within ``timeout``."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


def spawn(cmd: Sequence[str], log: Path, ready: str, *, env: dict | None = None,
          timeout: float = 180.0) -> ServerProcess:
    """Start ``cmd`` in its own process group and wait (at most ``timeout`` s) for ``ready``.

    Output goes to a file, not a pipe: a pipe nobody drains fills up and blocks the server.
    """
    with open(log, "wb") as fh:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(ready, log.read_text(errors="replace"))
        if match:
            return ServerProcess(proc, match.group(1), log)
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode} before it was ready; its log {log}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    ServerProcess(proc, "", log).stop(signal.SIGKILL)
    raise RuntimeError(f"{cmd[0]} was not ready within {timeout:.0f} s; its log {log}:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


def serve_command(*args: str) -> list[str]:
    """``synthtune serve ARGS`` with this interpreter (the console script beside it when installed)."""
    script = Path(sys.executable).parent / "synthtune"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "synthtune.cli"]
    return [*head, "serve", *args]
