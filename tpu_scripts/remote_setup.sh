#!/usr/bin/env bash
# Runs ON EACH TPU VM WORKER (setup.sh starts it there): install the package unpacked in
# ~/speechverse-jax into ~/svj-venv with the pinned runtime (requirements/cpu.lock) + jax[tpu] + gcsfs.
# Idempotent: a re-run (e.g. on a VM recreated after preemption) reuses what is there.
#
#   bash speechverse-jax/tpu_scripts/remote_setup.sh [--extra tpu|cuda|none] [--python python3.11] [--dry-run]
set -euo pipefail

SRC="$HOME/speechverse-jax"
VENV="$HOME/svj-venv"
PYTHON="python3.11"  # jax 0.10 needs Python >= 3.11; the TPU VM images ship 3.10
EXTRA="tpu"
DRY_RUN=0

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
    return 0
  fi
  printf '+ %s\n' "$*" >&2
  "$@"
}

while (($#)); do
  case "$1" in
    --extra) [[ $# -ge 2 ]] || die "--extra needs a value"; EXTRA="$2"; shift 2 ;;
    --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON="$2"; shift 2 ;;
    --src) [[ $# -ge 2 ]] || die "--src needs a value"; SRC="$2"; shift 2 ;;
    --venv) [[ $# -ge 2 ]] || die "--venv needs a value"; VENV="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) die "unknown option '$1'" ;;
  esac
done
case "$EXTRA" in  # gcs: gcsfs, for the gs:// workdir, manifests and audio
  tpu|cuda) TARGET=".[$EXTRA,gcs]" ;;
  none) TARGET=".[gcs]" ;;
  *) die "--extra must be tpu, cuda or none, got '$EXTRA'" ;;
esac

SUDO=()
[[ "$(id -u)" == 0 ]] || SUDO=(sudo)

if ! command -v "$PYTHON" >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  # Ubuntu 22.04 (the TPU VM images) has python3.11 in its universe component.
  run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq update
  run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "$PYTHON" "$PYTHON-venv"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  run "$PYTHON" -m venv "$VENV"
fi
run cd "$SRC"
run "$VENV/bin/pip" install -q --upgrade pip
run "$VENV/bin/pip" install -q -r requirements/cpu.lock
# The extras add jax[tpu] (libtpu) or jax[cuda12] at the locked jax version, and gcsfs (see setup.py).
run "$VENV/bin/pip" install -q -e "$TARGET"
run "$VENV/bin/python" -c 'import jax, speechverse_jax; print("speechverse-jax ready: jax", jax.__version__)'
