"""Real server processes for the tests: `synthtune serve` and the failure-injecting proxy.

Every process logs to a file, is waited for with a deadline, and is stopped by whoever started it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from synthtune.jobs.serve import READY

HERE = Path(__file__).resolve().parent
SYNTHTUNE = str(Path(sys.executable).parent / "synthtune")
KEY_ENV = "SYNTHTUNE_TEST_API_KEY"
PROXY_READY = r"proxy on (http://127\.0\.0\.1:\d+)"


@dataclass
class ServerProcess:
    """A child process that printed a readiness line holding its URL; its output goes to ``log``."""

    proc: subprocess.Popen
    url: str
    log: Path

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if re.search(pattern, line)]

    def logged(self, pattern: str, n: int = 1, timeout: float = 10) -> list[str]:
        """``lines``, once ``n`` match (or what matches after ``timeout``): the server writes a request's
        access line after the client has its response, so on a loaded machine it can come a moment later."""
        def enough():
            found = self.lines(pattern)
            return found if len(found) >= n else None

        return wait_for(enough, timeout) or self.lines(pattern)

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


def start_servers(specs: list[tuple[Path, list[str]]], env: dict | None = None, *, model: str = "tiny-llama",
                  host: str = "127.0.0.1") -> list[ServerProcess]:
    """Start `synthtune serve` processes (tiny-llama by default) one after another on free loopback ports."""
    started: list[ServerProcess] = []
    try:
        for log, args in specs:
            # one torch thread per server: the tests run several servers on a 2-core machine
            cmd = serve_command("--model", model, "--host", host, "--port", "0", "--threads", "1", *args)
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
    status, _, reply = http_call(url, method, body, key=key, raw=raw, timeout=timeout)
    return status, reply


def http_call(url: str, method: str = "GET", body=None, key: str | None = None, raw: bytes | None = None,
              timeout: float = 120) -> tuple[int, dict, dict]:
    """Like ``http_json``, also returning the response headers (lower-cased names)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, parts.path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
    finally:
        conn.close()


def connect(url: str, timeout: float = 30) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes the connection (``socket.timeout`` if it never does)."""
    reply = b""
    while len(reply) < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        reply += chunk
    return reply


def raw_exchange(url: str, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes on a fresh connection, half-close, and return all the server answers."""
    with connect(url, timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock)


def concurrently(fn: Callable, items: Sequence, timeout: float = 120) -> list:
    """``fn(item)`` for every item on threads released together (a barrier), results in item order.

    An exception in any call is raised here, not lost in its thread."""
    gate = threading.Barrier(len(items))

    def call(item):
        gate.wait(timeout=30)
        return fn(item)

    with ThreadPoolExecutor(len(items)) as pool:
        futures = [pool.submit(call, item) for item in items]
        return [f.result(timeout=timeout) for f in futures]


def proc_status(pid: int) -> dict[str, int]:
    """Threads and resident memory (KiB) of a process, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def wait_for(predicate, timeout: float, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None
