"""float32's round-off in a gradient whose terms cancel: the cross-check measures it against the
sizes of the terms summed (shared/proof/passes.py, docs/CROSSCHECK.md)."""

from __future__ import annotations

import numpy as np

from shared.backend import make_backend
from shared.config import TrainConfig
from shared.crosscheck import run_crosscheck
from shared.proof.passes import round_off_sizes, summed_terms
from shared.spec import get_arch, init_params, split_params

# BatchNorm 2d and 1d, the second centring the gradient over the batch for all before it.
CANCELLING = "conv4-bn-tanh-flatten-bn-fc10"


def test_the_terms_are_each_gradient_s_summands_in_magnitude():
    arch = get_arch(CANCELLING)
    params = init_params(arch, "he", 0, np.dtype(np.float64))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 1, 28, 28)), rng.integers(0, 10, 6)
    reference = make_backend("numpy", arch, np.float64)
    terms, grads = summed_terms(reference, arch, params, x, y, {})
    assert set(terms) == set(split_params(params, arch)[0]) == set(grads)
    for name, gradient in grads.items():  # a sum is no larger than its terms' magnitudes
        assert np.all(terms[name] >= np.abs(gradient) * (1 - 1e-12)), name
    # The last layer's, from the logits: dlogits = (softmax - one-hot) / N.
    outputs = reference.activations(params, x, {})
    logits = outputs["fc"]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    dlogits = (p / p.sum(axis=1, keepdims=True) - np.eye(10)[y]) / len(y)
    np.testing.assert_allclose(terms["fc.bias"], np.abs(dlogits).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        terms["fc.weight"], np.abs(dlogits).T @ np.abs(outputs["bn2"]), rtol=1e-12
    )
    # Where BatchNorm centres the gradient, the terms are far larger than their sum.
    assert terms["conv.bias"].max() > 1e3 * np.abs(grads["conv.bias"]).max()


def test_a_float32_cross_check_whose_batchnorm_cancels_sums_passes(real_data):
    """Measured against their family's size, `grad conv.bias` (exactly 0: BatchNorm follows)
    failed at 4.0e-4 and `lockstep momentum bn1.weight` at 1.03e-4 from step 1, the three
    implementations adding the same terms in other orders (the code before 2026-12-07)."""
    results = run_crosscheck(
        [get_arch("conv16-bn-relu-maxpool2-flatten-bn-fc10")], ["float32"], real_data, steps=3
    )
    assert [(r.setting, r.check, r.pair) for r in results if not r.passed] == []
    assert any(r.check == "lockstep momentum conv.bias" for r in results)


def test_a_run_past_the_finite_numbers_gives_no_size():
    """A lockstep whose weights overflowed (a rate too high) is compared up to there: its
    terms, infinite or NaN, give no size, not a NaN that a comparison would have to skip."""
    terms = {"fc.weight": np.array([[np.inf, 2.0], [np.nan, 1.0]]), "fc.bias": np.full(2, np.nan)}
    grads = {"fc.weight": np.ones((2, 2)), "fc.bias": np.zeros(2)}
    params = {"fc.weight": np.ones((2, 2)), "fc.bias": np.zeros(2)}
    sizes = round_off_sizes(terms, grads, params, TrainConfig(optimizer="adam", beta1=0.75))
    assert sizes["momentum"] == {"fc.weight": 2.0, "fc.bias": 0.0}
    assert sizes["exp_avg"] == {"fc.weight": 0.5, "fc.bias": 0.0}
