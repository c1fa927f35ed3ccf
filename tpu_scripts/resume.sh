#!/usr/bin/env bash
# Watchdog for a preemptible run: keeps a slice up and its training going until it finishes.
#
#   tpu_scripts/resume.sh --name svj-v5e --zone us-west4-a --slice v5e-16 --spot \
#       --workdir gs://my-bucket/runs/wlm --config configs/curriculum.py:wlm,v5e-16 -- --config.base_checkpoint=...
#
# Every --interval seconds it looks at the slice (and its queued resource with --queued):
#   READY + run going on every worker   -> nothing to do
#   READY + every worker finished rc=0  -> done (exit 0; --teardown-when-done deletes the slice)
#   READY + a worker failed / not running -> relaunch on all workers (launch.sh --restart)
#   READY + code not installed          -> setup.sh, then launch.sh
#   CREATING / WAITING_FOR_RESOURCES ... -> wait
#   PREEMPTED / TERMINATED / SUSPENDED / FAILED / gone -> teardown.sh, create.sh, setup.sh, launch.sh
# A relaunch with the same --workdir resumes: the trainer restores the latest checkpoint there and
# `speechverse-jax curriculum` skips finished stages. Run it where it can keep going (tmux, a small VM).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
usage: ${0##*/} --name NAME --zone ZONE (--slice SLICE | --accelerator-type TYPE) --workdir gs://... [options] [-- FLAGS]

create.sh options:  --slice SLICE, --accelerator-type TYPE, --version V, --spot, --reserved, --queued,
                    --service-account EMAIL, --gcloud-flag=FLAG
setup.sh options:   --extra tpu|cuda|none, --python PYTHON
launch.sh options:  --workdir URL, --command curriculum|train, --config FILE[:ARG], --env KEY=VALUE,
                    --no-compile-cache; everything after -- goes to speechverse-jax
watchdog options:
  --interval SECONDS     between checks (default 300)
  --max-attempts N       give up after N recoveries / relaunches (default 100)
  --teardown-when-done   delete the slice once every worker finished with status 0
  --once                 one check (and its recovery), then exit
  --dry-run              print the commands of one check; the states it pretends to see are
                         --dry-run-state (node, default PREEMPTED), --dry-run-queued-state
                         (default SUSPENDED) and --dry-run-status (run on the workers, default running)
EOF
}

CREATE=()
SETUP=()
LAUNCH=()
PASS=()
WORKDIR=""
INTERVAL=300
MAX_ATTEMPTS=100
TEARDOWN_DONE=0
ONCE=0
DRY_NODE="PREEMPTED"
DRY_QUEUED="SUSPENDED"
DRY_STATUS="running"
while (($#)); do
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --slice|--accelerator-type|--version|--service-account)
      need_value "$@"; CREATE+=("$1" "$2")
      [[ "$1" == --slice ]] && LAUNCH+=(--slice "$2")
      shift 2 ;;
    --spot|--reserved) CREATE+=("$1"); shift ;;
    --gcloud-flag=*) CREATE+=("$1"); shift ;;
    --extra|--python) need_value "$@"; SETUP+=("$1" "$2"); shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --command|--config|--env) need_value "$@"; LAUNCH+=("$1" "$2"); shift 2 ;;
    --no-compile-cache) LAUNCH+=("$1"); shift ;;
    --interval) need_value "$@"; INTERVAL="$2"; shift 2 ;;
    --max-attempts) need_value "$@"; MAX_ATTEMPTS="$2"; shift 2 ;;
    --teardown-when-done) TEARDOWN_DONE=1; shift ;;
    --once) ONCE=1; shift ;;
    --dry-run-state) need_value "$@"; DRY_NODE="$2"; shift 2 ;;
    --dry-run-queued-state) need_value "$@"; DRY_QUEUED="$2"; shift 2 ;;
    --dry-run-status) need_value "$@"; DRY_STATUS="$2"; shift 2 ;;
    --) shift; PASS=("$@"); break ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
check_common
[[ -n "$WORKDIR" ]] || die "--workdir is required (gs://BUCKET/PATH: the run resumes from it)"
[[ "$WORKDIR" == gs://?* ]] || die "--workdir '$WORKDIR' must be a gs:// URL: a recreated VM starts with an empty disk"
[[ " ${CREATE[*]} " == *" --slice "* || " ${CREATE[*]} " == *" --accelerator-type "* ]] ||
  die "--slice or --accelerator-type is required (to recreate the slice after a preemption)"
[[ "$INTERVAL" =~ ^[0-9]+$ ]] || die "--interval takes seconds, got '$INTERVAL'"
[[ "$MAX_ATTEMPTS" =~ ^[0-9]+$ ]] || die "--max-attempts takes a number, got '$MAX_ATTEMPTS'"
if ((DRY_RUN)); then
  ONCE=1
  DRY_RUN_STATE="$DRY_NODE"
  DRY_RUN_QUEUED_STATE="$DRY_QUEUED"
fi

COMMON=(--name "$NAME" --zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")
((QUEUED)) && COMMON+=(--queued)
((DRY_RUN)) && COMMON+=(--dry-run)

step() {  # run a sibling script; a failure is reported, not fatal (the next check retries)
  local script="$1"
  shift
  if ! SVJ_NESTED=1 "$BASH" "$SVJ_SCRIPTS/$script" "${COMMON[@]}" "$@"; then
    say "$script failed; the next check retries"
    return 1
  fi
}

attempts=0
count_attempt() {
  attempts=$((attempts + 1))
  ((attempts <= MAX_ATTEMPTS)) || die "gave up after $MAX_ATTEMPTS recoveries/relaunches"
}

launch() {
  step launch.sh --workdir "$WORKDIR" "${LAUNCH[@]}" "$@" -- "${PASS[@]}"
}

recover() {
  count_attempt
  note "recovering $NAME: delete, recreate, set up, relaunch (resumes from the latest checkpoint in $WORKDIR)"
  step teardown.sh --if-exists &&
    step create.sh "${CREATE[@]}" &&
    step setup.sh "${SETUP[@]}" &&
    launch
}

# One status word per worker from remote_launch.sh --status.
run_status() {
  local cmd="echo SVJSTATUS \$(bash $REMOTE_SRC/tpu_scripts/remote_launch.sh --status 2>/dev/null || echo not installed)"
  if ((DRY_RUN)); then
    svj_quote gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --quiet --command="$cmd" "${GFLAGS[@]}" >&3
    echo "SVJSTATUS $DRY_STATUS"
    return 0
  fi
  need_gcloud
  gcloud compute tpus tpu-vm ssh "$NAME" --worker=all --quiet --command="$cmd" "${GFLAGS[@]}" 2>/dev/null || true
}

check_run() {
  local out lines=0 running=0 ok=0 missing=0
  out="$(run_status)"
  while IFS= read -r line; do
    [[ "$line" == *SVJSTATUS* ]] || continue
    lines=$((lines + 1))
    case "${line#*SVJSTATUS }" in
      running*) running=$((running + 1)) ;;
      "finished rc=0") ok=$((ok + 1)) ;;
      "not installed"*) missing=$((missing + 1)) ;;
    esac
  done <<<"$out"
  if ((lines == 0)); then
    note "no answer from the workers of $NAME (ssh failed); checking again later"
  elif ((ok == lines)); then
    note "every worker finished with status 0: done"
    if ((TEARDOWN_DONE)); then step teardown.sh || true; fi
    exit 0
  elif ((running == lines)); then
    note "training is running on all $lines worker(s)"
  elif ((missing > 0)); then
    count_attempt
    note "code missing on $missing worker(s): set up and launch"
    step setup.sh "${SETUP[@]}" && launch --restart
  else
    count_attempt
    note "$running of $lines worker(s) running, $ok finished ok: relaunch everywhere (resumes from the latest checkpoint)"
    launch --restart
  fi
}

while :; do
  node=""
  if ((QUEUED)); then
    qstate="$(queued_state)"
    case "$qstate" in
      ACTIVE) node="$(tpu_state)" ;;
      WAITING_FOR_RESOURCES|PROVISIONING|ACCEPTED|CREATING|DELETING)
        note "queued resource $NAME is $qstate: waiting" ;;
      *) note "queued resource $NAME is $qstate"; recover || true ;;
    esac
  else
    node="$(tpu_state)"
  fi
  if [[ -n "$node" ]]; then
    case "$node" in
      READY) check_run ;;
      CREATING|STARTING|RESTARTING|REPAIRING|PROVISIONING|DELETING)
        note "$NAME is $node: waiting" ;;
      *) note "$NAME is $node"; recover || true ;;
    esac
  fi
  ((ONCE)) && break
  sleep "$INTERVAL"
done
