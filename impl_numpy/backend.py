"""The NumPy implementation behind the training loop's interface (see shared/backend.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from impl_numpy import layers, model, optim
from impl_numpy.augment import augment, erase
from shared import backend
from shared.batches import Batch
from shared.layers import Layer
from shared.parallel import Total

R = TypeVar("R")


class Backend(backend.Backend):
    name = "numpy"
    model, optim, ops = model, optim, layers
    augment, erase = staticmethod(augment), staticmethod(erase)

    @staticmethod
    def compile(fn: Callable, static_argnames: tuple[str, ...] = (), donate: bool = False):
        return fn

    def _array(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.dtype, copy=False)

    def _exact(self, a: np.ndarray) -> np.ndarray:
        return a

    def _tensor(self, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return np.array(value, dtype=dtype)

    def over_rows(self, fn: Callable[..., R], *batched: Any) -> list[R]:
        return model.over_rows(fn, self.arch, *batched)

    def chain_vjp(self, layers: tuple[Layer, ...], params, x, masks, total: Total) -> tuple:
        return model.chain_vjp(layers, params, x, masks, total)

    def pass_parts(self, params, x: np.ndarray, y: np.ndarray, masks) -> tuple[dict, dict, dict]:
        """A training-mode pass's outputs, the gradients its layers are given and its
        parameter gradients, by name: the by-hand backward's alone (model.pass_parts), which
        the cross-check's reference runs."""
        args = self._copy(params), self._array(x), y, self.arch, self._masks(masks)
        return model.pass_parts(*args, label_smoothing=self.smoothing)

    # Overflow is left to the training loop, which stops at a non-finite loss and says where;
    # NumPy's own warnings would only repeat it less clearly.
    @np.errstate(over="ignore", invalid="ignore")
    def train_step(self, state: backend.TrainState, data, batch: Batch, lr: float):
        return super().train_step(state, data, batch, lr)
