#!/usr/bin/env bash
# Set up ./.venv with oodbench and its test extras, and the offline Fashion-MNIST (Debian package), where missing.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${OODBENCH_TORCH:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing the Fashion-MNIST Debian package (dataset-fashion-mnist)" >&2
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "setup: could not install dataset-fashion-mnist; put Fashion-MNIST under the data root ($OODBENCH_DATA, else ~/.cache/oodbench/data; see data/README.md)" >&2
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC into .venv (the default is the CUDA build: about 3 minutes, 5.8 GB; see README for the CPU one)" >&2
  .venv/bin/pip install -q $TORCH_SPEC
fi
if ! .venv/bin/python -c "import oodbench, pytest, timm, faiss, pytorch_ood, lpips, submitit, torchmetrics, matplotlib, sklearn, scipy, yaml, tqdm" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[test]"
fi
