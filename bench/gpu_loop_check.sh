#!/usr/bin/env bash
# Device run (one call; carry .whl and .gpu as for gpu_train_check.sh, whose header says how to fill them):
#   set -o pipefail; bash bench/gpu_loop_check.sh 2>&1 | tee $OUT/log.txt
#   GPU_LOOP_RUNS="llama1b_lora_packed sampling" ...   # a subset, in the script's order
# CPU dry run of the same script (tiny shapes, a few steps, no wheel install), e.g. before a device run:
#   GPU_CHECK_DRY=1 PYTHON=.venv/bin/python OUT=/tmp/gpuloop bash bench/gpu_loop_check.sh
#
# Issue 18's GPU part: bench/loop_bench.py (train() against a plain HF + PEFT loop on the same
# batches, steady-state tokens/s and peak allocated memory) on random-init real shapes in bf16,
# from the Llama-3.2-1B recipe (configs/train/llama_1b_lora.yaml: LoRA r=16 all-linear, 8 x 512):
#   llama1b_lora_packed     the recipe as it is (packing on); both loss_impl values, and the loss
#                           memory probe (standard vs chunked, one packed batch of 8 rows)
#   llama1b_lora_bucketed   packing off, batches padded to a multiple of 64
#   llama1b_full_packed     full fine-tuning, bf16-mixed (fp32 master weights)
#   llama1b_full_bucketed
#   smollm2_lora_packed     the SmolLM2-135M shape (.gpu/smollm2-shape: config and tokenizer) on the same recipe
#   smollm2_full_packed
#   sampling                bench/sampling_bench.py, HF generate vs sample_k's shared prefill, each also
#                           once under torch.profiler (op tables in $OUT/profile/)
# The Llama shape has no tokenizer here (no hub): it trains on tiny-llama's, in the plain format,
# as gpu_train_check.sh does. Data: GSM8K train from .gpu/gsm8k when carried, else the bundled 36 rows.
# Each run writes $OUT/<run>.json (commit as bench/results/loop_bench_<card>_<run>.json and
# sampling_bench_<card>_profile.json, with the profile tables: see bench/README.md); a failing or
# timed-out run is logged and the script goes on, and a timed-out loop_bench run leaves the runs it
# finished in its JSON (marked "partial": true). Runs go in RUNS' default order, the most wanted
# first; the budget (8 min) cuts the tail. About 5-8 min on an H200 (not yet run on one).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_loop_check_out}
mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-480}   # seconds for the whole script; a run gets its cap or what is left
PY=${PYTHON:-python3}
RUNS=${GPU_LOOP_RUNS:-llama1b_lora_packed sampling llama1b_full_packed llama1b_lora_bucketed smollm2_lora_packed llama1b_full_bucketed smollm2_full_packed}
T0=$SECONDS
. bench/gpu_env.sh   # wheels, environment, $OUT/env.txt, slot

LLAMA=configs/models/llama-3.2-1b-shape
SMOL=.gpu/smollm2-shape
STEPS=30 WARMUP=10 LOSS_ROWS=8 FULL_PREC=bf16-mixed SAMPLING="--device cuda --repeats 2"
DATA=(data=bundled:train)
if [ -f .gpu/gsm8k/train.jsonl ]; then
  export SYNTHTUNE_GSM8K_DIR=$ROOT/.gpu/gsm8k
  DATA=(data=gsm8k:train limit=2000)   # enough packed rows for every step without re-reading an epoch
fi
if [ "$DRY" = 1 ]; then
  # same structure, tiny dims, real vocab sizes
  M=/tmp/gpu_loop_check_models
  mkdir -p $M/llama $M/smol
  $PY - "$M" "$SMOL" <<'EOF'
import json, shutil, sys
from pathlib import Path
m, smol = Path(sys.argv[1]), Path(sys.argv[2])
tiny = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
ll = json.loads(Path("configs/models/llama-3.2-1b-shape/config.json").read_text()) | tiny
(m / "llama" / "config.json").write_text(json.dumps(ll, indent=1))
if (smol / "config.json").exists():
    for f in smol.glob("*.json"):
        shutil.copy(f, m / "smol" / f.name)
    (m / "smol" / "config.json").write_text(json.dumps(json.loads((smol / "config.json").read_text()) | tiny, indent=1))
EOF
  LLAMA=$M/llama; SMOL=$M/smol; STEPS=4 WARMUP=2 LOSS_ROWS=1 FULL_PREC=fp32
  SAMPLING="--device cpu --threads 2 --prompt-len 64 --new 4 --k 2"
fi
RECIPE=(--config configs/train/llama_1b_lora.yaml --set random_init=true --steps $STEPS --warmup $WARMUP)
for kv in "${DATA[@]}"; do RECIPE+=(--set "$kv"); done
[ "$DRY" = 1 ] && RECIPE+=(--set per_device_batch_size=2 --set max_length=128)
LLAMA_TOK=(--models $LLAMA --set tokenizer=tiny-llama --set prompt_format=plain)
BUCKETED=(--set packing=false --set pad_to_multiple_of=64)
FULL=(--set method=full --set precision=$FULL_PREC --set learning_rate=2.0e-5)

# bench NAME CAP_S [loop_bench.py args...]
bench() {
  local name=$1 cap=$2; shift 2
  local t; t=$(slot "$name" "$cap"); [ "$t" = 0 ] && return
  local s=$SECONDS
  echo "=== $name: start $(date -u +%T), timeout ${t}s"
  timeout -k 5 "$t" $PY bench/loop_bench.py "${RECIPE[@]}" "$@" --out "$OUT/$name.json" >/dev/null
  local rc=$?
  echo "=== $name: rc=$rc after $((SECONDS - s))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
}

bench llama1b_lora_packed 120 "${LLAMA_TOK[@]}" --loss-batch $LOSS_ROWS
t=$(slot sampling 90)
if [ "$t" != 0 ]; then
  s=$SECONDS
  echo "=== sampling: start $(date -u +%T), timeout ${t}s"
  # shellcheck disable=SC2086  # SAMPLING is a list of flags
  timeout -k 5 "$t" $PY bench/sampling_bench.py --random-init $SAMPLING --variants workshop,hf,ours \
    --profile "$OUT/profile" --out "$OUT/sampling.json"
  echo "=== sampling: rc=$? after $((SECONDS - s))s"
fi
bench llama1b_full_packed 110 "${LLAMA_TOK[@]}" "${FULL[@]}" --loss-batch 0
bench llama1b_lora_bucketed 75 "${LLAMA_TOK[@]}" "${BUCKETED[@]}" --impls standard --loss-batch 0
if [ -f "$SMOL/tokenizer.json" ]; then
  bench smollm2_lora_packed 75 --models $SMOL --set prompt_format=plain --loss-batch 0
else
  echo "=== smollm2 runs SKIPPED: $SMOL/ missing (see gpu_train_check.sh's header)"
fi
bench llama1b_full_bucketed 90 "${LLAMA_TOK[@]}" "${FULL[@]}" "${BUCKETED[@]}" --impls standard --loss-batch 0
[ -f "$SMOL/tokenizer.json" ] && bench smollm2_full_packed 75 --models $SMOL --set prompt_format=plain "${FULL[@]}" --loss-batch 0

echo "=== all done after $((SECONDS - T0))s"
ls -la "$OUT" "$OUT/profile" 2>/dev/null || true
