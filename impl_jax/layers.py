"""Layers as pure JAX functions, and as forward/backward pairs mirroring impl_numpy.layers.

`X_forward(inputs...) -> (out, cache)` and `X_backward(dout, cache) -> gradients of the inputs`:
here the cache is the pullback from `jax.vjp`, so autodiff supplies every backward pass.
Sliding windows (conv, pooling) cover H' = (H + 2 * padding - k) // stride + 1 rows, as in
PyTorch: rows and columns that do not fill a window are dropped.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from shared.layers import window_offsets


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array | None, stride: int, padding: int) -> jax.Array:
    """x (N, C, H, W), w (O, C, k, k), b (O,) or None -> out (N, O, H', W').

    For kernels of at most LARGE_KERNEL positions, chosen by the input's channels, as
    measured on this CPU (docs/PERFORMANCE.md): with one channel, one matrix product
    w (O, k*k) @ im2col(x) per image, as in impl_numpy (XLA's own convolution made the lab
    network's step 1.35x slower), its weight gradient one reduction (see
    _one_channel_product); with more, XLA's convolution (im2col's k*k-fold unfolded copy made
    the forward slower), its weight gradient taken from another formulation that does build
    that copy (see _conv_many_channels).
    """
    n = x.shape[0]
    if w.shape[2] * w.shape[3] > LARGE_KERNEL:
        # Both formulations below write a slice per kernel position: a 28 x 28 kernel's
        # gradient compiled in 8.5 s. XLA's convolution and its gradients are one each (0.1 s).
        out = _conv_xla(x, w, stride, padding)
        return out if b is None else out + b[:, None, None]
    if by_xla_convolution(w.shape[1]):
        if n == w.shape[1]:
            # YNNPACK's convolution ran 2-3x slower where the batch equals the input channels,
            # and only there (strong's 32 -> 64 at batch 32: 47-54 GFLOP/s, against 140-150 at
            # batches 31 and 33), likely its loops paired by equal extents alone (fixed after
            # this jaxlib's YNNPACK); an image of zeros more, its output dropped, costs 1/N.
            x = jnp.pad(x, ((0, 1), (0, 0), (0, 0), (0, 0)))
        out = _conv_many_channels(x, w, stride, padding)
        out = _on_both_threads(out) if b is None else out + b[:, None, None]
        return out[:n]
    o, c, k, _ = w.shape
    cols = jnp.stack(window_offsets(_pad(x, padding), k, stride), axis=2)  # (N, C, k*k, H', W')
    ho, wo = cols.shape[3:]
    out = _one_channel_product(w.reshape(o, -1), cols.reshape(n, c * k * k, ho * wo))
    if b is not None:
        out = out + b[:, None]
    return out.reshape(n, o, ho, wo)


# Kernels of more positions run XLA's convolution alone (conv2d): 7 x 7 and smaller keep the
# formulations measured fastest.
LARGE_KERNEL = 49


def by_xla_convolution(in_channels: int) -> bool:
    """Whether conv2d runs XLA's convolution for this many input channels. In the compiled
    training step, with YNNPACK's fusions on, its output was laid out channels-last (NHWC)
    in memory, whatever order the program names its axes in; the 1-channel product's
    channels-first, as named (the traces in docs/PERFORMANCE.md). max_pool's
    `channels_last` follows from it."""
    return in_channels > 1


def _per_image_product(w: jax.Array, cols: jax.Array) -> jax.Array:
    """w (O, K) @ cols (N, K, P) -> (N, O, P): w broadcast over the batch, so that XLA's
    product comes out in (N, O, P) order. jnp.matmul's w @ cols computes (O, N, P) and then
    transposes it, which took 6 ms of strong's training step at batch 128 (that step
    0.92x the time without it, the lab's 0.92-0.96x, docs/PERFORMANCE.md)."""
    w_batch = jnp.broadcast_to(w, (len(cols), *w.shape))
    contract_k_batch_n = (((2,), (1,)), ((0,), (0,)))
    return lax.dot_general(w_batch, cols, contract_k_batch_n)


def _product_as_sums(w: jax.Array, cols: jax.Array) -> jax.Array:
    """w (O, K), cols (N, K, P) -> (N, O, P), the same as _per_image_product, written as
    products summed over K, which XLA fuses into one reduction without forming the (N, O, K,
    P) products."""
    return (w[None, :, :, None] * cols[:, None]).sum(axis=2)


@jax.custom_vjp
def _one_channel_product(w: jax.Array, cols: jax.Array) -> jax.Array:
    """w (O, K) @ cols (N, K, P) -> (N, O, P) by _per_image_product, with its weight gradient
    from _product_as_sums's jax.vjp (its input gradient is the product's own).

    The product's own weight gradient is a product per image, (O, P) @ (P, K) with K = k*k
    small, then a sum over the images: it ran at 2-6 GFLOP/s. Timed alone at batch 128, it
    took 14-17 ms for strong's conv1 and 8.3 ms for the lab's, against 7-8 and 2.7 ms as one
    reduction (docs/PERFORMANCE.md). Like _conv_many_channels, this has no forward-mode
    derivative (jax.jvp), which nothing here takes.
    """
    return _per_image_product(w, cols)


def _one_channel_product_forward(w, cols):
    return _per_image_product(w, cols), (w, cols)


def _one_channel_product_backward(inputs, dout):
    w, cols = inputs
    (dw,) = jax.vjp(lambda w: _product_as_sums(w, cols), w)[1](dout)
    (dcols,) = jax.vjp(lambda cols: _per_image_product(w, cols), cols)[1](dout)
    return dw, dcols


_one_channel_product.defvjp(_one_channel_product_forward, _one_channel_product_backward)


def _conv_xla(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """x (N, C, H, W), w (O, C, k, k) -> (N, O, H', W'): XLA's own convolution."""
    pads = [(padding, padding)] * 2
    dims = ("NCHW", "OIHW", "NCHW")
    return lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=dims)


def _conv_by_stacked_offsets(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """x (N, C, H, W), w (O, C, k, k) -> (N, O, H', W'): the same convolution as one matrix
    product, x's k*k shifted copies as columns (k*k*C, N*H'*W') against w's taps (k*k*C, O).
    A slow forward, but its weight gradient is one product, columns @ dout (N*H'*W', O), that
    YNNPACK runs on both threads. As k*k products, one per offset, each ran on one thread,
    and XLA ran them one after another (`deep`'s step 0.89-0.93x the time with one product
    on an AMD EPYC family 23, docs/PERFORMANCE.md). Each copy is written into its slot of the
    columns' buffer: with jnp.stack or jnp.concatenate, XLA copied each offset twice."""
    n = x.shape[0]
    o, c, k, _ = w.shape
    shifted = window_offsets(_pad(x, padding), k, stride)
    ho, wo = shifted[0].shape[2:]
    cols = jnp.zeros((k * k, c, n, ho, wo), x.dtype)
    for offset, view in enumerate(shifted):
        cols = cols.at[offset].set(view.transpose(1, 0, 2, 3))
    taps = w.transpose(2, 3, 1, 0).reshape(k * k * c, o)  # rows in the columns' (i, j, c) order
    out = jnp.einsum("pm,po->mo", cols.reshape(k * k * c, n * ho * wo), taps)
    return out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_many_channels(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """XLA's convolution, differentiated argument by argument through the formulations
    measured fastest (the strong network's 32 -> 64 conv, batch 128, on an AMD EPYC family
    25: forward 8 ms; input gradient 8 ms by its own convolution; weight gradient 7 ms as k*k
    products over x's shifted copies against 30 ms by its convolution). On an AMD EPYC family
    23 those products, each on one thread, became one product on both threads (see
    _conv_by_stacked_offsets), not measured on the family 25. The input gradient gets zeros
    to add from _on_both_threads. Every gradient still comes from jax.vjp."""
    return _conv_xla(x, w, stride, padding)


def _conv_many_channels_forward(x, w, stride, padding):
    return _conv_xla(x, w, stride, padding), (x, w)


def _conv_many_channels_backward(stride, padding, inputs, dout):
    x, w = inputs
    (dx,) = jax.vjp(lambda x: _conv_xla(x, w, stride, padding), x)[1](dout)
    dx = _on_both_threads(dx)
    (dw,) = jax.vjp(lambda w: _conv_by_stacked_offsets(x, w, stride, padding), w)[1](dout)
    return dx, dw


_conv_many_channels.defvjp(_conv_many_channels_forward, _conv_many_channels_backward)


def _on_both_threads(y: jax.Array) -> jax.Array:
    """y (N, C, H, W), a convolution's output -> y + 0, zeros per channel that XLA cannot
    fold away. This jaxlib's YNNPACK gives a convolution no loops over the batch, so alone
    in its fusion it runs on one thread, and on both with an element-wise op fused after it.
    After a convolution without a bias, the zeros made `deep`'s step take 0.88-0.90x the
    time; after every input gradient, `strong`'s 0.92-0.95x at batches 128 and 512 on an AMD
    EPYC family 23 (docs/PERFORMANCE.md)."""
    zeros = lax.optimization_barrier(jnp.zeros(y.shape[1], y.dtype))
    return y + zeros[:, None, None]


def _pad(x: jax.Array, padding: int, value: float = 0.0) -> jax.Array:
    """x (N, C, H, W) -> (N, C, H + 2 padding, W + 2 padding), the border filled with value."""
    border = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    return jnp.pad(x, border, constant_values=value) if padding else x


def relu(x: jax.Array) -> jax.Array:
    """max(x, 0); jax.nn.relu takes the derivative at 0 as 0, like PyTorch (jnp.maximum: 0.5)."""
    return jax.nn.relu(x)


def leakyrelu(x: jax.Array, slope: float) -> jax.Array:
    """x where positive, slope * x elsewhere; the derivative at 0 is slope, as PyTorch's
    (jax.nn.leaky_relu's is 1)."""
    return jnp.where(x > 0, x, slope * x)


def elu(x: jax.Array, alpha: float) -> jax.Array:
    """x where positive, alpha * (exp(x) - 1) elsewhere (jax.nn.elu)."""
    return jax.nn.elu(x, alpha)


def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU, x * Phi(x): jax.nn.gelu's approximate=False (its default is True)."""
    return jax.nn.gelu(x, approximate=False)


def gelutanh(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation (jax.nn.gelu's default)."""
    return jax.nn.gelu(x, approximate=True)


@jax.custom_jvp
def tanh(x: jax.Array) -> jax.Array:
    """Elementwise tanh; its derivative from x, not from its output (see _logistic_slope)."""
    return jnp.tanh(x)


@jax.custom_jvp
def sigmoid(x: jax.Array) -> jax.Array:
    """Elementwise 1 / (1 + exp(-x)); its derivative from x, not from its output (see
    _logistic_slope)."""
    return jax.nn.sigmoid(x)


def _logistic_slope(x: jax.Array) -> jax.Array:
    """sigmoid'(x) = e / (1 + e)^2, e = exp(-|x|), from x itself; tanh'(x) = 4 sigmoid'(2x).

    JAX's own rules take both from the output y (y (1 - y), 1 - y^2). A max-pool of y then
    read y in the backward twice, element by element for the derivative and by window for
    the first maximum, in one of XLA's fusions, and this jaxlib's XLA wrote that fusion's
    result over y while still reading other windows' values from it:
    `conv16-bn-sigmoid-maxpool2-flatten-bn-fc10` (and tanh) trained on gradients up to 100% off
    under jit, where NumPy and PyTorch agreed to 1e-16 (docs/CROSSCHECK.md). From x, the
    pooled y is read by window alone, and XLA does not write over it."""
    e = jnp.exp(-jnp.abs(x))
    return e / (1 + e) ** 2


@tanh.defjvp
def _tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return tanh(x), 4 * _logistic_slope(2 * x) * dx


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return sigmoid(x), _logistic_slope(x) * dx


# Windows of more positions are pooled by a gather: the chain of selects below compiles in
# time and memory that grow much faster than the window (a 16 x 16 window: 17 s and 1.4 GB,
# against 2 s by the gather).
SELECT_POOL_MAX = 16


def max_pool(
    x: jax.Array, size: int, stride: int, padding: int = 0, channels_last: bool = False
) -> jax.Array:
    """x (N, C, H, W) padded by `padding` with -inf -> (N, C, H', W'); the first maximum in a
    window takes the gradient, and a NaN counts as larger than anything (the last NaN takes
    it), as in PyTorch's kernel.

    As impl_numpy: a running maximum over the window's offsets in row-major order, replaced
    by a select only where a value is larger or NaN, so the gradient goes to the value kept.
    Windows that tile the image (stride == size, the usual 2x2) build their gradient in the
    tiles' layout (see _first_max_of_tiles); overlapping ones take it through the selects.
    `channels_last` says that x lies NHWC in memory (by_xla_convolution): the tiles are then
    taken in that order, and XLA reads them without transposing. Read through transposes,
    the Net's pooling took 16 ms of its traced step at batch 128; channels-last, the Net's
    step took 0.89-0.91x the time and strong's 0.91-0.94x. Taken so from an NCHW input,
    deep's first pooling made its step 1.02-1.05x slower (docs/PERFORMANCE.md).
    Picking the value by a gather at the windows' argmax made the gradient a scatter-add,
    the strong network's slowest operation in XLA here (kept for windows of more than
    SELECT_POOL_MAX positions); lax.reduce_window's gradient (select-and-scatter) ran the
    pool network 1.85x slower.
    """
    x = _pad(x, padding, -jnp.inf)
    if stride != size:  # windows that overlap, or leave gaps
        if size * size > SELECT_POOL_MAX:
            return _max_pool_by_gather(_windows(x, size, stride))
        return _running_max(window_offsets(x, size, stride))[0]
    n, c, h, w = x.shape
    ho, wo = h // size, w // size
    cropped = x[:, :, : ho * size, : wo * size]
    if size * size > SELECT_POOL_MAX:
        # One reshape: with a slice per position, a 28 x 28 window's gradient compiled in
        # 8.0 s (now 0.1 s), and a 100 x 100 window's 64-image run was stopped after 55 s.
        tiles = cropped.reshape(n, c, ho, size, wo, size).transpose(0, 1, 2, 4, 3, 5)
        return _max_pool_by_gather(tiles.reshape(n, c, ho, wo, size * size))
    if channels_last:
        tiles = cropped.transpose(0, 2, 3, 1).reshape(n, ho, size, wo, size, c)
        return _first_max_of_tiles(tiles, size).transpose(0, 3, 1, 2)
    tiles = cropped.reshape(n * c, ho, size, wo, size, 1)
    return _first_max_of_tiles(tiles, size).reshape(n, c, ho, wo)


def _running_max(offsets: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """k*k offsets of the windows, each (N, C, H', W') or the tiles' (A, H', W', B) -> their first
    maximum (the last NaN where a window holds one) and its offset's index (int8: at most
    SELECT_POOL_MAX offsets), both in the offsets' shape. Where the index is not used, XLA
    drops it from the compiled program."""
    best, first = offsets[0], jnp.zeros(offsets[0].shape, jnp.int8)
    for index, view in enumerate(offsets[1:], start=1):
        larger = (view > best) | jnp.isnan(view)
        best, first = jnp.where(larger, view, best), jnp.where(larger, jnp.int8(index), first)
    return best, first


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _first_max_of_tiles(tiles: jax.Array, k: int) -> jax.Array:
    """tiles (A, H', k, W', k, B), the image's non-overlapping k x k windows, (N*C, ..., 1)
    channels-first or (N, ..., C) channels-last -> each one's first maximum (A, H', W', B),
    by _running_max.

    Its gradient is built in the tiles' own layout: for each offset, dout where that offset
    holds the window's first maximum, zero elsewhere, the k*k planes then stacked into place.
    Through the chain of selects each offset's gradient was padded into its strided place
    and the k*k summed: strong's two poolings' backward took 25 ms of its step at batch 128,
    now 13 (docs/PERFORMANCE.md). dout is used in its own shape: when it was broadcast to the
    tiles' shape, YNNPACK fused the broadcast into the product before it (fc1's input
    gradient), which then wrote four times its output (25 ms). Like _conv_many_channels, this
    has no forward-mode derivative (jax.jvp), which nothing here takes.
    """
    return _running_max(_tile_offsets(tiles, k))[0]


def _tile_offsets(tiles: jax.Array, k: int) -> list[jax.Array]:
    """tiles (A, H', k, W', k, B) -> k*k views (A, H', W', B), offset (i, j) in row-major order.
    The same values as shared.layers.window_offsets(x, k, k) give on the cropped image x, in
    the tiles' layout; taken as x's strided slices instead (the gradient reshaped back), they
    made strong's step 1.04-1.08x slower at batch 128 (docs/PERFORMANCE.md)."""
    return [tiles[:, :, i, :, j, :] for i in range(k) for j in range(k)]


def _first_max_of_tiles_forward(tiles, k):
    """-> the first maxima (A, H', W', B) and, for the gradient, their offsets' index."""
    return _running_max(_tile_offsets(tiles, k))


def _first_max_of_tiles_backward(k, first, dout):
    """first (A, H', W', B) int8, dout (A, H', W', B) -> (dtiles (A, H', k, W', k, B),).
    Under jit XLA recomputes `first` inside this loop rather than store it (its CPU fusion
    copies element-wise producers into their consumers)."""
    zero = jnp.zeros((), dout.dtype)
    rows = [
        jnp.stack([jnp.where(first == i * k + j, dout, zero) for j in range(k)], axis=3)
        for i in range(k)
    ]  # k of (A, H', W', k, B)
    return (jnp.stack(rows, axis=2),)


_first_max_of_tiles.defvjp(_first_max_of_tiles_forward, _first_max_of_tiles_backward)


def _windows(x: jax.Array, size: int, stride: int) -> jax.Array:
    """x (N, C, H, W) -> its size x size windows moved by stride, (N, C, H', W', size*size),
    positions in row-major order (window_offsets'), by one gather: a slice a position, stacked,
    took a 28 x 28 window at stride 1 132 s and 2.6 GB to train 100 images (NumPy 3.4 s)."""
    n, c, h, w = x.shape
    ho, wo = (h - size) // stride + 1, (w - size) // stride + 1
    offset = jnp.arange(size)
    rows = (jnp.arange(ho) * stride)[:, None, None, None] + offset[None, None, :, None]
    cols = (jnp.arange(wo) * stride)[None, :, None, None] + offset[None, None, None, :]
    return x[:, :, rows, cols].reshape(n, c, ho, wo, size * size)  # rows, cols: (H', W', k, k)


def _max_pool_by_gather(windows: jax.Array) -> jax.Array:
    """windows (N, C, H', W', size*size), positions in row-major order -> the same maximum
    as max_pool's, picked at its index: the last NaN where a window holds one, else the first
    maximum."""
    nan = jnp.isnan(windows)
    last_nan = windows.shape[-1] - 1 - jnp.argmax(nan[..., ::-1], axis=-1)
    first = jnp.where(nan.any(axis=-1), last_nan, jnp.argmax(windows, axis=-1))
    return jnp.take_along_axis(windows, first[..., None], axis=-1)[..., 0]


def avg_pool(x: jax.Array, size: int, stride: int, padding: int = 0) -> jax.Array:
    """x (N, C, H, W) -> (N, C, H', W'), the mean of each window of x padded by `padding` with
    zeros that count in the mean (PyTorch's default)."""
    # A Python 0.0 with lax.add is recognised as a windowed sum, which has a gradient.
    window, strides = (1, 1, size, size), (1, 1, stride, stride)
    pads = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    return lax.reduce_window(x, 0.0, lax.add, window, strides, pads) / (size * size)


def _per_channel(v: jax.Array, ndim: int) -> jax.Array:
    """v (C,) -> shape broadcasting along axis 1 of an ndim-array: (C,) or (C, 1, 1)."""
    return v.reshape(-1, *[1] * (ndim - 2))


def batch_norm(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array,
    running_mean: jax.Array,
    running_var: jax.Array,
    momentum: float,
    eps: float,
    train: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (N, C) or (N, C, H, W); weight, bias, running stats (C,) -> out like x,
    running_mean, running_var (C,), as PyTorch's BatchNorm1d/2d.

    Training normalises with the batch statistics over every axis but 1 (biased variance)
    and moves the running stats towards them (unbiased variance, n / (n - 1)); evaluation
    normalises with the running stats and returns them unchanged.
    """
    if train:
        axes = (0, *range(2, x.ndim))
        mean = x.mean(axis=axes)
        # The variance about the mean held constant: the same value, and the same gradient in
        # exact arithmetic, since the variance's derivative through its own mean is a sum of
        # the centred input, zero. x.var's autodiff computed that zero in two passes over x.
        # First derivatives only: a second derivative would treat the mean as constant.
        centred = x - _per_channel(lax.stop_gradient(mean), x.ndim)
        var = (centred * centred).mean(axis=axes)
        n = x.size // x.shape[1]
        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var = (1 - momentum) * running_var + momentum * n / (n - 1) * var
    else:
        mean, var = running_mean, running_var
    # (x - mean) / std * weight + bias folded into one scale and shift per channel, as
    # PyTorch's CPU kernel computes it: two passes over x instead of four, and XLA fills
    # each per-channel operand out to x's full size before YNNPACK's element-wise fusions
    # (strong's training step 0.91-0.94x the time of the unfolded form, docs/PERFORMANCE.md).
    scale = lax.rsqrt(var + eps) * weight
    out = x * _per_channel(scale, x.ndim) + _per_channel(bias - mean * scale, x.ndim)
    return out, running_mean, running_var


def dropout(x: jax.Array, keep: jax.Array, p: float) -> jax.Array:
    """Inverted dropout with a given mask: x, keep bool (x's shape) -> x * keep / (1 - p)."""
    return x * keep / (1 - p)


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


def conv2d_forward(x, w, b, stride: int, padding: int):
    return jax.vjp(partial(conv2d, stride=stride, padding=padding), x, w, b)


def relu_forward(x):
    return jax.vjp(relu, x)


def leakyrelu_forward(x, slope: float):
    return jax.vjp(partial(leakyrelu, slope=slope), x)


def elu_forward(x, alpha: float):
    return jax.vjp(partial(elu, alpha=alpha), x)


def gelu_forward(x):
    return jax.vjp(gelu, x)


def gelutanh_forward(x):
    return jax.vjp(gelutanh, x)


def tanh_forward(x):
    return jax.vjp(tanh, x)


def sigmoid_forward(x):
    return jax.vjp(sigmoid, x)


def max_pool_forward(x, size: int, stride: int, padding: int = 0, channels_last: bool = False):
    pool = partial(max_pool, size=size, stride=stride, padding=padding, channels_last=channels_last)
    return jax.vjp(pool, x)


def avg_pool_forward(x, size: int, stride: int, padding: int = 0):
    return jax.vjp(partial(avg_pool, size=size, stride=stride, padding=padding), x)


def batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps, train):
    """-> out, cache, (running_mean, running_var): jax.vjp's order with has_aux."""

    def out_and_stats(x, weight, bias):
        out, *stats = batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, train)
        return out, tuple(stats)

    return jax.vjp(out_and_stats, x, weight, bias, has_aux=True)


def dropout_forward(x, keep, p: float):
    return jax.vjp(partial(dropout, keep=keep, p=p), x)


def flatten_forward(x):
    return jax.vjp(flatten, x)


def linear_forward(x, w, b):
    return jax.vjp(linear, x, w, b)


conv2d_backward = max_pool_backward = avg_pool_backward = batch_norm_backward = _backward
relu_backward = leakyrelu_backward = elu_backward = gelu_backward = gelutanh_backward = _backward
tanh_backward = sigmoid_backward = dropout_backward = _backward
flatten_backward = linear_backward = _backward


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """logits (N, K), labels (N,) -> mean loss, dlogits (N, K)."""
    return jax.value_and_grad(cross_entropy)(logits, labels, label_smoothing)
