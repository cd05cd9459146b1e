"""The training-loop interface (see shared/backend.py) for the JAX implementation."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from impl_jax import model, optim
from impl_jax.augment import augment
from shared.backend import BackendBase
from shared.batches import Batch
from shared.config import Hyperparams
from shared.spec import Arch, Params

State = tuple[optim.Params, optim.State]  # (parameters, optimizer state), donated to each step


class Backend(BackendBase):
    name = "jax"

    def __init__(self, arch: Arch, dtype: np.dtype, hyperparams: Hyperparams):
        super().__init__(arch, dtype, hyperparams)
        h = hyperparams
        self.optimizer = optim.SGD(h.momentum, h.nesterov, h.weight_decay)
        fns = dict(arch=arch, label_smoothing=h.label_smoothing)
        self._step = jax.jit(self._train_step, donate_argnums=0, static_argnames=("pad", "fill"))
        self._predict = jax.jit(partial(model.forward, arch=arch))
        self._activations = jax.jit(partial(model.activations, arch=arch))
        self._loss_and_grads = jax.jit(partial(model.loss_and_grads, **fns))
        self._input_grad = jax.jit(partial(model.input_grad, **fns))

    def _array(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, self.dtype)

    def _labels(self, y: np.ndarray) -> jax.Array:
        return jnp.asarray(y)

    def _copy(self, tensors: Params) -> optim.Params:
        return {k: jnp.asarray(v, self.dtype) for k, v in tensors.items()}

    def init_state(self, params: Params, velocity: Params | None = None) -> State:
        params = self._copy(params)
        velocity = None if velocity is None else self._copy(velocity)
        return params, self.optimizer.init(params, velocity)

    def put_data(self, x: np.ndarray, y: np.ndarray) -> tuple[jax.Array, jax.Array]:
        # Resident on the device for the whole run: a step then transfers only its indices.
        return self._array(x), self._labels(y)

    def _train_step(self, state: State, data, idx, rows, cols, lr, pad, fill):
        params, opt_state = state
        x, y = data[0][idx], data[1][idx]  # the gather runs on the device, in the step
        if rows is not None:
            x = augment(x, rows, cols, pad, fill)
        loss, grads, logits = model.loss_grads_and_logits(
            params, x, y, self.arch, self.hyperparams.label_smoothing
        )
        state = self.optimizer.update(params, grads, opt_state, lr)
        return state, loss, (logits.argmax(axis=1) == y).sum()

    def train_step(self, state: State, data, batch: Batch, lr: float):
        state, loss, correct = self._step(
            state,
            data,
            batch.idx,
            batch.rows,
            batch.cols,
            np.asarray(lr, self.dtype),
            pad=batch.pad,
            fill=batch.fill,
        )
        loss, correct = jax.device_get((loss, correct))  # one transfer back, not two
        return state, float(loss), int(correct)

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
