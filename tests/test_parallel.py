"""The NumPy implementation's batch split over threads (shared/parallel.py): the same numbers as
one thread, the same bits run after run, errors that surface, settings that are checked.

The suite pins each worker to one core, where the rule picks one thread: these tests force
more with THREEFOLD_NUMPY_THREADS.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from impl_numpy import model
from shared.cost import network_cost
from shared.errors import UsageError
from shared.parallel import THREADS_VARIABLE, over_threads, ranges_within, row_ranges, thread_count
from shared.spec import Arch, Params, get_arch, init_params

T = TypeVar("T")

NETWORKS = [
    "lab",
    "strong",
    # BatchNorm inside blocks and on a projection, dropout over whole channels and units.
    "conv4-bn-relu-res(conv4-bn-relu-conv4-bn)-relu-dropout2d0.2-"
    "res(conv6s2-bn-relu-conv6-bn)-relu-flatten-fc16-bn-relu-dropout0.5-fc10",
]


def inputs(arch: Arch, n: int, dtype=np.float64) -> tuple[Params, np.ndarray, np.ndarray, dict]:
    """Parameters, images, labels and dropout masks for a batch of n."""
    rng = np.random.default_rng(0)
    params = {k: v.astype(dtype) for k, v in init_params(arch, "he", 0).items()}
    x = rng.random((n, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, n)
    masks = {d.name: rng.random((n, *d.shape)) > d.p for d in arch.dropouts}
    return params, x, y, masks


def everything(arch: Arch, params: Params, x, y, masks) -> dict[str, np.ndarray]:
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


def with_threads(monkeypatch, threads: int, fn: Callable[[], T]) -> T:
    monkeypatch.setenv(THREADS_VARIABLE, str(threads))
    return fn()


@pytest.mark.parametrize("spec", NETWORKS)
@pytest.mark.parametrize("n", [2, 5, 16])  # 2: fewer images than 3 threads
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


def test_threads_keep_float32(monkeypatch):
    arch = get_arch(NETWORKS[-1])
    out = with_threads(monkeypatch, 2, lambda: everything(arch, *inputs(arch, 6, np.float32)))
    assert {name: value.dtype for name, value in out.items() if "tracked" not in name} == {
        name: np.dtype(np.float32) for name in out if "tracked" not in name
    }


def test_batch_statistics_span_every_thread(monkeypatch):
    """A batch whose halves differ: BatchNorm over each half alone gives other logits than
    over the whole batch, which the threads give."""
    arch = get_arch("conv4-bn-relu-flatten-fc10")
    params, x, y, masks = inputs(arch, 8)
    x[4:] += 10.0

    def logits(rows: slice) -> np.ndarray:
        return model.training_pass(params, x[rows], y[rows], arch, masks)[2]

    whole = with_threads(monkeypatch, 1, lambda: logits(slice(None)))
    halves = np.concatenate([logits(slice(0, 4)), logits(slice(4, 8))])
    assert not np.allclose(halves, whole, rtol=1e-3)
    threaded = with_threads(monkeypatch, 2, lambda: logits(slice(None)))
    np.testing.assert_allclose(threaded, whole, rtol=1e-10)


def test_threads_pay_only_where_each_share_outweighs_the_parameters(monkeypatch):
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    # The suite pins each worker to one core: the rule is asked about four.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})

    def rule(name: str, n: int) -> int:
        return thread_count(n, network_cost(get_arch(name).layers))

    assert rule("lab", 32) == rule("pool", 32) == rule("noconv", 512) == rule("lab", 128) == 1
    assert rule("lab", 256) == rule("strong", 16) == 2
    assert rule("pool", 128) == 3  # 3.8 M values, three shares over 1 M and 4 x 0.2 M
    assert rule("strong", 64) == rule("pool", 512) == 4  # no more than the cores
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    assert rule("lab", 32) == 3 and rule("lab", 2) == 2  # never more threads than images


@pytest.mark.parametrize("value", ["0", "-1", "two", "nan", "1.5", "", "\u00b2"])
def test_a_bad_thread_count_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(THREADS_VARIABLE, value)
    with pytest.raises(UsageError, match=THREADS_VARIABLE):
        thread_count(64, network_cost(get_arch("lab").layers))


def test_ranges_cover_the_batch_in_order():
    for n in range(0, 12):
        for threads in range(1, 5):
            ranges = row_ranges(n, threads)
            rows = [i for r in ranges for i in range(n)[r]]
            sizes = {len(range(n)[r]) for r in ranges}
            assert rows == list(range(n)) and max(sizes) - min(sizes) <= 1


def test_ranges_within_a_budget_are_as_few_as_keep_each_near_it():
    for n, row_bytes, budget in itertools.product(range(12), (1, 3, 8), (1, 8, 20, 100)):
        ranges = ranges_within(n, row_bytes, budget)
        rows = [i for r in ranges for i in range(n)[r]]
        sizes = [len(range(n)[r]) for r in ranges]
        assert rows == list(range(n)) and max(sizes) - min(sizes) <= 1
        if n == 0:
            assert sizes == [0]
        elif row_bytes > budget:
            assert sizes == [1] * n  # a row alone is over the budget: one a range
        else:
            # Every range within the budget but by one row at most, and one range fewer
            # would hold more than the budget allows.
            assert max(sizes) * row_bytes < budget + row_bytes
            assert (len(ranges) - 1) * budget < n * row_bytes


@pytest.mark.parametrize("failing", [0, 1])
def test_an_error_in_one_thread_surfaces_and_frees_the_others(failing):
    def fn(rows: slice, total) -> slice:
        total(1)
        if rows.start // 2 == failing:
            raise ValueError(f"range {failing} failed")
        total(2)  # where the other thread would wait for ever without the abort
        return rows

    def raised() -> str:
        try:
            over_threads(fn, 4, 2)
        except ValueError as error:
            return str(error)
        return "nothing raised"

    finished = []
    worker = threading.Thread(target=lambda: finished.append(raised()), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert finished == [f"range {failing} failed"]
    # The workers are free for the next pass.
    assert over_threads(lambda rows, total: total(rows.stop - rows.start)[0], 10, 2) == [10, 10]


def test_numpy_error_settings_reach_every_thread():
    def overflow_in_the_second_range(rows: slice, total) -> np.float32:
        return np.float32(3e38) * np.float32(1 if rows.start == 0 else 10)

    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        over_threads(overflow_in_the_second_range, 2, 2)


def test_blas_runs_on_one_thread_during_the_pass_and_is_restored():
    def blas_threads() -> dict[str, int]:
        return {
            i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"
        }

    with threadpool_limits(2, user_api="blas"):  # the suite's pinned workers start at 1
        before = blas_threads()
        during = over_threads(lambda rows, total: blas_threads(), 2, 2)
        after = blas_threads()
    assert before and set(before.values()) == {2}
    assert during == [dict.fromkeys(before, 1)] * 2
    assert after == before


def test_the_threads_gradients_are_held_to_the_memory_bound(monkeypatch):
    """Each thread makes the whole network's gradients: THREEFOLD_NUMPY_THREADS=64 once took
    a 15.9 M-parameter network's training from 0.36 GB to 4.3 GB."""
    cost = network_cost(get_arch("flatten-fc20000-relu-fc10").layers)
    most = 2**30 // (8 * cost.parameters)  # float64 copies within 1 GiB: 8
    monkeypatch.setenv(THREADS_VARIABLE, str(most))
    assert thread_count(500, cost) == most
    monkeypatch.setenv(THREADS_VARIABLE, str(most + 1))
    with pytest.raises(UsageError, match=f"={most + 1}: .* more than {most} copies would pass"):
        thread_count(500, cost)
    assert thread_count(500, cost, gradients=False) == most + 1  # evaluation makes none
    monkeypatch.delenv(THREADS_VARIABLE)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert thread_count(100_000, cost) == most  # the rule alone would take every core
