"""Layers as PyTorch functions, and as forward/backward pairs mirroring impl_numpy.layers.

`X_forward(inputs...) -> (out, cache)` and `X_backward(dout, cache) -> gradients of the inputs`:
here the cache holds the autograd graph, so autograd supplies every backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: int) -> torch.Tensor:
    """x (N, C, H, W), w (O, C, k, k), b (O,) -> out (N, O, H', W'); stride 1."""
    return F.conv2d(x, w, b, padding=padding)


def relu(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0); the derivative at 0 is 0."""
    return F.relu(x)


def max_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, H//size, W//size); leftover rows and columns are dropped."""
    return F.max_pool2d(x, size)


def flatten(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C*H*W) in C, H, W order."""
    return torch.flatten(x, 1)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (N, D), w (M, D), b (M,) -> out (N, M)."""
    return F.linear(x, w, b)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy of logits (N, K) against labels (N,)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def _forward(fn, *inputs: torch.Tensor, **static):
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    out = fn(*leaves, **static)
    return out.detach(), (out, leaves)


def _backward(dout: torch.Tensor, cache) -> tuple[torch.Tensor, ...]:
    out, leaves = cache
    return torch.autograd.grad(out, leaves, dout)


def conv2d_forward(x, w, b, padding: int):
    return _forward(conv2d, x, w, b, padding=padding)


def relu_forward(x):
    return _forward(relu, x)


def max_pool_forward(x, size: int):
    return _forward(max_pool, x, size=size)


def flatten_forward(x):
    return _forward(flatten, x)


def linear_forward(x, w, b):
    return _forward(linear, x, w, b)


conv2d_backward = relu_backward = max_pool_backward = flatten_backward = linear_backward = _backward


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """logits (N, K), labels (N,) -> mean loss, dlogits (N, K)."""
    loss, (out, leaves) = _forward(
        cross_entropy, logits, labels=labels, label_smoothing=label_smoothing
    )
    return loss, _backward(torch.ones_like(loss), (out, leaves))[0]
