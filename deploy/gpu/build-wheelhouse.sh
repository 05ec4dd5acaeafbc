#!/usr/bin/env bash
# Builds deploy/gpu/wheelhouse/: the wheels the GPU check installs on a machine with no package
# index (deploy/gpu/README.md). Run here, where pip reaches the package index; the folder is
# ignored by git and travels to the GPU machine as a carried path.
#
#   deploy/gpu/build-wheelhouse.sh                       # CPython 3.11 and 3.12, linux x86_64
#   PYTHON_VERSIONS="3.12 3.13" deploy/gpu/build-wheelhouse.sh
#
# It downloads the closure of requirements.txt (pinned by constraints.txt) for each Python as
# binary wheels for manylinux x86_64, drops the distributions of image-provided.txt, and writes
# MANIFEST.json with the sizes; it fails if the wheelhouse and the working tree together exceed
# the 64 MiB a device machine is sent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
wheelhouse="${WHEELHOUSE:-$here/wheelhouse}"
versions="${PYTHON_VERSIONS:-3.11 3.12}"
python="${PYTHON:-python3}"

downloads="$(mktemp -d)"
trap 'rm -rf "$downloads"' EXIT
for version in $versions; do
  echo "downloading wheels for CPython $version ..." >&2
  "$python" -m pip download --quiet --disable-pip-version-check \
    --only-binary=:all: --implementation cp --python-version "$version" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    -r "$here/requirements.txt" -c "$here/constraints.txt" -d "$downloads/$version" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done

partial="$wheelhouse.partial"
rm -rf "$partial"
mkdir -p "$partial"
# Keep every wheel but those of the image's distributions (names compared as PEP 503 does).
"$python" - "$here/image-provided.txt" "$partial" "$downloads"/* <<'PY'
import re, shutil, sys
from pathlib import Path

provided_file, target, *folders = sys.argv[1:]
normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()
provided = {normal(line.strip()) for line in open(provided_file) if line.strip() and not line.startswith("#")}
left_out = set()
for folder in folders:
    for wheel in sorted(Path(folder).glob("*.whl")):
        name = normal(wheel.name.split("-")[0])
        if name in provided:
            left_out.add(wheel.name)
        elif not (Path(target) / wheel.name).exists():
            shutil.copy2(wheel, target)
for name in sorted(left_out):
    print(f"left out (the image has it): {name}", file=sys.stderr)
PY
rm -rf "$wheelhouse"
mv "$partial" "$wheelhouse"
"$python" "$repo/mf_dist/bench/gpu_check/wheelhouse.py" "$wheelhouse" --repo "$repo" --write-manifest
