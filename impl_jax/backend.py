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

State = tuple[optim.Params, optim.State]  # (canonical tensors, optimizer state), donated


class Backend(backend.Backend):
    name = "jax"
    compiles = True
    model, optim = model, optim

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._step = jax.jit(self._train_step, donate_argnums=0, static_argnames=("pad", "fill"))

    @staticmethod
    def _compile(fn: Callable) -> Callable:
        return jax.jit(fn)

    def _array(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, self.dtype)

    def _exact(self, a: np.ndarray) -> jax.Array:
        return jnp.asarray(a)

    def _tensor(self, value: np.ndarray, dtype: np.dtype) -> jax.Array:
        return jnp.asarray(value, dtype)

    def _train_step(self, state: State, data, idx, rows, cols, masks, lr, pad, fill):
        params, opt_state = state
        x, y = data[0][idx], data[1][idx]  # the gather runs on the device, in the step
        if rows is not None:
            x = augment(x, rows, cols, pad, fill)
        loss, grads, logits, buffers = model.training_pass(
            params, x, y, self.arch, masks, self.hyperparams.label_smoothing
        )
        state = self._update(params, grads, buffers, opt_state, lr)
        return state, loss, (logits.argmax(axis=1) == y).sum()

    def compile_step(self, state: State, data, batches: list[Batch]) -> None:
        # A step of each shape on a throwaway copy: the state itself is donated to a step.
        copy = self.init_state(self.params(state), self.velocity(state))
        for batch in batches:
            copy, _, _ = self.train_step(copy, data, batch, 0.0)

    def train_step(self, state: State, data, batch: Batch, lr: float):
        # A Batch is no JAX type: unpack it for the compiled step (pad and fill are static).
        state, loss, correct = self._step(
            state,
            data,
            batch.idx,
            batch.rows,
            batch.cols,
            batch.masks,
            np.asarray(lr, self.dtype),
            pad=batch.pad,
            fill=batch.fill,
        )
        loss, correct = jax.device_get((loss, correct))  # one transfer back, not two
        return state, float(loss), int(correct)
