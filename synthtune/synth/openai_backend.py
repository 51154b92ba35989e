"""The ``openai`` backend: synthesis against OpenAI-compatible servers.

vLLM, TGI, llama.cpp, Ollama, hosted APIs and ``synthtune serve`` all speak this API, so scaling
synthesis out means starting more servers and listing them with ``--endpoint``; nothing here
schedules a cluster.

* Plain prompts go to ``/completions`` as text; chat prompts go to ``/chat/completions`` as
  ``messages``, and the server applies the model's own chat template.
* One request per prompt asks for all k samples (``n=k``). An endpoint that answers with fewer
  choices is taken to ignore ``n``: the missing samples, and from then on every request to it,
  go out as parallel single-sample requests with distinct seeds.
* At most ``concurrency`` requests are in flight, spread round-robin over the endpoints. Every
  attempt takes the next endpoint, so a retry moves away from a server that just failed.
* 408, 429, 5xx, timeouts and connection errors are retried with exponential backoff and jitter;
  a ``Retry-After`` header wins when it asks for longer. Any other 4xx is permanent: the run stops
  with the server's own message (an ``EndpointError``, which the CLI prints and exits 2 on).
* The API key is read from the environment variable named by ``api_key_env`` and checked there
  (a stray \r or space fails naming the variable, never showing the key). It only ever goes into
  the Authorization header; every response body is scrubbed of it before anything reads or cuts
  it, and every error the backend raises is scrubbed again (``synthtune.redact``).

Token counts: ``usage.completion_tokens`` covers all the choices of a request. With several
choices, one that ended on ``length`` counts ``max_tokens`` and the rest of the total is shared
among the others in proportion to their text length, so the sum stays exact. A server that
reports no usage gives ``n_tokens=0``.

Finish reasons: OpenAI's ``stop`` covers both EOS and a stop string. vLLM and ``synthtune serve``
tell them apart with ``stop_reason`` (the matched string; null for EOS), and TGI says
``eos_token`` / ``stop_sequence``. Without that detail a ``stop`` counts as ``eos``. Any other
reason (``content_filter``...) is an unfinished answer and maps to ``length``, which the
evaluator drops.

Calculator (``SamplingParams.calculator``, plain prompts only): the standard API cannot force
tokens mid-sample, so each sample becomes a chain of single-sample ``/completions`` requests that
also stop at ``=``. When a piece stops there, ``=`` is appended, and if the text now ends at
``<<expr=`` inside an open annotation the exact result and ``>>`` are appended too
(``calc_decoding.injection``, the rule the ``hf`` backend uses); the next request continues from
the prompt plus the text so far. See ``calc_step`` for what this cannot reproduce exactly.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass
from datetime import timezone
from urllib.parse import urlsplit

from synthtune import __version__
from synthtune.errors import ConfigError, ModelError
from synthtune.generation.base import Sample, SamplingParams, truncate_at_stop
from synthtune.redact import redact, redact_bytes, secret_from_env
from synthtune.synth.prompts import Prompt

log = logging.getLogger(__name__)

#: Statuses worth retrying: rate limits, request timeouts and server-side failures.
RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
MAX_BACKOFF_S = 60.0
#: A Retry-After above this is cut to it, so one header cannot stall a run for hours.
MAX_RETRY_AFTER_S = 300.0
#: The startup model check is a small request; a server that takes longer than this is not ready.
MODELS_TIMEOUT_S = 30.0
#: With the calculator on, every sample also stops here, so the client can add the result after ``<<expr=``
CALC_STOP = "="


class EndpointError(ModelError):
    """A server refused a request, or could not be reached within the retries."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(redact(message))  # the last guard: a message never carries the API key
        self.status = status


# --------------------------------------------------------------------------------------------
# small pure pieces
# --------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    url: str  # normalized API base, e.g. http://127.0.0.1:8000/v1
    scheme: str
    host: str
    port: int
    path: str
    n_ok: bool | None = None  # whether it honours `n`; None until a multi-sample answer shows it

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """An API base URL; a bare ``http://host:port`` gets ``/v1``, as vLLM and most servers use."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"endpoint {url!r} is not an http(s) URL; give the API base, e.g. "
                              f"http://127.0.0.1:8000/v1")
        if parts.username or parts.password:
            raise ConfigError(f"endpoint {parts.hostname}: credentials in the URL would be written to "
                              f"config.yaml; put the key in an environment variable and pass --api-key-env NAME")
        if parts.query or parts.fragment:
            raise ConfigError(f"endpoint {url!r}: drop the query/fragment; give the API base, e.g. "
                              f"http://127.0.0.1:8000/v1")
        path = parts.path.rstrip("/") or "/v1"
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as err:
            raise ConfigError(f"endpoint {url!r}: {err}") from None
        return cls(url=f"{parts.scheme}://{parts.netloc}{path}", scheme=parts.scheme, host=parts.hostname,
                   port=port, path=path)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent or bad.

    >>> parse_retry_after("3")
    3.0
    >>> parse_retry_after("soon") is None
    True
    """
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def retry_delay(attempt: int, backoff: float, retry_after: str | None = None,
                rand: Callable[[], float] = random.random) -> float:
    """Wait before retry ``attempt`` (0-based): ``backoff * 2**attempt`` with jitter, or Retry-After.

    The jitter keeps half the wait and randomizes the other half, so clients that failed together
    do not all come back together.
    """
    wait_s = min(MAX_BACKOFF_S, backoff * 2 ** attempt) * (0.5 + 0.5 * rand())
    asked = parse_retry_after(retry_after)
    if asked is not None:
        wait_s = max(wait_s, min(asked, MAX_RETRY_AFTER_S))
    return wait_s


def finish_reason(choice: dict) -> str:
    """A choice's finish reason in ``Sample`` terms: eos, stop or length (see the module notes)."""
    reason = choice.get("finish_reason")
    if reason == "stop":
        return "stop" if isinstance(choice.get("stop_reason"), str) else "eos"
    if reason in ("eos", "eos_token"):
        return "eos"
    if reason == "stop_sequence":
        return "stop"
    return "length"


def split_tokens(total: int | None, texts: Sequence[str], reasons: Sequence[str], max_tokens: int) -> list[int]:
    """Per-choice token counts from a request's ``completion_tokens`` (see the module notes)."""
    n = len(texts)
    if total is None or n == 0:
        return [0] * n
    if n == 1:
        return [int(total)]
    counts = [max_tokens if r == "length" else 0 for r in reasons]
    open_ = [i for i, r in enumerate(reasons) if r != "length"]
    rest = int(total) - sum(counts)
    if rest < 0 or (not open_ and rest):  # the server counts differently: share the whole total instead
        counts, open_, rest = [0] * n, list(range(n)), int(total)
    if not open_:
        return counts
    weights = [max(1, len(texts[i])) for i in open_]
    shares = [rest * w / sum(weights) for w in weights]
    floors = [int(s) for s in shares]
    # largest remainders get the leftover tokens, so the counts add up to the total exactly
    for j in sorted(range(len(open_)), key=lambda j: floors[j] - shares[j])[:rest - sum(floors)]:
        floors[j] += 1
    for i, c in zip(open_, floors, strict=True):
        counts[i] = c
    return counts


def continuation_seed(seed: int, sample: int, piece: int) -> int:
    """The seed of a calculator continuation: piece ``piece`` (>= 1) of sample ``sample``.

    Derived by hashing rather than by adding, so no continuation reuses the seed of another
    sample's first request (``seed + sample``) or of another piece: a reused seed would replay the
    same random draws. Kept below 2**63, the range vLLM and ``synthtune serve`` take.

    >>> continuation_seed(0, 0, 1) != continuation_seed(0, 1, 1) != continuation_seed(0, 0, 2)
    True
    """
    digest = hashlib.blake2b(f"{seed}:{sample}:{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def stop_string(choice: dict, sent: Sequence[str]) -> str | None:
    """The stop string that ended ``choice`` (one of ``sent``), or None when EOS or the length did.

    Raises ``ValueError`` when the server does not say which: OpenAI's own API reports a plain
    ``stop`` for both EOS and every stop string, and TGI's ``stop_sequence`` does not name one.
    """
    reason = choice.get("finish_reason")
    if reason not in ("stop", "stop_sequence"):
        return None
    named = choice.get("stop_reason")
    if isinstance(named, str):
        return named
    if reason == "stop" and "stop_reason" in choice:
        return None  # vLLM and synthtune serve: null is EOS, an int a stop token id
    if reason == "stop_sequence" and len(sent) == 1:
        return sent[0]
    raise ValueError("the server does not say which stop string ended a sample (no stop_reason)")


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops) if i != -1]
    return min(hits) if hits else None


def calc_step(text: str, piece: str, ended_at: str | None, reason: str, stops: Sequence[str], tokens_left: int,
              inject: Callable[[str], str | None]) -> tuple[str, str | None]:
    """One piece of a calculator chain: the completion text after it, and its finish reason
    (None: request a continuation).

    ``text`` is the completion so far, ``piece`` the next request's text (cut before its stop
    string), ``ended_at`` that stop string, ``reason`` the piece's finish reason, ``stops`` the
    user's stop strings, ``tokens_left`` what ``max_new_tokens`` leaves after this piece.

    A piece that stopped at ``=`` (and ``=`` is not one of the user's stops) gets it back, plus the
    calculator's ``result>>`` when that ``=`` closes ``<<expr``. The server matches the user's stop
    strings only inside each piece, so they are searched here across every seam (piece, ``=``,
    injection), and the text is cut at the first one, as one uninterrupted request would.

    What cannot be exact, compared with the ``hf`` backend's forced tokens: the server re-tokenizes
    prompt + text at every seam (a token that would have merged across it is split); a token that
    held more than the ``=`` (``=<``) loses its tail, which the continuation writes anew; the
    penalties count only the current piece's tokens; and the injected text is prompt, not generated
    tokens, so it counts neither in ``n_tokens`` nor toward ``max_new_tokens``.

    >>> calc = lambda t: "42>>" if t.endswith("<<6*7=") else None
    >>> calc_step("x = ", "<<6*7", "=", "stop", ["\\n"], 5, calc)
    ('x = <<6*7=42>>', None)
    >>> calc_step("x = <<6*7=42>>", "42 apples", "\\n", "stop", ["\\n"], 3, calc)
    ('x = <<6*7=42>>42 apples', 'stop')
    >>> calc_step("", "<<6*7", "=", "stop", ["7=4"], 5, calc)  # a stop string across the seam
    ('<<6*', 'stop')
    """
    longest = max((len(s) for s in stops), default=1)
    start = max(0, len(text) - longest + 1)
    text += piece
    if ended_at == CALC_STOP and CALC_STOP not in stops:
        text += CALC_STOP
        cut = _first_stop(text, stops, start)
        if cut is not None:
            return text[:cut], "stop"
        if tokens_left <= 0:  # the "=" was the last token the budget allowed: nothing is forced after it
            return text, "length"
        add = inject(text)
        if add:
            start = max(0, len(text) - longest + 1)
            text += add
            cut = _first_stop(text, stops, start)
            if cut is not None:
                return text[:cut], "stop"
        return text, None
    cut = _first_stop(text, stops, start)
    if cut is not None:
        return text[:cut], "stop"
    return text, reason


def server_message(data: bytes, limit: int = 400) -> str:
    """The human part of an error body: OpenAI's error.message, vLLM's message, FastAPI's detail.

    Secrets are redacted before the text is cut: a cut through the key would leave its start.
    """
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        text = redact(data.decode("utf-8", "replace").strip())
        return (text[:limit] + "...") if len(text) > limit else (text or "(empty body)")
    msg = body
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message", err) if isinstance(err, dict) else (err or body.get("message") or
                                                                     body.get("detail") or body)
    text = redact(msg if isinstance(msg, str) else json.dumps(msg))
    return (text[:limit] + "...") if len(text) > limit else text


# --------------------------------------------------------------------------------------------
# HTTP: keep-alive connections, one per (thread, endpoint)
# --------------------------------------------------------------------------------------------

# Errors that, on a reused keep-alive connection, mean the server closed it while idle (uvicorn
# does after 5 s): the request never reached it, so it is resent on a fresh connection at once.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class _Transport:
    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._live: set[http.client.HTTPConnection] = set()

    def request(self, ep: Endpoint, method: str, path: str, body: dict | None, headers: dict,
                timeout: float) -> tuple[int, dict[str, str], bytes]:
        data = json.dumps(body).encode() if body is not None else None
        conn, reused = self._connection(ep, timeout)
        try:
            return self._send(ep, conn, method, path, data, headers)
        except _STALE:
            if not reused:
                raise
        conn, _ = self._connection(ep, timeout)
        return self._send(ep, conn, method, path, data, headers)

    def _send(self, ep: Endpoint, conn: http.client.HTTPConnection, method: str, path: str, data: bytes | None,
              headers: dict) -> tuple[int, dict[str, str], bytes]:
        try:
            conn.request(method, ep.path + path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            self._drop(ep)
            raise
        if resp.will_close:
            self._drop(ep)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload

    def _connection(self, ep: Endpoint, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(ep.url)
        if conn is not None:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            return conn, True
        cls = http.client.HTTPSConnection if ep.scheme == "https" else http.client.HTTPConnection
        conn = cls(ep.host, ep.port, timeout=timeout)
        conns[ep.url] = conn
        with self._lock:
            self._live.add(conn)
        return conn, False

    def _drop(self, ep: Endpoint) -> None:
        conn = self._local.__dict__.get("conns", {}).pop(ep.url, None)
        if conn is not None:
            conn.close()
            with self._lock:
                self._live.discard(conn)

    def abort(self) -> None:
        """Break every open connection, so requests blocked on a hung server return now."""
        import socket

        with self._lock:
            live = list(self._live)
        for conn in live:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        """Abort, then release every connection's file descriptor now rather than at garbage collection."""
        self.abort()
        with self._lock:
            live, self._live = list(self._live), set()
        for conn in live:
            conn.close()


# --------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------


class OpenAIBackend:
    """k samples per prompt from OpenAI-compatible servers (see the module docstring)."""

    name = "openai"
    tokenizer = None
    is_seq2seq = False
    # the server applies the chat template: prompts carry their messages, and `auto` means chat
    chat_on_server = True

    def __init__(self, endpoints: Sequence[str], served_model: str, *, api_key_env: str | None = None,
                 concurrency: int = 8, request_timeout: float = 600.0, max_retries: int = 6,
                 retry_backoff: float = 1.0, check: bool = True):
        if not endpoints:
            raise ConfigError("backend=openai needs at least one endpoint: --endpoint http://HOST:8000/v1 "
                              "(repeat it for several servers)")
        self.endpoints = [Endpoint.parse(u) for u in endpoints]
        dup = {e.url for e in self.endpoints if sum(x.url == e.url for x in self.endpoints) > 1}
        if dup:
            raise ConfigError(f"endpoint listed twice: {', '.join(sorted(dup))}; list each server once "
                              f"(raise concurrency to send it more requests)")
        for key, value, low in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0)):
            if value < low:
                raise ConfigError(f"{key} must be >= {low}, got {value}")
        if request_timeout <= 0 or retry_backoff < 0:
            raise ConfigError(f"request_timeout must be > 0 and retry_backoff >= 0, got {request_timeout} "
                              f"and {retry_backoff}")
        self.model_name = served_model
        self.concurrency = concurrency
        self.request_timeout = float(request_timeout)
        self.max_retries = max_retries
        self.retry_backoff = float(retry_backoff)
        self._key_env = api_key_env
        self._key = secret_from_env(api_key_env) if api_key_env else None
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": f"synthtune/{__version__}"}
        if self._key:
            self._headers["Authorization"] = f"Bearer {self._key}"
        self._http = _Transport()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="synthtune-openai")
        self._rr = itertools.count()
        if check:
            self.check_models()

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"OpenAIBackend({[e.url for e in self.endpoints]}, {self.model_name!r})"

    def close(self) -> None:
        self._http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the public call ------------------------------------------------------------------------

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Sample]]:
        """``params.num_samples`` samples for each prompt, in prompt order."""
        if params.num_samples < 1 or params.max_new_tokens < 1:
            raise ValueError("num_samples and max_new_tokens must be >= 1")
        if params.calculator:
            return self._sample_calculated(prompts, params)
        k = params.num_samples
        got: list[list[Sample]] = [[] for _ in prompts]
        seeds = [params.seed + 1] * len(prompts)  # the next seed for a single-sample top-up request
        stop = threading.Event()
        pending: dict[Future, tuple[int, int]] = {
            self._pool.submit(self._complete, p, params, k, params.seed, stop): (i, k) for i, p in enumerate(prompts)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i, asked = pending.pop(fut)
                    samples = fut.result()
                    got[i].extend(samples)
                    # a short answer: the server ignored n; the rest go out as single requests
                    for _ in range(asked - len(samples)):
                        pending[self._pool.submit(self._complete, prompts[i], params, 1, seeds[i], stop)] = (i, 1)
                        seeds[i] += 1
        except BaseException:
            self._abandon(stop, pending)
            raise
        return got

    def _abandon(self, stop: threading.Event, futures) -> None:
        """On an error or Ctrl-C: queued requests never start, running ones stop at their next check,
        and open connections are closed, so nothing keeps a server busy for an answer no one reads."""
        stop.set()
        for fut in futures:
            fut.cancel()
        self._http.abort()

    def _sample_calculated(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Sample]]:
        """With the calculator: every sample is its own chain of requests (``calc_step``), run concurrently.

        One request per sample rather than ``n=k``: each sample stops at its own ``=`` and only a
        single-choice answer's ``usage`` is that sample's exact token count, which the next
        piece's ``max_tokens`` needs. vLLM's prefix cache still shares the prompt's prefill.
        """
        for p in prompts:
            check_calculator_format(p.format)
        stop = threading.Event()
        k = params.num_samples
        got: list[list[Sample | None]] = [[None] * k for _ in prompts]
        futures = {self._pool.submit(self._calc_sample, p, params, j, stop): (i, j)
                   for i, p in enumerate(prompts) for j in range(k)}
        try:
            for fut in as_completed(futures):
                i, j = futures[fut]
                got[i][j] = fut.result()
        except BaseException:
            self._abandon(stop, futures)
            raise
        return got  # type: ignore[return-value]  # every slot is filled once all futures are done

    def check_models(self) -> None:
        """Fail early, with the list of served names, when an endpoint does not serve the model."""
        for ep in self.endpoints:
            try:
                payload = self._call("GET", "/models", lambda _ep: None, threading.Event(), only=ep,
                                     timeout=min(self.request_timeout, MODELS_TIMEOUT_S))
            except EndpointError as err:
                if err.status == 404:  # a server without /models: the first request will tell
                    log.warning("endpoint %s has no /models; skipping the served-model check", ep.url)
                    continue
                raise
            ids = [m.get("id") for m in payload.get("data", []) if isinstance(m, dict)]
            if self.model_name not in ids:
                raise EndpointError(f"endpoint {ep.url} does not serve model {self.model_name!r}; it serves: "
                                    f"{', '.join(map(str, ids)) or 'nothing'}. Pass --served-model with one of "
                                    f"these (vLLM: its --served-model-name, or a --lora-modules name)")

    # -- one prompt ----------------------------------------------------------------------------

    def _complete(self, prompt: Prompt, params: SamplingParams, n: int, seed: int,
                  stop: threading.Event) -> list[Sample]:
        chat = prompt.format == "chat"
        path = "/chat/completions" if chat else "/completions"
        sent: dict[str, int] = {}

        def body_for(ep: Endpoint) -> dict:
            sent["n"] = n if ep.n_ok is not False else 1
            body = self._body(params, sent["n"], seed, params.max_new_tokens, params.stop)
            if chat:
                body["messages"] = prompt.chat_messages()
            else:
                body["prompt"] = prompt.text
            return body

        payload, ep = self._call("POST", path, body_for, stop, return_endpoint=True)
        choices = self._choices(payload, ep, path)
        if sent["n"] > 1:
            ep.n_ok = len(choices) >= sent["n"]
            if not ep.n_ok:
                log.warning("endpoint %s ignores n (asked %d samples, got %d): sending single-sample requests "
                            "to it from now on", ep.url, sent["n"], len(choices))
        choices = sorted(choices, key=lambda c: c.get("index", 0))[:sent["n"]]
        texts = [((c.get("message") or {}).get("content") if chat else c.get("text")) or "" for c in choices]
        reasons = [finish_reason(c) for c in choices]
        usage = payload.get("usage") or {}
        counts = split_tokens(usage.get("completion_tokens"), texts, reasons, params.max_new_tokens)
        return [Sample(text=truncate_at_stop(t, params.stop).strip(), n_tokens=c, finish_reason=r)
                for t, r, c in zip(texts, reasons, counts, strict=True)]

    def _body(self, params: SamplingParams, n: int, seed: int, max_tokens: int, stop: Sequence[str]) -> dict:
        """A request body without its prompt or messages."""
        body = {"model": self.model_name, "max_tokens": max_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "n": n, "seed": seed}
        if stop:
            body["stop"] = list(stop)
        if params.top_k > 0:  # a vLLM/TGI extension; OpenAI's own API rejects unknown fields
            body["top_k"] = params.top_k
        # OpenAI's own parameters, sent only when set, so servers that lack them see the same
        # body as before; vLLM counts the penalties over each sample's output, as the hf backend does
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            body["logit_bias"] = {str(tok): bias for tok, bias in params.logit_bias.items()}
        return body

    @staticmethod
    def _choices(payload: dict, ep: Endpoint, path: str) -> list:
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            raise EndpointError(f"endpoint {ep.url} answered POST {path} with no choices "
                                f"({redact(json.dumps(payload))[:200]}); is it an OpenAI-compatible server?")
        return choices

    def _calc_sample(self, prompt: Prompt, params: SamplingParams, j: int, stop: threading.Event) -> Sample:
        """Sample ``j`` of ``prompt`` with the calculator: single-sample requests chained by ``calc_step``.

        Seeds: the first request takes ``seed + j``, as a single-sample top-up does; each
        continuation gets ``continuation_seed``. Every piece that asks for more has used at least
        one token (its ``=``), so a chain makes at most ``max_new_tokens + 1`` requests.
        """
        from synthtune.generation.calc_decoding import injection

        user = tuple(params.stop)
        sent = [*user, CALC_STOP] if CALC_STOP not in user else list(user)
        text, used, n_tokens, piece = "", 0, 0, 0
        while True:
            seed = params.seed + j if piece == 0 else continuation_seed(params.seed, j, piece)
            body = self._body(params, 1, seed, params.max_new_tokens - used, sent)
            body["prompt"] = prompt.text + text
            payload, ep = self._call("POST", "/completions", lambda _ep, b=body: b, stop, return_endpoint=True)
            choice = sorted(self._choices(payload, ep, "/completions"), key=lambda c: c.get("index", 0))[0]
            tokens = (payload.get("usage") or {}).get("completion_tokens")
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise EndpointError(f"endpoint {ep.url} reports no usage.completion_tokens; calculator: true needs "
                                    f"it to keep each sample within max_new_tokens over its continuation requests. "
                                    f"Use a server that reports usage (vLLM, synthtune serve) or set calculator: "
                                    f"false")
            try:
                ended_at = stop_string(choice, sent)
            except ValueError as err:
                raise EndpointError(f"endpoint {ep.url}: {err}; calculator: true needs it to tell its own stop at "
                                    f"{CALC_STOP!r} from EOS and your stop strings. Use a server that reports "
                                    f"stop_reason (vLLM, synthtune serve) or set calculator: false") from None
            n_tokens += tokens
            used += max(1, tokens)  # a piece that ended on a stop generated at least that token
            text, reason = calc_step(text, choice.get("text") or "", ended_at, finish_reason(choice), user,
                                     params.max_new_tokens - used, injection)
            if reason is not None:
                return Sample(text=text.strip(), n_tokens=n_tokens, finish_reason=reason)
            piece += 1

    # -- the retry loop ------------------------------------------------------------------------

    def _next_endpoint(self) -> Endpoint:
        return self.endpoints[next(self._rr) % len(self.endpoints)]

    def _call(self, method: str, path: str, body_for: Callable[[Endpoint], dict | None], stop: threading.Event,
              *, only: Endpoint | None = None, timeout: float | None = None, return_endpoint: bool = False):
        t0 = time.monotonic()
        last, ep = "", None
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise EndpointError("cancelled: another request of this batch failed")
            ep = only or self._next_endpoint()
            retry_after = None
            try:
                status, headers, data = self._http.request(ep, method, path, body_for(ep), self._headers,
                                                           timeout or self.request_timeout)
            except (OSError, http.client.HTTPException) as err:
                last = redact(_describe(err))
            except Exception as err:
                # http.client's own checks (a header value it refuses) quote the headers, key
                # included: re-raise without the original, so no traceback can print it
                raise EndpointError(f"endpoint {ep.url}: {method} {path} could not be sent: "
                                    f"{type(err).__name__}: {redact(str(err))}") from None
            else:
                data = redact_bytes(data)  # before anything parses, quotes or cuts the body
                if status == 200:
                    payload = self._json(ep, method, path, data)
                    return (payload, ep) if return_endpoint else payload
                msg = server_message(data)
                if status not in RETRY_STATUSES:
                    raise self._permanent(ep, method, path, status, msg)
                last, retry_after = f"HTTP {status}: {msg}", headers.get("retry-after")
            if attempt == self.max_retries:
                break
            delay = retry_delay(attempt, self.retry_backoff, retry_after)
            log.warning("endpoint %s: %s %s failed (%s); retry %d/%d in %.1f s", ep.url, method, path, last,
                        attempt + 1, self.max_retries, delay)
            stop.wait(delay)
        where = ep.url if only else f"{len(self.endpoints)} endpoint(s), last {ep.url}"
        tries = self.max_retries + 1
        raise EndpointError(f"gave up on {method} {path} after {tries} attempt{'s' if tries > 1 else ''} over "
                            f"{time.monotonic() - t0:.1f} s ({where}): {last}. Check that the servers are up and "
                            f"reachable (--endpoint), then rerun the same command: finished batches are kept "
                            f"and only the ones in flight are redone")

    def _json(self, ep: Endpoint, method: str, path: str, data: bytes) -> dict:
        try:
            payload = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):
            raise EndpointError(f"endpoint {ep.url} answered {method} {path} with something other than a JSON "
                                f"object ({server_message(data, 120)!r}); is the URL an OpenAI-"
                                f"compatible API base, ending in /v1?")
        return payload

    def _permanent(self, ep: Endpoint, method: str, path: str, status: int, msg: str) -> EndpointError:
        where = f"endpoint {ep.url}"
        if status in (401, 403):
            how = (f"set the key the server expects in ${self._key_env}" if self._key_env else
                   "it wants an API key: export it in an environment variable and pass --api-key-env NAME")
            return EndpointError(f"{where} rejected the API key (HTTP {status}: {msg}); {how}", status)
        if status == 404:
            return EndpointError(f"{where} has no {method} {path} for model {self.model_name!r} (HTTP 404: {msg}); "
                                 f"check that the URL is the API base (ending in /v1) and that --served-model "
                                 f"is a name listed by GET {ep.url}/models", status)
        hint = ""
        if path == "/chat/completions" and "template" in msg.lower():
            hint = "; the served model has no chat template: set prompt_format=plain"
        return EndpointError(f"{where} refused {method} {path} (HTTP {status}: {msg}){hint}. Fix the setting "
                             f"the message names and rerun: finished batches are kept", status)


def check_calculator_format(fmt: str) -> None:
    """The calculator works on plain prompts only: a ``ConfigError`` for ``chat``.

    It continues a partly written completion after each result; a chat endpoint applies the
    template itself, and the standard API has no way to continue an unfinished assistant message.
    """
    if fmt == "chat":
        raise ConfigError("calculator: true with backend: openai needs plain prompts (/v1/completions), but this "
                          "run's prompts are chat ones (prompt_format: auto means chat on a server): a chat "
                          "endpoint cannot continue a partly written assistant message, which the calculator "
                          "does after each result. Set prompt_format: plain, or calculator: false")


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out (request_timeout)"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__

