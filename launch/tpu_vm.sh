#!/usr/bin/env bash
# Runs main.py on every worker (host) of a Cloud TPU VM slice.
#
# Runs on your machine (with gcloud) and drives the workers over `gcloud compute tpus tpu-vm ssh
# --worker=all`: create or reuse the slice, ship the code to every worker, install, run main.py on all
# workers at once, optionally delete the slice. The worker-side steps (--worker-setup, --worker-run)
# are this same script, executed on each worker from the copy of the repository shipped there.
set -euo pipefail

PROG=launch/tpu_vm.sh
usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config FILE[:PRESET] --workdir gs://BUCKET/DIR [options]
             [--config.FIELD=VALUE ...] [-- MAIN_ARGS ...]

Steps: (1) create the TPU VM slice, or reuse it when it exists; (2) copy this checkout (or clone
--repo) to every worker; (3) install Python $PYTHON_VERSION, jax[tpu] and requirements.txt in a venv on
every worker; (4) run main.py on all workers at once; (5) with --delete, delete the slice.

Slice:
  --name NAME                TPU VM name (required)
  --zone ZONE                zone, e.g. us-central2-b or europe-west4-a (required)
  --project PROJECT          Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE    e.g. v4-32, v5litepod-16, v5p-32, v6e-16; needed to create a slice
  --runtime-version VERSION  TPU software version (default from TYPE: v2-v4 tpu-ubuntu2204-base,
                             v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                     create a Spot slice (cheaper, may be preempted; rerun to resume)
  --delete                   delete the slice after the run (whether it succeeded or not)

Code and environment:
  --repo URL                 git clone URL on every worker instead of copying this checkout
  --ref REF                  branch, tag or commit to check out with --repo
  --python-version VERSION   Python for the workers' venv, installed with uv (default: $PYTHON_VERSION;
                             TPU VM images ship an older python3)
  --skip-setup               reuse the code and venv already on the workers
  --setup-only               create, copy and install, but do not run

Run:
  --config FILE[:PRESET]     experiment config, relative to the repository root (required)
  --workdir DIR              run directory: gs://BUCKET/DIR (shared by all workers; survives the
                             slice) or an absolute path on the workers (required)
  --detach                   start main.py under nohup on every worker and return at once
  --max-reruns N             when main.py exits $PREEMPTED_EXIT (stopped with its state saved, e.g. a Spot
                             preemption), make sure the slice is up and run again, up to N times
                             (default: 3; 0 = never)
  --dry-run                  print every command (one per line, prefixed '[dry-run] ') and run nothing
  -h, --help                 this help

Arguments --config.FIELD=VALUE, and everything after '--', go to main.py unchanged. main.py gets
--config.distributed=on: every worker joins one jax.distributed job (jax finds the coordinator from
the TPU metadata, so no addresses are passed).

Each worker logs to ~/$LOGS_DIR/<run tag>-<hostname>.log, copied to WORKDIR/logs/ when WORKDIR is
gs://.

Example:
  $PROG --name distill-v4 --zone us-central2-b --accelerator-type v4-32 \\
    --config configs/jsd.py --workdir gs://my-bucket/distillspec/jsd-v4-32 --config.mesh.fsdp=16
EOF
}

# Helpers (die, quote, show, run, setenv, need_value) shared by the launch scripts.
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# On every worker, relative to the home directory (where `tpu-vm ssh --command` starts).
CODE_DIR=distillspec-jax
VENV_DIR=distillspec-venv
LOGS_DIR=distillspec-logs
PYTHON_VERSION=3.11

mode=launch  # launch (your machine) | worker-setup | worker-run (on each TPU worker)
name="" zone="" project="" accelerator="" runtime="" spot=0 delete=0
repo_url="" ref="" skip_setup=0 setup_only=0 detach=0
config="" workdir="" tag="" max_reruns=3
python_version=$PYTHON_VERSION
main_args=()

split_option_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --name) need_value "$@"; name=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; accelerator=$2; shift 2 ;;
    --runtime-version) need_value "$@"; runtime=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --delete) delete=1; shift ;;
    --repo) need_value "$@"; repo_url=$2; shift 2 ;;
    --ref) need_value "$@"; ref=$2; shift 2 ;;
    --python-version) need_value "$@"; python_version=$2; shift 2 ;;
    --skip-setup) skip_setup=1; shift ;;
    --setup-only) setup_only=1; shift ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --config.*) main_args+=("$1"); shift ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --detach) detach=1; shift ;;
    --max-reruns) need_value "$@"; max_reruns=$2; shift 2 ;;
    --tag) need_value "$@"; tag=$2; shift 2 ;;  # internal: the run's log name, shared by all workers
    --worker-setup) mode=worker-setup; shift ;;
    --worker-run) mode=worker-run; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; main_args+=("$@"); break ;;
    *) die "unknown argument '$1' (main.py overrides look like --config.FIELD=VALUE; see --help)" ;;
  esac
done

# ---- worker side ---------------------------------------------------------------------------------

# Installs uv (which brings its own Python: TPU VM images ship an older python3 than the 3.11+ that
# jax needs), a venv, jax[tpu] and the requirements. One resolver call, so the requirements cannot
# move jax away from the TPU build.
worker_setup() {
  local venv=$HOME/$VENV_DIR uv
  if ! uv=$(command -v uv); then
    uv=$HOME/.local/bin/uv
    [[ -x $uv ]] || run python3 -m pip install --user --quiet --upgrade uv ||
      run python3 -m pip install --user --quiet --upgrade --break-system-packages uv  # Ubuntu 24.04+
  fi
  run "$uv" venv --allow-existing --python "$python_version" "$venv"
  run "$uv" pip install --python "$venv/bin/python" --upgrade "jax[tpu]" -r "$REPO/requirements.txt"
}

# Runs main.py in the foreground, output both on the terminal and in the log; the log goes to
# WORKDIR/logs/ afterwards when the workdir is on GCS. Exits with main.py's status.
worker_run() {
  local logs=$HOME/$LOGS_DIR log status=0
  log=$logs/${tag:-run}-$(hostname).log
  run mkdir -p "$logs"
  run cd "$REPO"
  local cmd
  main_cmd "$HOME/$VENV_DIR/bin/python"
  cmd=("${MAIN_CMD[@]}")
  if ((DRY_RUN)); then
    printf '[dry-run] %s 2>&1 | tee -a %s\n' "$(show "${cmd[@]}")" "$(quote "$log")"
  else
    printf '+ %s 2>&1 | tee -a %s\n' "$(show "${cmd[@]}")" "$(quote "$log")" >&2
    "${cmd[@]}" 2>&1 | tee -a "$log" || status=$?
  fi
  if [[ $workdir == gs://* ]]; then
    run gcloud storage cp "$log" "$workdir/logs/" || printf '%s: could not copy %s to %s/logs/\n' "$PROG" "$log" "$workdir" >&2
  fi
  return "$status"
}

# Sets MAIN_CMD to the main.py command line that each worker runs with python $1. Every worker must
# run it at the same time: jax.distributed waits for all of them. distributed=on rather than auto: on
# a TPU VM the slice is described by the metadata server, not by environment variables that 'auto'
# could see, and jax.distributed.initialize() reads the coordinator and process ids from there.
main_cmd() {
  MAIN_CMD=("$1" main.py "--config=$config" "--workdir=$workdir" --config.distributed=on "${main_args[@]}")
}

check_run_args() {
  [[ -n $config ]] || die "missing --config FILE[:PRESET] (e.g. --config configs/jsd.py, or configs/jsd.py:tiny)"
  [[ -n $workdir ]] || die "missing --workdir (use --workdir gs://BUCKET/DIR, which every worker shares)"
  # A relative path would land inside ~/$CODE_DIR on each worker, which the next copy replaces.
  [[ $workdir == gs://* || $workdir == /* ]] ||
    die "--workdir must be gs://BUCKET/DIR (recommended) or an absolute path on the workers, got '$workdir'"
}

case $mode in
  worker-setup) worker_setup; exit 0 ;;
  worker-run) check_run_args; worker_run; exit $? ;;
esac

# ---- your machine --------------------------------------------------------------------------------

[[ -n $name ]] || die "missing --name NAME (the TPU VM to create or reuse, e.g. --name distill-v4)"
[[ -n $zone ]] || die "missing --zone ZONE (where the TPU VM lives, e.g. --zone us-central2-b)"
((setup_only)) || check_run_args
if ((detach && delete)); then
  die "--detach and --delete do not go together: the slice would be deleted under the running job"
fi
[[ $max_reruns =~ ^[0-9]+$ ]] || die "--max-reruns needs a count >= 0, got '$max_reruns'"
if [[ -n $ref && -z $repo_url ]]; then
  die "--ref needs --repo URL (without --repo, this checkout is copied as it is)"
fi
if [[ $workdir == /* ]]; then
  printf '%s: warning: %s is a local path on each worker: only worker 0 writes metrics and results, and it is lost with the slice; multi-host checkpoints need shared storage (gs://)\n' "$PROG" "$workdir" >&2
fi

gcloud_args=("--zone=$zone")
[[ -z $project ]] || gcloud_args+=("--project=$project")

default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

create_tpu() {
  [[ -n $accelerator ]] ||
    die "TPU VM '$name' does not exist in $zone; pass --accelerator-type TYPE (e.g. v4-32, v5litepod-16) to create it"
  if [[ -z $runtime ]]; then
    runtime=$(default_runtime "$accelerator") ||
      die "no default runtime version for accelerator type '$accelerator'; pass --runtime-version VERSION"
  fi
  local create=(gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}" "--accelerator-type=$accelerator" "--version=$runtime")
  if ((spot)); then create+=(--spot); fi
  run "${create[@]}"
}

ensure_tpu() {
  created=0  # 1 when the slice is new (or started again): its workers need the code and the venv
  local describe=(gcloud compute tpus tpu-vm describe "$name" "${gcloud_args[@]}" "--format=value(state)")
  if ((DRY_RUN)); then
    run "${describe[@]}"
    printf '# when %s does not exist yet (otherwise it is reused):\n' "$name"
    if [[ -n $accelerator ]]; then create_tpu; else printf '# (creating it needs --accelerator-type)\n'; fi
    return 0
  fi
  local state err
  err=$(mktemp)
  printf '+ %s\n' "$(show "${describe[@]}")" >&2
  if state=$("${describe[@]}" 2>"$err"); then
    rm -f "$err"
    case $state in
      READY) printf '%s: reusing TPU VM %s (READY)\n' "$PROG" "$name" >&2 ;;
      STOPPED) run gcloud compute tpus tpu-vm start "$name" "${gcloud_args[@]}" ;;
      PREEMPTED)  # a Spot slice taken back: only deleting and creating it again brings it back
        run gcloud compute tpus tpu-vm delete "$name" "${gcloud_args[@]}" --quiet
        create_tpu
        created=1 ;;
      *) die "TPU VM '$name' is $state; wait until it is READY, or delete it (gcloud compute tpus tpu-vm delete $name --zone=$zone) and rerun" ;;
    esac
  elif grep -qi 'not.found' "$err"; then
    rm -f "$err"
    create_tpu
    created=1
  else
    cat "$err" >&2
    rm -f "$err"
    die "could not describe TPU VM '$name' (see gcloud's message above: check --project, --zone and gcloud auth login)"
  fi
}

# Runs one shell command on every worker at once.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker=all "--command=$1"
}

ship_code() {
  if [[ -n $repo_url ]]; then
    local clone
    clone="rm -rf $CODE_DIR && git clone --quiet $(quote "$repo_url") $CODE_DIR"
    [[ -z $ref ]] || clone+=" && git -C $CODE_DIR checkout --quiet $(quote "$ref")"
    on_workers "$clone"
    return 0
  fi
  # This checkout as it is (uncommitted edits included), without what git ignores (venvs, runs).
  [[ -e $REPO/.git ]] || die "$REPO is not a git checkout; pass --repo URL to clone the code on the workers"
  local files=() file tarball
  while IFS= read -r -d '' file; do
    if [[ -e $REPO/$file ]]; then files+=("$file"); fi  # skip files deleted but not yet committed
  done < <(git -C "$REPO" ls-files -z --cached --others --exclude-standard)
  if ((DRY_RUN)); then
    tarball=${TMPDIR:-/tmp}/distillspec-code.XXXXXX
    printf '[dry-run] tar -czf %s -C %s FILE...  # the %d files of: git ls-files --cached --others --exclude-standard\n' \
      "$tarball" "$(quote "$REPO")" "${#files[@]}"
  else
    tarball=$(mktemp "${TMPDIR:-/tmp}/distillspec-code.XXXXXX")
    printf '+ tar -czf %s -C %s FILE...  (%d files)\n' "$tarball" "$(quote "$REPO")" "${#files[@]}" >&2
    tar -czf "$tarball" -C "$REPO" "${files[@]}"
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:distillspec-code.tgz" "${gcloud_args[@]}" --worker=all
  run rm -f "$tarball"
  on_workers "rm -rf $CODE_DIR && mkdir -p $CODE_DIR && tar -xzf distillspec-code.tgz -C $CODE_DIR && rm -f distillspec-code.tgz"
}

setup_workers() {
  ship_code
  on_workers "bash $CODE_DIR/launch/tpu_vm.sh --worker-setup --python-version=$(quote "$python_version")"
}

ensure_tpu
if ((!skip_setup)); then
  setup_workers
fi
if ((setup_only)); then
  exit 0
fi

tag=${tag:-$(date -u +%Y%m%d-%H%M%S)}
worker_cmd="bash $CODE_DIR/launch/tpu_vm.sh --worker-run --tag=$tag $(show "--config=$config" "--workdir=$workdir")"
((${#main_args[@]} == 0)) || worker_cmd+=" -- $(show "${main_args[@]}")"
main_cmd "../$VENV_DIR/bin/python"
printf '# on every worker, in ~/%s: %s\n' "$CODE_DIR" "$(show "${MAIN_CMD[@]}")"
status=0
if ((detach)); then
  on_workers "mkdir -p $LOGS_DIR && nohup $worker_cmd >$LOGS_DIR/$tag-nohup.out 2>&1 </dev/null &"
  printf '# started on every worker; follow worker 0 with:\n#   gcloud compute tpus tpu-vm ssh %s %s --worker=0 --command=%s\n' \
    "$name" "$(show "${gcloud_args[@]}")" "$(quote "tail -f $LOGS_DIR/$tag-*.log")"
else
  on_workers "$worker_cmd" || status=$?
  # PREEMPTED_EXIT: main.py saved its state and stopped (SIGTERM: a Spot preemption, a maintenance event).
  # Running the same command again resumes it; a slice that had to be recreated gets the code first.
  reruns=0
  while ((status == PREEMPTED_EXIT && reruns < max_reruns)); do
    reruns=$((reruns + 1))
    printf '%s: main.py stopped with its state saved (exit %d); rerun %d of %d\n' "$PROG" "$status" "$reruns" "$max_reruns" >&2
    ensure_tpu
    if ((created)); then setup_workers; fi
    status=0
    on_workers "$worker_cmd" || status=$?
  done
fi
if ((delete)); then
  run gcloud compute tpus tpu-vm delete "$name" "${gcloud_args[@]}" --quiet
fi
exit "$status"
