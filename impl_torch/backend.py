"""The PyTorch implementation behind the training loop's interface (see shared/backend.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from impl_torch import model, optim
from impl_torch.augment import augment
from shared import backend
from shared.batches import Batch
from shared.spec import Params

State = tuple[optim.Params, optim.State]  # (parameters, momentum buffers), updated in place


class Backend(backend.Backend):
    name = "torch"
    model, optim = model, optim

    @staticmethod
    def _compile(fn: Callable) -> Callable:
        # torch.compile took 15.7 s and then ran a step at half eager speed (docs/PERFORMANCE.md).
        return fn

    def _array(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=self.dtype))

    def _labels(self, y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y)

    def _copy(self, tensors: Params) -> optim.Params:
        return {k: torch.from_numpy(np.array(v, dtype=self.dtype)) for k, v in tensors.items()}

    def train_step(self, state: State, data, batch: Batch, lr: float):
        params, opt_state = state
        idx = torch.from_numpy(batch.idx)
        x, y = data[0][idx], data[1][idx]
        if batch.rows is not None:
            rows, cols = torch.from_numpy(batch.rows), torch.from_numpy(batch.cols)
            x = augment(x, rows, cols, batch.pad, batch.fill)
        loss, grads, logits = model.loss_grads_and_logits(
            params, x, y, self.arch, self.hyperparams.label_smoothing
        )
        state = self.optimizer.update(params, grads, opt_state, lr)
        return state, loss.item(), int((logits.argmax(dim=1) == y).sum())
