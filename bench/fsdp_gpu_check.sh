#!/usr/bin/env bash
# FSDP2 on N GPUs against 1 GPU, through the real entry point (needs a machine with >= 2 GPUs):
#   NGPU=2 bash bench/fsdp_gpu_check.sh 2>&1 | tee /tmp/fsdp_gpu_check.log
# CPU-only machines cannot run it: accelerate makes an FSDP launch on CPUs plain DDP (see
# tests/multirank_entry.py), and the CPU test (tests/test_multirank_extra.py) runs the same
# checks with accelerate's FSDP2 path enabled on gloo. This script is that test on GPUs, with
# accelerate unmodified: configs/accelerate/fsdp.yaml as shipped (FSDP2, FULL_STATE_DICT,
# cpu_ram_efficient_loading), fp32 so the comparison is tight.
#
# It checks, and exits non-zero on the first failure:
#   1. the run is really FSDP (summary.json distributed_type), not a DDP fallback;
#   2. N ranks x 2 accumulation steps train like 1 GPU x 2N (losses rel 1e-4: GPU reductions
#      are not bitwise reproducible across world sizes; learning rates exactly);
#   3. stopped at step 2 and resumed (resume_from=latest), it ends where the 1-GPU run ends;
#   4. the saved adapter (final/) equals the 1-GPU adapter (rtol 1e-3), and the in-training
#      accuracy (synced generation: ranks whose answers end first keep joining) matches.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-2}
OUT=${OUT:-/tmp/fsdp_gpu_check}
ACC=${ACCELERATE:-.venv/bin/accelerate}
PY=${PYTHON:-.venv/bin/python}
rm -rf "$OUT"; mkdir -p "$OUT"
COMMON=(max_steps=4 eval_steps=0 logging_steps=1 trace_memory=false log_with=none precision=fp32
        eval_accuracy_samples=6 eval_max_new_tokens=16 save_steps=2)
"$ACC" launch --config_file configs/accelerate/single_gpu.yaml --mixed_precision no fine_tune/train.py \
  --config configs/train/smoke.yaml "${COMMON[@]}" gradient_accumulation_steps=$((2 * NGPU)) output_dir="$OUT/one"
for extra in stop_at_step=2 resume_from=latest; do
  "$ACC" launch --config_file configs/accelerate/fsdp.yaml --num_processes "$NGPU" --mixed_precision no \
    fine_tune/train.py --config configs/train/smoke.yaml "${COMMON[@]}" gradient_accumulation_steps=2 \
    output_dir="$OUT/fsdp" "$extra"
done
"$PY" - "$OUT" "$NGPU" <<'EOF'
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file

out, ngpu = Path(sys.argv[1]), int(sys.argv[2])
one, fsdp = (json.loads((out / d / "summary.json").read_text()) for d in ("one", "fsdp"))
def logged(s, k):
    return {h["step"]: h[k] for h in s["history"] if k in h}
assert (fsdp["distributed_type"], fsdp["processes"]) == ("FSDP", ngpu), (fsdp["distributed_type"], fsdp["processes"])
for k in ("loss", "lr"):
    a, b = logged(fsdp, k), logged(one, k)
    assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= 1e-4 * abs(b[s]) for s in b), (k, a, b)
assert fsdp["final_eval_accuracy"] == one["final_eval_accuracy"], (fsdp["final_eval_accuracy"], one["final_eval_accuracy"])
mine, ref = (load_file(out / d / "final" / "adapter_model.safetensors") for d in ("fsdp", "one"))
assert mine.keys() == ref.keys() and mine
for key in ref:
    torch.testing.assert_close(mine[key], ref[key], rtol=1e-3, atol=1e-6)
print(f"FSDP2 x{ngpu} == 1 GPU: losses {list(logged(fsdp, 'loss').values())}, accuracy {fsdp['final_eval_accuracy']}")
EOF
