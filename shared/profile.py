"""Where a training step's time goes, phase by phase, in each implementation (and layer by
layer in NumPy): `python scripts/benchmark.py --profile`.

Each phase runs on its own, the framework's way (compiled for JAX), on the batches training
uses, and is timed to completion (JAX dispatches asynchronously, so its results are awaited).
A JAX step compiles all phases into one program, which fuses across their borders: the step
can take less than its phases' sum, and the difference is reported rather than hidden.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np

from shared.backend import Backend, make_backend
from shared.batches import Batch, steady_batches
from shared.config import TrainConfig
from shared.spec import get_arch, init_params

PHASES = (
    "host to framework",
    "gather + augment",
    "forward",
    "backward",
    "optimizer update",
    "framework to host",
)


def _clock(fn: Callable[[], Any], wait: Callable[[Any], Any]) -> tuple[float, Any]:
    """Seconds until fn's result is computed (`wait` awaits JAX's), and the result."""
    start = time.perf_counter()
    out = wait(fn())
    return time.perf_counter() - start, out


def step_phases(backend: Backend, state: Any, data: Any, batch: Batch, lr: float) -> dict:
    """Seconds of each phase of one step on `batch`, each run as the backend's step runs it
    (compiled where the framework compiles) and awaited. The forward runs as evaluation-time
    code does (PyTorch without recording the autograd graph, which the backward's share then
    holds); NumPy and PyTorch update `state` in place, JAX's update is discarded."""
    params, opt_state = state
    clock = partial(_clock, wait=backend.wait)
    seconds = {}
    seconds["host to framework"], (arrays, rate) = clock(
        lambda: (backend.moved(backend.step_arrays(batch)), backend.rate(lr))
    )
    seconds["gather + augment"], (x, y) = clock(
        lambda: backend.gather(data, arrays, batch.pad, batch.fill)
    )
    masks = arrays.masks
    seconds["forward"], _ = clock(lambda: backend.activations_fn(params, x, masks=masks))
    both, (loss, grads, logits, buffers) = clock(
        lambda: backend.training_pass(params, x, y, masks=masks)
    )
    seconds["backward"] = max(both - seconds["forward"], 0.0)
    seconds["optimizer update"], _ = clock(
        lambda: backend.update_state(params, grads, buffers, opt_state, rate)
    )
    seconds["framework to host"], _ = clock(
        lambda: (float(loss), int((np.asarray(logits).argmax(axis=1) == np.asarray(y)).sum()))
    )
    return seconds


def numpy_layer_seconds(backend: Backend, state: Any, data: Any, batch: Batch) -> dict:
    """Seconds of each layer's forward and backward in one NumPy training pass: the model's
    own per-layer functions run in its order (forward, the loss, backward), each timed."""
    model, arch, params, masks = backend.model, backend.arch, state[0], batch.masks
    x, y = backend.gather(data, backend.step_arrays(batch), batch.pad, batch.fill)
    seconds: dict[str, float] = {}
    caches, buffers, grads = [], {}, {}
    for layer in arch.layers:
        start = time.perf_counter()
        x, cache = model.layer_forward(layer, params, x, masks, buffers)
        seconds[f"{layer.name} forward"] = time.perf_counter() - start
        caches.append(cache)
    _, dout = backend.ops.softmax_cross_entropy(x, y, backend.hyperparams.label_smoothing)
    for depth in reversed(range(len(arch.layers))):
        layer = arch.layers[depth]
        start = time.perf_counter()
        dout = model.layer_backward(layer, dout, caches[depth], depth > 0, grads)
        seconds[f"{layer.name} backward"] = time.perf_counter() - start
    return seconds


def timing_setup(
    impl: str, arch_name: str, batch_size: int, flip: bool
) -> tuple[Backend, Any, Any, Iterator[Batch]]:
    """What a timing worker steps: a backend of the network with train.py's defaults, its
    seeded initial state, the training images moved in, and an endless stream of full batches
    of `batch_size` (flipped when `flip`)."""
    from shared.data import load_dataset

    config = TrainConfig(impl=impl, arch=arch_name)
    arch = get_arch(arch_name)
    data = load_dataset()
    backend = make_backend(impl, arch, config.dtype, config.hyperparams)
    state = backend.init_state(init_params(arch, config.init, config.seed))
    train_data = backend.put_data(data.train.x, data.train.y)
    n, fill = len(data.train), data.background
    return backend, state, train_data, steady_batches(n, batch_size, fill, arch.dropouts, flip)


def profile(impl: str, arch_name: str, batch_size: int, steps: int) -> dict:
    """Median seconds per phase over `steps` steps, the median whole step as training runs
    it, and (NumPy) per layer; this runs in a worker process of its own. Flips as train.py's
    defaults have them, so the augmentation shows."""
    flip = TrainConfig().flip
    backend, state, train_data, stream = timing_setup(impl, arch_name, batch_size, flip)
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    whole, layers = [], {}
    for i in range(steps + 5):  # the first five compile and warm up
        batch = next(stream)
        seconds = step_phases(backend, state, train_data, batch, 0.01)
        start = time.perf_counter()
        state, _, _ = backend.train_step(state, train_data, batch, 0.01)
        step = time.perf_counter() - start
        by_layer = numpy_layer_seconds(backend, state, train_data, batch) if impl == "numpy" else {}
        if i >= 5:
            whole.append(step)
            for p in PHASES:
                phases[p].append(seconds[p])
            for k, v in by_layer.items():
                layers.setdefault(k, []).append(v)
    return {
        "impl": impl,
        "batch_size": batch_size,
        "steps": steps,
        "phases": {p: statistics.median(v) for p, v in phases.items()},
        "step": statistics.median(whole),
        "layers": {k: statistics.median(v) for k, v in layers.items()},
    }


def markdown(rows: list[dict]) -> str:
    """One table: milliseconds per phase for each implementation and batch size."""
    head = "| impl | batch | " + " | ".join(PHASES) + " | sum of phases | whole step |"
    lines = [head, "|" + " --- |" * 2 + " ---: |" * (len(PHASES) + 2)]
    for r in rows:
        ms = [1e3 * r["phases"][p] for p in PHASES]
        cells = " | ".join(f"{v:.3f}" for v in ms)
        lines.append(
            f"| {r['impl']} | {r['batch_size']} | {cells} | {sum(ms):.3f} | {1e3 * r['step']:.3f} |"
        )
    return "\n".join(lines)


def layer_markdown(row: dict) -> str:
    """NumPy's layers: milliseconds forward and backward, and share of the pass."""
    total = sum(row["layers"].values())
    names = list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in row["layers"]))
    lines = [
        "| layer | forward ms | backward ms | share of the pass |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name in names:
        f = row["layers"].get(f"{name} forward", 0.0)
        b = row["layers"].get(f"{name} backward", 0.0)
        lines.append(f"| {name} | {1e3 * f:.3f} | {1e3 * b:.3f} | {100 * (f + b) / total:.1f}% |")
    return "\n".join(lines)


def chart(rows: list[dict], path) -> None:
    """Stacked bars: a step's phases per implementation (and batch size), and beside them
    NumPy's layers forward and backward."""
    from shared.plots import plt, save_figure

    numpy_rows = [r for r in rows if r["layers"]]
    fig, axes = plt.subplots(1, 1 + bool(numpy_rows), figsize=(11 if numpy_rows else 6, 4))
    ax = axes[0] if numpy_rows else axes
    labels = [f"{r['impl']}\nbatch {r['batch_size']}" for r in rows]
    bottom = np.zeros(len(rows))
    for phase in PHASES:
        ms = np.array([1e3 * r["phases"][phase] for r in rows])
        ax.bar(labels, ms, bottom=bottom, label=phase)
        bottom += ms
    ax.scatter(
        labels,
        [1e3 * r["step"] for r in rows],
        color="black",
        marker="_",
        s=400,
        label="whole step",
        zorder=3,
    )
    ax.set(ylabel="milliseconds per step", title="one training step, by phase")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    if numpy_rows:
        r = numpy_rows[0]
        names = list(dict.fromkeys(k.rsplit(" ", 1)[0] for k in r["layers"]))
        f = [1e3 * r["layers"].get(f"{n} forward", 0.0) for n in names]
        b = [1e3 * r["layers"].get(f"{n} backward", 0.0) for n in names]
        axes[1].barh(names, f, label="forward")
        axes[1].barh(names, b, left=f, label="backward")
        axes[1].invert_yaxis()
        axes[1].set(xlabel="milliseconds", title=f"NumPy by layer, batch {r['batch_size']}")
        axes[1].legend(fontsize=7)
    save_figure(fig, path)
