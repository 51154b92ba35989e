"""Load test: one real `synthtune serve` process (tiny-llama, loopback) under abuse, bounded in count and time.

200 half-open connections are held while normal clients keep asking (they must all succeed), an
oversized request is refused, and a poisoned request (seed 2^64, which failed its whole batch with a
500 before) arrives in the same batch window as good ones: it is refused alone, they succeed (a
request that passes validation and still fails its batch is tested in test_serve.py).
Afterwards the server's thread count and resident memory, read from /proc/<pid>/status, are back
at their baseline within a tolerance. About 20 s on 2 cores.

    PYTHONPATH=$PWD python -m pytest tests/test_serve_load.py -q
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_helpers import (  # noqa: E402
    connect,
    http_json,
    proc_status,
    raw_exchange,
    read_until_closed,
    start_servers,
)

pytestmark = pytest.mark.integration  # spawns a server and drives it with concurrent clients

HALF_OPEN = 200
CLIENTS, REQUESTS_EACH = 6, 4
READ_TIMEOUT_S = 3
#: after the load: resident memory may keep allocator caches from the generations, but not the
#: connections' worth (200 threads' stacks in the old server, or 200 buffered requests)
RSS_TOLERANCE_KIB = 48 << 10


def _fd_headroom(need: int) -> None:
    """This process holds HALF_OPEN sockets at once: raise the soft open-file limit (or skip)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the open-file hard limit {hard} is below the {need} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _good(i: int) -> dict:
    return {"model": "tiny-llama", "prompt": f"Problem: {i} apples?\nAnswer:", "max_tokens": 8, "temperature": 0,
            "n": 1 + i % 3}


def test_serve_under_load_returns_to_baseline(tmp_path):
    _fd_headroom(HALF_OPEN + 256)
    (server,) = start_servers([(tmp_path / "load.log", ["--read-timeout", str(READ_TIMEOUT_S), "--batch-window-ms",
                                                        "100", "--max-connections", str(HALF_OPEN + 64)])])
    url, pid = server.url, server.proc.pid
    half_open = []
    try:
        # warm up every thread and allocation the steady state has (worker, parse thread, sampler)
        for i in range(6):
            assert http_json(f"{url}/completions", "POST", _good(i))[0] == 200
        base = proc_status(pid)

        for i in range(HALF_OPEN):
            sock = connect(url, timeout=READ_TIMEOUT_S + 30)  # wall-clock guard, generous
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n"[: 10 + i % 50])
            half_open.append(sock)

        def client(c: int) -> list[int]:
            return [http_json(f"{url}/completions", "POST", _good(c * REQUESTS_EACH + j), timeout=60)[0]
                    for j in range(REQUESTS_EACH)]

        with ThreadPoolExecutor(CLIENTS) as pool:
            statuses = [s for batch in pool.map(client, range(CLIENTS)) for s in batch]
        assert statuses == [200] * (CLIENTS * REQUESTS_EACH)
        held = proc_status(pid)
        assert held["Threads"] == base["Threads"], (base, held)  # no thread per connection

        # an oversized request is refused by its budget, without generating
        huge = {"model": "tiny-llama", "prompt": ["Problem: 1+1?"] * 1000, "n": 128, "max_tokens": 2000}
        status, err = http_json(f"{url}/completions", "POST", huge)
        assert status == 400 and err["error"]["code"] == "request_too_large"

        # a poisoned request first into a batch window, good ones after it: only it fails
        poison = b'{"model": "tiny-llama", "prompt": "Problem: 1?", "max_tokens": 8, "seed": 18446744073709551616}'
        out: dict = {}

        def bad():
            reply = raw_exchange(url, b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(poison)
                                 + poison)
            out["bad"] = int(reply[9:12])

        def good(i):
            time.sleep(0.03)
            out[i] = http_json(f"{url}/completions", "POST", _good(i))[0]

        threads = [threading.Thread(target=bad)] + [threading.Thread(target=good, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert out == {"bad": 400, 0: 200, 1: 200, 2: 200}

        # the server drops every half-open connection after its read timeout (408, then close)
        replies = [read_until_closed(s) for s in half_open]
        assert all(r.startswith(b"HTTP/1.1 408 ") for r in replies), {r[:20] for r in replies}
        after = proc_status(pid)
        assert after["Threads"] == base["Threads"], (base, after)
        assert after["VmRSS"] <= base["VmRSS"] + RSS_TOLERANCE_KIB, (base, after)
        log = server.log.read_text()
        assert log.count('" 408 ') == HALF_OPEN and "Traceback" not in log
        print(json.dumps({"baseline": base, "holding_200": held, "after": after}))
    finally:
        for s in half_open:
            s.close()
        server.stop()
