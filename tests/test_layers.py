"""The layers of all three implementations.

Each hand-written NumPy backward against central finite differences (float64, random upstream
gradients); every forward/backward pair (NumPy, JAX, PyTorch) against PyTorch's own ops as the
oracle (F.conv2d, F.max_pool2d, F.avg_pool2d, nn.BatchNorm1d/2d, torch.tanh, ...); the
vectorised NumPy conv and max-pool against plain loops; max-pool ties; dtypes kept.
"""

from __future__ import annotations

import importlib
from functools import partial

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from impl_numpy import layers, model
from shared.backend import IMPLEMENTATIONS
from shared.layers import Activation, Pool
from tests.conftest import to_native

IMPLS = IMPLEMENTATIONS
EPS = 1e-6
F64_TOL = 1e-10


def numeric_grad(f, x: np.ndarray, dout: np.ndarray) -> np.ndarray:
    """d(sum(f(x) * dout))/dx by central differences, every entry."""
    grad = np.zeros_like(x)
    for i in range(x.size):
        old = x.flat[i]
        x.flat[i] = old + EPS
        plus = np.sum(f(x) * dout)
        x.flat[i] = old - EPS
        minus = np.sum(f(x) * dout)
        x.flat[i] = old
        grad.flat[i] = (plus - minus) / (2 * EPS)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-12))


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, tol: float = F64_TOL):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    assert rel_error(actual, expected) <= tol, (
        f"{what}: relative error {rel_error(actual, expected):.3g}"
    )


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# A case is (layer name, build): build(rng) -> (differentiated inputs, static arguments), so that
# `X_forward(*inputs, *static)` is the call and X_backward returns one gradient per input.
def _normal(rng, *shapes):
    return [rng.standard_normal(s) for s in shapes]


def conv(n, c, o, h, w, k, s, p):
    def build(rng):
        return _normal(rng, (n, c, h, w), (o, c, k, k), (o,)), (s, p)

    return pytest.param("conv2d", build, id=f"conv-{n}x{c}x{h}x{w}-o{o}-k{k}-s{s}-p{p}")


def pool(kind, h, w, size, stride, padding=0):
    def build(rng):
        return _normal(rng, (2, 3, h, w)), (size, stride, padding)

    name = f"{kind}-pool-{h}x{w}-k{size}-s{stride}-p{padding}"
    return pytest.param(f"{kind}_pool", build, id=name)


def param(name, value, *shapes):
    """An element-wise layer with one parameter (a slope, an alpha)."""
    return pytest.param(name, lambda rng: (_normal(rng, *shapes), (value,)), id=f"{name}-{value}")


def batch_norm(shape, train):
    c = shape[1]

    def build(rng):
        stats = (rng.standard_normal(c), rng.random(c) + 0.5)
        return _normal(rng, shape, (c,), (c,)), (*stats, 0.1, 1e-5, train)

    mode = "train" if train else "eval"
    return pytest.param("batch_norm", build, id=f"bn-{'x'.join(map(str, shape))}-{mode}")


def dropout(shape, p, mask_shape=None):
    """Dropout of x (shape) with a mask of `mask_shape` (default: x's), broadcast over x."""

    def build(rng):
        return _normal(rng, shape), (rng.random(mask_shape or shape) >= p, p)

    return pytest.param("dropout", build, id=f"dropout-p{p}-mask{mask_shape or shape}")


def plain(name, *shapes):
    return pytest.param(name, lambda rng: (_normal(rng, *shapes), ()), id=name)


CONV_CASES = [
    conv(2, 1, 3, 5, 6, 3, 1, 1),
    conv(3, 2, 4, 7, 5, 3, 1, 0),
    conv(1, 3, 2, 6, 6, 5, 1, 2),
    conv(2, 2, 3, 8, 7, 3, 2, 0),  # last row does not fit a window
    conv(1, 2, 3, 9, 8, 5, 2, 2),
    conv(2, 1, 2, 7, 8, 3, 3, 0),  # last row, last two columns dropped
    conv(1, 2, 3, 9, 6, 3, 3, 1),
    conv(2, 3, 2, 5, 7, 1, 2, 0),  # stride > kernel: every other row unused
    conv(1, 2, 2, 6, 5, 1, 3, 1),
    conv(3, 3, 4, 6, 6, 3, 1, 1),  # batch == input channels: JAX adds an image of zeros
    # NumPy's input gradient on stacked rows (stride 1, padding < kernel) at its edges:
    conv(1, 2, 2, 5, 4, 3, 1, 2),  # output rows as long as an input row with its zeros
    conv(2, 3, 2, 6, 5, 2, 1, 1),  # an even kernel: more zeros reached on one side
    conv(2, 2, 3, 5, 4, 1, 1, 1),  # padding == kernel: the general path
    conv(2, 3, 4, 9, 8, 5, 1, 0),  # unpadded: the input gradient reaches 4 beyond dout
    conv(2, 2, 3, 6, 7, 2, 1, 0),  # an even kernel, unpadded
]
POOL_CASES = [
    pool(kind, h, w, size, stride)
    for kind in ("max", "avg")
    for h, w, size, stride in [
        (6, 6, 2, 2),
        (7, 5, 2, 2),
        (7, 6, 3, 2),  # overlapping windows
        (5, 6, 3, 1),
        (6, 5, 2, 1),
        (8, 7, 2, 3),  # gaps between windows
        (8, 7, 3, 3),  # 3x3 windows that tile, rows and columns left over
    ]
] + [  # padded (max with -inf, avg counting zeros), windows that do not tile dropped
    pool(kind, h, w, size, stride, padding)
    for kind in ("max", "avg")
    for h, w, size, stride, padding in [
        (7, 6, 3, 2, 1),
        (5, 5, 2, 2, 1),
        (6, 7, 4, 3, 2),
        (7, 9, 3, 3, 1),
    ]
]
BN_CASES = [batch_norm(shape, train) for shape in [(6, 4), (3, 2, 4, 5)] for train in (True, False)]
OTHER_CASES = [
    dropout((4, 5), 0.5),
    dropout((2, 3, 4, 4), 0.25),
    dropout((3, 4, 5, 5), 0.3, (3, 4, 1, 1)),  # a mask a channel, over its map (Dropout2d)
    plain("tanh", (3, 4, 5)),
    plain("sigmoid", (3, 4, 5)),
    plain("gelu", (3, 4, 5)),
    plain("gelutanh", (3, 4, 5)),
    param("leakyrelu", 0.01, (3, 4, 5)),
    param("leakyrelu", 0.3, (3, 4, 5)),
    param("elu", 1.0, (3, 4, 5)),
    param("elu", 0.4, (3, 4, 5)),
]
# Layers whose NumPy backward has a finite-difference test of its own below.
OLD_CASES = [
    plain("relu", (3, 2, 4, 4)),
    plain("flatten", (3, 2, 4, 5)),
    plain("linear", (5, 7), (3, 7), (3,)),
]
CASES = CONV_CASES + POOL_CASES + BN_CASES + OTHER_CASES + OLD_CASES


def numpy_forward(name: str, inputs, static) -> np.ndarray:
    return getattr(layers, f"{name}_forward")(*inputs, *static)[0]


@pytest.mark.parametrize(("name", "build"), CONV_CASES + POOL_CASES + BN_CASES + OTHER_CASES)
def test_numpy_backward_matches_finite_differences(rng, name, build):
    inputs, static = build(rng)
    out, cache, *_ = getattr(layers, f"{name}_forward")(*inputs, *static)
    dout = rng.standard_normal(out.shape)
    grads = getattr(layers, f"{name}_backward")(dout, cache)
    assert len(grads) == len(inputs)
    for i, (x, grad) in enumerate(zip(inputs, grads, strict=True)):

        def f(v, i=i):
            return numpy_forward(name, [*inputs[:i], v, *inputs[i + 1 :]], static)

        assert rel_error(grad, numeric_grad(f, x, dout)) < 1e-6, f"gradient of input {i}"


def _native(impl: str, a):
    return to_native(impl, a) if isinstance(a, np.ndarray) else a


def run_pair(impl: str, name: str, inputs, static, dout, jit: bool = True):
    """impl's X_forward and X_backward -> NumPy out, input gradients, returned running stats.

    JAX runs under jax.jit by default, as in training: one compilation per case is much faster
    than compiling each primitive of an op-by-op run.
    """
    mod = importlib.import_module(f"impl_{impl}.layers")
    native = partial(_native, impl)
    static = tuple(map(native, static))

    def pair(inputs, dout):
        out, cache, *stats = getattr(mod, f"{name}_forward")(*inputs, *static)
        return out, getattr(mod, f"{name}_backward")(dout, cache), sum(stats, ())

    if impl == "jax" and jit:
        pair = jax.jit(pair)
    out, grads, stats = pair([native(a) for a in inputs], native(dout))
    return np.asarray(out), [np.asarray(g) for g in grads], [np.asarray(s) for s in stats]


def torch_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, train):
    """nn.BatchNorm1d/2d itself, called with these parameters and copies of the running stats."""
    module = (torch.nn.BatchNorm1d if x.ndim == 2 else torch.nn.BatchNorm2d)(
        len(weight), eps, momentum, dtype=x.dtype
    )
    module.train(train)
    state = {"weight": weight, "bias": bias}
    state |= {"running_mean": running_mean.clone(), "running_var": running_var.clone()}
    return (
        torch.func.functional_call(module, state, (x,)),
        state["running_mean"],
        state["running_var"],
    )


ORACLES = {
    "conv2d": lambda x, w, b, s, p: F.conv2d(x, w, b, stride=s, padding=p),
    "max_pool": F.max_pool2d,
    "avg_pool": F.avg_pool2d,
    "batch_norm": torch_batch_norm,
    "dropout": lambda x, keep, p: torch.where(keep, x / (1 - p), 0.0),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "gelutanh": partial(F.gelu, approximate="tanh"),
    "leakyrelu": F.leaky_relu,
    "elu": F.elu,
    "relu": F.relu,
    "flatten": partial(torch.flatten, start_dim=1),
    "linear": F.linear,
}


def torch_oracle(name: str, inputs, static, dout):
    """PyTorch's own op and autograd -> NumPy out, input gradients, running stats."""
    leaves = [torch.tensor(a, requires_grad=True) for a in inputs]
    result = ORACLES[name](*leaves, *(_native("torch", s) for s in static))
    out, *stats = result if isinstance(result, tuple) else (result,)
    grads = torch.autograd.grad(out, leaves, torch.from_numpy(dout))
    return out.detach().numpy(), [g.numpy() for g in grads], [s.numpy() for s in stats]


def check_against_torch(impl, name, inputs, static, rng, tol):
    dout = rng.standard_normal(numpy_forward(name, inputs, static).shape).astype(inputs[0].dtype)
    actual = run_pair(impl, name, inputs, static, dout)
    expected = torch_oracle(name, inputs, static, dout)
    for what, a, e in zip(("out", "grads", "running stats"), actual, expected, strict=True):
        if what == "out":
            assert_close(a, e, f"{impl} {name} out", tol)
            continue
        assert len(a) == len(e), f"{impl} {name}: {len(a)} {what}, expected {len(e)}"
        for i, (ai, ei) in enumerate(zip(a, e, strict=True)):
            assert_close(ai, ei, f"{impl} {name} {what}[{i}]", tol)
    return actual


@pytest.mark.parametrize(("name", "build"), CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_matches_torch_float64(rng, impl, name, build):
    inputs, static = build(rng)
    check_against_torch(impl, name, inputs, static, rng, F64_TOL)


@pytest.mark.parametrize("budget", [1, 5000])
@pytest.mark.parametrize(("name", "build"), CONV_CASES)
def test_numpy_conv_backward_over_groups_of_images_matches_torch(
    rng, monkeypatch, name, build, budget
):
    """Columns larger than COLUMNS_BYTES take the backward a group of images at a time (one
    image a group, or groups of unequal size): each group's dw adds up, and each writes its
    own rows of dx."""
    monkeypatch.setattr(layers, "COLUMNS_BYTES", budget)
    inputs, static = build(rng)
    check_against_torch("numpy", name, inputs, static, rng, F64_TOL)


def _first_of_each_layer(cases):
    firsts = {}
    for case in cases:
        firsts.setdefault(case.values[0], case)
    return list(firsts.values())


def _float32(a):
    return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float64 else a


@pytest.mark.parametrize(("name", "build"), _first_of_each_layer(CASES))
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_keeps_float32(rng, impl, name, build):
    """Every output, gradient and running stat stays float32 (no silent upcast)."""
    inputs, static = build(rng)
    inputs, static = [_float32(a) for a in inputs], tuple(_float32(s) for s in static)
    out, grads, stats = check_against_torch(impl, name, inputs, static, rng, 1e-5)
    assert {a.dtype for a in (out, *grads, *stats)} == {np.dtype(np.float32)}


def test_softmax_cross_entropy_keeps_float32():
    loss, dlogits = layers.softmax_cross_entropy(np.ones((2, 10), np.float32), np.array([0, 1]))
    assert loss.dtype == np.float32 and dlogits.dtype == np.float32


def test_numpy_sigmoid_saturates_without_overflow():
    x = np.array([-1000.0, -700.0, -50.0, -1e-9, 0.0, 30.0, 50.0, 1000.0])
    with np.errstate(over="raise", invalid="raise"):
        out, _ = layers.sigmoid_forward(x)
    np.testing.assert_allclose(out, torch.sigmoid(torch.from_numpy(x)).numpy(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_zeroes_dropped_and_scales_kept(rng, impl):
    x, p = rng.standard_normal((3, 4, 5)), 0.3
    keep = rng.random(x.shape) >= p
    out, (dx,), _ = run_pair(impl, "dropout", [x], (keep, p), np.ones_like(x))
    assert np.all(out[~keep] == 0) and np.all(dx[~keep] == 0)
    np.testing.assert_allclose(out[keep], x[keep] / (1 - p), rtol=1e-15)
    np.testing.assert_allclose(dx[keep], 1 / (1 - p), rtol=1e-15)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_does_not_touch_its_inputs(rng, impl, train):
    """F.batch_norm updates running stats in place, and torch.from_numpy shares memory."""
    x, weight, bias = _normal(rng, (4, 3, 2, 2), (3,), (3,))
    running_mean, running_var = np.zeros(3), np.ones(3)
    run_pair(
        impl, "batch_norm", [x, weight, bias], (running_mean, running_var, 0.1, 1e-5, train), x
    )
    np.testing.assert_array_equal(running_mean, np.zeros(3))
    np.testing.assert_array_equal(running_var, np.ones(3))


# impl_jax.layers.max_pool's padding and channels_last after (size, stride): its input read in
# NHWC order, as after XLA's convolution.
JAX_CHANNELS_LAST = (0, True)


def loop_max_pool_grad(x, dout, size, stride):
    """Plain loops: each window's gradient to its first maximum in row-major order."""
    dx = np.zeros_like(x)
    n, c, ho, wo = dout.shape
    for i in range(n):
        for ch in range(c):
            for r in range(ho):
                for s in range(wo):
                    window = x[
                        i, ch, r * stride : r * stride + size, s * stride : s * stride + size
                    ]
                    a, b = np.unravel_index(np.argmax(window), window.shape)  # first maximum
                    dx[i, ch, r * stride + a, s * stride + b] += dout[i, ch, r, s]
    return dx


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("size", "stride"), [(2, 2), (3, 3), (4, 4), (3, 1), (3, 2), (2, 3), (5, 2)]
)
def test_max_pool_ties_go_to_the_first_maximum_in_all_three(size, stride, dtype):
    rng = np.random.default_rng(10 * size + stride)
    # 19 channels: PyTorch's channels-last kernel takes a vector's worth at once (16 or 8
    # floats, 8 or 4 doubles), then the rest one by one; fewer would test only the rest.
    x = rng.integers(0, 3, (2, 19, 9, 8)).astype(dtype)  # values 0, 1, 2: ties everywhere
    x[:, :, :5, :5] = 1.0  # constant windows, every entry tied
    x[0, 0, 6:, 5:] = 0.0  # after a ReLU
    out_shape = layers.max_pool_forward(x, size, stride)[0].shape
    # Integer gradients: their sums over overlapping windows are exact in any order.
    dout = rng.integers(1, 10, out_shape).astype(dtype)
    expected = loop_max_pool_grad(x, dout, size, stride)
    # JAX both compiled as a whole and op by op (XLA could choose differently), and reading
    # its input channels-last.
    jax_runs = [("jax", jit, layout) for layout in ((), JAX_CHANNELS_LAST) for jit in (True, False)]
    for impl, jit, layout in [("numpy", False, ()), *jax_runs, ("torch", False, ())]:
        (dx,) = run_pair(impl, "max_pool", [x], (size, stride, *layout), dout, jit)[1]
        np.testing.assert_array_equal(dx, expected, err_msg=f"{impl}, jit={jit}, {layout}")


@pytest.mark.parametrize(("h", "w", "size", "padding"), [(5, 5, 2, 1), (7, 9, 3, 1), (9, 8, 2, 0)])
def test_jax_s_max_pool_read_channels_last_matches_torch(rng, h, w, size, padding):
    """Windows that tile the input, padded with -inf or cropped, read channels-last."""
    x = rng.standard_normal((2, 19, h, w))
    static = (size, size, padding)
    dout = rng.standard_normal(F.max_pool2d(torch.from_numpy(x), *static).shape)
    out_t, (dx_t,), _ = torch_oracle("max_pool", [x], static, dout)
    out, (dx,), _ = run_pair("jax", "max_pool", [x], (*static, True), dout)
    assert_close(out, out_t, "jax max_pool channels-last out")
    assert_close(dx, dx_t, "jax max_pool channels-last dx")


# 5 x 5 windows are past JAX's SELECT_POOL_MAX: its gather, not its selects.
@pytest.mark.parametrize(("size", "stride"), [(2, 2), (3, 3), (3, 1), (5, 1)])
def test_max_pool_propagates_nan_and_routes_its_gradient_as_pytorch(size, stride):
    rng = np.random.default_rng(size)
    x = rng.standard_normal((2, 19, 6, 6))  # 19 channels, as in the test above
    x[1, 0, 4, 4:] = -0.0, 0.0  # a window's maximum tied, -0.0 first, as after a ReLU
    x[1, 0, 5, 4:] = -1.0
    x[0, 0, 0, 1] = x[0, 1, 2, 2] = x[1, 1, 3, 3] = x[1, 1, 3, 4] = np.nan  # two in one window
    xt = torch.tensor(x, requires_grad=True)
    out_t = F.max_pool2d(xt, size, stride)
    # Negative too: a pixel that is no window's maximum gets +0.0, never -0.0, as in PyTorch.
    dout = rng.integers(-9, 10, out_t.shape).astype(np.float64)
    out_t.backward(torch.tensor(dout))
    assert np.isnan(out_t.detach().numpy()).any()
    runs = [(impl, ()) for impl in IMPLEMENTATIONS] + [("jax", JAX_CHANNELS_LAST)]
    for impl, layout in runs:
        out, (dx,), _ = run_pair(impl, "max_pool", [x], (size, stride, *layout), dout)
        what = f"{impl} {layout}"
        np.testing.assert_array_equal(out, out_t.detach().numpy(), err_msg=what)
        np.testing.assert_array_equal(np.signbit(out), np.signbit(out_t.detach().numpy()), what)
        np.testing.assert_array_equal(dx, xt.grad.numpy(), err_msg=what)
        np.testing.assert_array_equal(np.signbit(dx), np.signbit(xt.grad.numpy()), what)


def test_max_pool_routes_ties_to_the_first_maximum():
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, 1, 3] = 1.0
    out, cache = layers.max_pool_forward(x, 2, 2)
    np.testing.assert_array_equal(out, [[[[0.0, 1.0]]]])
    (dx,) = layers.max_pool_backward(np.array([[[[5.0, 7.0]]]]), cache)
    np.testing.assert_array_equal(dx, [[[[5.0, 0, 0, 0], [0, 0, 0, 7.0]]]])


@pytest.mark.parametrize(("size", "stride"), [(2, 2), (3, 1), (3, 2)])
def test_numpy_s_relu_after_the_max_pool_is_the_layers_in_written_order(rng, size, stride):
    """NumPy's chain runs a ReLU after the max-pool over its output, on the pooled values:
    the same output and dx as the two in written order, on windows all negative (a maximum
    of 0, ties), overlapping windows and a NaN."""
    x = rng.standard_normal((2, 3, 7, 7))
    x[0, 0, :4, :4] = -1.0
    x[1, 2, 3, 3] = np.nan
    relu_out, relu_cache = layers.relu_forward(x)
    pooled, cache = layers.max_pool_forward(relu_out, size, stride)
    dout = rng.standard_normal(pooled.shape)
    (dpool,) = layers.max_pool_backward(dout, cache)
    (expected,) = layers.relu_backward(dpool, relu_cache)
    pair = (Activation("relu", "relu"), Pool("pool", "max", size, stride))
    out, pullback = model.chain_vjp(pair, {}, x, None)
    np.testing.assert_array_equal(out, pooled)
    np.testing.assert_array_equal(pullback(dout)["input"], expected)
    assert (pooled == 0).any() and (expected != 0).any()


def test_linear_backward_matches_finite_differences(rng):
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((3, 7)), rng.standard_normal(3)
    out, cache = layers.linear_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = layers.linear_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda v: layers.linear_forward(v, w, b)[0], x, dout)) < 1e-6
    assert rel_error(dw, numeric_grad(lambda v: layers.linear_forward(x, v, b)[0], w, dout)) < 1e-6
    assert rel_error(db, numeric_grad(lambda v: layers.linear_forward(x, w, v)[0], b, dout)) < 1e-6


def test_relu_backward_matches_finite_differences(rng):
    # Keep entries away from the kink at 0, where no finite difference is meaningful.
    x = rng.standard_normal((4, 3, 5, 5))
    x[np.abs(x) < 1e-3] = 0.5
    out, cache = layers.relu_forward(x)
    dout = rng.standard_normal(out.shape)
    (dx,) = layers.relu_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda v: layers.relu_forward(v)[0], x, dout)) < 1e-6


def test_flatten_backward_matches_finite_differences(rng):
    x = rng.standard_normal((3, 2, 4, 5))
    out, cache = layers.flatten_forward(x)
    dout = rng.standard_normal(out.shape)
    (dx,) = layers.flatten_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda v: layers.flatten_forward(v)[0], x, dout)) < 1e-6


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_gradient_matches_finite_differences(rng, smoothing):
    logits, labels = rng.standard_normal((6, 10)) * 3, rng.integers(0, 10, 6)
    _, dlogits = layers.softmax_cross_entropy(logits, labels, smoothing)
    numeric = numeric_grad(
        lambda v: layers.softmax_cross_entropy(v, labels, smoothing)[0], logits, np.array(1.0)
    )
    assert rel_error(dlogits, numeric) < 1e-6


def loop_conv2d(x, w, b, stride, padding):
    """The lab's way: a plain loop over images, filters and pixels. The test oracle."""
    n, _, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(n):
        for f in range(o):
            for r in range(ho):
                for s in range(wo):
                    window = xp[i, :, r * stride : r * stride + k, s * stride : s * stride + k]
                    out[i, f, r, s] = np.sum(window * w[f]) + b[f]
    return out


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", [0, 1, 2])
def test_vectorised_conv_equals_loop_conv(rng, stride, padding):
    x, w, b = _normal(rng, (3, 2, 9, 8), (4, 2, 3, 3), (4,))
    out, _ = layers.conv2d_forward(x, w, b, stride, padding)
    expected = loop_conv2d(x, w, b, stride, padding)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "value"), [("relu", None), ("leakyrelu", 0.1), ("elu", 0.5)])
@pytest.mark.parametrize("impl", IMPLS)
def test_kinked_activations_take_pytorch_s_derivative_at_exactly_zero(impl, name, value):
    """At an input of exactly 0, ReLU's derivative is 0, LeakyReLU's its slope, ELU's alpha, as
    PyTorch's (jax.nn.leaky_relu would give 1)."""
    x = np.array([[-1.0, 0.0, 0.0, 2.0]])
    static = () if value is None else (value,)
    dout = np.ones_like(x)
    _, (dx,), _ = run_pair(impl, name, [x], static, dout)
    _, (expected,), _ = torch_oracle(name, [x], static, dout)
    np.testing.assert_array_equal(dx, expected)
    assert dx[0, 1] == {"relu": 0.0, "leakyrelu": 0.1, "elu": 0.5}[name]
