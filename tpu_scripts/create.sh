#!/usr/bin/env bash
# Create a TPU VM or pod slice (on-demand, spot, or through a queued resource) and wait until it is up.
#
#   tpu_scripts/create.sh --name svj-v5e --zone us-west4-a --slice v5e-16 [--spot] [--queued] [--dry-run]
#   tpu_scripts/create.sh --name svj-v4 --zone us-central2-b --accelerator-type v4-32
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
usage: ${0##*/} --name NAME --zone ZONE (--slice SLICE | --accelerator-type TYPE) [options]

  --slice SLICE             a preset of speechverse_jax/train/slices.py: $SLICES
  --accelerator-type TYPE   any gcloud accelerator type (v4-8, v5litepod-16, v5p-32, v6e-8, ...)
  --version VERSION         TPU VM software version (default from the type: tpu-ubuntu2204-base for
                            v4, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --spot                    Spot capacity (cheaper, can be preempted at any time; see resume.sh)
  --queued                  request through a queued resource (id = NAME) instead of creating directly
  --reserved                use reserved capacity
  --service-account EMAIL   service account of the VMs (needs read/write on your gs:// bucket)
  --gcloud-flag FLAG        pass FLAG on to the create command (repeatable), e.g.
                            --gcloud-flag=--scopes=cloud-platform --gcloud-flag=--network=my-net
  --project PROJECT         default: the gcloud config's project (or SVJ_PROJECT)
  --no-wait                 return once the request is accepted
  --timeout SECONDS         how long to wait for READY / ACTIVE (default 3600)
  --dry-run                 print the gcloud commands, run nothing
Environment: SVJ_TPU_NAME, SVJ_ZONE, SVJ_PROJECT stand in for --name, --zone, --project.
EOF
}

SLICE=""
ACCEL=""
VERSION=""
SPOT=0
RESERVED=0
SERVICE_ACCOUNT=""
WAIT=1
TIMEOUT=3600
PASS=()
while (($#)); do
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --slice) need_value "$@"; SLICE="$2"; shift 2 ;;
    --slice=*) SLICE="${1#*=}"; shift ;;
    --accelerator-type) need_value "$@"; ACCEL="$2"; shift 2 ;;
    --accelerator-type=*) ACCEL="${1#*=}"; shift ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --version=*) VERSION="${1#*=}"; shift ;;
    --service-account) need_value "$@"; SERVICE_ACCOUNT="$2"; shift 2 ;;
    --service-account=*) SERVICE_ACCOUNT="${1#*=}"; shift ;;
    --gcloud-flag=*) PASS+=("${1#*=}"); shift ;;
    --gcloud-flag) [[ $# -ge 2 && "$2" == --* ]] || die "--gcloud-flag takes a --flag[=value]"; PASS+=("$2"); shift 2 ;;
    --timeout) need_value "$@"; TIMEOUT="$2"; shift 2 ;;
    --timeout=*) TIMEOUT="${1#*=}"; shift ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --no-wait) WAIT=0; shift ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done

check_common
if [[ -n "$SLICE" ]]; then
  [[ -z "$ACCEL" ]] || die "give --slice or --accelerator-type, not both"
  ACCEL="$(slice_accelerator "$SLICE")" || die "unknown --slice '$SLICE'; valid: $SLICES (or pass --accelerator-type)"
fi
[[ -n "$ACCEL" ]] || die "--slice or --accelerator-type is required (slices: $SLICES)"
[[ "$ACCEL" =~ ^v[0-9][a-z]*-[0-9]+$ ]] || die "--accelerator-type '$ACCEL' does not look like v4-8 / v5litepod-16 / v5p-32"
if [[ -z "$VERSION" ]]; then
  VERSION="$(runtime_for "$ACCEL")" || die "no default software version for '$ACCEL': pass --version"
fi
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout takes seconds, got '$TIMEOUT'"
((SPOT && RESERVED)) && die "--spot and --reserved exclude each other"

EXTRA=()
((SPOT)) && EXTRA+=(--spot)
((RESERVED)) && EXTRA+=(--reserved)
[[ -n "$SERVICE_ACCOUNT" ]] && EXTRA+=(--service-account="$SERVICE_ACCOUNT")
for f in "${PASS[@]}"; do
  [[ "$f" == --* ]] || die "--gcloud-flag takes a --flag[=value], got '$f'"
  EXTRA+=("$f")
done

if ((QUEUED)); then
  note "queued resource $NAME asks for $ACCEL ($VERSION); its node is also called $NAME"
  queued_resources create "$NAME" --node-id="$NAME" --accelerator-type="$ACCEL" \
    --runtime-version="$VERSION" "${EXTRA[@]}"
  if ((WAIT)); then
    wait_for queued ACTIVE "$TIMEOUT"
  fi
else
  note "TPU VM $NAME: $ACCEL ($VERSION)"
  tpu_vm create "$NAME" --accelerator-type="$ACCEL" --version="$VERSION" "${EXTRA[@]}"
fi
if ((WAIT)); then
  wait_for node READY "$TIMEOUT"
fi
next_hint "tpu_scripts/setup.sh --name $NAME --zone $ZONE"
