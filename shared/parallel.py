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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController

from shared.cost import MEMORY_BUDGET, Cost
from shared.errors import UsageError

R = TypeVar("R")
# total(*values) -> the sums of values over every thread's rows, position by position.
Total = Callable[..., tuple[Any, ...]]

THREADS_VARIABLE = "THREEFOLD_NUMPY_THREADS"


def alone(*values: Any) -> tuple[Any, ...]:
    """The total of values over a batch that no other thread shares: the values themselves."""
    return values


# When threads pay, measured with two threads on an Intel Xeon (family 6, model 207;
# docs/PERFORMANCE.md): each thread makes and reads the whole network's parameters and
# gradients, and the threads meet at a cost of about 0.1 ms a pass and 0.05 ms a total, so
# each thread's share of the batch's values (activations and unfolded inputs) must outweigh
# the parameters. Two threads were slower on the lab network at batch 32 (0.9 M values
# against 0.8 M parameters), as fast at 128 (3.4 M), faster at 256 (6.9 M) and 512
# (13.8 M); slower on the `pool` network at batch 32 (1.0 M against 0.2 M) and on `noconv`
# at 512 (0.9 M against 0.1 M), faster on `pool` at 128 (3.8 M).
VALUES_PER_PARAMETER = 4  # in each thread's share
LEAST_VALUES = 1_000_000  # in each thread's share


def requested_threads() -> int | None:
    """THREEFOLD_NUMPY_THREADS, checked: a positive whole number, or None where unset."""
    given = os.environ.get(THREADS_VARIABLE)
    if given is None:
        return None
    if not (given.isdecimal() and int(given) > 0):
        raise UsageError(f"{THREADS_VARIABLE}={given!r}: expected a positive whole number")
    return int(given)


def thread_count(n: int, cost: Cost, gradients: bool = True) -> int:
    """How many threads share a batch of n images of a network of `cost`:
    THREEFOLD_NUMPY_THREADS if set, else as many of the cores this process may run on as
    leave each thread's share of the values outweighing the parameters (see above); never
    more than the images. Where they make `gradients`, each thread makes the whole
    network's: the copies are held to the memory bound (in float64's 8 bytes a value), as
    the network itself is."""
    most = max(1, MEMORY_BUDGET // (8 * max(cost.parameters, 1))) if gradients else n
    threads = requested_threads()
    if threads is None:
        values = n * (cost.activations + cost.unfolded)
        worth = values // max(LEAST_VALUES, VALUES_PER_PARAMETER * cost.parameters)
        threads = min(len(os.sched_getaffinity(0)), worth, most)
    elif min(threads, n) > most:
        raise UsageError(
            f"{THREADS_VARIABLE}={threads}: each thread makes the network's {cost.parameters:,} "
            f"gradients, and more than {most} copies would pass the "
            f"{MEMORY_BUDGET / 2**30:.0f} GiB bound"
        )
    return max(1, min(threads, n))


def added(shares: Iterable[Any]) -> Any:
    """The threads' shares added up in thread order: the same sums, bit for bit, wherever
    and however often they are added."""
    return functools.reduce(operator.add, shares)


def rows_of(batched: Any, rows: slice) -> Any:
    """A range of the batch's rows of `batched`: an array (N, ...), a dict of them (the
    dropout masks), or None (no masks: evaluation)."""
    if batched is None:
        return None
    if isinstance(batched, dict):
        return {name: a[rows] for name, a in batched.items()}
    return batched[rows]


def joined(parts: Sequence[Any]) -> Any:
    """The threads' rows, in order, as one batch."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def row_ranges(n: int, threads: int) -> list[slice]:
    """n rows in `threads` consecutive ranges whose sizes differ by one at most."""
    bounds = [n * i // threads for i in range(threads + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def ranges_within(n: int, row_bytes: int, budget: int) -> list[slice]:
    """n rows of row_bytes each in as few consecutive ranges of near-equal size (differing by
    one row at most) as hold n * row_bytes within `budget` bytes a range on average; so a
    range may exceed `budget` by less than a row, and holds one row at least. One empty range
    if n = 0."""
    return row_ranges(n, max(1, min(n, -(-n * row_bytes // budget))))


class _Group:
    """The threads of one pass: `total` meets them all at a barrier."""

    def __init__(self, threads: int):
        self._barrier = threading.Barrier(threads)
        # Two sets of slots, used in turn: a thread that has passed the barrier can write its
        # next values while the others still read these, and cannot get two totals ahead,
        # since the next barrier waits for them. One barrier a total rather than two (each
        # costs about 0.05 ms).
        self._slots: list[list[tuple[Any, ...]]] = [[()] * threads, [()] * threads]
        self._calls = [0] * threads

    def total(self, index: int, *values: Any) -> tuple[Any, ...]:
        """Thread `index`'s values -> every thread's added up, once all have given theirs."""
        slots = self._slots[self._calls[index] % 2]
        self._calls[index] += 1
        slots[index] = values
        self._barrier.wait()
        return tuple(added(column) for column in zip(*slots, strict=True))

    def run(self, fn: Callable[[slice, Total], R], rows: slice, index: int) -> R:
        """fn(rows, total) as thread `index`."""
        try:
            return fn(rows, functools.partial(self.total, index))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Free the threads that wait at the barrier (with an error): one that stopped will
        never come."""
        self._barrier.abort()


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


# One pass on threads at a time: the workers are shared and OpenBLAS's setting is the
# process's, so a second caller waits rather than taking workers the first one waits for.
_one_pass_at_a_time = threading.Lock()


def over_threads(fn: Callable[[slice, Total], R], n: int, threads: int) -> list[R]:
    """[fn(rows, total) for each of `threads` ranges of a batch of n rows], each range on
    its own thread (the first on this one); in fn, `total(*values)` returns each value
    summed over all the ranges. An exception in any thread is raised here once every thread
    has stopped. fn must not itself call over_threads."""
    ranges = row_ranges(n, threads)
    if threads == 1:
        return [fn(ranges[0], alone)]
    group, futures, outcomes = _Group(threads), [], []
    with _one_pass_at_a_time, _blas_on_one_thread():
        try:
            for index, rows in enumerate(ranges[1:], 1):
                # In a copy of this thread's context: NumPy's errstate lives there.
                run = functools.partial(group.run, fn, rows, index)
                futures.append(_workers(threads - 1).submit(contextvars.copy_context().run, run))
            outcomes.append(group.run(fn, ranges[0], 0))
        except BaseException as error:  # Ctrl-C between two submissions included
            group.abort()
            outcomes.append(error)
        for future in futures:
            outcomes.append(future.exception() or future.result())
    # The first thread's own error, not another's broken barrier that it caused.
    errors = [e for e in outcomes if isinstance(e, BaseException)]
    errors.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))
    if errors:
        raise errors[0]
    return outcomes
