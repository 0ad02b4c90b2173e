# Helpers shared by the launch scripts; sourced, never run. Each script sets PROG (its name in messages)
# before sourcing, and sets DRY_RUN=1 for --dry-run.
# shellcheck shell=bash

DRY_RUN=0
# main.py's exit status when it stopped on request (SIGTERM, preemption) after saving its state: rerunning
# the same command resumes. 0 is finished, 1 failed (distillspec_jax/errors.py, docs/launch.md).
# shellcheck disable=SC2034  # used by the scripts that source this file
PREEMPTED_EXIT=75
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
# Shell-quotes one word only when it needs it (and in --flag=VALUE only the value), so printed
# commands stay readable and can be pasted into a shell.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]*$ && -n $1 ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
show() { local out="" word; for word in "$@"; do out+="${out:+ }$(quote "$word")"; done; printf '%s' "$out"; }
# Runs a command, or prints it under --dry-run; either way it is echoed first.
run() {
  if ((DRY_RUN)); then printf '[dry-run] %s\n' "$(show "$@")"; return 0; fi
  printf '+ %s\n' "$(show "$@")" >&2
  "$@"
}
# Exports a variable (printed as an export line under --dry-run).
setenv() {
  if ((DRY_RUN)); then printf '[dry-run] export %s=%s\n' "$1" "$(quote "$2")"; else printf '+ export %s=%s\n' "$1" "$(quote "$2")" >&2; fi
  export "$1=$2"
}
# Splits every launcher option written --name=VALUE into the two words --name VALUE, so a script's
# parser needs one case per option. main.py overrides (--config.FIELD=VALUE) and every word after
# '--' pass unchanged. Use: split_option_values "$@"; set -- "${ARGS[@]}"
split_option_values() {
  ARGS=()
  while (($#)); do
    case $1 in
      --) ARGS+=("$@"); return 0 ;;
      --config.*) ARGS+=("$1") ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}
need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value (see --help)"; }
