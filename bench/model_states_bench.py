"""Per-rank model-state bytes that DeepSpeed allocates on 2 ranks vs `synthtune memory`'s estimate.

    PYTHONPATH=$PWD .venv/bin/python bench/model_states_bench.py --model smollm2-135m-instruct \
        --out bench/results/model_states_cpu_2rank_smollm2.json

Each case is a real 1-step training run of fine_tune/train.py under ``accelerate launch`` on 2 CPU
ranks over gloo, fp32: ZeRO-3 and ZeRO-2 with DeepSpeed's defaults, and the shipped
configs/accelerate/zero3_2proc_cpu.yaml (persistence threshold 0). The run's summary.json holds what every rank held
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
# (label, launcher): DeepSpeed's defaults at ZeRO-3 and ZeRO-2 (persistence threshold 1e5
# elements), and the shipped zero3_2proc_cpu.yaml (its ds_zero3_cpu.json sets the threshold to 0)
LAUNCHERS = [("ZeRO-3", {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True}), ("ZeRO-2", {"zero_stage": 2}),
             ("ZeRO-3, threshold 0", REPO / "configs" / "accelerate" / "zero3_2proc_cpu.yaml")]
METHODS = ("lora", "full")


def launcher_file(spec, tmp: Path, label: str) -> Path:
    if isinstance(spec, Path):
        return spec
    cfg = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
           "deepspeed_config": {"offload_optimizer_device": "none", "offload_param_device": "none", **spec},
           "mixed_precision": "no", "num_machines": 1, "num_processes": 2, "machine_rank": 0,
           "main_process_ip": "127.0.0.1", "rdzv_backend": "static", "same_network": True}
    path = tmp / f"{label.replace(' ', '_').replace(',', '')}.json"
    path.write_text(json.dumps(cfg))  # accelerate reads JSON launcher configs too
    return path
KEYS = ("weights", "gradients", "optimizer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(model: str, label: str, config: Path, method: str, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), str(REPO / "fine_tune" / "train.py"), "--config", str(REPO / "configs" / "train" / "smoke.yaml"),
           f"model={model}", f"method={method}", "lora_r=16", "max_steps=1", "gradient_accumulation_steps=1",
           "per_device_batch_size=1", "max_length=256", "limit=8", "eval_limit=2", "eval_steps=0", "save_steps=0",
           "eval_accuracy_samples=0", "trace_memory=false", "log_with=none", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"{label} {method} failed:\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"launcher": label, "zero_stage": s["zero_stage"], "method": method, "model": model, "params": s["total_params"],
            "trainable": s["trainable_params"], "estimate": s["memory"]["estimate"]["model_states_bytes"],
            "measured": s["memory"]["model_states_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec in LAUNCHERS:
            config = launcher_file(spec, Path(tmp), label)
            for method in METHODS:
                rows.append(run_case(args.model, label, config, method, Path(tmp) / f"{config.stem}_{method}"))
    print("| launcher | method | rank | " + " | ".join(f"{k} measured / estimate" for k in KEYS) + " | gathered (ZeRO-3 cache) |")
    print("|---|---|---|" + "---|" * (len(KEYS) + 1))
    for r in rows:
        for m in r["measured"]:
            cells = [f"{m[k]:,} / {r['estimate'][k]:,} ({m[k] / max(r['estimate'][k], 1):.4f})" for k in KEYS]
            print(f"| {r['launcher']} | {r['method']} | {m['rank']} | " + " | ".join(cells) + f" | {m['gathered']:,} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
