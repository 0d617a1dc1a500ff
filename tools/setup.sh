#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages, a virtual environment in .venv,
# this package with its test extras, and MinkowskiEngine 0.5.4 built CPU-only (cached as a wheel).
#   FCMAE_VENV=path        where the virtual environment lives (default .venv in the repository)
#   FCMAE_NO_MINKOWSKI=1   skip the MinkowskiEngine build (its tests are then skipped with a reason)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FCMAE_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# Debian packages: the default dataset, and BLAS headers for the MinkowskiEngine build.
apt_need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -d /usr/share/datasets/fashion-mnist ] || apt_need+=(dataset-fashion-mnist)
if [ -z "${FCMAE_NO_MINKOWSKI:-}" ]; then dpkg -s libopenblas-dev >/dev/null 2>&1 || apt_need+=(libopenblas-dev); fi
if [ ${#apt_need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "[setup] apt-get install ${apt_need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_need[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
# (re)install when the venv is new or the packaging changed since the last install (new dependencies)
STAMP="$VENV/.fcmae-installed-packaging"
if ! cat pyproject.toml setup.py | cmp -s - "$STAMP" || ! "$VENV/bin/python" -c "import fcmae, timm, torch, transformers" >/dev/null 2>&1; then
  echo "[setup] installing the package (torch 2.14.1 comes from the local package cache)"
  quiet $PIP install -q --upgrade pip wheel setuptools
  # The tested torch first: pyproject.toml admits a range, and pip would otherwise fetch the newest build in it.
  quiet $PIP install -q torch==2.14.1 torchvision==0.29.1
  quiet $PIP install -q -e ".[dev]"
  cat pyproject.toml setup.py > "$STAMP"
fi

if [ -z "${FCMAE_NO_MINKOWSKI:-}" ] && ! "$VENV/bin/python" -c "import models.minkowski_compat as m; m.import_minkowski()" >/dev/null 2>&1; then
  # Built once per machine into a wheel cache: the build takes ~8 minutes on 2 cores.
  CACHE=${FCMAE_WHEEL_CACHE:-$HOME/.cache/fcmae-wheels}
  TORCH_TAG=$("$VENV/bin/python" -c "import torch; print(torch.__version__.replace('+', '_'))")
  mkdir -p "$CACHE/$TORCH_TAG"
  wheel() { find "$CACHE/$TORCH_TAG" -maxdepth 1 -iname 'minkowskiengine-0.5.4-*.whl' | head -n 1; }
  if [ -z "$(wheel)" ]; then
    echo "[setup] building MinkowskiEngine 0.5.4 (CPU only, about 8 minutes)"
    quiet $PIP install -q ninja
    MAX_JOBS=${MAX_JOBS:-2} quiet $PIP wheel -q --no-build-isolation --no-deps -w "$CACHE/$TORCH_TAG" \
      --config-settings=--global-option=--cpu_only --config-settings=--global-option=--blas=openblas \
      MinkowskiEngine==0.5.4
  fi
  quiet $PIP install -q --no-deps "$(wheel)"
fi
echo "[setup] ready: $VENV"
