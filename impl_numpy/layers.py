"""Layers as forward/backward pairs over NumPy arrays.

`X_forward(inputs...) -> (out, cache)` and `X_backward(dout, cache) -> gradients of the inputs`,
in the order of the inputs. All arrays keep the dtype they come in (float32 or float64).
Sliding windows (conv, pooling) cover H' = (H + 2 * padding - k) // stride + 1 rows, as in
PyTorch: rows and columns that do not fill a window are dropped and get a zero gradient.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import special

from shared.layers import window_offsets
from shared.parallel import Total, added, alone, ranges_within

Cache = Any


def _windows(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    """x (N, C, H, W) -> view (N, C, H', W', k, k) of the k x k windows, moved by stride."""
    return sliding_window_view(x, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]


def _pad(x: np.ndarray, padding: int, value: float = 0.0) -> np.ndarray:
    """x (N, C, H, W) -> (N, C, H + 2 padding, W + 2 padding), the border filled with value."""
    if not padding:
        return x
    return np.pad(
        x, ((0, 0), (0, 0), (padding, padding), (padding, padding)), constant_values=value
    )


def _col2im(
    dwindows: np.ndarray, x_shape: tuple[int, ...], stride: int, padding: int
) -> np.ndarray:
    """Adjoint of taking windows: dwindows (A, B, k, k, H', W') -> dx (A, B, H, W) of images
    (H, W) = x_shape[2:], overlaps summed, padding cut off; (A, B) is (N, C) or (C, N)."""
    a, b, k = dwindows.shape[:3]
    h, w = x_shape[2:]
    dxp = np.zeros((a, b, h + 2 * padding, w + 2 * padding), dtype=dwindows.dtype)
    # One vectorised add per kernel offset (k*k of them), never a loop over pixels or images.
    for i, view in enumerate(window_offsets(dxp, k, stride)):
        view += dwindows[:, :, i // k, i % k]
    return dxp[:, :, padding : padding + h, padding : padding + w]


def _one_product(c: int) -> bool:
    """Whether a convolution over c input channels runs as one matrix product over the whole
    batch rather than one per image. Measured at batch 128 (docs/PERFORMANCE.md): one product
    is faster with more channels (on the strong network's 32 -> 64, 1.3x forward and 1.5x
    backward), one per image with a single channel (on 1 -> 32, 4.6x forward), whose
    product is too thin to pay for laying the whole batch out as one matrix."""
    return c > 1


def _rows_fit(k: int, stride: int, padding: int) -> bool:
    """Whether a convolution's input gradient can run on stacked rows (_dx_on_stacked_rows):
    stride 1, and padding below the kernel size, so that an output row is no longer than
    an input row with its zeros."""
    return stride == 1 and padding < k


def _dx_on_stacked_rows(
    dout: np.ndarray, w2: np.ndarray, k: int, padding: int, dx: np.ndarray
) -> None:
    """dout (N, O, H', W'), w2 (O, C*k*k) -> dx (N, C, H, W) of a stride-1 convolution,
    written into dx.

    The batch lies as one flat row per channel: each image row followed by `padding` zeros,
    each image by `padding` zero rows. The zeros after a row are its right border and the
    next row's left, so one set serves both. Laid out so, tap (i, j) of every output pixel
    sits at one offset from the pixel's own place, (i - padding) * (W + padding) + j - padding,
    and col2im is k*k adds of whole rows, not of runs one image row long (2.5x faster on
    `strong`'s 32 -> 64, docs/PERFORMANCE.md). The product covers the zeros' places too
    (1.15x the columns at 14x14), where dout is zero and adds nothing.
    """
    n, o, ho, wo = dout.shape
    c, h, w = dx.shape[1:]
    rows, cols = h + padding, w + padding
    grid = n * rows * cols
    douts = np.zeros((o, n, rows, cols), dtype=dout.dtype)
    douts[:, :, :ho, :wo] = dout.transpose(1, 0, 2, 3)
    dcols = (w2.T @ douts.reshape(o, grid)).reshape(c, k * k, grid)
    reach = (k - 1) * (cols + 1)  # room past either end of the grid for any tap's offset
    dxs = np.zeros((c, reach + grid + reach), dtype=dout.dtype)
    for tap in range(k * k):
        start = reach + (tap // k - padding) * cols + tap % k - padding
        dxs[:, start : start + grid] += dcols[:, tap]
    dx_by_channel = dxs[:, reach : reach + grid].reshape(c, n, rows, cols)[:, :, :h, :w]
    np.copyto(dx, dx_by_channel.transpose(1, 0, 2, 3))


def conv2d_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, padding: int
) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W), w (O, C, k, k), b (O,) or None -> out (N, O, H', W').

    Convolution as a matrix product of w (O, C*k*k) with the columns im2col(x): one over the
    batch, w @ (C*k*k, N*H'*W'), or one per image, w @ (N, C*k*k, H'*W') (see _one_product).
    A bias rides in the product as one more column of w (O, C*k*k + 1) against a row of ones
    under the columns, so that neither pass makes one more trip over the output for it.
    """
    n, c = x.shape[:2]
    o, _, k, _ = w.shape
    windows = _windows(_pad(x, padding), k, stride)  # (N, C, H', W', k, k), a view
    ho, wo = windows.shape[2:4]
    taps = c * k * k
    w2 = w.reshape(o, taps)
    if b is not None:
        w2 = np.concatenate([w2, b[:, None]], axis=1, dtype=w.dtype)  # (O, C*k*k + 1)
    # One copy of the windows into the product's layout, rows in OIHW's (c, i, j) order,
    # then the row of ones.
    if _one_product(c):
        cols = np.empty((w2.shape[1], n * ho * wo), dtype=x.dtype)
        cols[:taps].reshape(c, k, k, n, ho, wo)[...] = windows.transpose(1, 4, 5, 0, 2, 3)
        cols[taps:] = 1
        out = (w2 @ cols).reshape(o, n, ho, wo).transpose(1, 0, 2, 3)
        out = np.ascontiguousarray(out)
    else:
        cols = np.empty((n, w2.shape[1], ho * wo), dtype=x.dtype)
        cols[:, :taps].reshape(n, c, k, k, ho, wo)[...] = windows.transpose(0, 1, 4, 5, 2, 3)
        cols[:, taps:] = 1
        out = np.matmul(w2, cols).reshape(n, o, ho, wo)
    return out, (x.shape, w, cols, stride, padding)


# The images whose columns a convolution's backward takes at a time (the one-product form):
# its products and col2im then run on columns the cache still holds. On the PyTorch examples'
# Net (32 -> 64 at 26x26, 0.67 MB of columns an image), groups of 8-16 images took 0.75-0.8x
# the time of the whole batch's 64 at once; on `strong` (0.23 MB) groups of 16-32 as long
# as 64 (docs/PERFORMANCE.md). A group may hold less than an image more (see ranges_within).
COLUMNS_BYTES = 8 << 20


def _one_product_backward(
    dout: np.ndarray,
    cols: np.ndarray,
    w2: np.ndarray,
    k: int,
    stride: int,
    padding: int,
    dx: np.ndarray | None,
) -> np.ndarray:
    """The backward of one group of images of a one-product convolution: dout (M, O, H', W'),
    cols (C*k*k [+ 1], M*H'*W') their columns, w2 (O, C*k*k) -> their share of dw
    (O, C*k*k [+ 1]); their dx (M, C, H, W) written into dx unless it is None."""
    m, o, ho, wo = dout.shape
    douts = dout.transpose(1, 0, 2, 3).reshape(o, m * ho * wo)  # (O, M*H'*W')
    # The same sums as douts @ cols.T, which OpenBLAS ran 1.2-1.7x slower alone; with
    # this form the training step took 0.97-1.01x the time (docs/PERFORMANCE.md).
    dw = (cols @ douts.T).T
    if dx is None:
        return dw
    if _rows_fit(k, stride, padding):
        _dx_on_stacked_rows(dout, w2, k, padding, dx)
    else:
        # Summed back in the product's (C, M) order, where each offset's block is
        # contiguous, and turned to (M, C) at the end.
        c = dx.shape[1]
        dcols = (w2.T @ douts).reshape(c, k, k, m, ho, wo).transpose(0, 3, 1, 2, 4, 5)
        np.copyto(dx, _col2im(dcols, dx.shape, stride, padding).transpose(1, 0, 2, 3))
    return dw


def conv2d_backward(
    dout: np.ndarray, cache: Cache, need_dx: bool = True
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """dout (N, O, H', W') -> dx (N, C, H, W) (None unless need_dx), dw (O, C, k, k), db (O,)
    (the bias's gradient, whether or not the conv has one)."""
    x_shape, w, cols, stride, padding = cache
    n, o, ho, wo = dout.shape
    c, k = w.shape[1:3]
    taps, dx = c * k * k, None
    w2 = w.reshape(o, taps)
    if _one_product(c):
        per_image = ho * wo
        image_bytes = cols.shape[0] * per_image * cols.itemsize
        dx = np.empty(x_shape, dtype=dout.dtype) if need_dx else None
        dw = added(
            _one_product_backward(
                dout[rows],
                cols[:, rows.start * per_image : rows.stop * per_image],
                w2,
                k,
                stride,
                padding,
                None if dx is None else dx[rows],
            )
            for rows in ranges_within(n, image_bytes, COLUMNS_BYTES)  # one, empty, if n = 0
        )
    else:
        douts = dout.reshape(n, o, ho * wo)
        # dw = sum over images of dout_n @ cols_n.T: a batched product, then one small sum
        # (4x faster here than np.tensordot, which first copies both operands transposed).
        dw = np.matmul(douts, cols.transpose(0, 2, 1)).sum(axis=0)
        if need_dx:
            dcols = np.matmul(w2.T, douts).reshape(n, c, k, k, ho, wo)
            dx = _col2im(dcols, x_shape, stride, padding)
    # The row of ones gives the bias's gradient as the product's last column.
    db = dw[:, taps].copy() if dw.shape[1] > taps else _channel_sum(dout)
    return dx, dw[:, :taps].reshape(w.shape), db


def relu_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (any shape) -> max(x, 0), same shape."""
    out = np.maximum(x, 0)
    return out, out


def relu_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """Gradient passes where the output is positive; the derivative at 0 is taken as 0."""
    out = cache
    return (dout * (out > 0),)


def leakyrelu_forward(x: np.ndarray, slope: float) -> tuple[np.ndarray, Cache]:
    """x (any shape) -> x where positive, slope * x elsewhere."""
    return np.where(x > 0, x, slope * x), (x, slope)


def leakyrelu_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """1 where the input is positive, slope elsewhere (at 0 too, as PyTorch)."""
    x, slope = cache
    return (np.where(x > 0, dout, slope * dout),)


def elu_forward(x: np.ndarray, alpha: float) -> tuple[np.ndarray, Cache]:
    """x (any shape) -> x where positive, alpha * (exp(x) - 1) elsewhere."""
    # expm1 of min(x, 0): exp never overflows on the side where np.where discards it.
    out = np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))
    return out, (x, out, alpha)


def elu_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """1 where the input is positive, alpha * exp(x) = out + alpha elsewhere (at 0: alpha)."""
    x, out, alpha = cache
    return (np.where(x > 0, dout, dout * (out + alpha)),)


def gelu_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (any shape) -> x * Phi(x), Phi the standard normal's CDF: the exact GELU."""
    cdf = 0.5 * (1 + special.erf(x / math.sqrt(2)))
    return x * cdf, (x, cdf)


def gelu_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """GELU' = Phi(x) + x * phi(x), phi the standard normal's density."""
    x, cdf = cache
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return (dout * (cdf + x * pdf),)


# The tanh approximation's constants, as PyTorch's and JAX's; Python floats, which keep a
# float32 array float32 (a NumPy float64 scalar would widen it).
_GELU_C = math.sqrt(2 / math.pi)
_GELU_A = 0.044715


def gelutanh_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (any shape) -> 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GELU's approximation."""
    t = np.tanh(_GELU_C * (x + _GELU_A * x**3))
    return 0.5 * x * (1 + t), (x, t)


def gelutanh_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """The derivative of the approximation: 0.5 (1 + t) + 0.5 x (1 - t^2) u', u' its inside's."""
    x, t = cache
    inner = _GELU_C * (1 + 3 * _GELU_A * x * x)
    return (dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner),)


def tanh_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (any shape) -> tanh(x), same shape."""
    out = np.tanh(x)
    return out, out


def tanh_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """tanh' = 1 - tanh^2, from the cached output."""
    out = cache
    return (dout * (1 - out * out),)


def sigmoid_forward(x: np.ndarray) -> tuple[np.ndarray, Cache]:
    """x (any shape) -> 1 / (1 + exp(-x)), same shape."""
    # exp(-softplus(-x)): no overflow for large |x|, and small outputs keep their precision.
    out = np.exp(-np.logaddexp(0, -x))
    return out, out


def sigmoid_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """sigmoid' = sigmoid * (1 - sigmoid), from the cached output."""
    out = cache
    return (dout * out * (1 - out),)


def max_pool_forward(
    x: np.ndarray, size: int, stride: int, padding: int = 0
) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W) -> out (N, C, H', W'): max over size x size windows moved by stride,
    of x padded by `padding` with -inf (a window of -inf alone sends its gradient to the
    padding, where PyTorch picks its first pixel)."""
    # The window's offsets one after another, (size*size, N, C, H', W'): a copy of the values
    # the windows cover (size^2 / stride^2 times x where windows overlap), after which every
    # pass below runs over contiguous memory (3x faster than over strided views).
    offsets = np.stack(window_offsets(_pad(x, padding, -np.inf), size, stride))
    # A running maximum over the offsets in row-major order whose index moves only to a
    # larger value or a NaN, as in PyTorch's kernel: the first maximum takes the gradient
    # (and NaN propagates). Offset i exceeds every index so far, so moving it is a maximum
    # with larger * i (selecting under a mask ran 10x slower).
    out = offsets[0]
    argmax = np.zeros(out.shape, dtype=np.uint8 if size * size < 256 else np.intp)
    for i, view in enumerate(offsets[1:], 1):
        larger = view > out
        larger |= np.isnan(view)
        np.maximum(argmax, larger * argmax.dtype.type(i), out=argmax)
        out = np.maximum(view, out)  # NaN-propagating, as the index; ties keep out (-0.0)
    return out, (x.shape, argmax, size, stride, padding)


def max_pool_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """dout (N, C, H', W') -> dx (N, C, H, W): each window's maximum gets its gradient;
    an input that is the maximum of several overlapping windows gets their sum."""
    x_shape, argmax, size, stride, padding = cache
    h, w = x_shape[2:]
    ho, wo = dout.shape[2:]
    padded = (*x_shape[:2], h + 2 * padding, w + 2 * padding)
    # Windows that do not overlap give each pixel one offset's gradient at most: written once
    # into dxp rather than added into zeros, and where they also cover the whole image (2x2
    # pooling of an even image) into memory never filled with zeros: half the passes.
    apart = stride >= size
    covered = stride == size and padded[2:] == (size * ho, size * wo)
    dxp = (np.empty if covered else np.zeros)(padded, dtype=dout.dtype)
    for i, view in enumerate(window_offsets(dxp, size, stride)):
        hit = dout * (argmax == i)
        if apart:
            # Adding 0.0 turns the -0.0 of a negative dout where not the maximum into +0.0,
            # as PyTorch's zeros (and as adding into zeros below).
            np.add(hit, 0.0, out=view)
        else:
            view += hit  # a view of dxp: adds in place, overlaps summed
    return (dxp[:, :, padding : padding + h, padding : padding + w],)


def avg_pool_forward(
    x: np.ndarray, size: int, stride: int, padding: int = 0
) -> tuple[np.ndarray, Cache]:
    """x (N, C, H, W) -> out (N, C, H', W'): mean over size x size windows moved by stride, of
    x padded by `padding` with zeros that count in the mean (PyTorch's default)."""
    means = _windows(_pad(x, padding), size, stride).mean(axis=(4, 5))
    return means, (x.shape, size, stride, padding)


def avg_pool_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """dout (N, C, H', W') -> dx (N, C, H, W): each window spreads its gradient evenly."""
    x_shape, size, stride, padding = cache
    n, c, ho, wo = dout.shape
    share = (dout / (size * size))[:, :, None, None]
    windows = np.broadcast_to(share, (n, c, size, size, ho, wo))
    return (_col2im(windows, x_shape, stride, padding),)


def _per_channel(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """v (C,) -> v against x (N, C) or (N, C, H, W): (C,) or (C, H, W), each channel's value
    repeated over its plane. Broadcast over the batch alone, a pass over x runs one inner loop
    an image long; against (C, 1, 1) it ran one a plane long, at 1.9-2.5 times a plain pass's
    time rather than 1.4-1.7 (docs/PERFORMANCE.md)."""
    return np.repeat(v, math.prod(x.shape[2:])).reshape(x.shape[1:])


def _channel_sum(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """x (N, C, ...) -> (C,): the sum over every axis but 1 of x, or of x * y without
    forming it, by np.einsum: NumPy's pairwise sums along each image's pixels took 1.5-2.6
    times as long (its sum over axes (0, 2, 3) at once 5x); np.vecdot for x * y as long on
    (N, C, H, W), 4-6 times on (N, C)."""
    x3 = x.reshape(*x.shape[:2], -1)
    if y is None:
        return np.einsum("ncp->c", x3)
    return np.einsum("ncp,ncp->c", x3, y.reshape(x3.shape))


def batch_norm_forward(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    momentum: float,
    eps: float,
    train: bool,
    total: Total = alone,
) -> tuple[np.ndarray, Cache, tuple[np.ndarray, np.ndarray]]:
    """x (N, C) or (N, C, H, W); weight, bias, running stats (C,) -> out like x, cache,
    (running_mean, running_var) (C,), as PyTorch's BatchNorm1d/2d.

    Training normalises with the batch statistics over every axis but 1 (biased variance)
    and moves the running stats towards them (unbiased variance, n / (n - 1)); evaluation
    normalises with the running stats and returns them unchanged. Where threads share the
    batch, x is this thread's rows and `total` sums over every thread's (shared/parallel.py).
    """
    n = x.size // x.shape[1]
    if train:
        sums, n = total(_channel_sum(x), n)
        mean = sums / n
        centred = x - _per_channel(mean, x)
        (squares,) = total(_channel_sum(centred, centred))
        var = squares / n
        running_mean = (1 - momentum) * running_mean + momentum * mean
        # momentum * n / (n - 1) stays a Python float, which leaves a float32 var float32.
        running_var = (1 - momentum) * running_var + momentum * n / (n - 1) * var
    else:
        centred = x - _per_channel(running_mean, x)
        var = running_var
    inv_std = 1 / np.sqrt(var + eps)
    # xhat = centred * inv_std is never formed: weight and 1/std scale centred in one pass,
    # and the backward folds 1/std into its per-channel factors (one pass fewer each step).
    scale = weight * inv_std
    out = centred * _per_channel(scale, x)
    out += _per_channel(bias, x)
    return out, (centred, inv_std, scale, n, train, total), (running_mean, running_var)


def batch_norm_backward(
    dout: np.ndarray, cache: Cache
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dout like x -> dx like x, dweight (C,), dbias (C,) (of this thread's rows, where
    threads share the batch: the caller sums them as every other parameter's gradient)."""
    # xhat = centred * inv_std, scale = weight / std
    centred, inv_std, scale, n, train, total = cache
    dweight, dbias = _channel_sum(dout, centred) * inv_std, _channel_sum(dout)
    dx = dout * _per_channel(scale, dout)
    if train:
        # The batch mean and variance depend on x as well: that takes away the gradient's
        # per-channel mean and its per-channel component along xhat, whose sums over the
        # whole batch are dbias and dweight.
        dweight_all, dbias_all = total(dweight, dbias)
        dx -= centred * _per_channel(scale * dweight_all * inv_std / n, dout)
        dx -= _per_channel(scale * dbias_all / n, dout)
    return dx, dweight, dbias


def dropout_forward(x: np.ndarray, keep: np.ndarray, p: float) -> tuple[np.ndarray, Cache]:
    """x (any shape), keep bool (x's shape), drop probability p -> x * keep / (1 - p).

    Inverted dropout with a mask drawn elsewhere: the scale keeps the expected output x.
    """
    return x * keep / (1 - p), (keep, p)


def dropout_backward(dout: np.ndarray, cache: Cache) -> tuple[np.ndarray]:
    """dout -> dout * keep / (1 - p): the forward map is diagonal, hence its own adjoint."""
    return (dropout_forward(dout, *cache)[0],)


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
    logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0, total: Total = alone
) -> tuple[np.ndarray, np.ndarray]:
    """logits (N, K), labels (N,) int -> mean loss (scalar array), dlogits (N, K).

    With smoothing eps the target is (1 - eps) * one_hot + eps / K, as in PyTorch. Where
    threads share the batch (`total`), the mean is over all of it: each thread's losses add
    up to it.
    """
    k = logits.shape[1]
    (n,) = total(len(logits))
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    logp = shifted - np.log(sum_exp)
    target = np.full_like(logits, label_smoothing / k)
    target[np.arange(len(logits)), labels] += 1 - label_smoothing
    loss = -(target * logp).sum() / n
    dlogits = (exp / sum_exp - target) / n
    return loss, dlogits
