#!/usr/bin/env bash
# Idempotent set-up: system packages for ffcv, a virtual environment in .venv/, the pinned requirements.
# A second run finishes in a second or two: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
SYSTEM_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev)

say() { printf '[setup] %s\n' "$*"; }

# 1. System libraries ffcv compiles against (checked through pkg-config, as ffcv's build does).
if ! { command -v pkg-config >/dev/null && pkg-config --exists opencv4 libturbojpeg; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing ${SYSTEM_PACKAGES[*]} (apt-get)"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${SYSTEM_PACKAGES[@]}" >/dev/null
    else
        echo "error: ffcv needs system packages: install them with 'sudo apt-get install ${SYSTEM_PACKAGES[*]}' (or use environment.yml with conda)" >&2
        exit 1
    fi
fi

# 2. Virtual environment.
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
        || { echo "error: Python >= 3.10 needed, $PYTHON is $($PYTHON -V 2>&1)" >&2; exit 1; }
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi

# 3. Pinned packages, reinstalled only when the requirement files change.
STAMP="$VENV/.requirements.sha256"
WANT=$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    say "installing requirements into $VENV (first run: a few minutes)"
    "$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
    "$VENV/bin/python" -c 'import torch, torchvision, ffcv.loader, nvidia.dali, numba' \
        || { echo "error: the environment in $VENV does not import; remove it and run again" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi
