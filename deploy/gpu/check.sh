#!/usr/bin/env bash
# The GPU check: on a GPU machine with only this repository (and deploy/gpu/wheelhouse) copied
# over, install what the machine lacks from the wheelhouse, run the CUDA tests, compare every
# model × solver on CUDA with the CPU, run a memory-capped case and the benchmark suites on CUDA
# beside their CPU references, within 8 minutes; write gpu-check.json, gpu-check.md and
# gpu-check.log to the output folder. deploy/gpu/README.md says more.
#
#   deploy/gpu/check.sh [--out DIR] [--budget SECONDS] [--dry-run] [--only STEP,STEP]
#
# The output folder is --out, else $OUT, else $TMPDIR/mf-dist-gpu-check-out (/tmp by default).
# Without CUDA (or with --dry-run) it is a dry run: the wheelhouse is built if missing, a stand-in
# for the GPU image is made once (standin-image.sh), and every step runs with the CPU as the
# device, at the tiny scale.
set -euo pipefail
started="$(date +%s.%N)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${OUT:-${TMPDIR:-/tmp}/mf-dist-gpu-check-out}"
dry_run=0
forward=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    --budget|--only|--scratch) forward+=("$1" "$2"); shift ;;
    --budget=*|--only=*|--scratch=*) forward+=("$1") ;;
    -h|--help) sed -n '2,/^[^#]/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The machine's own Python: on the GPU machines the plain python3 is the one holding torch.
python="${MF_DIST_IMAGE_PYTHON:-python3}"
if [ "$dry_run" = 0 ] && ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    >/dev/null 2>&1; then
  echo "check.sh: no CUDA device visible to $python: dry run" >&2
  dry_run=1
fi

wheelhouse="$here/wheelhouse"
if [ "$dry_run" = 1 ]; then
  if [ ! -f "$wheelhouse/MANIFEST.json" ]; then
    echo "check.sh: no wheelhouse yet: building it" >&2
    "$here/build-wheelhouse.sh"
  fi
  python="$("$here/standin-image.sh")"
  forward+=(--dry-run)
elif [ ! -f "$wheelhouse/MANIFEST.json" ]; then
  echo "check.sh: $wheelhouse is missing: build it with deploy/gpu/build-wheelhouse.sh and carry it" >&2
  exit 2
fi

cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m mf_dist.bench.gpu_check --out "$out" --started-at "$started" "${forward[@]}"
