"""Real server processes for the tests: `synthtune serve` and the failure-injecting proxy.

Each process logs to a file (a pipe nobody drains would fill and block the server); the helpers
wait for its readiness line with a deadline and always stop what they started.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
SYNTHTUNE = str(Path(sys.executable).parent / "synthtune")
START_TIMEOUT_S = 180  # model import and load on a busy 2-core machine
KEY_ENV = "SYNTHTUNE_TEST_API_KEY"


@dataclass
class Proc:
    proc: subprocess.Popen
    url: str
    log: Path

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if re.search(pattern, line)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


def launch(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, logging to ``log``; ``wait_ready`` then waits for it."""
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env or dict(os.environ),
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen, log: Path, ready: str, timeout: float = START_TIMEOUT_S) -> Proc:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(ready, log.read_text(errors="replace"))
        if match:
            return Proc(proc, match.group(1), log)
        if proc.poll() is not None:
            raise AssertionError(f"{log.name}: exited with {proc.returncode} before it was ready:\n"
                                 f"{log.read_text()[-3000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    raise AssertionError(f"{log.name}: not ready within {timeout} s:\n{log.read_text()[-3000:]}")


def serve_cmd(*args: str) -> list[str]:
    # one torch thread per server: the tests run several servers on a 2-core machine
    return [SYNTHTUNE, "serve", "--model", "tiny-llama", "--host", "127.0.0.1", "--port", "0", "--threads", "1",
            *args]


SERVE_READY = r"serving on (http://127\.0\.0\.1:\d+/v1)"
PROXY_READY = r"proxy on (http://127\.0\.0\.1:\d+)"


def start_servers(specs: list[tuple[Path, list[str]]], env: dict | None = None) -> list[Proc]:
    """Start several `synthtune serve` processes at once (their loads overlap), wait for all."""
    procs = [launch(serve_cmd(*args), log, env) for log, args in specs]
    started = []
    try:
        for p, (log, _) in zip(procs, specs, strict=True):
            started.append(wait_ready(p, log, SERVE_READY))
    except BaseException:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        raise
    return started


def start_proxy(upstream: str, log: Path, *args: str) -> Proc:
    base = upstream.removesuffix("/v1")
    p = launch([sys.executable, str(HERE / "openai_proxy.py"), "--upstream", base, *args], log)
    proc = wait_ready(p, log, PROXY_READY, timeout=60)
    proc.url = proc.url + "/v1"
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
