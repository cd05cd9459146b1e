"""The NumPy implementation behind the training loop's interface (see shared/backend.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from impl_numpy import model, optim
from impl_numpy.augment import augment
from shared import backend
from shared.batches import Batch
from shared.spec import Params

State = tuple[Params, optim.State]  # (canonical tensors, momentum buffers), updated in place


class Backend(backend.Backend):
    name = "numpy"
    model, optim = model, optim

    @staticmethod
    def _compile(fn: Callable) -> Callable:
        return fn

    def _array(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.dtype, copy=False)

    def _exact(self, a: np.ndarray) -> np.ndarray:
        return a

    def _tensor(self, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return np.array(value, dtype=dtype)

    # Overflow is left to the training loop, which stops at a non-finite loss and says where;
    # NumPy's own warnings would only repeat it less clearly.
    @np.errstate(over="ignore", invalid="ignore")
    def train_step(self, state: State, data, batch: Batch, lr: float):
        params, opt_state = state
        x, y, masks = self._step_inputs(data, batch)
        if batch.rows is not None:
            x = augment(x, batch.rows, batch.cols, batch.pad, batch.fill)
        loss, grads, logits, buffers = model.training_pass(
            params, x, y, self.arch, masks, self.hyperparams.label_smoothing
        )
        state = self._update(params, grads, buffers, opt_state, lr)
        return state, float(loss), int((logits.argmax(axis=1) == y).sum())
