"""Benchmark: ``synthtune score`` on 1,000 adversarial completions of 100 KB, and the old extraction.

Run (repo root):

    .venv/bin/python bench/score_adversarial_bench.py --out bench/results/score_adversarial_cpu.json

1. Writes ``--n-completions`` completions of ``--size-kb`` KB each (250 questions x 4 completions by
   default) built from the pathological shapes below, in the input format ``synthtune score`` reads
   (``question``, ``answer``, ``completions``), and runs the real CLI on it:
   ``synthtune score IN --out OUT --json`` in a child process, timed by the wall clock (interpreter
   start, reading, scoring, writing: everything a user waits for).
2. Compares extraction before and after the linear-time rewrite on SMALL inputs of every shape:
   ``extract_answer`` of ``--old-ref`` (``git show REF:synthtune/data/answers.py``, loaded as a
   module) against the current one, both in this process, best of 3 (old calls capped at
   ``--old-timeout-s`` by SIGALRM, which the regex engine honours).  The old code is polynomial in the
   input, so it only runs on a few KB; the ratio old/new is reported per shape and size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from synthtune.data.answers import _prepared, extract_answer  # noqa: E402

# The last commit before answer extraction was made linear-time (issue #12).
OLD_REF = "a59201a"

# name -> function of a size in characters; each was super-linear (or worse) in the old extraction,
# except "prose", the benign control.
SHAPES = {
    "long-word": lambda n: "A: 5 " + "b" * (n - 6) + ",",
    "digit-groups": lambda n: "12," * (n // 3),
    "star-run": lambda n: "1" + "*" * (n - 1),
    "spaced-stars": lambda n: "1 " + "* " * (n // 2 - 1),
    "frac-spaces": lambda n: "\\frac{1}{" + " " * (n - 10) + ",",
    "nested-boxes": lambda n: "\\boxed{" * (n // 7),
    "answer-chain": lambda n: "the answer is 1+1 " * (n // 18),
    "cut-off-repeat": lambda n: "123," * (n // 4) + "1",
    "prose": lambda n: ("Natalia sold 48/2 = 24 clips in May. She sold 48 + 24 = 72 clips altogether. "
                        "The answer is 72. ") * (n // 100),
}


class _Timeout(Exception):
    pass


def _expire(signum, frame):
    raise _Timeout


def _time_call(fn, text: str, timeout_s: float, repeats: int = 3) -> float | None:
    """Best wall time of ``repeats`` calls in seconds; None when a call runs past ``timeout_s``."""
    best = None
    for _ in range(repeats):
        signal.signal(signal.SIGALRM, _expire)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            start = time.perf_counter()
            fn(text)
            took = time.perf_counter() - start
        except _Timeout:
            return None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        best = took if best is None else min(best, took)
        if took > timeout_s / 3:  # one slow call says enough
            break
    return best


def _old_extract(ref: str, workdir: Path):
    source = subprocess.run(["git", "show", f"{ref}:synthtune/data/answers.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = workdir / "old_answers.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_answers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.extract_answer


def _new_call(text: str) -> None:
    _prepared.cache_clear()  # every call does the whole work (score's three extractors share one trim)
    extract_answer(text)


def compare_old_new(ref: str, sizes: list[int], timeout_s: float, workdir: Path, full_chars: int) -> list[dict]:
    old = _old_extract(ref, workdir)
    rows = []
    for name, make in SHAPES.items():
        gave_up = False
        full = make(full_chars)
        rows.append({"shape": name, "chars": len(full), "old_s": None, "new_s": _time_call(_new_call, full, 60),
                     "ratio": None, "same_answer": None, "old_not_run": True})
        print(f"{name:15s} {len(full):6d} chars  new only: {_fmt(rows[-1]['new_s'], 60)}", flush=True)
        for size in sizes:
            text = make(size)
            new_s = _time_call(_new_call, text, timeout_s)
            old_s = None if gave_up else _time_call(old, text, timeout_s)
            gave_up = gave_up or old_s is None
            rows.append({"shape": name, "chars": len(text), "old_s": old_s, "new_s": new_s,
                         "ratio": round(old_s / new_s, 1) if old_s is not None and new_s else None,
                         "same_answer": (old(text) == extract_answer(text)) if old_s is not None else None})
            print(f"{name:15s} {len(text):6d} chars  old {_fmt(old_s, timeout_s):>12s}  new {_fmt(new_s, timeout_s)}",
                  flush=True)
    return rows


def _fmt(seconds: float | None, timeout_s: float) -> str:
    return f"> {timeout_s:g} s" if seconds is None else f"{seconds * 1000:.2f} ms"


def write_input(path: Path, n_completions: int, size_kb: int, per_question: int = 4) -> dict[str, int]:
    names = list(SHAPES)
    counts = dict.fromkeys(names, 0)
    with open(path, "w", encoding="utf-8") as fh:
        for q in range(0, n_completions, per_question):
            completions = []
            for i in range(q, min(q + per_question, n_completions)):
                name = names[i % len(names)]
                counts[name] += 1
                completions.append(SHAPES[name](size_kb * 1000))
            fh.write(json.dumps({"question": f"adversarial question {q // per_question}", "answer": "#### 72",
                                 "completions": completions}) + "\n")
    return counts


def run_cli(in_path: Path, out_path: Path) -> dict:
    cli = shutil.which("synthtune", path=str(Path(sys.executable).parent)) or "synthtune"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run([cli, "score", str(in_path), "--out", str(out_path), "--json"], capture_output=True,
                          text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"synthtune score failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "summary": json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-completions", type=int, default=1000)
    parser.add_argument("--size-kb", type=int, default=100)
    parser.add_argument("--old-ref", default=OLD_REF)
    parser.add_argument("--old-sizes", default="250,500,1000,2000,4000", help="characters, comma-separated")
    parser.add_argument("--old-timeout-s", type=float, default=30.0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        in_path, out_path = workdir / "adversarial.jsonl", workdir / "scored.jsonl"
        counts = write_input(in_path, args.n_completions, args.size_kb)
        size_mb = in_path.stat().st_size / 1e6
        print(f"input: {args.n_completions} completions x {args.size_kb} KB = {size_mb:.0f} MB, shapes {counts}",
              flush=True)
        cli = run_cli(in_path, out_path)
        print(f"synthtune score: {cli['wall_s']} s wall ({cli['wall_s'] / args.n_completions * 1000:.1f} ms per "
              f"completion), summary {cli['summary']}", flush=True)
        sizes = [int(s) for s in args.old_sizes.split(",")]
        rows = compare_old_new(args.old_ref, sizes, args.old_timeout_s, workdir, args.size_kb * 1000)

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0]},
        "input": {"n_completions": args.n_completions, "size_kb": args.size_kb, "mb": round(size_mb, 1),
                  "shapes": counts},
        "cli": cli,
        "old_ref": args.old_ref,
        "old_timeout_s": args.old_timeout_s,
        "old_vs_new": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
