# shellcheck shell=bash
# shellcheck disable=SC2034  # variables set here are read by the scripts that source this file
# Shared by the tpu_scripts/*.sh commands (sourced, not run): option parsing, the `run` wrapper
# that prints instead of running under --dry-run, gcloud helpers and the slice table.
#
# Every command echoes what it runs. With --dry-run it prints each command (one per line,
# copy-pasteable) and runs nothing, so it works on a machine without gcloud.

SVJ_SCRIPTS="$(cd "${BASH_SOURCE[0]%/*}" && pwd)"
SVJ_REPO="$(cd "$SVJ_SCRIPTS/.." && pwd)"

# Names on the TPU VM workers (relative to the login user's home).
REMOTE_SRC="speechverse-jax"          # the unpacked working tree
REMOTE_TARBALL="svj-src.tar.gz"       # what setup.sh copies
REMOTE_VENV="svj-venv"                # virtual environment with the package + jax[tpu]
REMOTE_LOGS="svj-logs"                # run.log, run.pid, exit_code

exec 3>&1  # the real stdout: dry-run prints commands run inside $(...) here

NAME="${SVJ_TPU_NAME:-}"
ZONE="${SVJ_ZONE:-}"
PROJECT="${SVJ_PROJECT:-}"
DRY_RUN=0
QUEUED=0
CONSUMED=0

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

say() {
  printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# One line of shell words: arguments are single-quoted only when they need it.
svj_quote() {
  local out="" a q="'\\''"
  for a in "$@"; do
    if [[ -n "$a" && "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="${out:+ }$a"
    elif [[ "$a" =~ ^(--[a-z][-a-z0-9]*=)(.*)$ ]]; then  # --flag='value'
      a="${BASH_REMATCH[2]}"
      out+="${out:+ }${BASH_REMATCH[1]}'${a//\'/$q}'"
    else
      out+="${out:+ }'${a//\'/$q}'"
    fi
  done
  printf '%s\n' "$out"
}

need_gcloud() {
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or pass --dry-run to print the commands"
}

# Run a command, or only print it under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    svj_quote "$@"
    return 0
  fi
  [[ "$1" != gcloud ]] || need_gcloud
  printf '+ %s\n' "$(svj_quote "$@")" >&2
  "$@"
}

# Print a comment line (dry-run) / progress note (live).
note() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '# %s\n' "$*"
  else
    say "$*"
  fi
}

# The "what to run next" hint (left out when resume.sh runs the scripts).
next_hint() {
  [[ -n "${SVJ_NESTED:-}" ]] || note "next: $*"
}

# Options every script takes. Sets CONSUMED to the number of words used (0 = not a common option).
parse_common() {
  CONSUMED=1
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --queued) QUEUED=1 ;;
    --name|--zone|--project)
      [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
      case "$1" in
        --name) NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
      esac
      CONSUMED=2 ;;
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    *) CONSUMED=0 ;;
  esac
}

# `need_value "$@"` before reading "$2" as the value of option "$1".
need_value() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
}

check_common() {
  [[ -n "$NAME" ]] || die "--name is required (or set SVJ_TPU_NAME)"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name '$NAME' must be lower-case letters, digits and dashes, starting with a letter"
  [[ -n "$ZONE" ]] || die "--zone is required (or set SVJ_ZONE), e.g. --zone us-west4-a"
  [[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' does not look like a zone (e.g. us-west4-a)"
  GFLAGS=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GFLAGS+=(--project="$PROJECT")
  fi
}

# gcloud compute tpus tpu-vm SUB NAME ... --zone=... [--project=...]
tpu_vm() {
  local sub="$1"
  shift
  run gcloud compute tpus tpu-vm "$sub" "$@" "${GFLAGS[@]}"
}

queued_resources() {
  local sub="$1"
  shift
  run gcloud compute tpus queued-resources "$sub" "$@" "${GFLAGS[@]}"
}

# Run a shell command on every worker (or --worker=N).
on_workers() {
  local worker="$1" command="$2"
  tpu_vm ssh "$NAME" --worker="$worker" --quiet --command="$command"
}

# Node state: READY, CREATING, PREEMPTED, TERMINATED, ... or MISSING when describe fails.
# Under --dry-run it prints the command and answers $DRY_RUN_STATE.
tpu_state() {
  if [[ "$DRY_RUN" == 1 ]]; then
    svj_quote gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" --format='value(state)' >&3
    printf '%s\n' "${DRY_RUN_STATE:-READY}"
    return 0
  fi
  local state
  need_gcloud
  state="$(gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" --format='value(state)' 2>/dev/null)" || state=""
  printf '%s\n' "${state:-MISSING}"
}

# Queued-resource state: ACTIVE, WAITING_FOR_RESOURCES, PROVISIONING, SUSPENDED, FAILED, ... or MISSING.
queued_state() {
  if [[ "$DRY_RUN" == 1 ]]; then
    svj_quote gcloud compute tpus queued-resources describe "$NAME" "${GFLAGS[@]}" --format='value(state.state)' >&3
    printf '%s\n' "${DRY_RUN_QUEUED_STATE:-ACTIVE}"
    return 0
  fi
  local state
  need_gcloud
  state="$(gcloud compute tpus queued-resources describe "$NAME" "${GFLAGS[@]}" --format='value(state.state)' 2>/dev/null)" || state=""
  printf '%s\n' "${state:-MISSING}"
}

# Slice preset -> gcloud accelerator type (kept in step with speechverse_jax/train/slices.py;
# tests/test_tpu_scripts.py checks that).
slice_accelerator() {
  case "$1" in
    v4-8) echo v4-8 ;;
    v4-32) echo v4-32 ;;
    v5e-16) echo v5litepod-16 ;;
    v5p-32) echo v5p-32 ;;
    v6e-8) echo v6e-8 ;;
    *) return 1 ;;
  esac
}

SLICES="v4-8 v4-32 v5e-16 v5p-32 v6e-8"

# Accelerator type -> TPU VM software version for JAX (https://cloud.google.com/tpu/docs/runtimes).
runtime_for() {
  case "$1" in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

# `wait_for WHAT TARGET TIMEOUT_S`: poll tpu_state / queued_state until TARGET; fail on a dead end.
wait_for() {
  local what="$1" target="$2" timeout="$3" waited=0 state
  if [[ "$DRY_RUN" == 1 ]]; then
    note "then poll every 30 s until the state is $target:"
    if [[ "$what" == queued ]]; then
      svj_quote gcloud compute tpus queued-resources describe "$NAME" "${GFLAGS[@]}" --format='value(state.state)'
    else
      svj_quote gcloud compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" --format='value(state)'
    fi
    return 0
  fi
  while :; do
    if [[ "$what" == queued ]]; then state="$(queued_state)"; else state="$(tpu_state)"; fi
    [[ "$state" == "$target" ]] && { say "$NAME is $state"; return 0; }
    case "$state" in
      FAILED|SUSPENDED|PREEMPTED|TERMINATED) die "$NAME is $state (waiting for $target)" ;;
    esac
    if (( waited >= timeout )); then
      die "$NAME is still $state after ${timeout}s (waiting for $target)"
    fi
    say "$NAME is $state; waiting for $target (${waited}s)"
    sleep 30
    waited=$((waited + 30))
  done
}
