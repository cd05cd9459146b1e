"""The rows of the proof: two tensors that should agree (`Compared`), a comparison made step
by step as a run goes (`Measured`), and the verdict on either (`CheckResult`), with the
tolerance table and the one comparison every part uses.

Every part of the cross-check yields rows (the single pass, the lockstep run, the finite
differences, the shared code against the libraries); `judge` turns each into a
`CheckResult`, which the report and the picture read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# Relative error is max|a - b| / max|b|: the worst difference measured against the tensor's
# own scale, so tiny entries of a large tensor do not dominate.
# float64: differences are round-off (unit round-off 1.1e-16) grown by sums of at most 6272
# terms and a few layers, so 1e-9 is far above them and far below any real bug.
# float32: unit round-off 6e-8; a 6272-term sum in another order, then several layers,
# leaves ~1e-6 relative; 1e-4 keeps a 100x margin while a wrong factor or layout gives O(1).
# In lockstep, float64 runs carry their differences through 20 steps and momentum (still round-
# off, far below 1e-9); float32 restarts every step from a shared state (see `lockstep`), so a
# step's difference is its own, and the single pass's 1e-4 holds.
# Finite differences with step 1e-6 in float64 are accurate to ~1e-9 relative to the gradient.
TOLERANCES = {
    ("float64", "pass"): 1e-9,
    ("float64", "lockstep"): 1e-9,
    ("float32", "pass"): 1e-4,
    ("float32", "lockstep"): 1e-4,
    ("float64", "finite-diff"): 1e-6,
}
FD_STEP = 1e-6


@dataclass(frozen=True)
class Compared:
    """One comparison: `check` (what is compared: a layer's output, a gradient, a step's
    loss) between the two sides of `pair` ("numpy-jax", "numpy-fd", "shared-optax"), `a`
    and `b`. `scale` is the size of the tensor's family (every gradient of the pass, say):
    a tensor that is zero in exact arithmetic is measured against its family, not itself."""

    check: str
    pair: str
    a: np.ndarray
    b: np.ndarray
    scale: float = 0.0

    def measured(self) -> tuple[float, float, str]:
        """(max |a - b|, that relative to the size, the pair's dtype): see `compare`."""
        return (*compare(self.a, self.b, self.scale), dtypes_of(self.a, self.b))


@dataclass
class Measured:
    """A tensor compared at each step of a run as the run goes (a lockstep's weights and
    optimizer state): two numbers a step, not the run's tensors, so that a run's memory does
    not grow with its steps. Each step's difference is measured against that step's size
    (the larger of the two tensors and their family then), and the worst step is the row's:
    against the whole run's, the early steps of a run that grows by orders of magnitude would
    be measured against its last."""

    check: str
    pair: str
    dtypes: str = ""
    diffs: list[float] = field(default_factory=list)
    sizes: list[float] = field(default_factory=list)

    def add(self, a: np.ndarray, b: np.ndarray, scale: float = 0.0) -> None:
        """One step's tensors and their family's size at that step."""
        diff, size = difference(a, b, scale)
        self.diffs.append(diff)
        self.sizes.append(size)
        self.dtypes = self.dtypes or dtypes_of(a, b)

    def first(self, steps: int) -> Measured:
        """The row over the first `steps` steps alone."""
        return Measured(self.check, self.pair, self.dtypes, self.diffs[:steps], self.sizes[:steps])

    def relative(self) -> list[float]:
        """Each step's relative difference."""
        return [_relative(d, s) for d, s in zip(self.diffs, self.sizes, strict=True)]

    def measured(self) -> tuple[float, float, str]:
        """(the worst step's difference, the worst step's relative difference, the dtype)."""
        nothing = float("inf")  # a row that compared no step fails
        return max(self.diffs, default=nothing), max(self.relative(), default=nothing), self.dtypes


@dataclass(frozen=True)
class CheckResult:
    """One row of the cross-check: the worst difference of one tensor between a pair, under
    one setting (the hyperparameters or the planted batch the row ran with). `dtypes` is the
    pair's dtype, or both when they differ; a row passes only within tolerance and with both
    in `expected_dtype` (None: no dtype to check). A lockstep row that fails also gives the
    first step past its tolerance (1-based), where the worst may come steps later."""

    dtype: str
    arch: str
    setting: str
    check: str
    pair: str
    max_abs: float
    max_rel: float
    tolerance: float
    dtypes: str = ""
    expected_dtype: str | None = None
    first_step: int | None = None

    @property
    def passed(self) -> bool:
        dtype_ok = self.expected_dtype is None or self.dtypes == self.expected_dtype
        return self.max_rel <= self.tolerance and dtype_ok

    def as_dict(self) -> dict:
        """The row as JSON can hold it: a difference that is not a finite number (a NaN, an
        infinity, a shape mismatch: see `compare`) is null, with the reason."""
        row = {**asdict(self), "passed": self.passed}
        if not math.isfinite(self.max_rel):
            why = "not finite (NaN, inf or shape), or nothing compared"
            row |= {"max_abs": None, "max_rel": None, "why_null": why}
        return row


def compare(a: np.ndarray, b: np.ndarray, scale: float = 0.0) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(|a|, |b|, scale)); shapes must match exactly.

    `scale` is the size of the tensor's family (every gradient of the pass, say): a tensor
    that is zero in exact arithmetic, such as the gradient of a conv bias that BatchNorm
    follows (BatchNorm subtracts the mean the bias adds), is pure round-off in every
    implementation, and is measured against its family rather than against itself."""
    diff, size = difference(a, b, scale)
    return diff, _relative(diff, size)


def difference(a: np.ndarray, b: np.ndarray, scale: float = 0.0) -> tuple[float, float]:
    """(max |a - b|, the size it is measured against: max(|a|, |b|, scale)); an infinite
    difference where the shapes differ, it is not finite, or nothing was compared (a finite
    difference that found no entry away from a kink): a row that compared nothing fails."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.size == 0:
        return float("inf"), float("inf")
    diff = float(np.max(np.abs(a - b)))
    if not np.isfinite(diff):
        return float("inf"), float("inf")
    return diff, float(max(np.max(np.abs(a)), np.max(np.abs(b)), scale))


def _relative(diff: float, size: float) -> float:
    if math.isinf(diff):
        return float("inf")
    return diff / size if size > 0 else 0.0


def dtypes_of(a: np.ndarray, b: np.ndarray) -> str:
    """The pair's dtype, or both when they differ."""
    a, b = np.asarray(a).dtype, np.asarray(b).dtype
    return str(a) if a == b else f"{a}/{b}"


def judge(
    row: Compared | Measured,
    dtype: str,
    arch: str,
    setting: str,
    tolerance: float,
    expected_dtype: str | None = None,
) -> CheckResult:
    """The verdict on one comparison, made under (dtype, arch, setting)."""
    max_abs, max_rel, dtypes = row.measured()
    past = [] if isinstance(row, Compared) else [r > tolerance for r in row.relative()]
    return CheckResult(
        dtype,
        arch,
        setting,
        row.check,
        row.pair,
        max_abs,
        max_rel,
        tolerance,
        dtypes,
        expected_dtype,
        past.index(True) + 1 if any(past) else None,
    )
