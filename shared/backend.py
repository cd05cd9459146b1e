"""The one interface the training loop and the cross-check drive, whatever the framework, and
the one factory that builds it."""

from __future__ import annotations

import ctypes
import functools
import importlib
import sys
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

import numpy as np

from shared.batches import Batch
from shared.config import Hyperparams
from shared.errors import UsageError
from shared.spec import Arch, Params, split_params, tensor_dtype

IMPLEMENTATIONS = ("numpy", "jax", "torch")
State = tuple[Any, Any]  # (parameters, optimizer state), in the framework's own form


class Backend:
    """A network of `arch` in one framework, trained with `hyperparams`, in `dtype`.

    Each `impl_*/backend.py` subclasses it with its framework's part: its `model` and `optim`
    modules, `_compile` (jax.jit, or nothing), the conversions `_array`, `_exact`, `_tensor`,
    and `train_step`. The rest, written once here, is the same for every framework: arrays go
    in and come out as NumPy, tensors as the canonical dict (parameters and buffers), and
    training state stays in the framework's own form between steps (no conversions in the hot
    path). Dropout masks, where a method takes them, are NumPy bool arrays by layer name; with
    `masks=None` the network runs in evaluation mode.
    """

    name: str
    compiles = False  # whether the step is compiled before it first runs (see compile_step)
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

    def _exact(self, a: np.ndarray) -> Any:
        """An integer or bool array (labels, dropout masks) in the framework, dtype kept."""
        raise NotImplementedError

    def _tensor(self, value: np.ndarray, dtype: np.dtype) -> Any:
        """A fresh framework tensor of `dtype` holding `value` (a state's own, which NumPy
        and PyTorch update in place)."""
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

    def _copy(self, tensors: Params) -> dict[str, Any]:
        """Canonical tensors as fresh framework tensors: floats in the backend's dtype, the
        BatchNorm counters int64."""
        return {k: self._tensor(v, tensor_dtype(k, self.dtype)) for k, v in tensors.items()}

    def _masks(self, masks: dict[str, np.ndarray] | None) -> dict[str, Any] | None:
        return None if masks is None else {k: self._exact(v) for k, v in masks.items()}

    def _step_inputs(self, data: tuple[Any, Any], batch: Batch) -> tuple[Any, Any, dict]:
        """The batch's rows of `data` (from `put_data`), unaugmented, and its dropout masks."""
        idx = self._exact(batch.idx)
        return data[0][idx], data[1][idx], self._masks(batch.masks)

    def _update(self, params: dict, grads: dict, buffers: dict, opt_state: Any, lr: Any):
        """The state after one step: trainable parameters moved by the optimizer, BatchNorm
        buffers replaced by the pass's updated ones."""
        trainable, _ = split_params(params, self.arch)
        trainable, opt_state = self.optimizer.update(trainable, grads, opt_state, lr)
        return {**params, **trainable, **buffers}, opt_state

    def compile_step(self, state: State, data: Any, batches: list[Batch]) -> None:
        """Compile the training step for the shapes of `batches` now, so that the training
        that follows times steps alone (frameworks that compile override this; NumPy and
        PyTorch have nothing to compile)."""

    def init_state(self, params: Params, velocity: Params | None = None) -> State:
        """Training state from canonical tensors and (optionally) momentum buffers:
        (tensors, optimizer state over the trainable parameters) in the framework."""
        params = self._copy(params)
        velocity = None if velocity is None else self._copy(velocity)
        return params, self.optimizer.init(split_params(params, self.arch)[0], velocity)

    def put_data(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        """Images x (N, 1, 28, 28) and labels y (N,) moved into the framework once per run
        (in JAX onto the device: a step then transfers only its indices)."""
        return self._array(x), self._exact(y)

    def predict(self, state: State, x: np.ndarray) -> np.ndarray:
        """Logits (B, 10) of the state's tensors for images x (B, 1, 28, 28), in evaluation
        mode."""
        return np.asarray(self._predict(state[0], self._array(x)))

    def params(self, state: State) -> Params:
        """Canonical tensors of a state (parameters and buffers), as NumPy arrays."""
        return self._numpy(state[0])

    def velocity(self, state: State) -> Params:
        """Momentum buffers of a state, keyed like the trainable parameters."""
        return self._numpy(self.optimizer.velocity(state[1]))

    def activations(
        self, params: Params, x: np.ndarray, masks: dict[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Every layer's output by layer name; in training mode when given `masks`."""
        return self._numpy(
            self._activations(self._copy(params), self._array(x), masks=self._masks(masks))
        )

    def loss_and_grads(
        self, params: Params, x: np.ndarray, y: np.ndarray, masks: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, Params]:
        """Mean training-mode loss (a 0-d array of the dtype it was computed in) and the
        gradient of every trainable parameter."""
        value, grads = self._loss_and_grads(
            self._copy(params), self._array(x), self._exact(y), masks=self._masks(masks)
        )
        return np.asarray(value), self._numpy(grads)

    def input_grad(
        self, params: Params, x: np.ndarray, y: np.ndarray, masks: dict[str, np.ndarray]
    ) -> np.ndarray:
        """Gradient of the training-mode loss with respect to the images x."""
        dx = self._input_grad(
            self._copy(params), self._array(x), self._exact(y), masks=self._masks(masks)
        )
        return np.asarray(dx)


@functools.cache
def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for the next request instead of returning it to the
    system. By default every array above 128 KB is mapped fresh from the kernel and unmapped
    when freed, so each training step page-faults its activations and gradients back in: on
    the lab network that doubled a NumPy step at batch 128 (8,600 against 17,900 images/s,
    `python -m shared.benchmark --worker numpy lab 128 300`) and cost PyTorch a quarter. The
    memory stays the process's own (peak use is unchanged: the freed arrays are reused).
    Elsewhere than glibc, nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):  # musl has no mallopt
        return
    # M_MMAP_THRESHOLD (-3): allocate up to 1 GiB from the heap; a glibc that caps the
    # threshold at 32 MiB refuses more, and gets its cap.
    if mallopt(-3, 2**30) or mallopt(-3, 2**25):
        mallopt(-1, 2**30)  # M_TRIM_THRESHOLD (-1): keep up to 1 GiB freed at the heap's top


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
    keep_freed_memory()
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
