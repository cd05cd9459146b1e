"""Layers as pure JAX functions, and as forward/backward pairs mirroring impl_numpy.layers.

`X_forward(inputs...) -> (out, cache)` and `X_backward(dout, cache) -> gradients of the inputs`:
here the cache is the pullback from `jax.vjp`, so autodiff supplies every backward pass.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, padding: int) -> jax.Array:
    """x (N, C, H, W), w (O, C, k, k), b (O,) -> out (N, O, H', W'); stride 1."""
    out = lax.conv_general_dilated(
        x,
        w,
        window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return out + b[None, :, None, None]


def relu(x: jax.Array) -> jax.Array:
    """max(x, 0); jax.nn.relu takes the derivative at 0 as 0, like PyTorch (jnp.maximum: 0.5)."""
    return jax.nn.relu(x)


def max_pool(x: jax.Array, size: int) -> jax.Array:
    """x (N, C, H, W) -> (N, C, H//size, W//size); leftover rows and columns are dropped."""
    window = (1, 1, size, size)
    # A Python -inf with lax.max is recognised as max-pooling, which has a gradient.
    return lax.reduce_window(x, -jnp.inf, lax.max, window, window, "VALID")


def flatten(x: jax.Array) -> jax.Array:
    """x (N, C, H, W) -> (N, C*H*W) in C, H, W order."""
    return x.reshape(x.shape[0], -1)


def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x (N, D), w (M, D), b (M,) -> out (N, M)."""
    return x @ w.T + b


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy of logits (N, K) against labels (N,), target smoothed as in PyTorch."""
    k = logits.shape[-1]
    logp = jax.nn.log_softmax(logits)
    target = jax.nn.one_hot(labels, k, dtype=logits.dtype) * (1 - label_smoothing)
    target = target + label_smoothing / k
    return -(target * logp).sum() / logits.shape[0]


def _backward(dout: jax.Array, cache):
    return cache(dout)


def conv2d_forward(x, w, b, padding: int):
    return jax.vjp(partial(conv2d, padding=padding), x, w, b)


def relu_forward(x):
    return jax.vjp(relu, x)


def max_pool_forward(x, size: int):
    return jax.vjp(partial(max_pool, size=size), x)


def flatten_forward(x):
    return jax.vjp(flatten, x)


def linear_forward(x, w, b):
    return jax.vjp(linear, x, w, b)


conv2d_backward = relu_backward = max_pool_backward = flatten_backward = linear_backward = _backward


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """logits (N, K), labels (N,) -> mean loss, dlogits (N, K)."""
    return jax.value_and_grad(cross_entropy)(logits, labels, label_smoothing)
