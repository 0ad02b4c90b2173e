#!/usr/bin/env bash
# Runs main.py on one node with N GPUs: one process that drives every local GPU (JAX's single-controller
# model on one host), so no jax.distributed. For several nodes, use launch/slurm.sbatch.
set -euo pipefail

PROG=launch/gpu.sh
usage() {
  cat <<EOF
Usage: $PROG --config FILE[:PRESET] --workdir DIR [options] [--config.FIELD=VALUE ...] [-- MAIN_ARGS ...]

Creates (or reuses) a virtual environment with jax[cuda13] and the requirements, checks that the run
fits this node's GPUs (the pre-flight: python -m distillspec_jax.aot --topology=local --estimate_only,
seconds, before any download), then runs main.py on this node's GPUs.

Options:
  --config FILE[:PRESET]  experiment config, relative to the repository root, e.g. configs/jsd.py
                          or configs/jsd.py:tiny (required)
  --workdir DIR           run directory, local or gs://; a rerun with the same DIR resumes (required)
  --gpus N                use the first N GPUs (sets CUDA_VISIBLE_DEVICES); default: every visible GPU
  --venv DIR              virtual environment (default: REPO/.venv); created when missing
  --python PYTHON         interpreter that creates the venv (default: python3; needs 3.11+)
  --reinstall             (re)install jax[cuda13] and the requirements into an existing venv
  --setup-only            create/install the venv and stop (e.g. once, before SLURM jobs)
  --skip-preflight        do not run the pre-flight
  --preflight-compile     pre-flight by compiling every program for these GPUs (no weights; minutes at
                          real shapes) instead of the estimate from shapes
  --mem-fraction F        XLA_PYTHON_CLIENT_MEM_FRACTION, the share of GPU memory JAX preallocates
                          (default: 0.90; an XLA_PYTHON_CLIENT_MEM_FRACTION already set wins)
  --dry-run               print every command (one per line, prefixed '[dry-run] ') and run nothing
  -h, --help              this help

Arguments --config.FIELD=VALUE, and everything after '--', go to main.py unchanged.

Example:
  $PROG --config configs/jsd.py --workdir /data/runs/jsd-0.6b-8b --gpus 8 --config.mesh.fsdp=8
EOF
}

# Helpers (die, quote, show, run, setenv, need_value) shared by the launch scripts.
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=""
workdir=""
gpus=""
venv=""
python=python3
reinstall=0
setup_only=0
mem_fraction=0.90
skip_preflight=0 preflight_compile=0
main_args=()

split_option_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --config) need_value "$@"; config=$2; shift 2 ;;
    --config.*) main_args+=("$1"); shift ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --gpus) need_value "$@"; gpus=$2; shift 2 ;;
    --venv) need_value "$@"; venv=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --mem-fraction) need_value "$@"; mem_fraction=$2; shift 2 ;;
    --reinstall) reinstall=1; shift ;;
    --setup-only) setup_only=1; shift ;;
    --skip-preflight) skip_preflight=1; shift ;;
    --preflight-compile) preflight_compile=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; main_args+=("$@"); break ;;
    *) die "unknown argument '$1' (main.py overrides look like --config.FIELD=VALUE; see --help)" ;;
  esac
done

if ((!setup_only)); then
  [[ -n $config ]] || die "missing --config FILE[:PRESET] (e.g. --config configs/jsd.py, or configs/jsd.py:tiny)"
  [[ -n $workdir ]] || die "missing --workdir DIR (the run directory, e.g. --workdir /data/runs/jsd; gs:// works too)"
fi
if [[ -n $gpus && ! $gpus =~ ^[1-9][0-9]*$ ]]; then
  die "--gpus needs a positive integer, got '$gpus'"
fi
venv=${venv:-$REPO/.venv}
# Relative paths mean the caller's directory, although main.py runs from the repository root.
[[ -z $workdir || $workdir == *://* || $workdir == /* ]] || workdir=$PWD/$workdir
[[ $venv == /* ]] || venv=$PWD/$venv

if [[ ! -x $venv/bin/python ]]; then
  run "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is older than 3.11; pass --python python3.11 (or newer)"
  run "$python" -m venv "$venv"
  reinstall=1
elif ((!reinstall)) && ! compgen -G "$venv/lib/python3*/site-packages/jax_cuda13_plugin" >/dev/null; then
  # An existing venv without the CUDA plugin (e.g. a CPU-only .venv) would fail at JAX start-up.
  printf '%s: %s has no jax_cuda13_plugin; installing jax[cuda13] into it\n' "$PROG" "$venv" >&2
  reinstall=1
fi
if ((reinstall)); then
  run "$venv/bin/python" -m pip install --upgrade pip
  # One resolver call for both, so the requirements cannot move jax away from the CUDA build.
  run "$venv/bin/python" -m pip install -U "jax[cuda13]" -r "$REPO/requirements.txt"
fi
if ((setup_only)); then
  exit 0
fi

if [[ -n $gpus ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    # Keep to the GPUs this shell was given (e.g. by a scheduler): the first N of them.
    IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
    ((gpus <= ${#visible[@]})) || die "--gpus $gpus, but CUDA_VISIBLE_DEVICES lists only ${#visible[@]}: $CUDA_VISIBLE_DEVICES"
    selected=$(IFS=,; printf '%s' "${visible[*]:0:gpus}")
  else
    selected=$(seq -s, 0 $((gpus - 1)))
  fi
  setenv CUDA_VISIBLE_DEVICES "$selected"
fi
# 'cuda' rather than the default search: a broken CUDA install fails at start-up instead of silently
# running on the CPU.
setenv JAX_PLATFORMS cuda
setenv XLA_PYTHON_CLIENT_MEM_FRACTION "${XLA_PYTHON_CLIENT_MEM_FRACTION:-$mem_fraction}"
# The latency-hiding scheduler overlaps the FSDP all-gathers and reduce-scatters with compute. Flags
# already in XLA_FLAGS are kept; ours is added only when not given there.
xla_flags=${XLA_FLAGS:-}
if [[ $xla_flags != *--xla_gpu_enable_latency_hiding_scheduler* ]]; then
  xla_flags="${xla_flags:+$xla_flags }--xla_gpu_enable_latency_hiding_scheduler=true"
fi
setenv XLA_FLAGS "$xla_flags"

run cd "$REPO"
if ((!skip_preflight)); then
  preflight_flags=(--topology=local)
  ((preflight_compile)) || preflight_flags+=(--estimate_only)
  run_preflight "$venv/bin/python" "$config" "${preflight_flags[@]}" -- "${main_args[@]}"
fi
# One process: distributed=off, so a surrounding SLURM allocation is not mistaken for a multi-process
# job. Overrides given on the command line come later and win.
run "$venv/bin/python" main.py "--config=$config" "--workdir=$workdir" --config.distributed=off "${main_args[@]}"
