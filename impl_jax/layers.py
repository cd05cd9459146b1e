"""Layers as pure JAX functions, and as forward/backward pairs mirroring impl_numpy.layers.

`X_forward(inputs...) -> (out, cache)` and `X_backward(dout, cache) -> gradients of the inputs`:
here the cache is the pullback from `jax.vjp`, so autodiff supplies every backward pass.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _im2col(x: jax.Array, kernel_size: int, padding: int) -> jax.Array:
    """x (N, C, H, W) -> columns (N, C*k*k, H'*W'), row order (c, i, j) as in OIHW weights."""
    n, c, h, w = x.shape
    k = kernel_size
    xp = jnp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    shifted = [xp[:, :, i : i + ho, j : j + wo] for i in range(k) for j in range(k)]
    return jnp.stack(shifted, axis=2).reshape(n, c * k * k, ho * wo)


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, padding: int) -> jax.Array:
    """x (N, C, H, W), w (O, C, k, k), b (O,) -> out (N, O, H', W'); stride 1.

    Convolution as one matrix product w (O, C*k*k) @ im2col(x), as in impl_numpy: on this
    CPU, XLA's own convolution (lax.conv_general_dilated, which the tests use as the oracle)
    made the whole training step 25% slower for the network's single input channel.
    """
    n, _, h, wd = x.shape
    o, _, k, _ = w.shape
    out = jnp.matmul(w.reshape(o, -1), _im2col(x, k, padding)) + b[:, None]
    return out.reshape(n, o, h + 2 * padding - k + 1, wd + 2 * padding - k + 1)


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
