"""The NumPy implementation's batch split over threads (shared/parallel.py): the same numbers as
one thread, the same bits run after run, errors that surface, settings that are checked.

The suite pins each worker to one core, where the rule picks one thread: these tests force
more with THREEFOLD_NUMPY_THREADS.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from impl_numpy import model
from shared.cost import network_cost
from shared.errors import UsageError
from shared.parallel import THREADS_VARIABLE, over_threads, row_ranges, thread_count
from shared.spec import get_arch, init_params

NETWORKS = [
    "lab",
    "strong",
    # BatchNorm inside blocks and on a projection, dropout over whole channels and units.
    "conv4-bn-relu-res(conv4-bn-relu-conv4-bn)-relu-dropout2d0.2-"
    "res(conv6s2-bn-relu-conv6-bn)-relu-flatten-fc16-bn-relu-dropout0.5-fc10",
]


def inputs(arch, n: int, seed: int = 0):
    """float64 parameters, images, labels and dropout masks for a batch of n."""
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float64) for k, v in init_params(arch, "he", seed).items()}
    x = rng.random((n, 1, 28, 28))
    y = rng.integers(0, 10, n)
    masks = {d.name: rng.random((n, *d.shape)) > d.p for d in arch.dropouts}
    return params, x, y, masks


def everything(arch, params, x, y, masks) -> dict[str, np.ndarray]:
    """Every output of the NumPy model's passes, by name."""
    loss, grads, logits, buffers = model.training_pass(params, x, y, arch, masks, 0.1)
    return {
        "loss": np.asarray(loss),
        "logits": logits,
        "dx": model.input_grad(params, x, y, arch, masks, 0.1),
        "eval logits": model.forward(params, x, arch),
        **{f"grad {k}": v for k, v in grads.items()},
        **{f"buffer {k}": np.asarray(v) for k, v in buffers.items()},
    }


def with_threads(monkeypatch, threads: int, fn):
    monkeypatch.setenv(THREADS_VARIABLE, str(threads))
    return fn()


@pytest.mark.parametrize("spec", NETWORKS)
@pytest.mark.parametrize("n", [5, 16])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_compute_what_one_thread_does(monkeypatch, spec, n, threads):
    arch = get_arch(spec)
    args = (arch, *inputs(arch, n))
    one = with_threads(monkeypatch, 1, lambda: everything(*args))
    many = with_threads(monkeypatch, threads, lambda: everything(*args))
    assert one.keys() == many.keys()
    for name, expected in one.items():
        # Only the order of additions differs: float64 round-off.
        np.testing.assert_allclose(many[name], expected, rtol=1e-10, atol=1e-13, err_msg=name)


def test_threads_give_the_same_bits_every_run(monkeypatch):
    arch = get_arch("strong")
    args = (arch, *inputs(arch, 9))
    first = with_threads(monkeypatch, 2, lambda: everything(*args))
    second = with_threads(monkeypatch, 2, lambda: everything(*args))
    for name, value in first.items():
        assert np.array_equal(second[name], value), name


def test_batch_statistics_span_every_thread(monkeypatch):
    """A batch whose halves differ: BatchNorm over each half alone would normalise both to
    the same outputs; over the whole batch, the halves stay apart."""
    arch = get_arch("conv4-bn-relu-flatten-fc10")
    params, x, y, masks = inputs(arch, 8)
    x[4:] += 10.0
    _, _, logits, buffers = with_threads(
        monkeypatch, 2, lambda: model.training_pass(params, x, y, arch, masks)
    )
    _, _, whole, whole_buffers = with_threads(
        monkeypatch, 1, lambda: model.training_pass(params, x, y, arch, masks)
    )
    np.testing.assert_allclose(logits, whole, rtol=1e-10)
    assert buffers.keys() == whole_buffers.keys()
    for name, value in whole_buffers.items():
        np.testing.assert_allclose(buffers[name], value, rtol=1e-10, err_msg=name)


def test_threads_pay_only_where_activations_outweigh_parameters(monkeypatch):
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    cores = len(os.sched_getaffinity(0))

    def rule(name: str, n: int) -> int:
        cost = network_cost(get_arch(name).layers)
        return thread_count(n, cost.activations + cost.unfolded, cost.parameters)

    assert rule("lab", 32) == rule("pool", 32) == rule("noconv", 512) == 1
    assert rule("strong", 64) == rule("pool", 512) == min(cores, 64)
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    assert rule("lab", 32) == 3 and rule("lab", 2) == 2  # never more threads than rows


@pytest.mark.parametrize("value", ["0", "-1", "two", "nan", "1.5", ""])
def test_a_bad_thread_count_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(THREADS_VARIABLE, value)
    with pytest.raises(UsageError, match=THREADS_VARIABLE):
        thread_count(64, 1, 1)


def test_ranges_cover_the_batch_in_order():
    for n in range(0, 12):
        for threads in range(1, 5):
            ranges = row_ranges(n, threads)
            rows = [i for r in ranges for i in range(n)[r]]
            sizes = {len(range(n)[r]) for r in ranges}
            assert rows == list(range(n)) and max(sizes) - min(sizes) <= 1


def test_an_error_in_one_thread_surfaces_and_frees_the_others():
    def fn(rows, total):
        total(1)
        if rows.start > 0:
            raise ValueError("part two failed")
        total(2)  # where the first thread would wait for ever without the abort
        return rows

    finished = []
    worker = threading.Thread(target=lambda: finished.append(_raised(fn)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert finished == ["part two failed"]
    # The pool still serves.
    assert over_threads(lambda rows, total: total(rows.stop - rows.start)[0], 10, 2) == [10, 10]


def _raised(fn) -> str:
    try:
        over_threads(fn, 4, 2)
    except ValueError as error:
        return str(error)
    return "nothing raised"


def test_numpy_error_settings_reach_every_thread():
    def overflow(rows, total):
        return np.float32(3e38) * np.float32(rows.start + 10)

    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        over_threads(overflow, 2, 2)


def test_blas_runs_on_one_thread_during_the_pass_and_is_restored():
    def blas_threads():
        return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info()}

    before = blas_threads()
    during = over_threads(lambda rows, total: blas_threads(), 2, 2)[0]
    assert before.keys() == during.keys()
    blas = [lib["filepath"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert blas and all(during[path] == 1 for path in blas)
    assert blas_threads() == before
