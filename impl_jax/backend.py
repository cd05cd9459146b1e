"""The JAX implementation behind the training loop's interface (see shared/backend.py)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from impl_jax import model, optim
from impl_jax.augment import augment
from shared import backend
from shared.batches import Batch
from shared.spec import Params

State = tuple[optim.Params, optim.State]  # (parameters, optimizer state), donated to each step


class Backend(backend.Backend):
    name = "jax"
    model, optim = model, optim

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._step = jax.jit(self._train_step, donate_argnums=0, static_argnames=("pad", "fill"))

    @staticmethod
    def _compile(fn: Callable) -> Callable:
        return jax.jit(fn)

    def _array(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, self.dtype)

    def _labels(self, y: np.ndarray) -> jax.Array:
        return jnp.asarray(y)

    def _copy(self, tensors: Params) -> optim.Params:
        return {k: jnp.asarray(v, self.dtype) for k, v in tensors.items()}

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
        # A Batch is no JAX type: unpack it for the compiled step (pad and fill are static).
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
