"""Layers as PyTorch functions, and as forward/backward pairs mirroring impl_numpy.layers.

`X_forward(inputs...) -> (out, cache)` and `X_backward(dout, cache) -> gradients of the inputs`:
here the cache holds the autograd graph, so autograd supplies every backward pass (max-pooling's
through _MaxPool, which picks PyTorch's faster kernels).
Sliding windows (conv, pooling) cover H' = (H + 2 * padding - k) // stride + 1 rows: rows and
columns that do not fill a window are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def conv2d(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """x (N, C, H, W), w (O, C, k, k), b (O,) or None -> out (N, O, H', W')."""
    return F.conv2d(x, w, b, stride=stride, padding=padding)


def relu(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0); the derivative at 0 is 0."""
    return F.relu(x)


def leakyrelu(x: torch.Tensor, slope: float) -> torch.Tensor:
    """x where positive, slope * x elsewhere; the derivative at 0 is slope."""
    return F.leaky_relu(x, slope)


def elu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x where positive, alpha * (exp(x) - 1) elsewhere."""
    return F.elu(x, alpha)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact GELU, x * Phi(x) (PyTorch's default)."""
    return F.gelu(x)


def gelutanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation."""
    return F.gelu(x, approximate="tanh")


def tanh(x: torch.Tensor) -> torch.Tensor:
    """Elementwise tanh."""
    return torch.tanh(x)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Elementwise 1 / (1 + exp(-x))."""
    return torch.sigmoid(x)


def max_pool(x: torch.Tensor, size: int, stride: int, padding: int = 0) -> torch.Tensor:
    """x (N, C, H, W) padded with -inf -> (N, C, H', W'); the first maximum in a window takes
    the gradient (see _MaxPool)."""
    return _MaxPool.apply(x, size, stride, padding)


class _MaxPool(torch.autograd.Function):
    """F.max_pool2d's maxima and gradient, the forward by PyTorch's channels-last kernel and
    the backward by its NCHW kernel from the forward's indices (a window's position in the
    image plane, the same in both layouts).

    PyTorch's NCHW forward kernel takes one window at a time; its channels-last kernel
    vectorises over the channels. On an Intel Xeon (family 6, model 207), on strong's first
    pooling at batch 128 (128, 32, 28, 28): forward 15-17 ms in NCHW against 4.3 ms with the
    input copied to channels-last and the output back; with the channels-last backward too,
    the input's gradient came out in that layout and the pair took 12.8 ms, against 5.8 this
    way and 17.4 in NCHW (docs/PERFORMANCE.md). Ties and NaNs go as in F.max_pool2d: both
    kernels keep the first maximum, or the last NaN. Unlike F.max_pool2d, it has no second
    derivative and no forward-mode one (torch.func), which nothing here takes. as_module
    keeps nn.MaxPool2d (the same values, and a module users can export).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, stride: int, padding: int) -> torch.Tensor:
        channels_last = x.contiguous(memory_format=torch.channels_last)
        out, indices = F.max_pool2d(channels_last, size, stride, padding, return_indices=True)
        ctx.save_for_backward(x, indices)
        ctx.window = size, stride, padding
        return out.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        x, indices = ctx.saved_tensors
        size, stride, padding = ctx.window
        dx = torch.ops.aten.max_pool2d_with_indices_backward(
            dout, x, [size, size], [stride, stride], [padding, padding], [1, 1], False, indices
        )
        return dx, None, None, None


def avg_pool(x: torch.Tensor, size: int, stride: int, padding: int = 0) -> torch.Tensor:
    """x (N, C, H, W) padded with zeros that count -> (N, C, H', W'), each window's mean."""
    return F.avg_pool2d(x, size, stride, padding)


def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    train: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, C) or (N, C, H, W); weight, bias, running stats (C,) -> out like x,
    running_mean, running_var (C,): PyTorch's BatchNorm1d/2d, whose running stats move by
    momentum towards the batch mean and unbiased variance in training."""
    # F.batch_norm updates the running stats in place: on copies, to stay a pure function.
    running_mean, running_var = running_mean.clone(), running_var.clone()
    out = F.batch_norm(x, running_mean, running_var, weight, bias, train, momentum, eps)
    return out, running_mean, running_var


def dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: x, keep bool (x's shape) -> x * keep / (1 - p)."""
    return x * keep / (1 - p)


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


def _forward(fn, *inputs: torch.Tensor, has_aux: bool = False, **static):
    """fn(*inputs, **static) on fresh autograd leaves -> (out, cache), and with has_aux (fn
    returns (out, aux)) -> (out, cache, aux), the order of jax.vjp."""
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    out, aux = fn(*leaves, **static) if has_aux else (fn(*leaves, **static), None)
    result = out.detach(), (out, leaves)
    return (*result, aux) if has_aux else result


def _backward(dout: torch.Tensor, cache) -> tuple[torch.Tensor, ...]:
    out, leaves = cache
    return torch.autograd.grad(out, leaves, dout)


def conv2d_forward(x, w, b, stride: int, padding: int):
    if b is None:  # no bias to differentiate: the pair gives (dx, dw)
        return _forward(conv2d, x, w, b=None, stride=stride, padding=padding)
    return _forward(conv2d, x, w, b, stride=stride, padding=padding)


def relu_forward(x):
    return _forward(relu, x)


def leakyrelu_forward(x, slope: float):
    return _forward(leakyrelu, x, slope=slope)


def elu_forward(x, alpha: float):
    return _forward(elu, x, alpha=alpha)


def gelu_forward(x):
    return _forward(gelu, x)


def gelutanh_forward(x):
    return _forward(gelutanh, x)


def tanh_forward(x):
    return _forward(tanh, x)


def sigmoid_forward(x):
    return _forward(sigmoid, x)


def max_pool_forward(x, size: int, stride: int, padding: int = 0):
    return _forward(max_pool, x, size=size, stride=stride, padding=padding)


def avg_pool_forward(x, size: int, stride: int, padding: int = 0):
    return _forward(avg_pool, x, size=size, stride=stride, padding=padding)


def batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps, train):
    """-> out, cache, (running_mean, running_var), as impl_jax."""

    def out_and_stats(x, weight, bias):
        out, *stats = batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, train)
        return out, tuple(stats)

    return _forward(out_and_stats, x, weight, bias, has_aux=True)


def dropout_forward(x, keep, p: float):
    return _forward(dropout, x, keep=keep, p=p)


def flatten_forward(x):
    return _forward(flatten, x)


def linear_forward(x, w, b):
    return _forward(linear, x, w, b)


conv2d_backward = max_pool_backward = avg_pool_backward = batch_norm_backward = _backward
relu_backward = leakyrelu_backward = elu_backward = gelu_backward = gelutanh_backward = _backward
tanh_backward = sigmoid_backward = dropout_backward = _backward
flatten_backward = linear_backward = _backward


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """logits (N, K), labels (N,) -> mean loss, dlogits (N, K)."""
    loss, (out, leaves) = _forward(
        cross_entropy, logits, labels=labels, label_smoothing=label_smoothing
    )
    return loss, _backward(torch.ones_like(loss), (out, leaves))[0]
