"""The network over the canonical tensors, forward and backward by hand.

`masks` sets the mode: None is evaluation (BatchNorm normalises with its running statistics,
dropout is the identity); a dict with one keep-mask per dropout layer is training (BatchNorm
uses the batch's statistics and returns updated running ones, dropout applies those masks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from impl_numpy import layers
from shared.cost import network_cost
from shared.layers import (
    Activation,
    AdaptivePool,
    BatchNorm,
    Conv,
    Dropout,
    Flatten,
    Layer,
    Linear,
    Pool,
    Residual,
    pass_steps,
    run_order,
)
from shared.parallel import (
    Total,
    added,
    alone,
    joined,
    over_threads,
    rows_of,
    thread_count,
)
from shared.spec import Arch, Params

Masks = dict[str, np.ndarray] | None
R = TypeVar("R")


def layer_forward(
    layer: Layer,
    params: Params,
    x: np.ndarray,
    masks: Masks,
    buffers: Params,
    outputs: Params | None,
    total: Total = alone,
) -> tuple[np.ndarray, object]:
    """The layer's output and its cache; updated BatchNorm buffers go into `buffers`, the
    outputs of a block's layers into `outputs` (unless None: see chain_forward); `total`
    sums over the threads that share the batch (shared/parallel.py)."""
    match layer:
        case Residual(body=body, shortcut=shortcut):
            out, body_caches = chain_forward(body, params, x, masks, buffers, outputs, total)
            skip, shortcut_caches = chain_forward(
                shortcut, params, x, masks, buffers, outputs, total
            )
            return out + skip, (body_caches, shortcut_caches)
        case Conv(name, stride=stride, padding=padding):
            w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
            return layers.conv2d_forward(x, w, b, stride, padding)
        case Pool(op="max", size=size, stride=stride, padding=padding):
            return layers.max_pool_forward(x, size, stride, padding)
        case Pool(op="avg", size=size, stride=stride, padding=padding):
            return layers.avg_pool_forward(x, size, stride, padding)
        case AdaptivePool(window=window):
            return layers.avg_pool_forward(x, window, window)
        case BatchNorm(name, momentum=momentum, eps=eps):
            out, cache, (mean, var) = layers.batch_norm_forward(
                x,
                params[f"{name}.weight"],
                params[f"{name}.bias"],
                params[f"{name}.running_mean"],
                params[f"{name}.running_var"],
                momentum,
                eps,
                train=masks is not None,
                total=total,
            )
            if masks is not None:
                buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"] = mean, var
                buffers[f"{name}.num_batches_tracked"] = params[f"{name}.num_batches_tracked"] + 1
            return out, cache
        case Dropout(name, p):
            if masks is None:
                return x, None
            return layers.dropout_forward(x, masks[name], p)
        case Activation(fn=fn, param=param):
            # Looked up at call time, so a test can swap one for a planted wrong variant.
            return getattr(layers, f"{fn}_forward")(x, *([] if param is None else [param]))
        case Flatten():
            return layers.flatten_forward(x)
        case Linear(name):
            return layers.linear_forward(x, params[f"{name}.weight"], params[f"{name}.bias"])
    raise TypeError(f"unknown layer {layer!r}")


def layer_backward(
    layer: Layer,
    dout: np.ndarray,
    cache: object,
    need_dx: bool,
    grads: Params,
    douts: Params | None = None,
) -> np.ndarray | None:
    """Gradient with respect to the layer's input; parameter gradients go into `grads`, and a
    block's layers' output gradients into `douts` (see chain_backward)."""
    match layer:
        case Residual(body=body, shortcut=shortcut):
            body_caches, shortcut_caches = cache
            # The input fed both paths: its gradient is the sum of both paths' gradients.
            dx_body = chain_backward(body, dout, body_caches, need_dx, grads, douts)
            dx_shortcut = chain_backward(shortcut, dout, shortcut_caches, need_dx, grads, douts)
            return dx_body + dx_shortcut if need_dx else None
        case Conv(name, bias=bias):
            dx, grads[f"{name}.weight"], db = layers.conv2d_backward(dout, cache, need_dx)
            if bias:
                grads[f"{name}.bias"] = db
            return dx
        case Linear(name):
            dx, grads[f"{name}.weight"], grads[f"{name}.bias"] = layers.linear_backward(
                dout, cache, need_dx
            )
            return dx
        case BatchNorm(name):
            dx, grads[f"{name}.weight"], grads[f"{name}.bias"] = layers.batch_norm_backward(
                dout, cache
            )
            return dx
        case Pool(op="max"):
            return layers.max_pool_backward(dout, cache)[0]
        case Pool(op="avg") | AdaptivePool():
            return layers.avg_pool_backward(dout, cache)[0]
        case Dropout():
            return layers.dropout_backward(dout, cache)[0]
        case Activation(fn=fn):
            return getattr(layers, f"{fn}_backward")(dout, cache)[0]
        case Flatten():
            return layers.flatten_backward(dout, cache)[0]
    raise TypeError(f"unknown layer {layer!r}")


def chain_vjp(
    layers: tuple[Layer, ...], params: Params, x: np.ndarray, masks: Masks, total: Total = alone
) -> tuple[np.ndarray, Callable[[np.ndarray], Params]]:
    """The chain's output, run as the training pass runs it, and its pullback: dout ->
    {"input": dx, parameter name: gradient} (how the profile times layers forward and
    backward); `total` as in layer_forward."""
    out, caches = chain_forward(layers, params, x, masks, {}, None, total)

    def pullback(dout: np.ndarray) -> Params:
        grads: Params = {}
        grads["input"] = chain_backward(layers, dout, caches, True, grads)
        return grads

    return out, pullback


def chain_forward(
    layers: tuple[Layer, ...],
    params: Params,
    x: np.ndarray,
    masks: Masks,
    buffers: Params,
    outputs: Params | None,
    total: Total = alone,
) -> tuple[np.ndarray, list[object]]:
    """x through `layers` in the order the pass runs them (shared.layers.run_order): the last
    output and every layer's cache, in that order; each layer's output goes into `outputs`
    by name (a block's layers' too) unless it is None. A ReLU stepped with the max-pool over
    its output runs after it, on the pooled values; its own output is computed for `outputs`
    alone."""
    caches: list[object] = []
    for step in pass_steps(layers):
        if outputs is not None and len(step) == 2:
            relu = step[0]
            outputs[relu.name] = layer_forward(relu, params, x, masks, buffers, None, total)[0]
        for layer in run_order(step):
            x, cache = layer_forward(layer, params, x, masks, buffers, outputs, total)
            caches.append(cache)
        if outputs is not None:
            outputs[step[-1].name] = x
    return x, caches


def chain_backward(
    layers: tuple[Layer, ...],
    dout: np.ndarray,
    caches: list[object],
    need_dx: bool,
    grads: Params,
    douts: Params | None = None,
) -> np.ndarray | None:
    """dout of the chain's output -> the gradient with respect to its input (computed for the
    first layer run only if `need_dx`), from chain_forward's caches, back through the layers
    in the order they ran; parameter gradients go into `grads`, and, unless it is None, the
    gradient each layer is given (its output's as the pass ran it) into `douts` by name. A
    ReLU run after a max-pool takes its mask on the pooled values: one pass over a quarter
    of them (2x2 windows)."""
    ran = run_order(layers)
    for depth in reversed(range(len(ran))):
        if douts is not None:
            douts[ran[depth].name] = dout
        need = need_dx or depth > 0
        dout = layer_backward(ran[depth], dout, caches[depth], need, grads, douts)
    return dout


def _forward(
    params: Params,
    x: np.ndarray,
    arch: Arch,
    masks: Masks,
    total: Total = alone,
    outputs: Params | None = None,
) -> tuple[np.ndarray, list[object], Params]:
    """The logits, the caches of the network's layers as they ran, and the updated buffers
    (training only); every layer's output by name into `outputs` (a block's layers' too)
    if given (see chain_forward)."""
    buffers: Params = {}
    logits, caches = chain_forward(arch.layers, params, x, masks, buffers, outputs, total)
    return logits, caches, buffers


def over_rows(
    fn: Callable[..., R], arch: Arch, *batched: object, gradients: bool = True
) -> list[R]:
    """[fn(*parts, total)] for ranges of a batch's rows, `parts` being that range of each of
    `batched` (arrays (N, ...), dicts of them or None, see shared/parallel.py's rows_of), on
    as many threads as `arch`'s cost makes worth it (shared/parallel.py; `gradients`: whether
    each thread makes them). Only NumPy has it: JAX and PyTorch spread each operation over
    the cores themselves."""
    n = len(batched[0])

    def on_rows(rows: slice, total: Total) -> R:
        return fn(*(rows_of(b, rows) for b in batched), total)

    return over_threads(on_rows, n, thread_count(n, network_cost(arch.layers), gradients))


def activations(
    params: Params, x: np.ndarray, arch: Arch, masks: Masks = None
) -> dict[str, np.ndarray]:
    """Every layer's output, by layer name; x (N, 1, 28, 28) -> ..., logits (N, 10) last."""
    outputs: Params = {}
    _forward(params, x, arch, masks, alone, outputs)
    return outputs


def forward(params: Params, x: np.ndarray, arch: Arch) -> np.ndarray:
    """x (N, 1, 28, 28) -> logits (N, 10), in evaluation mode (rows on every core)."""

    def logits(x: np.ndarray, total: Total) -> np.ndarray:
        return _forward(params, x, arch, None)[0]

    return joined(over_rows(logits, arch, x, gradients=False))


def _loss_and_backward(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    arch: Arch,
    masks: Masks,
    label_smoothing: float,
    need_dx: bool,
    total: Total,
    outputs: Params | None = None,
    douts: Params | None = None,
) -> tuple[np.ndarray, Params, np.ndarray | None, np.ndarray, Params]:
    logits, caches, buffers = _forward(params, x, arch, masks, total, outputs)
    loss, dout = layers.softmax_cross_entropy(logits, y, label_smoothing, total)
    grads: Params = {}
    # The first layer's input is the image: its gradient is only computed on request.
    dout = chain_backward(arch.layers, dout, caches, need_dx, grads, douts)
    # Gradients in the canonical order (the backward pass met them last layer first).
    grads = {name: grads[name] for name in params if name in grads}
    return loss, grads, dout, logits, buffers


def _on_threads(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    arch: Arch,
    masks: Masks,
    label_smoothing: float,
    need_dx: bool,
) -> tuple[np.ndarray, Params, np.ndarray | None, np.ndarray, Params]:
    """_loss_and_backward with the batch's rows on every core (shared/parallel.py): each
    thread's loss and gradients are its rows' shares of the batch's, which add up to them;
    BatchNorm's buffers come out the same in every thread."""

    def rows_pass(x: np.ndarray, y: np.ndarray, masks: Masks, total: Total) -> tuple:
        return _loss_and_backward(params, x, y, arch, masks, label_smoothing, need_dx, total)

    parts = over_rows(rows_pass, arch, x, y, masks)
    if len(parts) == 1:
        return parts[0]
    losses, grads, dxs, logits, buffers = zip(*parts, strict=True)
    summed = {name: added(g[name] for g in grads) for name in grads[0]}
    dx = joined(dxs) if need_dx else None
    return added(losses), summed, dx, joined(logits), buffers[0]


def training_pass(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    arch: Arch,
    masks: dict[str, np.ndarray],
    label_smoothing: float = 0.0,
) -> tuple[np.ndarray, Params, np.ndarray, Params]:
    """One training-mode pass: (mean cross-entropy, the gradient of every trainable parameter,
    the logits (N, 10), the updated BatchNorm buffers)."""
    loss, grads, _, logits, buffers = _on_threads(
        params, x, y, arch, masks, label_smoothing, need_dx=False
    )
    return loss, grads, logits, buffers


def loss_and_grads(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    arch: Arch,
    masks: dict[str, np.ndarray],
    label_smoothing: float = 0.0,
) -> tuple[np.ndarray, Params]:
    """Mean cross-entropy and its gradient for every trainable parameter, in training mode."""
    loss, grads, _, _ = training_pass(params, x, y, arch, masks, label_smoothing)
    return loss, grads


def pass_parts(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    arch: Arch,
    masks: dict[str, np.ndarray],
    label_smoothing: float = 0.0,
) -> tuple[Params, Params, Params]:
    """A training-mode pass in parts, by name: every layer's output (as `activations`), the
    gradient of the loss each layer is given (of its output, (N, C, H, W) or (N, F), as the
    pass runs it: a ReLU stepped with its max-pool is given the pooled positions', see
    chain_backward) and every trainable parameter's gradient. The cross-check measures a
    gradient's round-off by the sizes of the terms it sums."""
    outputs: Params = {}
    douts: Params = {}
    _, grads, *_ = _loss_and_backward(
        params, x, y, arch, masks, label_smoothing, False, alone, outputs, douts
    )
    return outputs, douts, grads


def input_grad(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    arch: Arch,
    masks: dict[str, np.ndarray],
    label_smoothing: float = 0.0,
) -> np.ndarray:
    """Gradient of the training-mode loss with respect to the images, dx (N, 1, 28, 28)."""
    return _on_threads(params, x, y, arch, masks, label_smoothing, need_dx=True)[2]
