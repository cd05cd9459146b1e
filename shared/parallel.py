"""A batch's rows split over threads, one a core: how NumPy's passes use every core.

NumPy runs each element-wise pass on one core, and its matrix products on every core through
OpenBLAS, whose threads then spin for a while and hold the other cores (docs/PERFORMANCE.md).
So the NumPy implementation splits the batch instead, as data parallelism does across devices:
each thread runs the whole pass on its own rows, with OpenBLAS on one thread, and whatever
needs the whole batch (BatchNorm's statistics, the mean loss) is summed across the threads
where it is needed by `total`. Python threads suffice because NumPy releases the GIL for
the passes that take the time.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import operator
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from threadpoolctl import ThreadpoolController

from shared.errors import UsageError

R = TypeVar("R")
# total(*values) -> the sums of values over every thread's rows, position by position.
Total = Callable[..., tuple[Any, ...]]

THREADS_VARIABLE = "THREEFOLD_NUMPY_THREADS"


def alone(*values: Any) -> tuple[Any, ...]:
    """The total of values over a batch that no other thread shares: the values themselves."""
    return values


# When threads pay, measured on an Intel Xeon (family 6, model 207; docs/PERFORMANCE.md): each
# thread makes and reads the whole network's parameters and gradients, and the threads meet
# at a cost of about 0.1 ms a pass and 0.05 ms a total, so a batch's activations must
# outweigh its parameters. Two threads were slower on the lab network at batch 32 (0.9 M
# values of activations and unfolded inputs against 0.8 M parameters), as fast at 128 (3.5 M),
# faster at 256 (6.9 M) and 512 (13.8 M); slower on the `pool` network at batch 32 (1.0 M
# against 0.2 M) and on `noconv` at 512 (0.9 M against 0.1 M), faster on `pool` at 128 (3.8 M).
VALUES_PER_PARAMETER = 8
LEAST_VALUES = 2_000_000


def thread_count(n: int, values_per_row: int, parameters: int) -> int:
    """How many threads share a batch of n rows of a network whose rows each make
    `values_per_row` values: THREEFOLD_NUMPY_THREADS if set, else one a core this process
    may run on where the batch's values outweigh the parameters (see above), else one;
    never more than the rows."""
    given = os.environ.get(THREADS_VARIABLE)
    values = n * values_per_row
    if given is not None:
        if not (given.isdigit() and int(given) > 0):
            raise UsageError(f"{THREADS_VARIABLE}={given!r}: expected a positive whole number")
        threads = int(given)
    elif values >= max(LEAST_VALUES, VALUES_PER_PARAMETER * parameters):
        threads = len(os.sched_getaffinity(0))
    else:
        threads = 1
    return max(1, min(threads, n))


def added(shares: Iterable[Any]) -> Any:
    """The threads' shares added up in thread order: the same sums, bit for bit, wherever
    and however often they are added."""
    return functools.reduce(operator.add, shares)


def row_ranges(n: int, threads: int) -> list[slice]:
    """n rows in `threads` consecutive ranges whose sizes differ by one at most."""
    bounds = [n * i // threads for i in range(threads + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


class _Group:
    """The threads of one pass: `total` meets them all at a barrier."""

    def __init__(self, threads: int):
        self._barrier = threading.Barrier(threads)
        # Two sets of slots, used in turn: a thread that has passed the barrier can write its
        # next values while the others still read these, and cannot get two totals ahead,
        # since the next barrier waits for them. One barrier a total rather than two (each
        # costs about 40 microseconds).
        self._slots: list[list[tuple[Any, ...]]] = [[()] * threads, [()] * threads]
        self._calls = [0] * threads

    def total(self, index: int, *values: Any) -> tuple[Any, ...]:
        slots = self._slots[self._calls[index] % 2]
        self._calls[index] += 1
        slots[index] = values
        self._barrier.wait()
        return tuple(added(column) for column in zip(*slots, strict=True))

    def run(self, fn: Callable[[slice, Total], R], rows: slice, index: int) -> R:
        try:
            return fn(rows, functools.partial(self.total, index))
        except BaseException:
            self._barrier.abort()  # the others would wait at the barrier for ever
            raise


@functools.cache
def _workers(count: int) -> ThreadPoolExecutor:
    """A pool of `count` threads, kept between passes (a new thread a step costs more)."""
    return ThreadPoolExecutor(count, thread_name_prefix="threefold-numpy")


@functools.cache
def _blas() -> ThreadpoolController:
    """The BLAS libraries loaded (NumPy's OpenBLAS among them), found once: looking them up
    costs about 0.8 ms, against 0.014 ms to set their threads."""
    return ThreadpoolController().select(user_api="blas")


@contextmanager
def _blas_on_one_thread() -> Iterator[None]:
    """Every BLAS loaded on one thread while ours share the cores."""
    with _blas().limit(limits=1):
        yield


def over_threads(fn: Callable[[slice, Total], R], n: int, threads: int) -> list[R]:
    """[fn(rows, total) for each of `threads` ranges of a batch of n rows], each range on
    its own thread (the first on this one); in fn, `total(*values)` returns each value
    summed over all the ranges. An exception in any thread is raised here once every thread
    has stopped."""
    ranges = row_ranges(n, threads)
    if threads == 1:
        return [fn(ranges[0], alone)]
    group = _Group(threads)
    with _blas_on_one_thread():
        # Each worker runs in a copy of this thread's context: NumPy's errstate lives there.
        futures = [
            _workers(threads - 1).submit(contextvars.copy_context().run, group.run, fn, rows, index)
            for index, rows in enumerate(ranges[1:], 1)
        ]
        outcomes: list[Any] = []
        try:
            outcomes.append(group.run(fn, ranges[0], 0))
        except BaseException as error:
            outcomes.append(error)
        for future in futures:
            outcomes.append(future.exception() or future.result())
    # The first thread's own error, not another's broken barrier that it caused.
    errors = [e for e in outcomes if isinstance(e, BaseException)]
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))
    if errors:
        raise errors[0]
    return outcomes
