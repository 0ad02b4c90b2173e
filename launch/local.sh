#!/usr/bin/env bash
# Runs main.py on this machine's CPU, optionally with N fake devices (to exercise the sharded code
# paths: data/fsdp/tensor meshes behave as on N accelerators, only slower).
set -euo pipefail

PROG=launch/local.sh
usage() {
  cat <<EOF
Usage: $PROG --workdir DIR [options] [--config.FIELD=VALUE ...] [-- MAIN_ARGS ...]

Runs main.py on CPU in one process. Creates the virtual environment first when it is missing.

Options:
  --config FILE[:PRESET]  experiment config, relative to the repository root
                          (default: configs/jsd.py:tiny)
  --workdir DIR           run directory; a rerun with the same DIR resumes (required)
  --devices N             fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N);
                          default: 1, or whatever XLA_FLAGS already says
  --venv DIR              virtual environment (default: REPO/.venv); created when missing
  --python PYTHON         interpreter that creates the venv (default: python3; needs 3.11+)
  --reinstall             (re)install requirements into an existing venv
  --dry-run               print every command (one per line, prefixed '[dry-run] ') and run nothing
  -h, --help              this help

Arguments --config.FIELD=VALUE, and everything after '--', go to main.py unchanged.

Example:
  $PROG --workdir runs/tiny-jsd --devices 8 --config.mesh.fsdp=2
EOF
}

# Helpers (die, quote, show, run, setenv, need_value) shared by the launch scripts.
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config=configs/jsd.py:tiny
workdir=""
devices=""
venv=""
python=python3
reinstall=0
main_args=()

split_option_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --config) need_value "$@"; config=$2; shift 2 ;;
    --config.*) main_args+=("$1"); shift ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --devices) need_value "$@"; devices=$2; shift 2 ;;
    --venv) need_value "$@"; venv=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --reinstall) reinstall=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; main_args+=("$@"); break ;;
    *) die "unknown argument '$1' (main.py overrides look like --config.FIELD=VALUE; see --help)" ;;
  esac
done

[[ -n $workdir ]] || die "missing --workdir DIR (the run directory, e.g. --workdir runs/tiny-jsd)"
if [[ -n $devices && ! $devices =~ ^[1-9][0-9]*$ ]]; then
  die "--devices needs a positive integer, got '$devices'"
fi
venv=${venv:-$REPO/.venv}
# Relative paths mean the caller's directory, although main.py runs from the repository root.
[[ $workdir == *://* || $workdir == /* ]] || workdir=$PWD/$workdir
[[ $venv == /* ]] || venv=$PWD/$venv

if [[ ! -x $venv/bin/python ]]; then
  run "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$python is older than 3.11; pass --python python3.11 (or newer)"
  run "$python" -m venv "$venv"
  reinstall=1
fi
if ((reinstall)); then
  run "$venv/bin/python" -m pip install --upgrade pip
  run "$venv/bin/python" -m pip install -U jax -r "$REPO/requirements.txt"
fi

setenv JAX_PLATFORMS cpu
if [[ -n $devices ]]; then
  # Drop any earlier device count so the flag given here wins.
  xla_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/  +/ /g; s/^ //; s/ $//')
  setenv XLA_FLAGS "${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"
fi

run cd "$REPO"
# One process: distributed=off, so a SLURM or TPU environment around this shell is not mistaken for
# a multi-process job. Overrides given on the command line come later and win.
run "$venv/bin/python" main.py "--config=$config" "--workdir=$workdir" --config.distributed=off "${main_args[@]}"
