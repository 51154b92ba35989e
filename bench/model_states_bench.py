"""Per-rank model-state bytes that DeepSpeed allocates on 2 ranks vs `synthtune memory`'s estimate.

    PYTHONPATH=$PWD .venv/bin/python bench/model_states_bench.py --model smollm2-135m-instruct \
        --out bench/results/model_states_2rank_cpu.json

Each case is a real 1-step training run of fine_tune/train.py under
``accelerate launch --config_file configs/accelerate/zero3_2proc_cpu.yaml --zero_stage N`` (2 CPU
ranks over gloo, fp32). The run's summary.json holds what every rank held
(``memory.model_states_bytes``: ZeRO-3 partitions, gradient partitions, optimizer states and
master partitions, counted by synthtune.memory.partitions) and the estimator's numbers for the
same run (``memory.estimate.model_states_bytes``). This prints both, per rank, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [(3, "lora"), (2, "lora"), (3, "full"), (2, "full")]
KEYS = ("weights", "gradients", "optimizer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(model: str, stage: int, method: str, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "zero3_2proc_cpu.yaml"), "--main_process_port", str(free_port()),
           "--zero_stage", str(stage), *(["--zero3_init_flag", "false"] if stage != 3 else []),
           str(REPO / "fine_tune" / "train.py"), "--config", str(REPO / "configs" / "train" / "smoke.yaml"),
           f"model={model}", f"method={method}", "lora_r=16", "max_steps=1", "gradient_accumulation_steps=1",
           "per_device_batch_size=1", "max_length=256", "limit=8", "eval_limit=2", "eval_steps=0", "save_steps=0",
           "eval_accuracy_samples=0", "trace_memory=false", "log_with=none", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{stage=} {method=} failed:\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"zero_stage": stage, "method": method, "model": model, "params": s["total_params"],
            "trainable": s["trainable_params"], "estimate": s["memory"]["estimate"]["model_states_bytes"],
            "measured": s["memory"]["model_states_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage, method in CASES:
            rows.append(run_case(args.model, stage, method, Path(tmp) / f"z{stage}_{method}"))
    print("| ZeRO | method | rank | " + " | ".join(f"{k} measured / estimate" for k in KEYS) + " | gathered (ZeRO-3 cache) |")
    print("|---|---|---|" + "---|" * (len(KEYS) + 1))
    for r in rows:
        for m in r["measured"]:
            cells = [f"{m[k]:,} / {r['estimate'][k]:,} ({m[k] / max(r['estimate'][k], 1):.4f})" for k in KEYS]
            print(f"| {r['zero_stage']} | {r['method']} | {m['rank']} | " + " | ".join(cells) + f" | {m['gathered']:,} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
