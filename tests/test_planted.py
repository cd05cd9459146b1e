"""Planted wrong variants of the newer layers and of the training step, each in one
implementation: the cross-check must fail exactly the rows that involve that implementation,
name them (check, pair, setting), and pass every other row.

Each plant replaces one function of one implementation with monkeypatch before
`run_crosscheck` builds its backends (JAX traces the functions it finds when a backend's
function first runs, so a plant in place by then is what JAX compiles).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import impl_jax.layers
import impl_numpy.layers
import impl_numpy.model
import impl_numpy.optim
import impl_torch.augment
import impl_torch.backend
import impl_torch.layers
import impl_torch.model
import shared.config
from shared import crosscheck
from shared.backend import make_backend
from shared.config import TrainConfig
from shared.crosscheck import run_crosscheck
from shared.layers import Residual
from shared.parallel import alone
from shared.proof.rows import CheckResult, compare
from shared.proof.settings import ALL_ON, drawn_setting
from shared.spec import get_arch, param_shapes
from tests.conftest import pairs_with

# A small network with BatchNorm 2d and 1d, a strided conv (conv2) and dropout.
SPEC = "conv4-bn-relu-maxpool2-conv6s2-bn-tanh-flatten-fc16-bn-sigmoid-dropout0.25-fc10"
# Without BatchNorm or sigmoid, exact zeros stay exact: the planted-ties setting runs.
SPEC_WITHOUT_BN = "conv4-relu-maxpool2-flatten-fc16-relu-dropout0.25-fc10"
STEPS, BATCH = 3, 6
# The settings (by kind) that train in lockstep, and every one with a single pass too.
TRAINS = ("defaults", "fast recipe", "drawn", "drawn Adam", "drawn AdamW")
PASSES = (*TRAINS, "large logits")


def check(spec: str = SPEC, dtype: str = "float64") -> list[CheckResult]:
    """A short cross-check of one network in one dtype on seeded random images."""
    return run_crosscheck([get_arch(spec)], [dtype], None, steps=STEPS, batch_size=BATCH)


def kind(setting: str) -> str:
    for name in (
        "defaults",
        "fast recipe",
        "drawn AdamW",
        "drawn Adam",
        "drawn",
        "large logits",
        "planted ties",
        "shared code",
    ):
        if setting.startswith(name):
            return name
    raise AssertionError(f"unknown setting {setting!r}")


def involves(row: CheckResult, impl: str) -> bool:
    """Whether a row compares `impl`: one side of its pair, or, in the shared-code rows
    (arch "-", code under test first, then the library), the code under test."""
    sides = row.pair.split("-")
    return impl == sides[0] if row.arch == "-" else impl in sides


def failures(results: list[CheckResult], planted: str) -> set[tuple[str, str, str]]:
    """(setting kind, check, pair) of every failing row, once asserted that every row which
    does not involve the planted implementation passed."""
    innocent = [(r.setting, r.check, r.pair) for r in results if not involves(r, planted)]
    assert innocent, "no row to clear the others"
    assert [
        (r.setting, r.check, r.pair, r.max_rel)
        for r in results
        if not involves(r, planted) and not r.passed
    ] == []
    return {(kind(r.setting), r.check, r.pair) for r in results if not r.passed}


def layer_names(spec: str) -> list[str]:
    return [layer.name for layer in get_arch(spec).layers]


def activation_rows(spec: str, first: str, mode: str) -> set[str]:
    """The activation checks of every layer from `first` on, in `mode` (in evaluation mode,
    the prediction path's logits too)."""
    names = layer_names(spec)
    later = names[names.index(first) :]
    predicted = {"logits (predict)"} if mode == "eval" else set()
    return {f"activation {n} ({mode})" for n in later[:-1]} | {f"logits ({mode})"} | predicted


_JAX_BACKENDS: dict = {}


@pytest.fixture
def jax_compiled_once(monkeypatch):
    """JAX compiles every function of a new backend (seconds for each network and setting);
    a plant in NumPy or PyTorch leaves JAX as it is, so its backends are built once for the
    module. Only for plants outside JAX: a JAX plant needs backends traced with it."""

    def cached(impl, arch, dtype=np.float32, hyperparams=None):
        if impl != "jax":
            return make_backend(impl, arch, dtype, hyperparams)
        key = (arch.spec, np.dtype(dtype).name, hyperparams)
        if key not in _JAX_BACKENDS:
            _JAX_BACKENDS[key] = make_backend(impl, arch, dtype, hyperparams)
        return _JAX_BACKENDS[key]

    monkeypatch.setattr(crosscheck, "make_backend", cached)


@pytest.mark.usefixtures("jax_compiled_once")
@pytest.mark.parametrize("spec", [SPEC, SPEC_WITHOUT_BN])
def test_the_networks_pass_unplanted(spec):
    """The baseline: every row passes without a plant, so each failure below is the plant's."""
    results = check(spec)
    assert [(r.setting, r.check, r.pair) for r in results if not r.passed] == []
    kinds = {kind(r.setting) for r in results}
    assert ("planted ties" in kinds) == (spec == SPEC_WITHOUT_BN)


# --- BatchNorm ---------------------------------------------------------------------------


def test_batch_norm_normalising_with_the_unbiased_variance(monkeypatch):
    def unbiased(x, weight, bias, running_mean, running_var, momentum, eps, train):
        out, *stats = batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, train)
        if train:  # the plant: normalise with the batch variance over n - 1
            axes, shape = (0, *range(2, x.ndim)), (-1, *[1] * (x.ndim - 2))
            mean, var = x.mean(axis=axes), x.var(axis=axes, ddof=1)
            xhat = (x - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps)
            out = xhat * weight.reshape(shape) + bias.reshape(shape)
        return out, *stats

    batch_norm = impl_jax.layers.batch_norm
    monkeypatch.setattr(impl_jax.layers, "batch_norm", unbiased)
    failed = failures(check(), "jax")
    for setting in PASSES:
        for pair in pairs_with("jax"):
            for row in ("activation bn1 (train)", "logits (train)", "loss", "grad input"):
                assert (setting, row, pair) in failed
            assert (setting, "activation conv1 (train)", pair) not in failed
    assert ("defaults", f"lockstep loss x{STEPS}", "numpy-jax") in failed
    assert ("drawn", "lockstep bn1.running_var", "jax-torch") in failed
    # Evaluation mode uses the running statistics, which the plant left alone.
    assert not any(c.endswith("(eval)") or c.startswith("dropout mask") for _, c, _ in failed)


def test_running_statistics_moved_by_0_9_instead_of_0_1(monkeypatch, jax_compiled_once):
    def momentum_the_other_way(
        x, weight, bias, running_mean, running_var, momentum, eps, train, total=alone
    ):
        return batch_norm_forward(
            x, weight, bias, running_mean, running_var, 1 - momentum, eps, train, total
        )

    batch_norm_forward = impl_numpy.layers.batch_norm_forward
    monkeypatch.setattr(impl_numpy.layers, "batch_norm_forward", momentum_the_other_way)
    failed = failures(check(), "numpy")
    # The statistics feed nothing of training mode: only the tracked tensors differ, from the
    # first step on, in both settings that train.
    assert failed == {
        (setting, f"lockstep bn{i}.{stat}", pair)
        for setting in TRAINS
        for i in (1, 2, 3)
        for stat in ("running_mean", "running_var")
        for pair in pairs_with("numpy")
    }


def test_running_statistics_updated_in_evaluation_mode(monkeypatch, jax_compiled_once):
    def updating_in_evaluation(
        x, weight, bias, running_mean, running_var, momentum, eps, train, total=alone
    ):
        if not train:  # the plant: evaluation moves the statistics too, then uses them
            axes, n = (0, *range(2, x.ndim)), x.size // x.shape[1]
            running_mean = (1 - momentum) * running_mean + momentum * x.mean(axis=axes)
            var = x.var(axis=axes) * n / (n - 1)
            running_var = (1 - momentum) * running_var + momentum * var
        return batch_norm_forward(
            x, weight, bias, running_mean, running_var, momentum, eps, train, total
        )

    batch_norm_forward = impl_numpy.layers.batch_norm_forward
    monkeypatch.setattr(impl_numpy.layers, "batch_norm_forward", updating_in_evaluation)
    failed = failures(check(), "numpy")
    # Exactly the evaluation-mode outputs from the first BatchNorm on, in every setting.
    assert failed == {
        (setting, row, pair)
        for setting in PASSES
        for row in activation_rows(SPEC, "bn1", "eval")
        for pair in pairs_with("numpy")
    }


def test_a_prediction_path_that_normalises_with_the_batch_s_statistics(
    monkeypatch, jax_compiled_once
):
    """The logits of validation, the test and evaluate.py come from the prediction path, its
    own function: run in training mode there, BatchNorm's batch statistics changed a third
    of strong's test predictions, while the layer-by-layer passes and the lockstep, which
    do not take that path, passed every row."""
    forward = impl_numpy.model._forward

    def forward_in_training_mode(params, x, arch):
        masks = {layer.name: np.ones(1, bool) for layer in arch.dropouts}
        return forward(params, x, arch, masks)[0]

    monkeypatch.setattr(impl_numpy.model, "forward", forward_in_training_mode)
    failed = failures(check(), "numpy")
    assert failed == {
        (setting, "logits (predict)", pair) for setting in PASSES for pair in pairs_with("numpy")
    }


@pytest.mark.parametrize("steps", [3, 20])
def test_a_warm_up_one_step_late_is_caught_however_short_the_check(monkeypatch, steps):
    """A 3-step check warmed up for 3 // 4 = 0 steps: a warm-up that started at 0 instead
    of base_lr / W passed it (the schedule is shared code, so no pair can tell). 20 steps,
    the default, warmed up for 5 before: the control."""
    on_time = shared.config.learning_rate

    def late(step, total_steps, base_lr, schedule, warmup_steps=0):
        if step < warmup_steps:
            return base_lr * step / warmup_steps
        return on_time(step, total_steps, base_lr, schedule, warmup_steps)

    monkeypatch.setattr(shared.config, "learning_rate", late)
    failed = {
        r.check for r in crosscheck.shared_code_checks(TrainConfig(), steps, 0) if not r.passed
    }
    assert failed and all(check.startswith("schedule ") for check in failed)


def test_a_schedule_wrong_after_its_warm_up_is_caught_in_a_one_step_check(monkeypatch):
    """With --steps 1 every compared step was warm-up: a cosine or linear decay 1% off
    passed, under rows named after it."""
    on_time = shared.config.learning_rate

    def off_after_warm_up(step, total_steps, base_lr, schedule, warmup_steps=0):
        rate = on_time(step, total_steps, base_lr, schedule, warmup_steps)
        return rate if step < warmup_steps else rate * 1.01

    monkeypatch.setattr(shared.config, "learning_rate", off_after_warm_up)
    failed = {r.check for r in crosscheck.shared_code_checks(TrainConfig(), 1, 0) if not r.passed}
    assert {check.split(",")[0] for check in failed} >= {"schedule cosine", "schedule linear"}


def test_an_erasing_box_one_row_too_tall_is_named_in_the_images(monkeypatch, jax_compiled_once):
    """It failed the lockstep's loss and tensors alone: no row named the augmentation."""

    def one_row_too_tall(x, boxes):
        taller = boxes.clone()
        taller[:, 2] += 1
        return erase(x, taller)

    erase = impl_torch.augment.erase
    monkeypatch.setattr(impl_torch.backend.Backend, "erase", staticmethod(one_row_too_tall))
    failed = failures(check(), "torch")
    images = {(setting, pair) for setting, row, pair in failed if row == "lockstep images"}
    # Every setting that erases trains on other images from its first step with a box.
    assert {setting for setting, _, _ in failed} == {setting for setting, _ in images}
    assert images and all(pair in pairs_with("torch") for _, pair in images)


# --- dropout and strides -------------------------------------------------------------------


def test_dropout_without_the_inverted_scaling(monkeypatch, jax_compiled_once):
    monkeypatch.setattr(impl_torch.layers, "dropout", lambda x, keep, p: x * keep)
    failed = failures(check(), "torch")
    grads = {f"grad {name}" for name in param_shapes(get_arch(SPEC))}
    for setting in PASSES:
        for pair in pairs_with("torch"):
            assert (setting, "activation dropout (train)", pair) in failed
            assert (setting, "grad fc1.weight", pair) in failed
            assert (setting, "grad input", pair) in failed
            assert (setting, "activation sigmoid (train)", pair) not in failed
    wrong = {c for _, c, _ in failed}
    assert wrong <= activation_rows(SPEC, "dropout", "train") | grads | {
        "loss",
        "grad input",
        *(f"lockstep {name}" for name in param_shapes(get_arch(SPEC))),
        *(
            f"lockstep {buffer} {name}"
            for buffer in ("momentum", "exp_avg", "exp_avg_sq")
            for name in param_shapes(get_arch(SPEC))
        ),
        *(f"lockstep bn{i}.{stat}" for i in (1, 2, 3) for stat in ("running_mean", "running_var")),
        f"lockstep loss x{STEPS}",
    }
    # The same units are dropped: only the scale of the kept ones is wrong.
    assert not any(c.startswith("dropout mask") for c in wrong)


def rows_only_forward(x, w, b, stride, padding):
    """The plant: the stride applied to the rows only; the columns are those of stride 1,
    cut to the expected width so that the rest of the network still runs."""
    out, cache = impl_numpy_conv2d_forward(x, w, b, 1, padding)
    if stride == 1:
        return out, (None, cache)
    wo = (x.shape[3] + 2 * padding - w.shape[3]) // stride + 1
    return out[:, :, ::stride, :wo], ((out.shape, stride, wo), cache)


def rows_only_backward(dout, cache, need_dx=True):
    """The exact adjoint of rows_only_forward: the plant is consistent with itself."""
    strided, inner = cache
    if strided is not None:
        shape, stride, wo = strided
        full = np.zeros(shape, dout.dtype)
        full[:, :, ::stride, :wo] = dout
        dout = full
    return impl_numpy_conv2d_backward(dout, inner, need_dx)


impl_numpy_conv2d_forward = impl_numpy.layers.conv2d_forward
impl_numpy_conv2d_backward = impl_numpy.layers.conv2d_backward


def test_a_stride_applied_to_the_rows_only(monkeypatch, jax_compiled_once):
    monkeypatch.setattr(impl_numpy.layers, "conv2d_forward", rows_only_forward)
    monkeypatch.setattr(impl_numpy.layers, "conv2d_backward", rows_only_backward)
    results = check()
    failed = failures(results, "numpy")
    for setting in PASSES:
        for pair in pairs_with("numpy"):
            for mode in ("eval", "train"):
                assert (setting, f"activation conv2 ({mode})", pair) in failed
                assert (setting, f"activation pool ({mode})", pair) not in failed  # before it
            assert (setting, "grad conv2.weight", pair) in failed
    # The plant's backward is its forward's adjoint, so the finite differences agree with
    # it: only the other implementations can tell that the forward itself is wrong.
    assert not any(c.startswith("finite-diff") for _, c, _ in failed)
    assert any(r.check.startswith("finite-diff") and r.passed for r in results)


def test_a_stride_that_changes_the_shape_fails_loudly(monkeypatch):
    """With the columns left at stride 1 the shapes differ: compare() makes such a row
    infinitely different, and the layer after flatten cannot even run the pass."""
    x = np.random.default_rng(0).standard_normal((2, 4, 14, 14))
    w, b = np.random.default_rng(1).standard_normal((6, 4, 3, 3)), np.zeros(6)
    full, _ = impl_numpy_conv2d_forward(x, w, b, 1, 1)
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), 2, 1)
    assert full[:, :, ::2].shape != expected.shape
    assert compare(full[:, :, ::2], expected.numpy()) == (float("inf"), float("inf"))

    def rows_only(x, w, b, stride, padding):
        out, cache = impl_numpy_conv2d_forward(x, w, b, 1, padding)
        return out[:, :, ::stride], (None, cache)

    monkeypatch.setattr(impl_numpy.layers, "conv2d_forward", rows_only)
    with pytest.raises(ValueError, match="mismatch"):
        check()


# --- the optimizer, the loss -----------------------------------------------------------


def test_a_momentum_of_0_9_hard_coded_in_one_optimizer(monkeypatch, jax_compiled_once):
    # The defaults use 0.9 themselves: only drawn hyperparameters can expose the constant.
    assert ALL_ON.momentum == 0.9
    drawn = drawn_setting(0, STEPS, False).config.momentum
    assert abs(drawn - 0.9) > 0.05

    def fixed_momentum(self, momentum, nesterov, weight_decay):
        init(self, 0.9, nesterov, weight_decay)

    init = impl_numpy.optim.SGD.__init__
    monkeypatch.setattr(impl_numpy.optim.SGD, "__init__", fixed_momentum)
    failed = failures(check(), "numpy")
    assert {setting for setting, _, _ in failed} == {"drawn"}
    assert all(c.startswith("lockstep") for _, c, _ in failed)
    for pair in pairs_with("numpy"):
        # (Not the biases BatchNorm follows: their gradients are round-off, and so are
        # their momentum buffers.)
        for name in param_shapes(get_arch(SPEC)):
            if name.endswith(".weight"):
                assert ("drawn", f"lockstep momentum {name}", pair) in failed
        assert ("drawn", f"lockstep loss x{STEPS}", pair) in failed
        assert ("drawn", "lockstep bn1.num_batches_tracked", pair) not in failed


@pytest.mark.parametrize("nesterov", [True, False])
def test_a_nesterov_switch_hard_coded_in_one_optimizer(nesterov, monkeypatch, jax_compiled_once):
    # The drawn setting took the defaults' Nesterov at seed 0: a hard-coded True passed.
    def fixed_nesterov(self, momentum, _, weight_decay):
        init(self, momentum, nesterov, weight_decay)

    init = impl_torch.optim.SGD.__init__
    monkeypatch.setattr(impl_torch.optim.SGD, "__init__", fixed_nesterov)
    failed = failures(check(), "torch")
    # Caught wherever the settings take the other switch: the drawn one, or the defaults'.
    assert {setting for setting, _, _ in failed} == (
        {"drawn"} if nesterov else {"defaults", "fast recipe"}
    )
    assert all(c.startswith("lockstep") for _, c, _ in failed)


def test_a_float32_loss_computed_in_float64(monkeypatch, jax_compiled_once):
    def cross_entropy_in_float64(logits, labels, label_smoothing=0.0):
        return F.cross_entropy(logits.double(), labels, label_smoothing=label_smoothing)

    monkeypatch.setattr(impl_torch.layers, "cross_entropy", cross_entropy_in_float64)
    results = check(dtype="float32")
    failed = failures(results, "torch")
    assert failed == {(setting, "loss", pair) for setting in PASSES for pair in pairs_with("torch")}
    # The values agree (float64 is only more exact): the dtype alone fails the rows.
    for r in results:
        if r.check == "loss" and involves(r, "torch"):
            assert r.dtypes == "float32/float64" and r.expected_dtype == "float32"
            assert r.max_rel <= r.tolerance


def softmax_without_max_subtraction(logits, labels, label_smoothing=0.0, total=alone):
    """Cross-entropy from exp(logits) as they are: exp overflows beyond 88.7 in float32."""
    k = logits.shape[1]
    (n,) = total(len(logits))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        exp = np.exp(logits)
        sum_exp = exp.sum(axis=1, keepdims=True)
        logp = logits - np.log(sum_exp)
        target = np.full_like(logits, label_smoothing / k)
        target[np.arange(len(logits)), labels] += 1 - label_smoothing
        return -(target * logp).sum() / n, (exp / sum_exp - target) / n


def test_a_softmax_without_max_subtraction(monkeypatch, jax_compiled_once):
    monkeypatch.setattr(impl_numpy.layers, "softmax_cross_entropy", softmax_without_max_subtraction)
    results = check(dtype="float32")
    failed = failures(results, "numpy")
    # Ordinary logits are far from overflow: only the large-logits setting can catch it.
    assert {setting for setting, _, _ in failed} == {"large logits", "shared code"}
    for pair in pairs_with("numpy"):
        assert ("large logits", "loss", pair) in failed
        assert ("large logits", "grad fc2.weight", pair) in failed
        assert ("large logits", "logits (train)", pair) not in failed
    assert all(c == "loss" or c.startswith("grad") for s, c, _ in failed if s == "large logits")
    # The cross-check's own rows of the shared loss against optax and PyTorch catch it too.
    shared = {(c, p) for s, c, p in failed if s == "shared code"}
    assert ("loss, smoothing 0.1, float32 logits 90-100", "numpy-torch") in shared
    losses = [r for r in results if r.check == "loss" and not r.passed]
    assert all(r.max_rel == float("inf") for r in losses)


# --- the ReLU's derivative at its kink --------------------------------------------------


def relu_with_derivative_one_at_zero(x):
    return torch.where(x >= 0, x, torch.zeros_like(x))


@pytest.mark.parametrize(
    ("impl", "module", "plant"),
    [
        pytest.param("jax", impl_jax.layers, lambda x: jnp.maximum(x, 0), id="jnp.maximum-0.5"),
        pytest.param("torch", impl_torch.layers, relu_with_derivative_one_at_zero, id="where-1"),
    ],
)
def test_a_relu_derivative_at_zero_other_than_0(monkeypatch, request, impl, module, plant):
    if impl != "jax":
        request.getfixturevalue("jax_compiled_once")
    monkeypatch.setattr(module, "relu", plant)
    failed = failures(check(SPEC_WITHOUT_BN), impl)
    # Exact zeros reach the kink: the planted ones, and an erased box's through the first
    # step's zero biases in every lockstep that erases (all but the planted ties and the large
    # logits, which run a single pass); the forward pass is the same either way.
    erasing = {"defaults", "fast recipe", "drawn", "drawn Adam", "drawn AdamW"}
    assert {setting for setting, _, _ in failed} == {"planted ties"} | erasing
    assert all(c.startswith("grad") for s, c, _ in failed if s == "planted ties")
    assert all(c.startswith("lockstep") for s, c, _ in failed if s in erasing)
    for pair in pairs_with(impl):
        assert ("planted ties", "grad input", pair) in failed
        assert ("planted ties", "grad fc1.bias", pair) in failed


# --- Adam, GELU: the variants ports get wrong ----------------------------------------------


def adam_variant(variant: str):
    """NumPy's Adam.update, written out with one of the classic mistakes."""

    def update(self, params, grads, state, lr):
        for name, p in params.items():
            g, m, v = grads[name], state["exp_avg"][name], state["exp_avg_sq"][name]
            step = state["step"][name]
            step += 1
            coupled = not self.decoupled or variant == "l2-coupled adamw"
            if self.weight_decay and coupled:
                g = g + self.weight_decay * p
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            if self.weight_decay and not coupled:
                p *= 1 - lr * self.weight_decay
            t = float(step)
            m_hat, v_hat = m / (1 - self.beta1**t), v / (1 - self.beta2**t)
            if variant == "no bias correction":
                m_hat, v_hat = m, v
            if variant == "eps inside the root":
                p -= lr * m_hat / np.sqrt(v_hat + self.eps)
            else:
                p -= lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return params, state

    return update


@pytest.mark.parametrize(
    ("variant", "settings"),
    [
        ("eps inside the root", {"drawn Adam", "drawn AdamW"}),
        ("no bias correction", {"drawn Adam", "drawn AdamW"}),
        ("l2-coupled adamw", {"drawn AdamW"}),
    ],
)
def test_an_adam_written_the_way_ports_get_it_wrong(
    monkeypatch, jax_compiled_once, variant, settings
):
    monkeypatch.setattr(impl_numpy.optim.Adam, "update", adam_variant(variant))
    failed = failures(check(SPEC_WITHOUT_BN), "numpy")
    # Only the settings that run that optimizer, only the lockstep, every weight.
    assert {setting for setting, _, _ in failed} == settings
    assert all(check.startswith("lockstep") for _, check, _ in failed)
    for setting in settings:
        for pair in pairs_with("numpy"):
            assert (setting, f"lockstep loss x{STEPS}", pair) in failed
            for name in param_shapes(get_arch(SPEC_WITHOUT_BN)):
                assert (setting, f"lockstep {name}", pair) in failed


def test_the_unplanted_adam_variant_is_numpys_adam(monkeypatch, jax_compiled_once):
    """The plants above differ from the real update only where they say."""
    monkeypatch.setattr(impl_numpy.optim.Adam, "update", adam_variant("none"))
    assert failures(check(SPEC_WITHOUT_BN), "numpy") == set()


def test_gelu_in_its_other_form(monkeypatch):
    """jax.nn.gelu approximates with tanh unless told not to: the classic silent divergence
    from PyTorch's exact GELU, at most 5e-4 apart: in float64 the first GELU is named; in
    float32 (tolerance 1e-4 of the layer's scale) the divergence shows a layer or two later."""
    spec = "conv4-gelu-maxpool2-flatten-fc16-gelu-fc10"
    monkeypatch.setattr(impl_jax.layers, "gelu", impl_jax.layers.gelutanh)
    failed = failures(check(spec, "float64"), "jax")
    for setting in PASSES:
        for pair in pairs_with("jax"):
            for mode in ("eval", "train"):
                assert (setting, f"activation gelu1 ({mode})", pair) in failed
                assert (setting, f"activation conv ({mode})", pair) not in failed


# --- residual blocks -----------------------------------------------------------------------

# An identity block, then a strided one whose projection has BatchNorm.
SPEC_RESIDUAL = (
    "conv4-relu-res(conv4-relu-conv4)-relu-res(conv6s2-bn-relu-conv6-bn)-relu-flatten-fc10"
)


@pytest.mark.usefixtures("jax_compiled_once")
def test_the_residual_network_passes_unplanted():
    results = check(SPEC_RESIDUAL)
    assert [(r.setting, r.check, r.pair) for r in results if not r.passed] == []


def test_a_block_that_drops_its_shortcut_s_gradient(monkeypatch, jax_compiled_once):
    """NumPy's backward returns the body's input gradient alone, not the sum of both paths':
    every gradient before the first block is wrong, none after it, and the forward is right."""
    model = impl_numpy.model
    original = model.layer_backward

    def body_only(layer, dout, cache, need_dx, grads, douts=None):
        if not isinstance(layer, Residual):
            return original(layer, dout, cache, need_dx, grads, douts)
        body_caches, shortcut_caches = cache
        model.chain_backward(layer.shortcut, dout, shortcut_caches, need_dx, grads, douts)
        return model.chain_backward(layer.body, dout, body_caches, need_dx, grads, douts)

    monkeypatch.setattr(model, "layer_backward", body_only)
    failed = failures(check(SPEC_RESIDUAL), "numpy")
    for setting in PASSES:
        for pair in pairs_with("numpy"):
            assert (setting, "grad conv.weight", pair) in failed
            assert (setting, "grad input", pair) in failed
            assert (setting, "grad fc.weight", pair) not in failed
            assert (setting, "grad block2.conv2.weight", pair) not in failed
    assert ("defaults", "finite-diff conv.weight", "numpy-fd") in failed
    assert not any(check.startswith("activation") for _, check, _ in failed)


def test_a_block_whose_relu_moved_before_the_add(monkeypatch, jax_compiled_once):
    """PyTorch's block adds the shortcut to relu(body) (ReLU moved before the add): the first
    block's output is named, in both modes, and nothing before it."""
    model = impl_torch.model
    original = model.layer_forward

    def relu_then_add(layer, params, x, masks, buffers, outputs):
        if not isinstance(layer, Residual):
            return original(layer, params, x, masks, buffers, outputs)
        body = model.chain_forward(layer.body, params, x, masks, buffers, outputs)
        return torch.relu(body) + model.chain_forward(
            layer.shortcut, params, x, masks, buffers, outputs
        )

    monkeypatch.setattr(model, "layer_forward", relu_then_add)
    failed = failures(check(SPEC_RESIDUAL), "torch")
    for setting in PASSES:
        for pair in pairs_with("torch"):
            for mode in ("eval", "train"):
                assert (setting, f"activation block1 ({mode})", pair) in failed
                assert (setting, f"activation block1.conv2 ({mode})", pair) not in failed


def projection_rows_only_forward(x, w, b, stride, padding):
    """The plant: a 1x1 convolution (the projection) strides the rows only."""
    if w.shape[-1] == 1:
        return rows_only_forward(x, w, b, stride, padding)
    out, cache = impl_numpy_conv2d_forward(x, w, b, stride, padding)
    return out, (None, cache)


def test_a_projection_strided_on_one_axis(monkeypatch, jax_compiled_once):
    monkeypatch.setattr(impl_numpy.layers, "conv2d_forward", projection_rows_only_forward)
    monkeypatch.setattr(impl_numpy.layers, "conv2d_backward", rows_only_backward)
    failed = failures(check(SPEC_RESIDUAL), "numpy")
    for setting in PASSES:
        for pair in pairs_with("numpy"):
            for mode in ("eval", "train"):
                assert (setting, f"activation block2.downsample.0 ({mode})", pair) in failed
                assert (setting, f"activation block2.conv2 ({mode})", pair) not in failed
            assert (setting, "grad block2.downsample.0.weight", pair) in failed
