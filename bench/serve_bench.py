"""Synthesis throughput: the in-process `hf` backend vs the `openai` backend over 1 and 2 `synthtune serve` processes.

Run (repo root; PASSIVE keeps idle OpenMP threads from spinning on a shared machine):

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_bench.py --threads 1 --out bench/results/serve_bench_cpu_t1.json
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_bench.py --threads 2 --out bench/results/serve_bench_cpu_t2.json

With --threads 1 every server has one core of its own (``serve x2`` then uses two cores, as two
machines would add capacity); with --threads 2 both variants share the same two cores.

Every variant runs the same `run_synthesis` job (tiny-llama, the same questions, prompts, k, seed
and token budget) into a fresh output folder; the backend is built before the clock starts (model
loaded, servers up), so the time is generation plus the loop. The random tiny model almost never
stops early, so nearly every sample costs the full --max-new-tokens and the variants do equal work.

Variants (threads = torch CPU threads):

* ``hf bs=1``: the in-process backend as `synthtune synth` builds it (one prompt per sampler call);
* ``hf bs=B``: the same with B prompts per sampler call (what server-side batching can reach);
* ``serve x1``: one server with --threads T, the backend sending --concurrency requests at once;
* ``serve x2``: two servers with --threads T/2 each, requests round-robin over both.

On one machine the two servers share its cores, so ``serve x2`` shows the cost of splitting, not
the scaling of two machines; with one server per GPU node the endpoints add capacity instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_io import emit, machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from synthtune.config import SynthConfig  # noqa: E402
from synthtune.jobs.serve import READY  # noqa: E402
from synthtune.synth.pipeline import run_synthesis  # noqa: E402
from tests.server_helpers import serve_command, spawn  # noqa: E402


def job(out: Path, args, **kw) -> SynthConfig:
    return SynthConfig(model="tiny-llama", questions="bundled:train", exemplar_pool_size=12, limit=args.questions,
                       k=args.k, rounds=1, shots=args.shots, prompt_format="plain", max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, seed=0, out=str(out), **kw)


def timed(cfg: SynthConfig, backend) -> dict:
    t0 = time.perf_counter()
    summary = run_synthesis(cfg, backend=backend, progress=False, log=lambda m: None)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "completions": summary["samples"], "new_tokens": summary["new_tokens"],
            "completions_per_s": round(summary["samples"] / seconds, 3),
            "tokens_per_s": round(summary["new_tokens"] / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8, help="questions per pipeline batch")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai backend)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in total for each variant")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all variants; best and median reported")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from synthtune.models import load_model
    from synthtune.synth.backends import HFBackend
    from synthtune.synth.openai_backend import OpenAIBackend

    torch.set_num_threads(args.threads)
    lm = load_model("tiny-llama", device="cpu")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="synthtune-serve-bench-") as tmp:
        tmp = Path(tmp)
        per_server = max(1, args.threads // 2)
        servers = [spawn(serve_command("--model", "tiny-llama", "--port", "0", "--threads", str(t),
                                       "--max-batch", str(args.concurrency * args.k)), tmp / f"s{i}.log", READY)
                   for i, t in enumerate((args.threads, per_server, per_server))]
        try:
            variants = {
                "hf bs=1": (lambda: HFBackend(lm, batch_size=1), "hf", []),
                f"hf bs={args.batch_size}": (lambda: HFBackend(lm, batch_size=args.batch_size), "hf", []),
                "serve x1": (None, "openai", [servers[0].url]),
                "serve x2": (None, "openai", [servers[1].url, servers[2].url]),
            }
            for rep in range(args.repeats):
                for name, (make, kind, endpoints) in variants.items():
                    extra = dict(backend="openai", endpoints=endpoints, concurrency=args.concurrency) if endpoints \
                        else {}
                    cfg = job(tmp / f"{name.replace(' ', '_')}-{rep}", args, **extra)
                    backend = make() if make else OpenAIBackend(endpoints, "tiny-llama", concurrency=args.concurrency)
                    try:
                        runs.setdefault(name, []).append(timed(cfg, backend))
                    finally:
                        if kind == "openai":
                            backend.close()
                    print(f"{name}: {runs[name][-1]}", file=sys.stderr, flush=True)
        finally:
            for s in servers:
                s.stop()
    result = {**machine(torch=torch.__version__), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "threads": {"hf": args.threads, "serve x1": args.threads, "serve x2": f"{per_server} per server"},
              **summarize(runs)}
    emit(result, args.out)


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Best and median per variant; the ratios use the medians (other jobs may share the machine)."""
    median = {name: statistics.median(x["completions_per_s"] for x in r) for name, r in runs.items()}
    return {"best": {name: max(r, key=lambda x: x["completions_per_s"]) for name, r in runs.items()},
            "median_completions_per_s": median,
            "ratio_vs_hf_bs1": {name: round(m / median["hf bs=1"], 2) for name, m in median.items()},
            "ratio_x2_vs_x1": round(median["serve x2"] / median["serve x1"], 2),
            "runs": runs}

if __name__ == "__main__":
    main()
