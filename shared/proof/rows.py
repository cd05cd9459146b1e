"""The rows of the proof: two tensors that should agree (`Compared`), and the verdict on them
(`CheckResult`), with the tolerance table and the one comparison every part uses.

Every part of the cross-check yields `Compared` rows (the single pass, the lockstep run, the
finite differences, the shared code against the libraries); `judge` turns each into a
`CheckResult`, which the report and the picture read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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
    weights) between the two sides of `pair` ("numpy-jax", "numpy-fd", "shared-optax"), `a`
    and `b`. `scale` is the size of the tensor's family (every gradient of the pass, say):
    a tensor that is zero in exact arithmetic is measured against its family, not itself.
    With `by_step`, a and b stack a tensor of each step of a run (axis 0), and `scale` holds
    the family's size at each step (see `compare`)."""

    check: str
    pair: str
    a: np.ndarray
    b: np.ndarray
    scale: float | np.ndarray = 0.0
    by_step: bool = False


@dataclass(frozen=True)
class CheckResult:
    """One row of the cross-check: the worst difference of one tensor between a pair, under
    one setting (the hyperparameters or the planted batch the row ran with). `dtypes` is the
    pair's dtype, or both when they differ; a row passes only within tolerance and with both
    in `expected_dtype` (None: no dtype to check)."""

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

    @property
    def passed(self) -> bool:
        dtype_ok = self.expected_dtype is None or self.dtypes == self.expected_dtype
        return self.max_rel <= self.tolerance and dtype_ok

    def as_dict(self) -> dict:
        """The row as JSON can hold it: a difference that is not a finite number (a NaN, an
        infinity, a shape mismatch: see `compare`) is null, with the reason."""
        row = {**asdict(self), "passed": self.passed}
        if not math.isfinite(self.max_rel):
            row |= {"max_abs": None, "max_rel": None, "why_null": "not finite (NaN, inf or shape)"}
        return row


def compare(
    a: np.ndarray, b: np.ndarray, scale: float | np.ndarray = 0.0, by_step: bool = False
) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(|a|, |b|, scale)); shapes must match exactly.

    `scale` is the size of the tensor's family (every gradient of the pass, say): a tensor
    that is zero in exact arithmetic, such as the gradient of a conv bias that BatchNorm
    follows (BatchNorm subtracts the mean the bias adds), is pure round-off in every
    implementation, and is measured against its family rather than against itself.

    With `by_step`, a and b (steps, ...) stack a tensor of each step of a run and `scale`
    (steps,) its family's size at each: each step's difference is measured against that
    step's sizes, and the worst step is returned. Against the whole run's, the early steps
    of a run that grows by orders of magnitude would be measured against its last."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    if by_step:
        scales = np.broadcast_to(np.asarray(scale, np.float64), a.shape[:1])
        steps = [compare(a_s, b_s, s) for a_s, b_s, s in zip(a, b, scales, strict=True)]
        return max(d for d, _ in steps), max(r for _, r in steps)
    diff = float(np.max(np.abs(a - b)))
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b)), scale))
    if not np.isfinite(diff):
        return float("inf"), float("inf")
    return diff, (diff / scale if scale > 0 else 0.0)


def dtypes_of(a: np.ndarray, b: np.ndarray) -> str:
    """The pair's dtype, or both when they differ."""
    a, b = np.asarray(a).dtype, np.asarray(b).dtype
    return str(a) if a == b else f"{a}/{b}"


def judge(
    row: Compared,
    dtype: str,
    arch: str,
    setting: str,
    tolerance: float,
    expected_dtype: str | None = None,
) -> CheckResult:
    """The verdict on one comparison, made under (dtype, arch, setting)."""
    return CheckResult(
        dtype,
        arch,
        setting,
        row.check,
        row.pair,
        *compare(row.a, row.b, row.scale, row.by_step),
        tolerance,
        dtypes_of(row.a, row.b),
        expected_dtype,
    )
