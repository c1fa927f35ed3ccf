#!/usr/bin/env bash
# Copy this working tree (code + configs) to every worker of a TPU VM / slice and install it there
# with jax[tpu]. Re-run it after changing code: the install is editable, so --copy-only is enough.
#
#   tpu_scripts/setup.sh --name svj-v5e --zone us-west4-a [--copy-only] [--dry-run]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/common.sh"

usage() {
  cat <<EOF
usage: ${0##*/} --name NAME --zone ZONE [options]

Packs the files git tracks or would track (git ls-files -co --exclude-standard: your uncommitted
edits included, .venv and outputs left out), copies the tarball to every worker (--worker=all),
unpacks it into ~/$REMOTE_SRC and runs tpu_scripts/remote_setup.sh there: Python 3.11 venv
~/$REMOTE_VENV, pip install -r requirements/cpu.lock, pip install -e '.[tpu]'.

  --extra tpu|cuda|none   the package extra to install (default tpu)
  --python PYTHON         interpreter on the workers (default python3.11; installed with apt if missing)
  --copy-only             copy and unpack the code, skip the install (code edits on a set-up slice)
  --tarball PATH          where to build the tarball locally (default \$TMPDIR/svj-src-NAME.tar.gz)
  --queued                (accepted for symmetry with the other scripts; the node is NAME either way)
  --project PROJECT, --dry-run, -h
EOF
}

EXTRA="tpu"
PYTHON="python3.11"
COPY_ONLY=0
TARBALL=""
while (($#)); do
  parse_common "$@"
  if ((CONSUMED)); then shift "$CONSUMED"; continue; fi
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --extra) need_value "$@"; EXTRA="$2"; shift 2 ;;
    --extra=*) EXTRA="${1#*=}"; shift ;;
    --python) need_value "$@"; PYTHON="$2"; shift 2 ;;
    --python=*) PYTHON="${1#*=}"; shift ;;
    --tarball) need_value "$@"; TARBALL="$2"; shift 2 ;;
    --tarball=*) TARBALL="${1#*=}"; shift ;;
    --copy-only) COPY_ONLY=1; shift ;;
    *) usage >&2; die "unknown option '$1'" ;;
  esac
done
check_common
case "$EXTRA" in tpu|cuda|none) ;; *) die "--extra must be tpu, cuda or none, got '$EXTRA'" ;; esac
TARBALL="${TARBALL:-${TMPDIR:-/tmp}/svj-src-$NAME.tar.gz}"

# shellcheck disable=SC2016  # expanded by the inner bash
PACK='cd "$1" && git ls-files -z -co --exclude-standard | while IFS= read -r -d "" f; do [ -f "$f" ] && printf "%s\0" "$f"; done | tar --null -T - -czf "$2"'

note "1/3 pack the working tree of $SVJ_REPO"
run bash -c "$PACK" pack "$SVJ_REPO" "$TARBALL"
note "2/3 copy it to every worker of $NAME"
tpu_vm scp "$TARBALL" "$NAME:$REMOTE_TARBALL" --worker=all --quiet
UNPACK="rm -rf $REMOTE_SRC && mkdir -p $REMOTE_SRC && tar -xzf $REMOTE_TARBALL -C $REMOTE_SRC"
if ((COPY_ONLY)); then
  note "3/3 unpack on every worker (no install)"
  on_workers all "$UNPACK"
else
  note "3/3 unpack and install on every worker (a few minutes the first time)"
  on_workers all "$UNPACK && bash $REMOTE_SRC/tpu_scripts/remote_setup.sh --extra $EXTRA --python $(svj_quote "$PYTHON")"
fi
next_hint "tpu_scripts/launch.sh --name $NAME --zone $ZONE --workdir gs://BUCKET/runs/RUN --config configs/curriculum.py:wlm,SLICE"
