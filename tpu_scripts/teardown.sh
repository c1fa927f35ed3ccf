#!/usr/bin/env bash
# Delete a TPU VM / slice (or its queued resource), optionally saving the workers' logs first.
# Checkpoints and metrics live in the gs:// workdir and are not touched.
#
#   tpu_scripts/teardown.sh --name svj-v5e --zone us-west4-a [--queued] [--logs DIR] [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
usage: ${0##*/} --name NAME --zone ZONE [--queued] [--logs DIR] [options]

  --queued      the slice came from a queued resource: delete that (--force also deletes its node)
  --logs DIR    first copy every worker's log to DIR/<worker>.log (logs.sh --out DIR)
  --if-exists   do nothing (exit 0) when there is nothing to delete
  --project PROJECT, --dry-run, -h
EOF
}

LOGS_DIR=""
IF_EXISTS=0
while (($#)); do
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --logs) need_value "$@"; LOGS_DIR="$2"; shift 2 ;;
    --logs=*) LOGS_DIR="${1#*=}"; shift ;;
    --if-exists) IF_EXISTS=1; shift ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
check_common

if [[ -n "$LOGS_DIR" ]]; then
  FWD=(--name "$NAME" --zone "$ZONE" --out "$LOGS_DIR")
  [[ -n "$PROJECT" ]] && FWD+=(--project "$PROJECT")
  ((DRY_RUN)) && FWD+=(--dry-run)
  "$BASH" "$SVJ_SCRIPTS/logs.sh" "${FWD[@]}" || say "could not collect the logs (is $NAME up?); deleting anyway"
fi

if ((QUEUED)); then
  if ((IF_EXISTS)) && [[ "$(queued_state)" == MISSING ]]; then
    note "no queued resource $NAME"
    exit 0
  fi
  queued_resources delete "$NAME" --force --quiet
else
  if ((IF_EXISTS)) && [[ "$(tpu_state)" == MISSING ]]; then
    note "no TPU VM $NAME"
    exit 0
  fi
  tpu_vm delete "$NAME" --quiet
fi
