#!/usr/bin/env bash
# Create .venv with the pinned stack (measured recipe: ../shared/ENVIRONMENT.md).
# Idempotent: a finished venv is marked by .venv/.spre_fx-ready and reused.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.spre_fx-ready
# The stamp records the inputs of the install; a change to them rebuilds.
KEY=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ]; then
  exit 0
fi

TORCH=2.14.1
TORCHVISION=0.29.1
MMCV=2.1.0
CACHE=${SPRE_FX_CACHE:-$HOME/.cache/spre_fx}/mmcv-$MMCV-torch$TORCH-py$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')

echo "[setup] creating $VENV (first run: 7-16 min, mostly the mmcv build)"
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q "torch==$TORCH" "torchvision==$TORCHVISION"
$PIP install -q "setuptools==80.9.0" ninja psutil wheel

# mmcv 2.1.0 has no wheel for this torch: build its CPU ops once, keep the wheel outside
# the checkout keyed by torch and python versions (pip's cache does not key on torch).
if ! ls "$CACHE"/mmcv-*.whl >/dev/null 2>&1; then
  echo "[setup] building mmcv $MMCV from source into $CACHE (about 6-15 min on 2 cores)"
  mkdir -p "$CACHE"
  printf '#!/bin/sh\nexec g++ "$@" -std=c++20\n' > "$VENV/bin/cxx20"
  chmod +x "$VENV/bin/cxx20"
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} CXX="$PWD/$VENV/bin/cxx20" \
    $PIP wheel -q --no-deps --no-build-isolation -w "$CACHE.tmp" "mmcv==$MMCV"
  mv "$CACHE.tmp"/mmcv-*.whl "$CACHE"/ && rmdir "$CACHE.tmp"
fi
$PIP install -q "$CACHE"/mmcv-*.whl
$PIP install -q -e ".[dev]"
echo "$KEY" > "$STAMP"
echo "[setup] $VENV ready"
