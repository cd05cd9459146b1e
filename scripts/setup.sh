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

if [ -x .venv/bin/python ]; then
    python=.venv/bin/python # an existing .venv is checked, and kept
else
    python=${PYTHON:-python3.11}
    [ -n "${PYTHON:-}" ] || command -v "$python" >/dev/null || python=python3
fi
command -v "$python" >/dev/null || { echo "setup: no $python found; threefold needs Python 3.11 or newer (PYTHON=...)" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: $python is $("$python" -V 2>&1); threefold needs Python 3.11 or newer (PYTHON=...$([ -x .venv/bin/python ] && echo ', after removing .venv'))" >&2
    exit 1
}
[ -x .venv/bin/python ] || "$python" -m venv .venv
echo "setup: installing the project into .venv"
# torch is pinned to 2.13.0 (pyproject.toml), and PyPI's build of it is the multi-GB CUDA one:
# where pip's local wheels (its find-links) hold no CPU build, PyTorch's CPU index is added.
torch_cpu=()
.venv/bin/pip install -q --dry-run --no-index --no-deps 'torch==2.13.0+cpu' >/dev/null 2>&1 ||
    torch_cpu=(--extra-index-url https://download.pytorch.org/whl/cpu)
.venv/bin/pip install -q --disable-pip-version-check "${torch_cpu[@]}" -e '.[dev,onnx,cluster]' 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import numpy, jax, optax, torch, onnx, onnxruntime, safetensors" || { echo "setup: install failed" >&2; exit 1; }
