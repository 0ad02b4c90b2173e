#!/usr/bin/env bash
# The real-shape GPU figures in one prepared run (issue 13, item 8), sized for under 9 minutes of GPU time:
#   decode.json       Qwen3-1.7B shape, bfloat16, B = 1, 8, 32, against transformers (static cache + compile)
#   speculative.json  0.6B draft -> 8B target: verify cost against one decode step, loop overhead, per γ
#   distill_1.7b.json the distill step for 0.6B + 1.7B, T = 1024 (tokens/s, MFU)
#   distill_8b.json   the distill step's memory for 0.6B + 8B (peak bytes in use, compile time)
# Usage (from the repository root): bench/gpu_check.sh [OUT_DIR]   (default: $OUT, else ./gpu_check_out)
# Python packages the GPU image lacks are installed from ./.whl when that folder exists
# (pip download -r requirements.txt -d .whl --no-deps on a machine with an index, then carry .whl).
# Each benchmark has its own time limit, so one that hangs cannot take the others' time; a failed or
# timed-out one leaves its stderr in OUT_DIR/<name>.log and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ]; then
  python -m pip install -q --no-index --find-links .whl -r requirements.txt 2>&1 | tail -n 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
python -c "import jax; print(jax.devices())" 2>&1 | tee "$out/devices.txt"

run() {  # run NAME SECONDS python -m MODULE ARGS...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.json" 2> "$out/$name.log"
  local rc=$?
  printf '%s: exit %d after %d s\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$out/summary.txt"
}

run decode 170 python -m bench.decode --model=1.7b --dtype=bfloat16 --batch_sizes=1,8,32 --prompt_len=128 \
  --new_tokens=256 --runs=3 --hf=static_compile
run speculative 150 python -m bench.speculative --model=8b --draft_model=0.6b --dtype=bfloat16 --drafts=random \
  --gammas=1,4,7 --batch=1 --prompt_len=128 --new_tokens=128 --runs=3
run distill_1.7b 100 python -m bench.distill_step --student=0.6b --teacher=1.7b --dtype=bfloat16 \
  --student_param_dtype=float32 --seq_len=1024 --batch=8 --loss_chunks=128 --remat --runs=3
run distill_8b 100 python -m bench.distill_step --student=0.6b --teacher=8b --dtype=bfloat16 \
  --student_param_dtype=float32 --seq_len=1024 --batch=8 --loss_chunks=128 --remat --runs=2
cat "$out/summary.txt"
