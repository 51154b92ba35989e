"""A real HTTP proxy in front of an OpenAI-compatible server that misbehaves on purpose (tests only).

    python tests/openai_proxy.py --upstream http://127.0.0.1:PORT [--port 0] [--fail-429 N] [--fail-503 N] [--ignore-n]

* ``--fail-429 N`` / ``--fail-503 N``: the first N distinct POST bodies get a 429 (with
  ``Retry-After: 1``), the next N a 503 (no Retry-After: the client's own backoff applies). A body
  fails at most once, so a client that retries always gets through: which requests fail is
  decided by arrival order alone, never by chance.
* ``--ignore-n``: ``n`` is dropped from request bodies, as servers that ignore it behave (the
  upstream then returns one choice).
* ``GET /proxy/stats``: what it did, as JSON.

It prints ``proxy on http://127.0.0.1:PORT`` to stderr once it listens.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

UPSTREAM_TIMEOUT_S = 120


class State:
    def __init__(self, upstream: str, fail_429: int, fail_503: int, ignore_n: bool):
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port
        self.budget = {429: fail_429, 503: fail_503}
        self.ignore_n = ignore_n
        self.failed: set[str] = set()
        self.stats = {"forwarded": 0, "429": 0, "503": 0, "n_dropped": 0, "upstream_errors": 0}
        self.lock = threading.Lock()

    def verdict(self, body: bytes) -> int | None:
        """429 or 503 for a body seen for the first time while the budget lasts, else None."""
        key = hashlib.sha256(body).hexdigest()
        with self.lock:
            if key in self.failed:
                return None
            for status in (429, 503):
                if self.budget[status] > 0:
                    self.budget[status] -= 1
                    self.failed.add(key)
                    self.stats[str(status)] += 1
                    return status
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - quiet; the stats say what happened
        pass

    @property
    def state(self) -> State:
        return self.server.state  # type: ignore[attr-defined]

    def do_GET(self):
        if self.path == "/proxy/stats":
            with self.state.lock:
                self._send(200, json.dumps(self.state.stats).encode())
            return
        self._forward(None)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = self.state.verdict(body)
        if status is not None:
            msg = {"error": {"message": f"injected {status} by the test proxy", "type": "proxy"}}
            self._send(status, json.dumps(msg).encode(), {"Retry-After": "1"} if status == 429 else {})
            return
        if self.state.ignore_n:
            data = json.loads(body)
            if data.pop("n", 1) != 1:
                with self.state.lock:
                    self.state.stats["n_dropped"] += 1
            body = json.dumps(data).encode()
        self._forward(body)

    def _forward(self, body: bytes | None):
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        conn = http.client.HTTPConnection(self.state.host, self.state.port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except OSError as err:
            with self.state.lock:
                self.state.stats["upstream_errors"] += 1
            self._send(502, json.dumps({"error": {"message": f"upstream: {err}"}}).encode())
            return
        finally:
            conn.close()
        with self.state.lock:
            self.state.stats["forwarded"] += 1
        self._send(resp.status, payload)

    def _send(self, status: int, data: bytes, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--fail-429", type=int, default=0)
    ap.add_argument("--fail-503", type=int, default=0)
    ap.add_argument("--ignore-n", action="store_true")
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.state = State(args.upstream, args.fail_429, args.fail_503, args.ignore_n)
    print(f"proxy on http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
