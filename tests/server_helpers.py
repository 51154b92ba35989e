"""Real server processes for the tests: `synthtune serve` and the failure-injecting proxy.

Every process logs to a file, is waited for with a deadline, and is stopped by whoever started it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from synthtune.serve import READY, ServerProcess, serve_command, spawn

HERE = Path(__file__).resolve().parent
SYNTHTUNE = str(Path(sys.executable).parent / "synthtune")
KEY_ENV = "SYNTHTUNE_TEST_API_KEY"
PROXY_READY = r"proxy on (http://127\.0\.0\.1:\d+)"


def start_servers(specs: list[tuple[Path, list[str]]], env: dict | None = None) -> list[ServerProcess]:
    """Start tiny-llama `synthtune serve` processes one after another on free loopback ports."""
    started: list[ServerProcess] = []
    try:
        for log, args in specs:
            # one torch thread per server: the tests run several servers on a 2-core machine
            cmd = serve_command("--model", "tiny-llama", "--host", "127.0.0.1", "--port", "0", "--threads", "1", *args)
            started.append(spawn(cmd, log, READY, env=env or dict(os.environ)))
    except BaseException:
        for p in started:
            p.stop(signal.SIGKILL)
        raise
    return started


def start_proxy(upstream: str, log: Path, *args: str) -> ServerProcess:
    cmd = [sys.executable, str(HERE / "openai_proxy.py"), "--upstream", upstream.removesuffix("/v1"), *args]
    proc = spawn(cmd, log, PROXY_READY, env=dict(os.environ), timeout=60)
    proc.url += "/v1"
    return proc


def http_json(url: str, method: str = "GET", body=None, key: str | None = None, raw: bytes | None = None,
              timeout: float = 120) -> tuple[int, dict]:
    """One request to a test server; returns (status, JSON body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, parts.path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()
