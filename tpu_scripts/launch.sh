#!/usr/bin/env bash
# Start training on every worker of a TPU VM / slice, detached, one log per worker.
#
#   tpu_scripts/launch.sh --name svj-v5e --zone us-west4-a --workdir gs://my-bucket/runs/wlm \
#       --config configs/curriculum.py:wlm,v5e-16 [--dry-run] -- \
#       --config.base_checkpoint=gs://my-bucket/checkpoints/base --config.data.train_manifests=...
#
# Re-running it with the same --workdir resumes: the trainer restores the latest checkpoint in the
# workdir, and `curriculum` skips the stages that already finished.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
usage: ${0##*/} --name NAME --zone ZONE --workdir gs://BUCKET/PATH [options] [-- SPEECHVERSE_JAX_FLAGS...]

  --workdir URL        run folder shared by all workers (gs://...; checkpoints, metrics, logs/)
  --command CMD        curriculum (default) or train
  --config FILE[:ARG]  config module, relative to the repository (default configs/curriculum.py)
  --slice SLICE        append a slice preset to the config arg (FILE:LAYOUT,SLICE); one of: $SLICES
  --env KEY=VALUE      extra environment for the trainer (repeatable)
  --restart            replace a run that is still going on the workers
  --no-compile-cache   do not keep JAX's compilation cache in WORKDIR/jax_cache
  --allow-local-workdir  accept a non-gs:// workdir (single-host slices only; lost with the VM)
  --queued, --project PROJECT, --dry-run, -h
Everything after -- is passed to speechverse-jax (e.g. --config.data.train_manifests=gs://...).
Each worker appends its output to ~/$REMOTE_LOGS/run.log and copies it to WORKDIR/logs/STAMP/worker-N.log
every 5 minutes and at exit; read them with logs.sh.
EOF
}

COMMAND="curriculum"
CONFIG="configs/curriculum.py"
SLICE=""
WORKDIR=""
RESTART=0
CACHE=1
LOCAL_OK=0
ENVS=(SVJ_DISTRIBUTED=auto)
PASS=()
while (($#)); do
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --command) need_value "$@"; COMMAND="$2"; shift 2 ;;
    --command=*) COMMAND="${1#*=}"; shift ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --slice) need_value "$@"; SLICE="$2"; shift 2 ;;
    --slice=*) SLICE="${1#*=}"; shift ;;
    --env) need_value "$@"; [[ "$2" == *=* ]] || die "--env takes KEY=VALUE, got '$2'"; ENVS+=("$2"); shift 2 ;;
    --restart) RESTART=1; shift ;;
    --no-compile-cache) CACHE=0; shift ;;
    --allow-local-workdir) LOCAL_OK=1; shift ;;
    --) shift; PASS=("$@"); break ;;
    *) usage >&2; die "unknown option '$1' (speechverse-jax flags go after --)" ;;
  esac
done
check_common
[[ -n "$WORKDIR" ]] || die "--workdir is required, e.g. --workdir gs://my-bucket/runs/wlm"
WORKDIR="${WORKDIR%/}"
if [[ "$WORKDIR" != gs://?* ]]; then
  ((LOCAL_OK)) || die "--workdir '$WORKDIR' is not a gs:// URL: every worker must see the same checkpoints and a preempted VM loses its disk (--allow-local-workdir to override on one host)"
fi
case "$COMMAND" in curriculum|train) ;; *) die "--command must be curriculum or train, got '$COMMAND'" ;; esac
[[ -f "$SVJ_REPO/${CONFIG%%:*}" ]] || die "--config '${CONFIG%%:*}' not found in $SVJ_REPO (paths are relative to the repository)"
if [[ -n "$SLICE" ]]; then
  slice_accelerator "$SLICE" >/dev/null || [[ "$SLICE" == gpu-8xh100 || "$SLICE" == cpu-8 ]] ||
    die "unknown --slice '$SLICE'; valid: $SLICES"
  if [[ "$CONFIG" != *:* ]]; then
    CONFIG="$CONFIG:$SLICE"
  elif [[ ",${CONFIG#*:}," != *",$SLICE,"* ]]; then
    CONFIG="$CONFIG,$SLICE"
  fi
fi
for a in "${PASS[@]}"; do
  case "$a" in
    --workdir|--workdir=*) die "give the run folder with --workdir before --, not after it" ;;
  esac
done
((CACHE)) && ENVS+=(JAX_COMPILATION_CACHE_DIR="$WORKDIR/jax_cache")

STAMP="$(TZ=UTC printf '%(%Y%m%d-%H%M%S)T' -1)"
REMOTE=(bash "$REMOTE_SRC/tpu_scripts/remote_launch.sh")
((RESTART)) && REMOTE+=(--restart)
REMOTE+=(--upload-to "$WORKDIR/logs/$STAMP")
for e in "${ENVS[@]}"; do REMOTE+=(--env "$e"); done
REMOTE+=(-- "$COMMAND" --config "$CONFIG" --workdir "$WORKDIR" "${PASS[@]}")

note "start '$COMMAND' on every worker of $NAME (workdir $WORKDIR)"
on_workers all "$(svj_quote "${REMOTE[@]}")"
next_hint "tpu_scripts/logs.sh --name $NAME --zone $ZONE [--follow]"
