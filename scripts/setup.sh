#!/usr/bin/env bash
# Sets up a fresh machine: Fashion-MNIST (Debian's package, where missing), a virtual
# environment in .venv and the project installed into it with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

data=/usr/share/datasets/fashion-mnist
if [ -z "${THREEFOLD_DATA:-}" ] && [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "setup: installing the project into .venv"
# torch is pinned to the CPU build on local disk (see pyproject.toml).
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev,onnx,cluster]' 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import numpy, jax, optax, torch, onnx, onnxruntime, safetensors" || { echo "setup: install failed" >&2; exit 1; }
