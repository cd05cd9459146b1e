"""The network over the canonical parameter dict, forward and backward by hand."""

from __future__ import annotations

import numpy as np

from impl_numpy import layers
from shared.spec import Arch, Conv, Flatten, Layer, Linear, MaxPool, Params, ReLU


def _layer_forward(layer: Layer, params: Params, x: np.ndarray) -> tuple[np.ndarray, object]:
    match layer:
        case Conv(name, padding=padding):
            return layers.conv2d_forward(
                x, params[f"{name}.weight"], params[f"{name}.bias"], padding
            )
        case ReLU():
            return layers.relu_forward(x)
        case MaxPool(size=size):
            return layers.max_pool_forward(x, size)
        case Flatten():
            return layers.flatten_forward(x)
        case Linear(name):
            return layers.linear_forward(x, params[f"{name}.weight"], params[f"{name}.bias"])
    raise TypeError(f"unknown layer {layer!r}")


def _layer_backward(
    layer: Layer, dout: np.ndarray, cache: object, need_dx: bool, grads: Params
) -> np.ndarray | None:
    """Gradient with respect to the layer's input; parameter gradients go into `grads`."""
    match layer:
        case Conv(name):
            dx, grads[f"{name}.weight"], grads[f"{name}.bias"] = layers.conv2d_backward(
                dout, cache, need_dx
            )
            return dx
        case Linear(name):
            dx, grads[f"{name}.weight"], grads[f"{name}.bias"] = layers.linear_backward(
                dout, cache, need_dx
            )
            return dx
        case ReLU():
            return layers.relu_backward(dout, cache)[0]
        case MaxPool():
            return layers.max_pool_backward(dout, cache)[0]
        case Flatten():
            return layers.flatten_backward(dout, cache)[0]
    raise TypeError(f"unknown layer {layer!r}")


def activations(params: Params, x: np.ndarray, arch: Arch) -> dict[str, np.ndarray]:
    """Every layer's output, by layer name; x (N, 1, 28, 28) -> ..., logits (N, 10) last."""
    acts = {}
    for layer in arch.layers:
        x, _ = _layer_forward(layer, params, x)
        acts[layer.name] = x
    return acts


def forward(params: Params, x: np.ndarray, arch: Arch) -> np.ndarray:
    """x (N, 1, 28, 28) -> logits (N, 10)."""
    for layer in arch.layers:
        x, _ = _layer_forward(layer, params, x)
    return x


def _loss_and_backward(
    params: Params, x: np.ndarray, y: np.ndarray, arch: Arch, label_smoothing: float, need_dx: bool
) -> tuple[float, Params, np.ndarray | None, np.ndarray]:
    caches = []
    for layer in arch.layers:
        x, cache = _layer_forward(layer, params, x)
        caches.append(cache)
    logits = x
    loss, dout = layers.softmax_cross_entropy(logits, y, label_smoothing)
    grads: Params = {}
    for depth in reversed(range(len(arch.layers))):
        # The first layer's input is the image: its gradient is only computed on request.
        dout = _layer_backward(arch.layers[depth], dout, caches[depth], need_dx or depth > 0, grads)
    return float(loss), grads, dout, logits


def loss_and_grads(
    params: Params, x: np.ndarray, y: np.ndarray, arch: Arch, label_smoothing: float = 0.0
) -> tuple[float, Params]:
    """Mean cross-entropy and its gradient for every canonical parameter."""
    loss, grads, _, _ = _loss_and_backward(params, x, y, arch, label_smoothing, need_dx=False)
    return loss, grads


def loss_grads_and_logits(
    params: Params, x: np.ndarray, y: np.ndarray, arch: Arch, label_smoothing: float = 0.0
) -> tuple[float, Params, np.ndarray]:
    """As `loss_and_grads`, plus the logits (N, 10) of the forward pass, for training metrics."""
    loss, grads, _, logits = _loss_and_backward(params, x, y, arch, label_smoothing, need_dx=False)
    return loss, grads, logits


def input_grad(
    params: Params, x: np.ndarray, y: np.ndarray, arch: Arch, label_smoothing: float = 0.0
) -> np.ndarray:
    """Gradient of the loss with respect to the images, dx (N, 1, 28, 28)."""
    return _loss_and_backward(params, x, y, arch, label_smoothing, need_dx=True)[2]
