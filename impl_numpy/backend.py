"""The NumPy implementation behind the training loop's interface (see shared/backend.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from impl_numpy import model, optim
from impl_numpy.augment import augment
from shared import backend
from shared.batches import Batch
from shared.spec import Params

State = tuple[Params, optim.State]  # (parameters, momentum buffers), updated in place


class Backend(backend.Backend):
    name = "numpy"
    model, optim = model, optim

    @staticmethod
    def _compile(fn: Callable) -> Callable:
        return fn

    def _array(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.dtype, copy=False)

    def _labels(self, y: np.ndarray) -> np.ndarray:
        return y

    def _copy(self, tensors: Params) -> Params:
        return {k: np.array(v, dtype=self.dtype) for k, v in tensors.items()}

    # Overflow is left to the training loop, which stops at a non-finite loss and says where;
    # NumPy's own warnings would only repeat it less clearly.
    @np.errstate(over="ignore", invalid="ignore")
    def train_step(self, state: State, data, batch: Batch, lr: float):
        params, opt_state = state
        x, y = data[0][batch.idx], data[1][batch.idx]
        if batch.rows is not None:
            x = augment(x, batch.rows, batch.cols, batch.pad, batch.fill)
        loss, grads, logits = model.loss_grads_and_logits(
            params, x, y, self.arch, self.hyperparams.label_smoothing
        )
        state = self.optimizer.update(params, grads, opt_state, lr)
        return state, float(loss), int((logits.argmax(axis=1) == y).sum())
