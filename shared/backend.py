"""The one interface the training loop and the cross-check drive, whatever the framework, and
the one factory that builds it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

import numpy as np

from shared.batches import Batch
from shared.config import Hyperparams
from shared.errors import UsageError
from shared.spec import Arch, Params

IMPLEMENTATIONS = ("numpy", "jax", "torch")
State = tuple[Any, Any]  # (parameters, optimizer state), in the framework's own form


class Backend:
    """A network of `arch` in one framework, trained with `hyperparams`, in `dtype`.

    Each `impl_*/backend.py` subclasses it with its framework's part: its `model` and `optim`
    modules, `_compile` (jax.jit, or nothing), the conversions `_array`, `_labels`, `_copy`, and
    `train_step`. The rest, written once here, is the same for every framework: arrays go in and
    come out as NumPy, parameters as the canonical dict, and training state stays in the
    framework's own form between steps (no conversions in the hot path).
    """

    name: str
    model: ModuleType  # impl_*/model.py
    optim: ModuleType  # impl_*/optim.py

    def __init__(self, arch: Arch, dtype: np.dtype, hyperparams: Hyperparams):
        self.arch, self.dtype, self.hyperparams = arch, np.dtype(dtype), hyperparams
        h = hyperparams
        self.optimizer = self.optim.SGD(h.momentum, h.nesterov, h.weight_decay)
        fns = dict(arch=arch, label_smoothing=h.label_smoothing)
        self._predict = self._compile(partial(self.model.forward, arch=arch))
        self._activations = self._compile(partial(self.model.activations, arch=arch))
        self._loss_and_grads = self._compile(partial(self.model.loss_and_grads, **fns))
        self._input_grad = self._compile(partial(self.model.input_grad, **fns))

    # --- the framework's part ------------------------------------------------------------

    @staticmethod
    def _compile(fn: Callable) -> Callable:
        """The function as the framework runs it fastest (compiled, or as it is)."""
        raise NotImplementedError

    def _array(self, x: np.ndarray) -> Any:
        """x in the framework, in the backend's dtype, sharing memory where it can."""
        raise NotImplementedError

    def _labels(self, y: np.ndarray) -> Any:
        """Integer labels y (N,) in the framework."""
        raise NotImplementedError

    def _copy(self, tensors: Params) -> dict[str, Any]:
        """Canonical tensors as fresh framework tensors of the backend's dtype (a state's own,
        which NumPy and PyTorch update in place)."""
        raise NotImplementedError

    def train_step(self, state: Any, data: Any, batch: Batch, lr: float) -> tuple[Any, float, int]:
        """One SGD step on a batch of `data` (from `put_data`), augmented as the batch says
        -> (new state, mean loss, correct count)."""
        raise NotImplementedError

    # --- the same for every framework ----------------------------------------------------

    @staticmethod
    def _numpy(tensors: dict[str, Any]) -> Params:
        """NumPy copies of a framework's tensors: a state's buffers may be updated in place
        (NumPy, PyTorch) or donated to the next step (JAX) after they are read."""
        return {k: np.asarray(v).copy() for k, v in tensors.items()}

    def init_state(self, params: Params, velocity: Params | None = None) -> State:
        """Training state from canonical parameters and (optionally) momentum buffers:
        (parameters, optimizer state) in the framework."""
        params = self._copy(params)
        velocity = None if velocity is None else self._copy(velocity)
        return params, self.optimizer.init(params, velocity)

    def put_data(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """Images x (N, 1, 28, 28) and labels y (N,) moved into the framework once per run
        (in JAX onto the device: a step then transfers only its indices)."""
        return self._array(x), self._labels(y)

    def predict(self, state: State, x: np.ndarray) -> np.ndarray:
        """Logits (B, 10) of the state's parameters for images x (B, 1, 28, 28)."""
        return np.asarray(self._predict(state[0], self._array(x)))

    def params(self, state: State) -> Params:
        """Canonical parameters of a state, as NumPy arrays."""
        return self._numpy(state[0])

    def velocity(self, state: State) -> Params:
        """Momentum buffers of a state, keyed like the parameters."""
        return self._numpy(self.optimizer.velocity(state[1]))

    def activations(self, params: Params, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every layer's output by layer name."""
        return self._numpy(self._activations(self._copy(params), self._array(x)))

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        """Mean loss and the gradient of every canonical parameter."""
        value, grads = self._loss_and_grads(self._copy(params), self._array(x), self._labels(y))
        return float(value), self._numpy(grads)

    def input_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Gradient of the loss with respect to the images x."""
        return np.asarray(self._input_grad(self._copy(params), self._array(x), self._labels(y)))


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
