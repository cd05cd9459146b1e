"""The network as pure functions of (params, x): no state, no transposes, canonical names."""

from __future__ import annotations

import jax

from impl_jax import layers
from shared.spec import Arch, Conv, Flatten, Layer, Linear, MaxPool, ReLU

Params = dict[str, jax.Array]


def _layer_forward(layer: Layer, params: Params, x: jax.Array) -> jax.Array:
    match layer:
        case Conv(name, padding=padding):
            return layers.conv2d(x, params[f"{name}.weight"], params[f"{name}.bias"], padding)
        case ReLU():
            return layers.relu(x)
        case MaxPool(size=size):
            return layers.max_pool(x, size)
        case Flatten():
            return layers.flatten(x)
        case Linear(name):
            return layers.linear(x, params[f"{name}.weight"], params[f"{name}.bias"])
    raise TypeError(f"unknown layer {layer!r}")


def activations(params: Params, x: jax.Array, arch: Arch) -> dict[str, jax.Array]:
    """Every layer's output, by layer name; x (N, 1, 28, 28) -> ..., logits (N, 10) last."""
    acts = {}
    for layer in arch.layers:
        x = _layer_forward(layer, params, x)
        acts[layer.name] = x
    return acts


def forward(params: Params, x: jax.Array, arch: Arch) -> jax.Array:
    """x (N, 1, 28, 28) -> logits (N, 10)."""
    for layer in arch.layers:
        x = _layer_forward(layer, params, x)
    return x


def loss(
    params: Params, x: jax.Array, y: jax.Array, arch: Arch, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean cross-entropy of the network's logits against labels y (N,)."""
    return layers.cross_entropy(forward(params, x, arch), y, label_smoothing)


def _loss_with_logits(params, x, y, arch, label_smoothing):
    logits = forward(params, x, arch)
    return layers.cross_entropy(logits, y, label_smoothing), logits


def loss_grads_and_logits(
    params: Params, x: jax.Array, y: jax.Array, arch: Arch, label_smoothing: float = 0.0
) -> tuple[jax.Array, Params, jax.Array]:
    """Mean cross-entropy, its gradient for every canonical parameter, and the logits (N, 10)
    of the forward pass (for training metrics)."""
    (value, logits), grads = jax.value_and_grad(_loss_with_logits, has_aux=True)(
        params, x, y, arch, label_smoothing
    )
    return value, grads, logits


def loss_and_grads(
    params: Params, x: jax.Array, y: jax.Array, arch: Arch, label_smoothing: float = 0.0
) -> tuple[jax.Array, Params]:
    """Mean cross-entropy and its gradient for every canonical parameter."""
    value, grads, _ = loss_grads_and_logits(params, x, y, arch, label_smoothing)
    return value, grads


def input_grad(
    params: Params, x: jax.Array, y: jax.Array, arch: Arch, label_smoothing: float = 0.0
) -> jax.Array:
    """Gradient of the loss with respect to the images, dx (N, 1, 28, 28)."""
    return jax.grad(loss, argnums=1)(params, x, y, arch, label_smoothing)
