"""The three implementations compute the same thing: per layer, per model, per optimizer step,
in lockstep, and across checkpoints. And the comparison itself has teeth."""

from __future__ import annotations

import importlib
from dataclasses import replace

import numpy as np
import pytest

from shared.backend import IMPLEMENTATIONS, make_backend
from shared.checkpoint import load_checkpoint
from shared.config import Hyperparams, TrainConfig
from shared.crosscheck import ALL_ON, checkpoint_agreement, compare, run_crosscheck
from shared.data import load_dataset
from shared.spec import PRESETS, get_arch, init_params, param_shapes, presets
from shared.train import train
from tests.conftest import to_native

PAIRS = [("numpy", "jax"), ("numpy", "torch"), ("jax", "torch")]
F64_TOL = 1e-10


def run_layer(impl: str, layer: str, inputs: list[np.ndarray], dout: np.ndarray, **static):
    """(out, input gradients) of one layer in one implementation, as NumPy arrays."""
    mod = importlib.import_module(f"impl_{impl}.layers")
    out, cache = getattr(mod, f"{layer}_forward")(*(to_native(impl, a) for a in inputs), **static)
    grads = getattr(mod, f"{layer}_backward")(to_native(impl, dout), cache)
    return np.asarray(out), [np.asarray(g) for g in grads]


def assert_same(a: np.ndarray, b: np.ndarray, what: str, tol: float = F64_TOL) -> None:
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    max_abs, max_rel = compare(a, b)
    assert max_rel <= tol, f"{what}: max abs {max_abs:.3g}, max rel {max_rel:.3g} > {tol}"


def random_case(seed: int):
    """A seeded layer shape: batch 1..17, several channel counts, odd and even sizes."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 18))
    c, o = int(rng.choice([1, 2, 3, 5])), int(rng.choice([1, 4, 8]))
    h, w = (int(v) for v in rng.integers(5, 14, 2))
    k = int(rng.choice([1, 3, 5]))
    return rng, n, c, o, h, w, k, int(rng.integers(0, k // 2 + 1))


SEEDS = range(8)


@pytest.mark.parametrize("seed", SEEDS)
def test_conv2d_layer_agrees(seed):
    rng, n, c, o, h, w, k, p = random_case(seed)
    inputs = [
        rng.standard_normal((n, c, h, w)),
        rng.standard_normal((o, c, k, k)),
        rng.standard_normal(o),
    ]
    dout = rng.standard_normal((n, o, h + 2 * p - k + 1, w + 2 * p - k + 1))
    results = {i: run_layer(i, "conv2d", inputs, dout, padding=p) for i in IMPLEMENTATIONS}
    for a, b in PAIRS:
        assert_same(results[a][0], results[b][0], f"conv2d out {a}-{b}")
        for name, ga, gb in zip(("dx", "dw", "db"), results[a][1], results[b][1], strict=True):
            assert_same(ga, gb, f"conv2d {name} {a}-{b}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("layer", "static"),
    [("relu", {}), ("max_pool", {"size": 2}), ("max_pool", {"size": 3}), ("flatten", {})],
)
def test_parameterless_layer_agrees(seed, layer, static):
    rng, n, c, _, h, w, _, _ = random_case(seed)
    x = rng.standard_normal((n, c, h, w))
    if layer == "relu":
        x[:, :, 0, 0] = 0.0  # the derivative at the kink must agree too
    out_shape = {
        "relu": x.shape,
        "max_pool": (n, c, h // static.get("size", 1), w // static.get("size", 1)),
        "flatten": (n, c * h * w),
    }[layer]
    dout = rng.standard_normal(out_shape)
    results = {i: run_layer(i, layer, [x], dout, **static) for i in IMPLEMENTATIONS}
    for a, b in PAIRS:
        assert_same(results[a][0], results[b][0], f"{layer} out {a}-{b}")
        assert_same(results[a][1][0], results[b][1][0], f"{layer} dx {a}-{b}")


def test_max_pool_ties_agree():
    # After ReLU, windows full of zeros are common: every implementation must route the
    # gradient to the same (first) element.
    x = np.zeros((2, 3, 6, 6))
    x[0, 0, 1, 1] = 1.0
    dout = np.arange(2 * 3 * 3 * 3, dtype=float).reshape(2, 3, 3, 3)
    results = {i: run_layer(i, "max_pool", [x], dout, size=2) for i in IMPLEMENTATIONS}
    for a, b in PAIRS:
        assert_same(results[a][1][0], results[b][1][0], f"max_pool tie dx {a}-{b}")


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_layer_agrees(seed):
    rng = np.random.default_rng(seed)
    n, d, m = int(rng.integers(1, 18)), int(rng.integers(1, 40)), int(rng.integers(1, 20))
    inputs = [rng.standard_normal((n, d)), rng.standard_normal((m, d)), rng.standard_normal(m)]
    dout = rng.standard_normal((n, m))
    results = {i: run_layer(i, "linear", inputs, dout) for i in IMPLEMENTATIONS}
    for a, b in PAIRS:
        assert_same(results[a][0], results[b][0], f"linear out {a}-{b}")
        for name, ga, gb in zip(("dx", "dw", "db"), results[a][1], results[b][1], strict=True):
            assert_same(ga, gb, f"linear {name} {a}-{b}")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_agrees(seed, smoothing):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 18))
    logits, labels = rng.standard_normal((n, 10)) * 4, rng.integers(0, 10, n)
    results = {}
    for impl in IMPLEMENTATIONS:
        mod = importlib.import_module(f"impl_{impl}.layers")
        loss, dlogits = mod.softmax_cross_entropy(
            to_native(impl, logits), to_native(impl, labels), smoothing
        )
        results[impl] = (np.asarray(loss), np.asarray(dlogits))
    for a, b in PAIRS:
        assert_same(results[a][0], results[b][0], f"loss {a}-{b}")
        assert_same(results[a][1], results[b][1], f"dlogits {a}-{b}")


@pytest.mark.parametrize("arch", list(PRESETS))
def test_model_forward_and_gradients_agree(arch):
    arch = get_arch(arch)
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((9, 1, 28, 28)), rng.integers(0, 10, 9)
    params = init_params(arch, "torch", seed=3, dtype=np.float64)
    out = {}
    for impl in IMPLEMENTATIONS:
        backend = make_backend(impl, arch, np.float64, Hyperparams(label_smoothing=0.1))
        out[impl] = (
            backend.activations(params, x),
            backend.loss_and_grads(params, x, y),
            backend.input_grad(params, x, y),
        )
    for a, b in PAIRS:
        (acts_a, (loss_a, grads_a), dx_a), (acts_b, (loss_b, grads_b), dx_b) = out[a], out[b]
        for layer in arch.layers:
            assert_same(acts_a[layer.name], acts_b[layer.name], f"{layer.name} {a}-{b}")
        assert abs(loss_a - loss_b) <= F64_TOL * abs(loss_a)
        assert set(grads_a) == set(grads_b) == set(param_shapes(arch))
        for name in grads_a:
            assert_same(grads_a[name], grads_b[name], f"grad {name} {a}-{b}")
        assert_same(dx_a, dx_b, f"grad input {a}-{b}")


# Nesterov without momentum is plain SGD (PyTorch refuses the combination; ours accept it).
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, False), (0.9, True), (0.0, True)])
@pytest.mark.parametrize("steps", [1, 10])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_optimizer_steps_agree(steps, dtype, momentum, nesterov):
    config = replace(ALL_ON, momentum=momentum, nesterov=nesterov)
    results = run_crosscheck(
        [get_arch("pool")], [dtype], None, steps=steps, batch_size=5, seed=steps, config=config
    )
    lockstep = [r for r in results if r.check.startswith("lockstep")]
    # A loss row, then every parameter and (with momentum) every momentum buffer.
    per_tensor = 2 if momentum else 1
    assert len(lockstep) == len(PAIRS) * (1 + per_tensor * len(param_shapes(get_arch("pool"))))
    assert [r for r in results if not r.passed] == []


def test_lockstep_on_real_data_agrees(real_data):
    results = run_crosscheck(list(presets().values()), ["float64", "float32"], real_data, steps=20)
    assert [(r.dtype, r.arch, r.check, r.pair) for r in results if not r.passed] == []
    assert any(r.check.startswith("finite-diff") for r in results)


def test_checkpoint_interchange(tiny_data_dir, tmp_path, real_data):
    tiny = load_dataset(tiny_data_dir)
    for impl in IMPLEMENTATIONS:
        out = tmp_path / impl
        out.mkdir()
        train(
            TrainConfig(impl=impl, arch="pool", epochs=1, batch_size=16),
            tiny,
            out,
            log=lambda _: None,
        )
        ckpt = load_checkpoint(out / "checkpoint.npz")
        assert ckpt.meta["impl"] == impl
        results = checkpoint_agreement(ckpt.params, get_arch("pool"), real_data.test.x)
        assert [r.check for r in results if not r.passed] == []


def failing_checks(**kwargs) -> set[tuple[str, str]]:
    results = run_crosscheck([get_arch("lab")], ["float64"], None, steps=2, batch_size=6, **kwargs)
    return {(r.check, r.pair) for r in results if not r.passed}


def test_checks_catch_a_wrong_flatten_order(monkeypatch):
    import impl_numpy.layers as np_layers

    def flatten_hwc(x):
        return x.transpose(0, 2, 3, 1).reshape(len(x), -1), x.shape

    monkeypatch.setattr(np_layers, "flatten_forward", flatten_hwc)
    failed = failing_checks()
    assert {("activation flatten", "numpy-jax"), ("activation flatten", "numpy-torch")} <= failed
    assert not any(pair == "jax-torch" for _, pair in failed)


def test_checks_catch_a_bias_gradient_off_by_a_factor(monkeypatch):
    import impl_numpy.layers as np_layers

    linear_backward = np_layers.linear_backward

    def off_by_a_factor(dout, cache, need_dx=True):
        dx, dw, db = linear_backward(dout, cache, need_dx)
        return dx, dw, db * 1.001

    monkeypatch.setattr(np_layers, "linear_backward", off_by_a_factor)
    failed = failing_checks()
    assert {
        ("grad fc1.bias", "numpy-jax"),
        ("grad fc2.bias", "numpy-torch"),
        ("finite-diff fc1.bias", "numpy-fd"),
    } <= failed
    assert ("grad fc1.weight", "numpy-jax") not in failed
    assert not any(pair == "jax-torch" for _, pair in failed)


@pytest.mark.parametrize("seed", SEEDS)
def test_jax_im2col_conv_equals_xla_convolution(seed):
    """impl_jax computes conv as im2col @ w for speed; XLA's own convolution is the oracle."""
    from jax import lax

    from impl_jax.layers import conv2d

    rng, n, c, o, h, w, k, p = random_case(seed)
    x, wt, b = (
        rng.standard_normal((n, c, h, w)),
        rng.standard_normal((o, c, k, k)),
        rng.standard_normal(o),
    )
    expected = (
        lax.conv_general_dilated(
            x, wt, (1, 1), ((p, p), (p, p)), dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        + b[None, :, None, None]
    )
    assert_same(np.asarray(conv2d(x, wt, b, p)), np.asarray(expected), "jax conv vs lax.conv")


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shift", [0, 3])
def test_augmentation_agrees(flip, shift):
    from shared.batches import augmentation_maps
    from shared.data import FASHION_MNIST

    rng = np.random.default_rng(shift)
    x = rng.standard_normal((11, 2, 28, 28))
    rows, cols = augmentation_maps(rng, 11, 28, 28, flip, shift)
    out = {}
    for impl in IMPLEMENTATIONS:
        mod = importlib.import_module(f"impl_{impl}.augment")
        native = [to_native(impl, a) for a in (x, rows, cols)]
        out[impl] = np.asarray(mod.augment(*native, shift, FASHION_MNIST.background))
    for a, b in PAIRS:
        assert_same(out[a], out[b], f"augment {a}-{b}", tol=0.0)
