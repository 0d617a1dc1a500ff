#!/usr/bin/env bash
# The main job on a fresh machine: set up (without the optional MinkowskiEngine build), then a short real
# FCMAE pretraining of convnextv2_atto on Fashion-MNIST. Extra arguments go to `python -m fcmae.pretrain`.
set -euo pipefail
cd "$(dirname "$0")/.."
FCMAE_NO_MINKOWSKI=${FCMAE_NO_MINKOWSKI:-1} bash tools/setup.sh
exec "${FCMAE_VENV:-.venv}/bin/python" -m fcmae.pretrain -c configs/pretrain/fashion_mnist_demo.yaml "$@"
