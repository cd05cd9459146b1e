"""The training-loop interface (see shared/backend.py) for the NumPy implementation."""

from __future__ import annotations

import numpy as np

from impl_numpy import model, optim
from impl_numpy.augment import augment
from shared.backend import BackendBase
from shared.data import Batch
from shared.spec import Params

State = tuple[Params, Params]  # (parameters, momentum buffers), updated in place


class Backend(BackendBase):
    name = "numpy"

    def _cast(self, tensors: Params) -> Params:
        return {k: np.array(v, dtype=self.dtype) for k, v in tensors.items()}

    def init_state(self, params: Params, velocity: Params | None = None) -> State:
        params = self._cast(params)
        velocity = optim.init_velocity(params) if velocity is None else self._cast(velocity)
        return params, velocity

    def put_data(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x.astype(self.dtype, copy=False), y

    # Overflow is left to the training loop, which stops at a non-finite loss and says where;
    # NumPy's own warnings would only repeat it less clearly.
    @np.errstate(over="ignore", invalid="ignore")
    def train_step(self, state: State, data, batch: Batch, lr: float):
        params, velocity = state
        x, y = data[0][batch.idx], data[1][batch.idx]
        if batch.rows is not None:
            x = augment(x, batch.rows, batch.cols, batch.pad, batch.fill)
        loss, grads, logits = model.loss_grads_and_logits(
            params, x, y, self.arch, self.label_smoothing
        )
        optim.sgd_step(params, grads, velocity, lr, self.momentum, self.weight_decay, self.nesterov)
        return state, loss, int((logits.argmax(axis=1) == y).sum())

    def predict(self, state: State, x: np.ndarray) -> np.ndarray:
        return model.forward(state[0], x.astype(self.dtype, copy=False), self.arch)

    def params(self, state: State) -> Params:
        return {k: v.copy() for k, v in state[0].items()}

    def velocity(self, state: State) -> Params:
        return {k: v.copy() for k, v in state[1].items()}

    def activations(self, params: Params, x: np.ndarray) -> dict[str, np.ndarray]:
        return model.activations(self._cast(params), x.astype(self.dtype), self.arch)

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        return model.loss_and_grads(
            self._cast(params), x.astype(self.dtype), y, self.arch, self.label_smoothing
        )

    def input_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return model.input_grad(
            self._cast(params), x.astype(self.dtype), y, self.arch, self.label_smoothing
        )
