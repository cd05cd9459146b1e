"""The JAX implementation under chex: every entry point gives the same result jitted and not
jitted (a function that works under one only is a bug), checked against the NumPy reference
pytree by pytree; and the model's boundary refuses inputs of the wrong shape or type."""

from __future__ import annotations

import re
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import impl_jax.augment
import impl_jax.backend
import impl_jax.layers
import impl_jax.model
import impl_jax.optim
import impl_numpy.augment
import impl_numpy.model
import impl_numpy.optim
from shared.backend import make_backend
from shared.batches import augmentation_maps, dropout_masks, training_batches
from shared.config import Hyperparams
from shared.spec import get_arch, init_params, split_params

# A network with every kind of layer and buffer: conv with stride, BatchNorm 2d and 1d,
# max-pooling, tanh, sigmoid, dropout. The third max-pools a sigmoid's and a tanh's output,
# whose gradients this jaxlib's XLA computed over a buffer it was still reading (tanh and
# sigmoid in impl_jax.layers) under jit.
NETWORKS = (
    "lab",
    "conv4-bn-relu-maxpool2-conv6s2-bn-tanh-flatten-fc16-bn-sigmoid-dropout0.25-fc10",
    "conv4-bn-sigmoid-maxpool2-conv6-bn-tanh-maxpool2-flatten-fc10",
)
TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64: what differs is round-off


def case(name: str, n: int = 5, seed: int = 0):
    """(arch, canonical float64 params as NumPy and as JAX, images, labels, dropout masks)."""
    arch = get_arch(name)
    params = init_params(arch, "he", seed, np.dtype(np.float64))
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, 1, 28, 28)), rng.integers(0, 10, n)
    masks = dropout_masks(arch.dropouts, n, seed, 1, 0)
    return arch, params, jax.tree.map(jnp.asarray, params), x, y, masks


class ModelTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_activations_in_both_modes(self):
        activations = self.variant(impl_jax.model.activations, static_argnames="arch")
        for name in NETWORKS:
            arch, params, jparams, x, _, masks = case(name)
            for mode in (None, masks):
                jmasks = None if mode is None else jax.tree.map(jnp.asarray, mode)
                ours = activations(jparams, jnp.asarray(x), arch=arch, masks=jmasks)
                chex.assert_trees_all_close(
                    jax.tree.map(np.asarray, ours),
                    impl_numpy.model.activations(params, x, arch, mode),
                    **TOL,
                )

    @chex.variants(with_jit=True, without_jit=True)
    def test_training_pass(self):
        training_pass = self.variant(
            impl_jax.model.training_pass, static_argnames=("arch", "label_smoothing")
        )
        for name in NETWORKS:
            arch, params, jparams, x, y, masks = case(name)
            ours = training_pass(
                jparams,
                jnp.asarray(x),
                jnp.asarray(y),
                arch=arch,
                masks=jax.tree.map(jnp.asarray, masks),
                label_smoothing=0.1,
            )
            reference = impl_numpy.model.training_pass(params, x, y, arch, masks, 0.1)
            chex.assert_trees_all_close(jax.tree.map(np.asarray, ours), reference, **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_input_gradient(self):
        input_grad = self.variant(impl_jax.model.input_grad, static_argnames="arch")
        arch, params, jparams, x, y, masks = case(NETWORKS[1])
        ours = input_grad(jparams, jnp.asarray(x), jnp.asarray(y), arch=arch, masks=masks)
        reference = impl_numpy.model.input_grad(params, x, y, arch, masks)
        chex.assert_trees_all_close(np.asarray(ours), reference, **TOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sgd_update(self):
        hyper = (0.9, True, 1e-3)  # momentum, Nesterov, weight decay
        update = self.variant(impl_jax.optim.SGD(*hyper).update)
        arch, params, jparams, x, y, masks = case("lab")
        _, grads = impl_numpy.model.loss_and_grads(params, x, y, arch, masks)
        trainable, _ = split_params(params, arch)
        jax_sgd, numpy_sgd = impl_jax.optim.SGD(*hyper), impl_numpy.optim.SGD(*hyper)
        state = jax_sgd.init(split_params(jparams, arch)[0])
        numpy_params = {k: v.copy() for k, v in trainable.items()}
        numpy_state = numpy_sgd.init(numpy_params)
        jax_params = split_params(jparams, arch)[0]
        for _ in range(3):  # momentum carried from step to step
            jax_params, state = update(jax_params, jax.tree.map(jnp.asarray, grads), state, 0.05)
            g = {k: v.copy() for k, v in grads.items()}  # NumPy's update overwrites them
            numpy_params, numpy_state = numpy_sgd.update(numpy_params, g, numpy_state, 0.05)
        chex.assert_trees_all_close(jax.tree.map(np.asarray, jax_params), numpy_params, **TOL)
        chex.assert_trees_all_close(
            jax.tree.map(np.asarray, jax_sgd.tensors(state)), numpy_state, **TOL
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_augment(self):
        augment = self.variant(impl_jax.augment.augment, static_argnums=(3, 4))
        rng = np.random.default_rng(3)
        x = rng.standard_normal((6, 1, 28, 28))
        rows, cols = augmentation_maps(rng, 6, 28, 28, True, 2)
        ours = augment(jnp.asarray(x), jnp.asarray(rows), jnp.asarray(cols), 2, -0.8)
        chex.assert_trees_all_close(
            np.asarray(ours), impl_numpy.augment.augment(x, rows, cols, 2, -0.8), rtol=0, atol=0
        )


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((4, 28, 28)), np.zeros(4, int), "rank"),  # the channel axis missing
        (np.zeros((4, 3, 28, 28)), np.zeros(4, int), "shape"),  # three channels
        (np.zeros((4, 1, 28, 28), int), np.zeros(4, int), "type"),  # integer pixels
        (np.zeros((4, 1, 28, 28)), np.zeros(5, int), "shape"),  # a label too many
        (np.zeros((4, 1, 28, 28)), np.zeros(4), "type"),  # float labels
    ],
)
def test_the_model_boundary_refuses_wrong_inputs(images, labels, message):
    arch, _, jparams, *_ = case("lab")
    loss = partial(impl_jax.model.loss_and_grads, arch=arch, masks={})
    with pytest.raises(AssertionError, match=message):
        loss(jparams, jnp.asarray(images), jnp.asarray(labels))


def test_the_model_boundary_refuses_a_tensor_of_another_network():
    arch, _, jparams, x, *_ = case("lab")
    wrong = {**jparams, "fc1.weight": jparams["fc1.weight"][:, :100]}
    with pytest.raises(AssertionError, match="shape"):
        impl_jax.model.forward(wrong, jnp.asarray(x), arch)


@pytest.mark.parametrize(
    ("name", "ynn_relu"),
    [("lab", False), ("res(conv4-relu-conv4)-flatten-fc10", True), ("strong", True)],
)
def test_the_backend_hands_xla_its_options_for_the_network(name, ynn_relu):
    """Networks with a convolution XLA runs (one inside a block counts) compile their
    element-wise work into YNNPACK's fusions too: there the ReLU's maximum runs inside one,
    where XLA's defaults run it in a fusion of XLA's own; `lab`, whose only convolution is a
    1-channel product, compiles as XLA's defaults have it."""
    arch = get_arch(name)
    backend = make_backend("jax", arch)
    params = backend.init_state(init_params(arch))[0]
    x = np.zeros((4, 1, 28, 28), np.float32)

    def maximum_in_ynn_fusion(fn) -> bool:
        return any(" maximum(" in body for body in ynn_fusions(fn.lower(params, x)))

    assert not maximum_in_ynn_fusion(jax.jit(partial(impl_jax.model.forward, arch=arch)))
    assert maximum_in_ynn_fusion(backend.predict_fn) == ynn_relu


@pytest.mark.parametrize("bias", [False, True])
def test_every_xla_convolution_shares_its_ynnpack_fusion_with_an_element_wise_op(bias):
    """YNNPACK runs a convolution alone in its fusion on one thread. Of the convolutions XLA
    runs (more than one input channel), one without a bias, and every input gradient, add
    zeros that XLA cannot fold away, so that each runs fused with that add, on both threads."""
    options = impl_jax.backend.compiler_options(get_arch("deep"))
    x, w = jnp.ones((8, 16, 14, 14), jnp.float32), jnp.ones((32, 16, 3, 3), jnp.float32)
    b = jnp.ones(32, jnp.float32) if bias else None
    dout = jnp.ones((8, 32, 14, 14), jnp.float32)

    def out_and_dx(x, w, dout):
        out, pullback = jax.vjp(partial(impl_jax.layers.conv2d, b=b, stride=1, padding=1), x, w)
        return out, pullback(dout)[0]

    lowered = jax.jit(out_and_dx, compiler_options=options).lower(x, w, dout)
    with_conv = [body for body in ynn_fusions(lowered) if " convolution(" in body]
    assert len(with_conv) == 2 and all(" add(" in body for body in with_conv)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_many_channel_convolution_s_weight_gradient_is_one_product(stride):
    """YNNPACK runs a product with a small output on one thread, and XLA ran the k*k products,
    one per kernel offset, one after another. A many-channel convolution's weight gradient
    is one product of x's stacked offsets: one dot in the compiled gradient, its output
    (k*k*C, O) = (144, 32), the way round that took 0.66x the time of (32, 144) alone."""
    options = impl_jax.backend.compiler_options(get_arch("deep"))
    x, w = jnp.ones((8, 16, 14, 14), jnp.float32), jnp.ones((32, 16, 3, 3), jnp.float32)
    dout = jnp.ones((8, 32, 14 // stride, 14 // stride), jnp.float32)

    def dw(x, w, dout):
        conv = partial(impl_jax.layers.conv2d, b=None, stride=stride, padding=1)
        return jax.vjp(lambda w: conv(x, w), w)[1](dout)[0]

    hlo = jax.jit(dw, compiler_options=options).lower(x, w, dout).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert len(dots) == 1 and re.search(r"= f32\[144,32\]\{[^}]*\} dot\(", dots[0])


@pytest.mark.parametrize("name", ["lab", "strong"])
def test_a_one_channel_convolution_s_weight_gradient_has_no_product(name):
    """The 1-channel convolution's weight gradient, products per image of (O, H'*W') @
    (H'*W', k*k) summed over the batch, ran at 2-6 GFLOP/s; it compiles to a reduction with
    no product in it, under XLA's defaults (`lab`) and YNNPACK's fusions (`strong`), while the
    input gradient keeps its product. The values are checked against PyTorch in
    tests/test_layers.py."""
    options = impl_jax.backend.compiler_options(get_arch(name))
    x = jnp.linspace(-1, 1, 8 * 28 * 28, dtype=jnp.float32).reshape(8, 1, 28, 28)
    w, b = jnp.ones((32, 1, 3, 3), jnp.float32), jnp.ones(32, jnp.float32)
    dout = jnp.linspace(-1, 1, 8 * 32 * 28 * 28, dtype=jnp.float32).reshape(8, 32, 28, 28)

    def pullback(x, w, dout, argnum):
        conv = partial(impl_jax.layers.conv2d, b=b, stride=1, padding=1)
        return jax.vjp(conv, x, w)[1](dout)[argnum]

    def compiled(argnum: int) -> str:
        grad = jax.jit(partial(pullback, argnum=argnum), compiler_options=options)
        return grad.lower(x, w, dout).compile().as_text()

    assert " dot(" in compiled(0)
    dw_hlo = compiled(1)
    assert " reduce(" in dw_hlo and " dot(" not in dw_hlo


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name", ["pool", "strong"])
def test_a_tiling_max_pool_s_gradient_needs_no_pads_and_leaves_the_product_before_it_alone(
    name, channels_last
):
    """2x2 max-pooling's gradient through its chain of selects placed each offset's gradient
    by a pad into its strided place, then summed the four (25 ms of strong's step at batch
    128): it compiles to no pad. Its dout, here from a product as fc1's input gradient, is
    used in its own shape: broadcast to the tiles' shape, YNNPACK fused the broadcast into
    the product's output. The gradient's values are checked against PyTorch's, ties and NaN
    included, in tests/test_layers.py."""
    options = impl_jax.backend.compiler_options(get_arch(name))
    x = jnp.linspace(-1, 1, 8 * 32 * 28 * 28, dtype=jnp.float32).reshape(8, 32, 28, 28)
    h = jnp.linspace(-1, 1, 8 * 16, dtype=jnp.float32).reshape(8, 16)
    w = jnp.linspace(-1, 1, 16 * 32 * 14 * 14, dtype=jnp.float32).reshape(16, -1)

    def pullback(x, h, w):
        pool = partial(impl_jax.layers.max_pool, size=2, stride=2, channels_last=channels_last)
        return jax.vjp(pool, x)[1]((h @ w).reshape(8, 32, 14, 14))[0]

    lowered = jax.jit(pullback, compiler_options=options).lower(x, h, w)
    assert " pad(" not in lowered.compile().as_text()
    with_dot = [body for body in ynn_fusions(lowered) if " dot(" in body]
    assert with_dot and not any(" broadcast(" in body for body in with_dot)


NET = "conv32p0-relu-conv64p0-relu-maxpool2-dropout0.25-flatten-fc128-relu-dropout0.5-fc10"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("strong", [False, True]),  # after the 1-channel product, then after XLA's conv
        ("deep", [False]),
        ("pool", [False]),
        (NET, [True]),  # through a ReLU
        ("conv8-relu-conv8-maxpool2-maxpool2-flatten-fc10", [True, False]),
        ("conv4-res(conv8-relu-maxpool2)-relu-flatten-fc10", [True]),  # inside a block
        ("conv4-relu-conv8-res(maxpool2-conv8)-relu-flatten-fc10", [True]),  # a block's input
        ("conv4-relu-conv8-res(conv8)-maxpool2-flatten-fc10", [False]),  # after a block
    ],
)
def test_a_max_pool_reads_channels_last_only_after_xla_s_convolution(monkeypatch, spec, expected):
    """The layout each max-pool is told its input has in memory: channels-last where XLA's
    convolution wrote it, through BatchNorm and element-wise layers. Wrong, it costs speed
    only (docs/PERFORMANCE.md), so nothing else would catch it."""
    told = []
    original = impl_jax.layers.max_pool

    def recording(x, size, stride, padding=0, channels_last=False):
        told.append(channels_last)
        return original(x, size, stride, padding, channels_last)

    monkeypatch.setattr(impl_jax.layers, "max_pool", recording)
    arch, _, jparams, x, _, masks = case(spec, n=2)
    masks = jax.tree.map(jnp.asarray, masks)
    impl_jax.model.chain_forward(arch.layers, jparams, jnp.asarray(x), masks, {}, {})
    assert told == expected


def ynn_fusions(lowered) -> list[str]:
    """The bodies of the compiled program's YNNPACK fusions, as HLO text."""
    hlo = lowered.compile().as_text()
    called = re.findall(r"calls=%([\w.]+)[^\n]*\"kind\":\"__ynn_fusion\"", hlo)
    return [re.search(rf"^%{re.escape(c)} .*?^}}", hlo, re.M | re.S)[0] for c in called]


def test_another_label_smoothing_compiles_nothing_new():
    """The label smoothing is an argument of the compiled functions, like the learning rate,
    not a constant compiled into them: a backend with another smoothing finds every program
    in the compilation cache (the cross-check's settings each draw their own smoothing, and
    compiled 149 programs for the real-data lockstep, now 107), and computes with its own."""
    arch = get_arch("lab")
    params = init_params(arch)
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 1, 28, 28), np.float32), rng.integers(0, 10, 16)
    [batch] = training_batches(16, 16, seed=0, epoch=0, fill=0.0, shuffle=False)

    def step_and_loss(smoothing: float) -> tuple[float, float]:
        backend = make_backend("jax", arch, hyperparams=Hyperparams(label_smoothing=smoothing))
        state = backend.init_state(params)
        _, step_loss, _ = backend.train_step(state, backend.put_data(x, y), batch, 0.1)
        loss, _ = backend.loss_and_grads(params, x, y, {})
        backend.input_grad(params, x, y, {})
        return step_loss, float(loss)

    step_and_loss(0.1)  # compiles, or finds every program cached
    events = []

    def listen(event: str, **_) -> None:
        events.append(event)

    jax.monitoring.register_event_listener(listen)
    try:
        ours = step_and_loss(0.25)
    finally:
        jax.monitoring.unregister_event_listener(listen)
    # Every program asked of the cache was found there (a miss is recorded only when its
    # entry is written, which a minimum compile time can skip).
    requests = events.count("/jax/compilation_cache/compile_requests_use_cache")
    assert requests > 0 and events.count("/jax/compilation_cache/cache_hits") == requests
    expected = impl_numpy.model.loss_and_grads(params, x, y, arch, {}, 0.25)[0]
    np.testing.assert_allclose(ours, [expected, expected], rtol=1e-5)


@pytest.mark.parametrize(
    ("layer", "grown"),
    [  # a 28 x 28 window as a slice per position: 784 slices, 8 s to compile with its gradient
        (partial(impl_jax.layers.max_pool, size=28, stride=28), "maxpool28"),
        (
            lambda x: impl_jax.layers.conv2d(x, jnp.ones((1, 1, 28, 28)), None, 1, 14),
            "conv1k28p14",
        ),
    ],
)
def test_a_large_window_compiles_to_a_few_operations_not_one_per_position(layer, grown):
    x = jnp.zeros((2, 1, 28, 28))
    program = jax.jit(jax.grad(lambda x: layer(x).sum())).lower(x).as_text()
    assert len(re.findall(r"stablehlo\.slice\b", program)) < 10, grown
