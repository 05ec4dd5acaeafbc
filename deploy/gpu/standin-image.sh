#!/usr/bin/env bash
# The dry run's stand-in for the GPU machine's Python: a venv holding what that image provides and
# the wheelhouse leaves out (image-provided.txt: torch, numpy, pandas, pyarrow, scipy, numba,
# llvmlite), built once and reused; prints its python's path on stdout.
#
# Its packages come from this machine's ordinary pip sources, not from the wheelhouse: the check's
# own install, into a fresh venv over this stand-in, is the one that must need nothing else. torch
# is the CPU build, torch==2.13.0: pip takes it from its find-links (on this project's machines its
# configuration points at a folder holding torch-2.13.0+cpu for CPython 3.11) or from its cache;
# elsewhere set MF_DIST_TORCH to a downloaded wheel's path, or PIP_FIND_LINKS to its folder.
#
#   MF_DIST_GPU_STANDIN   where the stand-in lives (default ~/.cache/mf-dist/gpu-image-standin)
#   MF_DIST_TORCH         the torch requirement or wheel file (default torch==2.13.0)
#   PYTHON                the interpreter it is made from (default python3, 3.11 or newer)
set -euo pipefail
standin="${MF_DIST_GPU_STANDIN:-${XDG_CACHE_HOME:-$HOME/.cache}/mf-dist/gpu-image-standin}"
python="${PYTHON:-python3}"
packages=(numpy==2.4.6 pandas==3.1.1 pyarrow==26.0.1 scipy==1.17.1 numba==0.68.1 llvmlite==0.50.0)
torch="${MF_DIST_TORCH:-torch==2.13.0}"
stamp="$standin/.mf-dist-standin-$(echo "$torch ${packages[*]}" | cksum | cut -d' ' -f1)"

if [ ! -f "$stamp" ]; then
  echo "building the stand-in image at $standin (once) ..." >&2
  rm -rf "$standin"
  "$python" -m venv "$standin"
  "$standin/bin/python" -m pip install --quiet --disable-pip-version-check "$torch" "${packages[@]}" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2) >&2
  touch "$stamp"
fi
echo "$standin/bin/python"
