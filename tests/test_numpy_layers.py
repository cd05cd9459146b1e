"""Each hand-written NumPy backward against central finite differences (float64, random
upstream gradients), and the vectorised conv and max-pool against plain loops."""

from __future__ import annotations

import numpy as np
import pytest

from impl_numpy import layers

EPS = 1e-6


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


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize(
    ("n", "c", "o", "h", "w", "k", "p"),
    [(2, 1, 3, 5, 6, 3, 1), (3, 2, 4, 7, 5, 3, 0), (1, 3, 2, 6, 6, 5, 2)],
)
def test_conv2d_backward_matches_finite_differences(rng, n, c, o, h, w, k, p):
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((o, c, k, k))
    b = rng.standard_normal(o)
    out, cache = layers.conv2d_forward(x, wt, b, p)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = layers.conv2d_backward(dout, cache)
    assert (
        rel_error(dx, numeric_grad(lambda v: layers.conv2d_forward(v, wt, b, p)[0], x, dout)) < 1e-6
    )
    assert (
        rel_error(dw, numeric_grad(lambda v: layers.conv2d_forward(x, v, b, p)[0], wt, dout)) < 1e-6
    )
    assert (
        rel_error(db, numeric_grad(lambda v: layers.conv2d_forward(x, wt, v, p)[0], b, dout)) < 1e-6
    )


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


@pytest.mark.parametrize(("h", "w"), [(6, 6), (7, 5)])
def test_max_pool_backward_matches_finite_differences(rng, h, w):
    x = rng.standard_normal((2, 3, h, w))  # distinct values: no ties
    out, cache = layers.max_pool_forward(x, 2)
    dout = rng.standard_normal(out.shape)
    (dx,) = layers.max_pool_backward(dout, cache)
    assert rel_error(dx, numeric_grad(lambda v: layers.max_pool_forward(v, 2)[0], x, dout)) < 1e-6


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


def loop_conv2d(x, w, b, padding):
    """The lab's way: a plain loop over images, filters and pixels. The test oracle."""
    n, _, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = h + 2 * padding - k + 1, wd + 2 * padding - k + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(n):
        for f in range(o):
            for r in range(ho):
                for s in range(wo):
                    out[i, f, r, s] = np.sum(xp[i, :, r : r + k, s : s + k] * w[f]) + b[f]
    return out


def test_vectorised_conv_equals_loop_conv(rng):
    x, w, b = (
        rng.standard_normal((3, 2, 9, 8)),
        rng.standard_normal((4, 2, 3, 3)),
        rng.standard_normal(4),
    )
    for padding in (0, 1, 2):
        out, _ = layers.conv2d_forward(x, w, b, padding)
        np.testing.assert_allclose(out, loop_conv2d(x, w, b, padding), rtol=1e-12, atol=1e-12)


def test_max_pool_routes_ties_to_the_first_maximum():
    x = np.zeros((1, 1, 2, 4))
    x[0, 0, 1, 3] = 1.0
    out, cache = layers.max_pool_forward(x, 2)
    np.testing.assert_array_equal(out, [[[[0.0, 1.0]]]])
    (dx,) = layers.max_pool_backward(np.array([[[[5.0, 7.0]]]]), cache)
    np.testing.assert_array_equal(dx, [[[[5.0, 0, 0, 0], [0, 0, 0, 7.0]]]])


def test_layers_keep_float32():
    x = np.ones((2, 1, 6, 6), np.float32)
    w, b = np.ones((3, 1, 3, 3), np.float32), np.ones(3, np.float32)
    out, cache = layers.conv2d_forward(x, w, b, 1)
    assert out.dtype == np.float32
    assert all(g.dtype == np.float32 for g in layers.conv2d_backward(out, cache))
    loss, dlogits = layers.softmax_cross_entropy(np.ones((2, 10), np.float32), np.array([0, 1]))
    assert loss.dtype == np.float32 and dlogits.dtype == np.float32
