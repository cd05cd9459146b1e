"""The training-loop interface (see shared/backend.py) for the NumPy implementation."""

from __future__ import annotations

from functools import partial

import numpy as np

from impl_numpy import model, optim
from impl_numpy.augment import augment
from shared.backend import BackendBase
from shared.batches import Batch
from shared.config import Hyperparams
from shared.spec import Arch, Params

State = tuple[optim.Params, optim.State]  # (parameters, momentum buffers), updated in place


class Backend(BackendBase):
    name = "numpy"

    def __init__(self, arch: Arch, dtype: np.dtype, hyperparams: Hyperparams):
        super().__init__(arch, dtype, hyperparams)
        h = hyperparams
        self.optimizer = optim.SGD(h.momentum, h.nesterov, h.weight_decay)
        fns = dict(arch=arch, label_smoothing=h.label_smoothing)
        self._predict = partial(model.forward, arch=arch)
        self._activations = partial(model.activations, arch=arch)
        self._loss_and_grads = partial(model.loss_and_grads, **fns)
        self._input_grad = partial(model.input_grad, **fns)

    def _array(self, x: np.ndarray) -> np.ndarray:
        return x.astype(self.dtype, copy=False)

    def _labels(self, y: np.ndarray) -> np.ndarray:
        return y

    def _copy(self, tensors: Params) -> optim.Params:
        return {k: np.array(v, dtype=self.dtype) for k, v in tensors.items()}

    def init_state(self, params: Params, velocity: Params | None = None) -> State:
        params = self._copy(params)
        velocity = None if velocity is None else self._copy(velocity)
        return params, self.optimizer.init(params, velocity)

    def put_data(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._array(x), self._labels(y)

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

    def predict(self, state: State, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(state[0], self._array(x)))

    def params(self, state: State) -> Params:
        return self._numpy(state[0])

    def velocity(self, state: State) -> Params:
        return self._numpy(self.optimizer.velocity(state[1]))

    def activations(self, params: Params, x: np.ndarray) -> dict[str, np.ndarray]:
        return self._numpy(self._activations(self._copy(params), self._array(x)))

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        value, grads = self._loss_and_grads(self._copy(params), self._array(x), self._labels(y))
        return float(value), self._numpy(grads)

    def input_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(self._input_grad(self._copy(params), self._array(x), self._labels(y)))
