#!/usr/bin/env bash
# Runs ON EACH TPU VM WORKER (launch.sh / logs.sh / resume.sh start it there).
#
#   remote_launch.sh [--restart] [--upload-to gs://.../logs/STAMP] [--env K=V ...] -- ARGS...
#       start `~/svj-venv/bin/speechverse-jax ARGS` detached (nohup, own session) in ~/speechverse-jax;
#       output is appended to ~/svj-logs/run.log, the exit status goes to ~/svj-logs/exit_code and,
#       with --upload-to, the log is copied to URL/worker-N.log every --upload-every seconds and at exit.
#       On a multi-worker slice it also sets SVJ_COORDINATOR / SVJ_NUM_PROCESSES / SVJ_PROCESS_ID from
#       the VM metadata (worker 0 coordinates), so every worker joins one jax.distributed run.
#   remote_launch.sh --status    one line: "running pid=P", "finished rc=R", "stopped (no exit status)",
#                                "not started" or "not installed"
#   remote_launch.sh --stop      stop the run this script started (by its recorded process group id)
set -euo pipefail

SRC="$HOME/speechverse-jax"
VENV="$HOME/svj-venv"
LOGS="$HOME/svj-logs"
MODE="start"
RESTART=0
UPLOAD_TO=""
UPLOAD_EVERY=300
ENVS=()
DRY_RUN=0

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

while (($#)); do
  case "$1" in
    --status) MODE="status"; shift ;;
    --stop) MODE="stop"; shift ;;
    --child) MODE="child"; shift ;;
    --restart) RESTART=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --upload-to) [[ $# -ge 2 ]] || die "--upload-to needs a value"; UPLOAD_TO="$2"; shift 2 ;;
    --upload-every) [[ $# -ge 2 ]] || die "--upload-every needs a value"; UPLOAD_EVERY="$2"; shift 2 ;;
    --env) [[ $# -ge 2 && "$2" == *=* ]] || die "--env takes KEY=VALUE"; ENVS+=("$2"); shift 2 ;;
    --logs) [[ $# -ge 2 ]] || die "--logs needs a value"; LOGS="$2"; shift 2 ;;
    --src) [[ $# -ge 2 ]] || die "--src needs a value"; SRC="$2"; shift 2 ;;
    --venv) [[ $# -ge 2 ]] || die "--venv needs a value"; VENV="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (the speechverse-jax arguments go after --)" ;;
  esac
done

worker_id() {  # TPU VM host names end in -w-N
  local host
  host="$(hostname)"
  if [[ "$host" =~ -w-([0-9]+)$ ]]; then echo "${BASH_REMATCH[1]}"; else echo 0; fi
}

running_pid() {  # the recorded pid, if that process is still alive
  local pid
  [[ -f "$LOGS/run.pid" ]] || return 1
  pid="$(<"$LOGS/run.pid")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/stat" ]]; then  # an exited but unreaped process is not running
    local stat
    stat="$(<"/proc/$pid/stat")"
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]] || return 1
  fi
  echo "$pid"
}

metadata() {  # a TPU VM's instance attribute (empty off Google Cloud)
  command -v curl >/dev/null 2>&1 || return 0
  curl -sf --max-time 5 -H 'Metadata-Flavor: Google' \
    "http://${GCE_METADATA_IP:-metadata.google.internal}/computeMetadata/v1/instance/attributes/$1" 2>/dev/null || true
}

# On a multi-worker TPU VM slice: the explicit multi-process start (coordinator = worker 0, the
# process id = this worker's number), read from the VM metadata as JAX's own TPU detection does.
# Nothing when SVJ_COORDINATOR is given, on one worker, or off Google Cloud (auto detection then).
cluster_envs() {
  local e endpoints id first count
  for e in "${ENVS[@]}"; do [[ "$e" != SVJ_COORDINATOR=* ]] || return 0; done
  id="$(metadata agent-worker-number)"
  endpoints="$(metadata worker-network-endpoints)"
  [[ "$id" =~ ^[0-9]+$ && "$endpoints" == *,* ]] || return 0
  IFS=, read -r -a workers <<<"$endpoints"
  count="${#workers[@]}"
  first="${workers[0]}"
  [[ "$first" == *:*:* ]] && first="${first##*:}"  # old format name:id:ip
  ENVS+=("SVJ_COORDINATOR=$first:8482" "SVJ_NUM_PROCESSES=$count" "SVJ_PROCESS_ID=$id")
}

upload() {
  [[ -n "$UPLOAD_TO" ]] || return 0
  gcloud storage cp --quiet "$LOGS/run.log" "$UPLOAD_TO/worker-$(worker_id).log" >/dev/null 2>&1 || true
}

case "$MODE" in
  status)
    if [[ ! -x "$VENV/bin/speechverse-jax" || ! -d "$SRC" ]]; then
      echo "not installed"
    elif pid="$(running_pid)"; then
      echo "running pid=$pid"
    elif [[ -f "$LOGS/exit_code" ]]; then
      echo "finished rc=$(<"$LOGS/exit_code")"
    elif [[ -f "$LOGS/run.pid" ]]; then
      echo "stopped (no exit status)"
    else
      echo "not started"
    fi
    ;;
  stop)
    if pid="$(running_pid)"; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
      for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      echo "stopped pid=$pid"
    else
      echo "nothing running"
    fi
    ;;
  start)
    (($#)) || die "nothing to run: give the speechverse-jax arguments after --"
    [[ "$UPLOAD_EVERY" =~ ^[0-9]+$ && "$UPLOAD_EVERY" -gt 0 ]] || die "--upload-every takes seconds > 0"
    if [[ "$DRY_RUN" == 1 ]]; then
      printf 'env'; printf ' %q' "${ENVS[@]}" "$VENV/bin/speechverse-jax" "$@"; printf '\n'
      exit 0
    fi
    [[ -x "$VENV/bin/speechverse-jax" ]] || die "$VENV/bin/speechverse-jax not found: run tpu_scripts/setup.sh first"
    mkdir -p "$LOGS"
    if pid="$(running_pid)"; then
      ((RESTART)) || die "a run is already going (pid $pid); pass --restart to replace it"
      "$0" --stop --logs "$LOGS"
    fi
    rm -f "$LOGS/exit_code"
    cluster_envs
    child=("$0" --child --logs "$LOGS" --src "$SRC" --venv "$VENV" --upload-every "$UPLOAD_EVERY")
    [[ -n "$UPLOAD_TO" ]] && child+=(--upload-to "$UPLOAD_TO")
    for e in "${ENVS[@]}"; do child+=(--env "$e"); done
    nohup setsid "${child[@]}" -- "$@" >>"$LOGS/run.log" 2>&1 </dev/null &
    echo "$!" >"$LOGS/run.pid"
    echo "worker $(worker_id): started pid=$! log=$LOGS/run.log env: ${ENVS[*]}"
    ;;
  child)
    trap 'echo 143 >"$LOGS/exit_code"; upload; exit 143' TERM
    printf '==== %s worker %s: speechverse-jax %s\n' "$(date -u +%FT%TZ)" "$(worker_id)" "$*"
    uploader=""
    if [[ -n "$UPLOAD_TO" ]]; then
      (while sleep "$UPLOAD_EVERY"; do upload; done) &
      uploader=$!
    fi
    cd "$SRC"
    rc=0
    env "${ENVS[@]}" "$VENV/bin/speechverse-jax" "$@" || rc=$?
    echo "$rc" >"$LOGS/exit_code"
    printf '==== %s exit status %s\n' "$(date -u +%FT%TZ)" "$rc"
    [[ -n "$uploader" ]] && kill "$uploader" 2>/dev/null
    upload
    exit "$rc"
    ;;
esac
