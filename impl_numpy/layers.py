"""Layers as forward/backward pairs over NumPy arrays.

`X_forward(inputs...) -> (out, cache)` and `X_backward(dout, cache) -> gradients of the inputs`,
in the order of the inputs. All arrays keep the dtype they come in (float32 or float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Cache = Any


def _im2col(x: np.ndarray, kernel_size: int, padding: int) -> np.ndarray:
    """x (N, C, H, W) -> columns (N, C*k*k, H'*W'), row order (c, i, j) as in OIHW weights."""
    n, c = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    windows = sliding_window_view(xp, (kernel_size, kernel_size), axis=(2, 3))
    ho, wo = windows.shape[2:4]
    # (N, C, H', W', k, k) -> (N, C, k, k, H', W'): one copy, laid out for a single matmul.
    return windows.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kernel_size**2, ho * wo)


def _col2im(
    dcols: np.ndarray, x_shape: tuple[int, ...], kernel_size: int, padding: int
) -> np.ndarray:
    """Adjoint of `_im2col`: columns (N, C*k*k, H'*W') -> dx (N, C, H, W), overlaps summed."""
    n, c, h, w = x_shape
    k = kernel_size
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    dcols = dcols.reshape(n, c, k, k, ho, wo)
    dxp = np.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=dcols.dtype)
    # One vectorised add per kernel offset (k*k of them), never a loop over pixels or images.
    for i in range(k):
        for j in range(k):
            dxp[:, :, i : i + ho, j : j + wo] += dcols[:, :, i, j]
    return dxp[:, :, padding : padding + h, padding : padding + w]


def conv2d_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, padding: int
) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W), w (O, C, k, k), b (O,) -> out (N, O, H', W'); stride 1.

    Convolution as one matrix product: w (O, C*k*k) @ im2col(x) (N, C*k*k, H'*W').
    """
    n, _, h, wd = x.shape
    o, _, k, _ = w.shape
    cols = _im2col(x, k, padding)
    out = np.matmul(w.reshape(o, -1), cols)  # (N, O, H'*W')
    out += b[:, None]
    ho, wo = h + 2 * padding - k + 1, wd + 2 * padding - k + 1
    return out.reshape(n, o, ho, wo), (x.shape, w, cols, padding)


def conv2d_backward(
    dout: np.ndarray, cache: Cache, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """dout (N, O, H', W') -> dx (N, C, H, W) (None unless need_dx), dw (O, C, k, k), db (O,)."""
    x_shape, w, cols, padding = cache
    n, o = dout.shape[:2]
    dout = dout.reshape(n, o, -1)  # (N, O, H'*W')
    # dw = sum over images of dout_n @ cols_n.T: a batched product, then one small sum (4x
    # faster here than np.tensordot, which first copies both operands into transposed order).
    dw = np.matmul(dout, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
    db = dout.sum(axis=(0, 2))
    dx = None
    if need_dx:
        dcols = np.matmul(w.reshape(o, -1).T, dout)  # (N, C*k*k, H'*W')
        dx = _col2im(dcols, x_shape, w.shape[2], padding)
    return dx, dw, db


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (any shape) -> max(x, 0), same shape."""
    out = np.maximum(x, 0)
    return out, out


def relu_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """Gradient passes where the output is positive; the derivative at 0 is taken as 0."""
    out = cache
    return (dout * (out > 0),)


def max_pool_forward(x: np.ndarray, size: int) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W) -> out (N, C, H//size, W//size): max over non-overlapping windows.

    Rows and columns that do not fill a window are dropped, as PyTorch and JAX do.
    """
    n, c, h, w = x.shape
    ho, wo = h // size, w // size
    windows = x[:, :, : ho * size, : wo * size].reshape(n, c, ho, size, wo, size)
    windows = windows.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, size * size)
    # The first maximum in a window takes the gradient, as in PyTorch and XLA.
    argmax = windows.argmax(axis=-1)
    out = np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]
    return out, (x.shape, argmax, size)


def max_pool_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """dout (N, C, H//size, W//size) -> dx (N, C, H, W), routed to each window's maximum."""
    x_shape, argmax, size = cache
    n, c = x_shape[:2]
    ho, wo = dout.shape[2:]
    dwindows = np.zeros((n, c, ho, wo, size * size), dtype=dout.dtype)
    np.put_along_axis(dwindows, argmax[..., None], dout[..., None], axis=-1)
    dwindows = dwindows.reshape(n, c, ho, wo, size, size).transpose(0, 1, 2, 4, 3, 5)
    dx = np.zeros(x_shape, dtype=dout.dtype)
    dx[:, :, : ho * size, : wo * size] = dwindows.reshape(n, c, ho * size, wo * size)
    return (dx,)


def flatten_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W) -> (N, C*H*W) in C, H, W order (PyTorch's `flatten(x, 1)`)."""
    return x.reshape(len(x), -1), x.shape


def flatten_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    return (dout.reshape(cache),)


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (N, D), w (M, D), b (M,) -> out (N, M)."""
    return x @ w.T + b, (x, w)


def linear_backward(
    dout: np.ndarray, cache: Cache, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """dout (N, M) -> dx (N, D) (None unless need_dx), dw (M, D), db (M,)."""
    x, w = cache
    dx = dout @ w if need_dx else None
    return dx, dout.T @ x, dout.sum(axis=0)


def softmax_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """logits (N, K), labels (N,) int -> mean loss (scalar array), dlogits (N, K).

    With smoothing eps the target is (1 - eps) * one_hot + eps / K, as in PyTorch.
    """
    n, k = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    logp = shifted - np.log(sum_exp)
    target = np.full_like(logits, label_smoothing / k)
    target[np.arange(n), labels] += 1 - label_smoothing
    loss = -(target * logp).sum() / n
    dlogits = (exp / sum_exp - target) / n
    return loss, dlogits
