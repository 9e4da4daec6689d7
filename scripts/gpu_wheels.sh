#!/usr/bin/env bash
# Fill .gpu-wheels/ (or $1) here with the wheels the GPU machine's image lacks, for its Python and platform, so that
# `make gpu-check` runs there without a package registry (it installs them into a temporary target, never into the
# system). Prints the total size and fails if it is over the 64 MiB a device call may carry.
#
# What the image lacks, from /work/.library/device/KINDS.md (its package list) against requirements.txt and the
# imports of the code the check runs: omegaconf and its parser runtime antlr4-python3-runtime 4.9 (PyYAML is
# there). numba and numba-cuda (the CUDA mask kernel), rich, psutil, matplotlib, scikit-image, tensorboard,
# opencv and pytest are there. FFCV (a compiled extension against system libjpeg-turbo and OpenCV) and DALI (a
# wheel of several hundred MiB) cannot travel: the check skips their rows when they do not import.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${1:-.gpu-wheels}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}   # the GPU image's python3 (KINDS.md: Python 3.12.3)
LIMIT_MIB=64
pin() { grep -E "^$1==" requirements.txt | head -n1; }

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# Binary-compatible wheels for the GPU machine's interpreter (pure-Python ones match any platform).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$(pin omegaconf)"
# omegaconf 2.3 pins antlr4-python3-runtime 4.9.*, published only as a source archive: build its pure-Python wheel.
"$PY" -m pip wheel -q --no-deps -w "$DEST" "antlr4-python3-runtime==4.9.3"
for whl in "$DEST"/*.whl; do
    case "$whl" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp${PYTHON_VERSION/./}-*manylinux*x86_64*.whl) ;;
        *) echo "error: $whl does not install on the GPU machine (Python $PYTHON_VERSION, x86_64)" >&2; exit 1 ;;
    esac
done

bytes=$(du -cb "$DEST"/*.whl | tail -n1 | cut -f1)
ls -l "$DEST"/*.whl | awk '{printf "  %8d  %s\n", $5, $NF}'
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $((bytes / 1024)) KiB in all (limit ${LIMIT_MIB} MiB)"
if [ "$bytes" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "error: $DEST is over ${LIMIT_MIB} MiB: a device call carries at most that" >&2
    exit 1
fi
