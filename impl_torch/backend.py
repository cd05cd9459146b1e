"""The PyTorch implementation behind the training loop's interface (see shared/backend.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from impl_torch import model, optim
from impl_torch.augment import augment
from shared import backend
from shared.batches import Batch

State = tuple[optim.Params, optim.State]  # (canonical tensors, momentum buffers), in place


class Backend(backend.Backend):
    name = "torch"
    model, optim = model, optim

    @staticmethod
    def _compile(fn: Callable) -> Callable:
        # torch.compile took 15.7 s and then ran a step at half eager speed (docs/PERFORMANCE.md).
        return fn

    def _array(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=self.dtype))

    def _exact(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a)

    def _tensor(self, value: np.ndarray, dtype: np.dtype) -> torch.Tensor:
        return torch.from_numpy(np.array(value, dtype=dtype))

    def train_step(self, state: State, data, batch: Batch, lr: float):
        params, opt_state = state
        x, y, masks = self._step_inputs(data, batch)
        if batch.rows is not None:
            rows, cols = torch.from_numpy(batch.rows), torch.from_numpy(batch.cols)
            x = augment(x, rows, cols, batch.pad, batch.fill)
        loss, grads, logits, buffers = model.training_pass(
            params, x, y, self.arch, masks, self.hyperparams.label_smoothing
        )
        state = self._update(params, grads, buffers, opt_state, lr)
        return state, loss.item(), int((logits.argmax(dim=1) == y).sum())
