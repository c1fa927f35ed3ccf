#!/usr/bin/env bash
# Show or collect the training logs of a TPU VM / slice.
#
#   tpu_scripts/logs.sh --name svj-v5e --zone us-west4-a              # status + last 50 lines, every worker
#   tpu_scripts/logs.sh --name svj-v5e --zone us-west4-a --follow     # tail -F worker 0 (Ctrl-C stops watching only)
#   tpu_scripts/logs.sh --name svj-v5e --zone us-west4-a --out logs/  # full log of each worker -> logs/N.log
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
usage: ${0##*/} --name NAME --zone ZONE [--lines N | --follow | --out DIR] [--worker W] [options]

  --lines N      status line and the last N lines of every worker's log (default 50)
  --follow       keep printing worker W's log as it grows (default worker 0, which logs metrics)
  --out DIR      copy each worker's whole log to DIR/<worker>.log (gcloud --output-directory)
  --worker W     all (default; --follow: 0) or one worker number
  --queued, --project PROJECT, --dry-run, -h
The logs also reach WORKDIR/logs/<launch time>/worker-N.log on gs:// every 5 minutes (launch.sh).
EOF
}

LINES=50
FOLLOW=0
OUT=""
WORKER=""
while (($#)); do
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --lines) need_value "$@"; LINES="$2"; shift 2 ;;
    --lines=*) LINES="${1#*=}"; shift ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#*=}"; shift ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --worker=*) WORKER="${1#*=}"; shift ;;
    --follow) FOLLOW=1; shift ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
check_common
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines takes a number, got '$LINES'"
[[ -z "$WORKER" || "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker takes 'all' or a number, got '$WORKER'"
((FOLLOW)) && [[ -n "$OUT" ]] && die "--follow and --out exclude each other"

STATUS="bash $REMOTE_SRC/tpu_scripts/remote_launch.sh --status"
LOG="$REMOTE_LOGS/run.log"
if ((FOLLOW)); then
  on_workers "${WORKER:-0}" "$STATUS; tail -n $LINES -F $LOG"
elif [[ -n "$OUT" ]]; then
  run mkdir -p "$OUT"
  tpu_vm ssh "$NAME" --worker="${WORKER:-all}" --quiet --command="$STATUS; cat $LOG 2>/dev/null || true" --output-directory="$OUT"
  note "logs of worker(s) ${WORKER:-all} are in $OUT/<worker>.log"
else
  on_workers "${WORKER:-all}" "echo \"== \$(hostname): \$($STATUS)\"; tail -n $LINES $LOG 2>/dev/null || echo '(no log yet)'"
fi
