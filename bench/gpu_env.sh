# Sourced by the GPU check scripts (bench/gpu_train_check.sh, bench/gpu_loop_check.sh), not run:
# from the repo root, with OUT, DRY (1: CPU dry run), PY, T0, BUDGET and RUNS set, it installs the carried wheels in
# .whl/ (the device image lacks datasets, deepspeed and a few of their needs: see
# gpu_train_check.sh's header for how to fetch them), sets the environment every run needs, and
# records the card and the library versions in $OUT/env.txt. `slot NAME CAP_S` gives a run its timeout.
ROOT=$PWD
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export SYNTHTUNE_CACHE_DIR=${SYNTHTUNE_CACHE_DIR:-/tmp/stcache} SYNTHTUNE_OUTPUTS_DIR=${SYNTHTUNE_OUTPUTS_DIR:-/tmp/stout}

if [ "$DRY" != 1 ] && [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "FATAL: wheel install failed"; exit 1; }
  if ! $PY -c "import pyarrow,sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
     && ls .whl/extra/pyarrow-*.whl >/dev/null 2>&1; then
    echo "device pyarrow missing or < 24: installing the carried one"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/extra/pyarrow-*.whl
  fi
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  export DS_ACCELERATOR=cuda   # the wheel was built on a CPU machine and records accelerator_name='cpu'
else
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
echo "wheels ready after $((SECONDS - T0)) s"

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY - <<'PYEOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "transformers", "peft", "accelerate", "deepspeed", "datasets", "pyarrow", "tokenizers", "nvitop"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(m, "IMPORT FAILED:", repr(e)[:300])
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
} 2>&1 | tee "$OUT/env.txt"

# seconds a run may take: its cap or what is left of the budget; 0 = skip (not selected, or no time)
slot() {
  local name=$1 cap=$2 left=$((BUDGET - (SECONDS - T0)))
  case " $RUNS " in *" $name "*) ;; *) echo 0; return;; esac
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 25 ]; then echo "=== $name SKIPPED: only ${left}s of the budget left" >&2; echo 0; return; fi
  echo "$t"
}
