#!/usr/bin/env bash
# Wheels for an offline GPU machine that already has torch, lightning, torchmetrics, accelerate, timm and
# scikit-image: the project's other runtime packages, without their (already present) dependencies, into .whl/
# (git-ignored). scripts/gpu_check.sh installs them with `pip install --no-index --no-deps .whl/*.whl`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d .whl \
    vector-quantize-pytorch einops einx loguru torch-einops-utils frozendict \
    webdataset braceexpand lpips torch-fidelity jsonargparse
ls -la .whl
du -sh .whl
