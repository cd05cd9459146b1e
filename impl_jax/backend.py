"""The training-loop interface (see shared/backend.py) for the JAX implementation."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from impl_jax import model, optim
from impl_jax.augment import augment
from shared.backend import BackendBase
from shared.data import Batch
from shared.spec import Arch, Params


class Backend(BackendBase):
    name = "jax"

    def __init__(self, arch: Arch, **hyperparameters):
        super().__init__(arch, **hyperparameters)
        self.optimizer = optim.make_optimizer(self.momentum, self.weight_decay, self.nesterov)
        self._step = jax.jit(self._train_step, donate_argnums=0, static_argnames=("pad", "fill"))
        self._predict = jax.jit(partial(model.forward, arch=arch))
        fns = dict(arch=arch, label_smoothing=self.label_smoothing)
        self._activations = jax.jit(partial(model.activations, arch=arch))
        self._loss_and_grads = jax.jit(partial(model.loss_and_grads, **fns))
        self._input_grad = jax.jit(partial(model.input_grad, **fns))

    def _train_step(self, state, data, idx, rows, cols, lr, pad, fill):
        params, opt_state = state
        x, y = data[0][idx], data[1][idx]  # the gather runs on the device, in the step
        if rows is not None:
            x = augment(x, rows, cols, pad, fill)
        loss, grads, logits = model.loss_grads_and_logits(
            params, x, y, self.arch, self.label_smoothing
        )
        params, opt_state = optim.sgd_step(self.optimizer, params, grads, opt_state, lr)
        correct = (logits.argmax(axis=1) == y).sum()
        return (params, opt_state), loss, correct

    def _device(self, tensors: Params) -> dict[str, jax.Array]:
        return {k: jnp.asarray(v, dtype=self.dtype) for k, v in tensors.items()}

    def init_state(self, params: Params, velocity: Params | None = None):
        params = self._device(params)
        opt_state = optim.init_velocity(self.optimizer, params)
        if velocity is not None:
            opt_state = optim.with_velocity(opt_state, self._device(velocity))
        return params, opt_state

    def put_data(self, x: np.ndarray, y: np.ndarray) -> tuple[jax.Array, jax.Array]:
        # Resident on the device for the whole run: a step then transfers only its indices.
        return jnp.asarray(x, self.dtype), jnp.asarray(y)

    def train_step(self, state, data, batch: Batch, lr: float):
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

    def predict(self, state, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(state[0], x.astype(self.dtype, copy=False)))

    # Copies: the state's buffers are donated to the next step, which may reuse their memory.
    def params(self, state) -> Params:
        return {k: np.array(v) for k, v in state[0].items()}

    def velocity(self, state) -> Params:
        return {k: np.array(v) for k, v in optim.velocity(state[1]).items()}

    def activations(self, params: Params, x: np.ndarray) -> dict[str, np.ndarray]:
        acts = self._activations(self._device(params), jnp.asarray(x, self.dtype))
        return {k: np.asarray(v) for k, v in acts.items()}

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
        value, grads = self._loss_and_grads(self._device(params), jnp.asarray(x, self.dtype), y)
        return float(value), {k: np.asarray(v) for k, v in grads.items()}

    def input_grad(self, params: Params, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(self._input_grad(self._device(params), jnp.asarray(x, self.dtype), y))
