"""The one interface the training loop and the cross-check drive, whatever the framework, and
the one factory that builds it.

Each `impl_*/backend.py` defines a `Backend` class with these methods; arrays go in and come
out as NumPy, parameters as the canonical dict. Training state stays in the framework's own
form between steps (no conversions in the hot path).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

from shared.batches import Batch
from shared.config import Hyperparams
from shared.errors import UsageError
from shared.spec import Arch, Params

IMPLEMENTATIONS = ("numpy", "jax", "torch")


class Backend(Protocol):
    name: str
    arch: Arch
    dtype: np.dtype
    hyperparams: Hyperparams

    def init_state(self, params: Params, velocity: Params | None = None) -> Any:
        """Training state from canonical parameters and (optionally) momentum buffers."""

    def put_data(self, x: np.ndarray, y: np.ndarray) -> Any:
        """Images x (N, 1, 28, 28) and labels y (N,) moved into the framework once per run."""

    def train_step(self, state: Any, data: Any, batch: Batch, lr: float) -> tuple[Any, float, int]:
        """One SGD step on a batch of `data`, augmented as the batch says
        -> (new state, mean loss, correct count)."""

    def predict(self, state: Any, x: np.ndarray) -> np.ndarray:
        """Logits (B, 10) of the state's parameters."""

    def params(self, state: Any) -> Params:
        """Canonical parameters of a state, as NumPy arrays."""

    def velocity(self, state: Any) -> Params:
        """Momentum buffers of a state, keyed like the parameters."""

    def activations(self, params: Params, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every layer's output by layer name."""

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        """Mean loss and the gradient of every canonical parameter."""

    def input_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Gradient of the loss with respect to the images x."""


class BackendBase:
    """What every implementation keeps; its Backend adds the methods above."""

    name = ""

    def __init__(self, arch: Arch, dtype: np.dtype, hyperparams: Hyperparams):
        self.arch, self.dtype, self.hyperparams = arch, np.dtype(dtype), hyperparams

    @staticmethod
    def _numpy(tensors: dict[str, Any]) -> Params:
        """NumPy copies of a framework's tensors: a state's buffers may be updated in place
        (NumPy, PyTorch) or donated to the next step (JAX) after they are read."""
        return {k: np.asarray(v).copy() for k, v in tensors.items()}


def make_backend(
    impl: str, arch: Arch, dtype: Any = np.float32, hyperparams: Hyperparams | None = None
) -> Backend:
    """Import `impl_<impl>` and build its Backend (by default for plain SGD on plain
    cross-entropy, as evaluation needs); a missing framework affects that impl alone."""
    if impl not in IMPLEMENTATIONS:
        raise UsageError(
            f"unknown implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}"
        )
    try:
        module = importlib.import_module(f"impl_{impl}.backend")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in {impl, "jaxlib", "optax"}:
            raise UsageError(
                f"--impl {impl}: {e.name} is not installed (run scripts/setup.sh); "
                "the other implementations still work"
            ) from None
        raise
    return module.Backend(arch, np.dtype(dtype), hyperparams or Hyperparams())


def predict(
    backend: Backend, state: Any, images: np.ndarray, tta: bool = False, batch_size: int = 1000
) -> np.ndarray:
    """Logits (N, 10) for images (N, 1, 28, 28), computed in batches; with `tta`, the mean of
    the logits of each image and of its mirror image (test-time augmentation by flips)."""
    logits = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        out = backend.predict(state, x)
        if tta:
            out = (out + backend.predict(state, np.ascontiguousarray(x[..., ::-1]))) / 2
        logits.append(out)
    return np.concatenate(logits)
