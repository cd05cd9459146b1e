"""The JAX implementation behind the training loop's interface (see shared/backend.py)."""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from impl_jax import layers, model, optim
from impl_jax.augment import augment, erase
from shared import backend
from shared.batches import Batch
from shared.layers import Conv
from shared.spec import Arch

# XLA hands element-wise work to YNNPACK only when asked (its defaults take products,
# convolutions and reductions). Where a network has a convolution that XLA runs (more than one
# input channel, see layers.conv2d), YNNPACK's element-wise fusions made the training step
# at batch 128 1.16x faster on `strong` and 1.13x on the PyTorch examples' Net; where the
# convolutions are all 1-channel products they made `lab` 3% and `pool` 11% slower
# (docs/PERFORMANCE.md).
YNN_FUSIONS = "DOT,INDIVIDUAL_CONVOLUTION,REDUCE,ELTWISE"


def compiler_options(arch: Arch) -> dict[str, str]:
    """XLA's options for the network's compiled functions, chosen by its convolutions."""
    if any(isinstance(n.layer, Conv) and n.layer.in_channels > 1 for n in arch.nodes):
        fusions = ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in YNN_FUSIONS.split(","))
        return {"xla_cpu_experimental_ynn_fusion_type": fusions}
    return {}


class Backend(backend.Backend):
    name = "jax"
    compiles = True
    reference_library = "optax"
    model, optim, ops = model, optim, layers
    augment, erase = staticmethod(augment), staticmethod(erase)

    def compile(self, fn: Callable, static_argnames: tuple[str, ...] = (), donate: bool = False):
        # A donated state's buffers are reused for the next: a step allocates no new weights.
        return jax.jit(
            fn,
            static_argnames=static_argnames,
            donate_argnums=(0,) if donate else (),
            compiler_options=compiler_options(self.arch),
        )

    def _array(self, x: np.ndarray) -> jax.Array:
        return jnp.asarray(x, self.dtype)

    def _exact(self, a: np.ndarray) -> jax.Array:
        return jnp.asarray(a)

    def _tensor(self, value: np.ndarray, dtype: np.dtype) -> jax.Array:
        return jnp.asarray(value, dtype)

    def step_arrays(self, batch: Batch) -> backend.StepArrays:
        # NumPy as they are: a compiled function moves its NumPy arguments with the call,
        # faster than jnp.asarray one by one (54 us a step at batch 128 with flips).
        return backend.StepArrays(batch.idx, batch.rows, batch.cols, batch.masks, batch.boxes)

    def moved(self, arrays: backend.StepArrays) -> backend.StepArrays:
        return jax.device_put(arrays)

    def scalar(self, value: float) -> np.ndarray:
        # An array, not a Python float, which jax.jit would take as a constant to compile in.
        return np.asarray(value, self.dtype)

    def wait(self, value: Any) -> Any:
        return jax.block_until_ready(value)

    def to_host(self, value: Any) -> Any:
        return jax.device_get(value)  # one transfer back, not one per value

    def traced_steps(
        self, state: backend.TrainState, data: Any, batches: list[Batch], lr: float
    ) -> tuple[backend.TrainState, list[dict], str]:
        # The compiled step itself runs under the trace, so that the program's text is the
        # one traced. Its static arguments are the batches' padding and fill: one for all.
        statics = {(batch.pad, batch.fill) for batch in batches}
        if len(statics) != 1:
            raise ValueError(f"traced batches need one padding and fill, not {len(statics)}")
        ((pad, fill),), rate = statics, self.scalar(lr)
        arrays = [self.step_arrays(batch) for batch in batches]
        lowered = self._step.lower(state, data, arrays[0], rate, self.smoothing, pad=pad, fill=fill)
        step = lowered.compile()
        with tempfile.TemporaryDirectory() as folder:
            with jax.profiler.trace(folder, create_perfetto_trace=True):
                for step_arrays in arrays:
                    state, *result = step(state, data, step_arrays, rate, self.smoothing)
                    self.to_host(result)  # awaited, as train_step awaits its loss
            paths = list(Path(folder).rglob("perfetto_trace.json.gz"))
            if len(paths) != 1:
                raise RuntimeError(f"jax.profiler wrote {len(paths)} Perfetto traces, not one")
            trace = json.loads(gzip.decompress(paths[0].read_bytes()))
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        return state, events, step.as_text()
