#!/usr/bin/env bash
# Device run (one call, wheels in .whl/ and the padding bench's inputs in .gpu/ carried, see below):
#   set -o pipefail; bash bench/gpu_train_check.sh 2>&1 | tee $OUT/log.txt
#   GPU_CHECK_RUNS="ul2_lora_single ul2_lora_zero3 padding" ...   # a subset, in the script's order
# CPU dry run of the same script (tiny shapes, 2 steps, no wheel install):
#   GPU_CHECK_DRY=1 PYTHON=.venv/bin/python OUT=/tmp/gpucheck bash bench/gpu_train_check.sh
#
# Issue 5, part 6 (GPU check): synthtune's real training loop (fine_tune/train.py under
# accelerate launch) in bf16 on random-init real shapes, no weights needed:
#   ul2_lora_single  Flan-UL2 shape (configs/models/flan-ul2), LoRA r=8 on q,v, batch 2 x 256, one GPU
#   ul2_lora_zero3   the same run under DeepSpeed ZeRO-3 in one process (configs/accelerate/zero3_1proc.yaml):
#                    same seed, same random-init weights, so its losses must track ul2_lora_single's
#   llama1b_lora     Llama-3.2-1B shape (configs/models/llama-3.2-1b-shape), LoRA all-linear r=16, 8 x 512
#   llama1b_full     the same shape, full fine-tuning, bf16-mixed (fp32 master weights)
#   padding          bench/padding_bench.py on the GPU: SmolLM2-135M shape (random init, bf16), LoRA and
#                    full, workshop (pad to 256) vs length-grouped vs grouped + pad to a multiple of 64
#                    vs packed, on GSM8K train
# The padding bench runs last: it gets whatever time is left. Each run's summary.json is copied
# to $OUT/<run>.json (commit it as bench/results/gpu_train_<card>_<run>.json, the padding bench's as
# padding_bench_<card>.json: see bench/README.md); a failing or timed-out run is logged and the script goes on. Each launch passes --mixed_precision bf16, matching the loop's own
# Accelerator(mixed_precision=...) for precision=bf16/bf16-mixed (the loop's value wins anyway;
# under DeepSpeed accelerate turns it into the DS config's bf16.enabled).
#
# Wheels: the device image lacks datasets, deepspeed and a few of their needs. Here, in the repo
# root (.whl/ is git-ignored):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#     hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions==4.16.0 nvitop==1.7.2
#   pip wheel --no-deps deepspeed==0.19.8 -w .whl          # sdist only: pure-Python wheel, ops JIT
#   pip download ... -d .whl/extra pyarrow==26.0.1          # installed there only if its pyarrow < 24
#   (the H200 image had pyarrow 25.0.1: leave .whl/extra out, it is 53 MB of the 64 MiB a call carries)
# The padding bench needs the SmolLM2 config and tokenizer (no weights) and GSM8K train, in .gpu/
# (git-ignored; never committed):
#   mkdir -p .gpu/smollm2-shape .gpu/gsm8k
#   cp .cache/models/smollm2-135m-instruct/{config,tokenizer,tokenizer_config,generation_config}.json .gpu/smollm2-shape/
#   cp ../shared/data/gsm8k/{train.jsonl,LICENSE} .gpu/gsm8k/
# and the run names `carry: [".whl", ".gpu"]`.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_train_check_out}
mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-330}   # seconds for the whole script; the last run gets what is left
PY=${PYTHON:-python3}
RUNS=${GPU_CHECK_RUNS:-ul2_lora_single ul2_lora_zero3 llama1b_lora llama1b_full padding}
T0=$SECONDS
RUNS_DIR=/tmp/gpu_train_check_runs
. bench/gpu_env.sh   # wheels, environment, $OUT/env.txt

UL2=configs/models/flan-ul2
LLAMA=configs/models/llama-3.2-1b-shape
STEPS=12
FULL_PREC=bf16-mixed
MP=bf16
if [ "$DRY" = 1 ]; then
  # same structure, tiny dims, real vocab sizes
  M=/tmp/gpu_train_check_models
  mkdir -p $M/ul2 $M/llama
  $PY - "$M" <<'EOF'
import json, sys
m = sys.argv[1]
ul2 = json.load(open("configs/models/flan-ul2/config.json"))
ul2.update(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2)
json.dump(ul2, open(f"{m}/ul2/config.json", "w"), indent=1)
ll = json.load(open("configs/models/llama-3.2-1b-shape/config.json"))
ll.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, head_dim=16)
json.dump(ll, open(f"{m}/llama/config.json", "w"), indent=1)
EOF
  UL2=$M/ul2; LLAMA=$M/llama; STEPS=2; FULL_PREC=fp32; MP=no
fi

COMMON="random_init=true data=bundled:train eval_data=bundled:test eval_steps=0 eval_accuracy_samples=2 \
eval_max_new_tokens=16 save_steps=0 log_with=none logging_steps=4 warmup_steps=2 gradient_accumulation_steps=1 \
max_steps=$STEPS"

# run NAME CAP_S ACCEL_YAML [train.py args...]
run() {
  local name=$1 cap=$2 accel=$3; shift 3
  local t; t=$(slot "$name" "$cap"); [ "$t" = 0 ] && return
  local od=$RUNS_DIR/$name s=$SECONDS rc
  rm -rf "$od"
  echo "=== $name: start $(date -u +%T), timeout ${t}s"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | sed 's/^/GPU memory used before: /'
  timeout -k 5 "$t" $PY -m accelerate.commands.launch --config_file "configs/accelerate/$accel" \
    --mixed_precision $MP fine_tune/train.py "$@" output_dir="$od"
  rc=$?
  echo "=== $name: rc=$rc after $((SECONDS - s))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  if [ -f "$od/summary.json" ]; then
    cp "$od/summary.json" "$OUT/$name.json"
    $PY - "$od/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
keys = ("steps", "trainable_params", "total_params", "train_tokens_run", "train_seconds", "tokens_per_s",
        "total_seconds", "first_train_loss", "final_train_loss", "final_eval_loss")
print("SUMMARY", json.dumps({k: s.get(k) for k in keys} | {"memory": s.get("memory")}))
EOF
  else
    echo "=== $name: no summary.json"
  fi
  rm -rf "$od/final"   # the full model's weights are ~5 GB: keep /tmp small
}

run ul2_lora_single 90 single_gpu.yaml --config configs/train/flan_ul2_lora.yaml $COMMON \
  model=$UL2 tokenizer=tiny-t5 method=lora lora_r=8 "lora_targets=[q,v]" per_device_batch_size=2 \
  max_length=256 max_target_length=256 precision=bf16

run ul2_lora_zero3 240 zero3_1proc.yaml --config configs/train/flan_ul2_lora.yaml $COMMON \
  model=$UL2 tokenizer=tiny-t5 method=lora lora_r=8 "lora_targets=[q,v]" per_device_batch_size=2 \
  max_length=256 max_target_length=256 precision=bf16

run llama1b_lora 45 single_gpu.yaml --config configs/train/llama_1b_lora.yaml $COMMON \
  model=$LLAMA tokenizer=tiny-llama prompt_format=plain packing=false method=lora lora_r=16 "lora_targets=[all-linear]" \
  per_device_batch_size=8 max_length=512 precision=bf16

run llama1b_full 55 single_gpu.yaml --config configs/train/llama_1b_lora.yaml $COMMON \
  model=$LLAMA tokenizer=tiny-llama prompt_format=plain packing=false method=full learning_rate=2.0e-5 \
  per_device_batch_size=8 max_length=512 precision=$FULL_PREC

# GPU padding bench: GSM8K train and the SmolLM2 tokenizer from .gpu/ (CPU dry run: the same, tiny steps)
t=$(slot padding 150)
if [ "$t" != 0 ]; then
  if [ -f .gpu/gsm8k/train.jsonl ] && [ -f .gpu/smollm2-shape/tokenizer.json ]; then
    echo "=== padding: start $(date -u +%T), timeout ${t}s"
    DEV=cuda; DT=bf16; PSTEPS=48; PBS=8
    [ "$DRY" = 1 ] && { DEV=cpu; DT=fp32; PSTEPS=4; PBS=2; }
    s=$SECONDS
    SYNTHTUNE_GSM8K_DIR=$ROOT/.gpu/gsm8k timeout -k 5 "$t" $PY bench/padding_bench.py --tasks causal \
      --device $DEV --dtype $DT --random-init --model .gpu/smollm2-shape --methods lora,full \
      --batch-size $PBS --steps $PSTEPS --rounds 4 --threads 8 --out "$OUT/padding_gpu.json"
    echo "=== padding: rc=$? after $((SECONDS - s))s"
  else
    echo "=== padding SKIPPED: .gpu/gsm8k/train.jsonl or .gpu/smollm2-shape/ missing (see the header)"
  fi
fi

echo "=== all done after $((SECONDS - T0))s"
ls -la "$OUT"
