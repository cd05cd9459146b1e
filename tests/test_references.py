"""The shared schedule, loss and metrics agree with optax, PyTorch and plain loops, and the
checks that say so fail when one of those shared pieces is broken."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

import shared.config
from impl_numpy import layers as numpy_layers
from shared import metrics
from shared.config import SCHEDULES, TrainConfig, warmup_steps
from shared.proof.references import (
    FLOAT32_TOLERANCE,
    FLOAT64_TOLERANCE,
    reference_checks,
    tolerance,
)
from shared.proof.rows import compare


def numpy_loss(logits: np.ndarray, labels: np.ndarray, smoothing: float):
    """NumPy's hand-written loss layer, looked up at call time so that a test can plant a
    wrong one."""
    return numpy_layers.softmax_cross_entropy(logits, labels, smoothing)


# The default run: 15 epochs of 782 batches (the 50000 training images after the validation
# split, in batches of 64), one epoch of warm-up.
STEPS_PER_EPOCH = math.ceil(50000 / TrainConfig().batch_size)
FULL_STEPS = TrainConfig().epochs * STEPS_PER_EPOCH
FULL_WARMUP = warmup_steps(TrainConfig(), STEPS_PER_EPOCH)
# A run of 2 epochs of 8 batches: warmed up over its first half.
SHORT_WARMUP = warmup_steps(TrainConfig(epochs=2), 8)

# (schedule, total steps, warm-up steps, label smoothing): warm-up 0, 1 (no rise: step 0
# already takes the full rate), short, most of the run, the whole run, longer than the run,
# and the default run's real counts.
GRID = [
    ("cosine", 20, 0, 0.0),
    ("cosine", 20, 1, 0.1),
    ("cosine", 20, 2, 0.3),
    ("cosine", 20, 5, 0.1),
    ("cosine", 20, 19, 0.0),
    ("cosine", 20, 20, 0.1),
    ("cosine", 16, SHORT_WARMUP, 0.1),
    ("cosine", 1, 0, 0.1),
    ("cosine", FULL_STEPS, FULL_WARMUP, 0.1),
    ("constant", 20, 0, 0.1),
    ("constant", 20, 1, 0.0),
    ("constant", 20, 5, 0.3),
    ("constant", 16, SHORT_WARMUP, 0.1),
    ("constant", 1, 1, 0.1),
    ("linear", 20, 0, 0.1),
    ("linear", 20, 1, 0.0),
    ("linear", 20, 5, 0.1),
    ("linear", 20, 19, 0.1),
    ("linear", 1, 0, 0.1),
    # The speedrun's real counts: 8 epochs of 391 steps, a 0.3-epoch warm-up (117 steps).
    ("linear", 8 * 391, 117, 0.1),
]


def rows_by_name(
    schedule: str, total: int, warmup: int, smoothing: float, seed: int = 0
) -> dict[tuple[str, str], tuple[float, float]]:
    """(check, pair) -> (relative difference, tolerance) of every reference row."""
    config = replace(TrainConfig(), schedule=schedule, label_smoothing=smoothing)
    return {
        (row.check, row.pair): (compare(row.a, row.b)[1], tolerance(row.a))
        for row in reference_checks(config, total, warmup, seed, numpy_loss)
    }


def failing(rows: dict[tuple[str, str], tuple[float, float]]) -> set[tuple[str, str]]:
    return {name for name, (rel, tol) in rows.items() if not rel <= tol}


def test_a_short_run_warms_up_over_half_of_it():
    # The grid's "half the run" case is what training does by default for short runs.
    assert SHORT_WARMUP == 8 == 16 // 2


@pytest.mark.parametrize(("schedule", "total", "warmup", "smoothing"), GRID)
def test_shared_pieces_agree_with_the_libraries(schedule, total, warmup, smoothing):
    rows = rows_by_name(schedule, total, warmup, smoothing, seed=total)
    assert not failing(rows), {name: rows[name] for name in failing(rows)}
    assert {pair for _, pair in rows} == {
        "shared-optax",
        "shared-torch",
        "numpy-torch",
        "numpy-optax",
        "metrics-torch",
        "metrics-optax",
        "metrics-loop",
    }
    # Both float32 rows (the 90-100 batch's loss) and float64 rows are there, each held to
    # its own tolerance.
    assert {tol for _, tol in rows.values()} == {FLOAT32_TOLERANCE, FLOAT64_TOLERANCE}


def test_rows_have_their_inputs_dtype():
    config = TrainConfig()
    rows = reference_checks(config, 20, 5, 0, numpy_loss)
    dtypes = {row.check: row.a.dtype for row in rows}
    assert dtypes["loss, smoothing 0.1, float32 logits 90-100"] == np.float32
    assert dtypes["dlogits, smoothing 0.1, float32 logits 90-100"] == np.float32
    assert dtypes["loss, smoothing 0.1, float64"] == np.float64
    assert dtypes["schedule cosine, warm-up 5 of 20"] == np.float64


# Mutants: each a plausible bug in a shared piece, which the cross-check between the three
# implementations cannot see since all three would share it.

_learning_rate = shared.config.learning_rate


def warmup_from_zero(step, total_steps, base_lr, schedule, warmup_steps=0):
    """The warm-up rising from 0 (step / W) instead of reaching 1 / W at the first step."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    return _learning_rate(step, total_steps, base_lr, schedule, warmup_steps)


def cosine_over_whole_run(step, total_steps, base_lr, schedule, warmup_steps=0):
    """The cosine's progress measured over the whole run instead of the steps after warm-up."""
    if step < warmup_steps or schedule != "cosine":
        return _learning_rate(step, total_steps, base_lr, schedule, warmup_steps)
    return base_lr * 0.5 * (1 + np.cos(np.pi * (step - warmup_steps) / total_steps))


def smoothing_over_other_classes(logits, labels, label_smoothing=0.0):
    """Smoothing target eps / (K - 1) on the wrong classes (another convention, not PyTorch's)."""
    n, k = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    target = np.full_like(logits, label_smoothing / (k - 1))
    target[np.arange(n), labels] = 1 - label_smoothing
    return -(target * np.log(probs)).sum() / n, (probs - target) / n


def softmax_without_max_shift(logits, labels, label_smoothing=0.0):
    """The loss without subtracting each row's maximum: exp overflows float32 above 88.7."""
    n, k = logits.shape
    with np.errstate(over="ignore", invalid="ignore"):
        exp = np.exp(logits)
        probs = exp / exp.sum(axis=1, keepdims=True)
        target = np.full_like(logits, label_smoothing / k)
        target[np.arange(n), labels] += 1 - label_smoothing
        logp = logits - np.log(exp.sum(axis=1, keepdims=True))
        return -(target * logp).sum() / n, (probs - target) / n


def cross_entropy_summed(logits, labels):
    """Summed over the batch instead of averaged."""
    logp = metrics.log_softmax(logits.astype(np.float64))
    return float(-logp[np.arange(len(labels)), labels].sum())


def accuracy_off_by_one(logits, labels):
    """Divides the correct count by N + 1."""
    return float((logits.argmax(axis=1) == labels).sum() / (len(labels) + 1))


def confusion_transposed(predicted, labels, num_classes):
    """Rows the predicted class, columns the true one: the transpose of the documented layout."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (predicted, labels), 1)
    return cm


def per_class_over_predictions(cm):
    """Divides by how often a class was predicted (column sums) instead of how often it is
    the true class (row sums)."""
    totals = cm.sum(axis=0)
    return [float(c / t) if t else None for c, t in zip(np.diag(cm), totals, strict=True)]


SCHEDULE = "schedule cosine, warm-up 5 of 20"
PER_CLASS = "per-class accuracy (-1: no example)"
F32, F64 = "float32 logits 90-100", "float64"


def against_libraries(side: str, *checks: str) -> set[tuple[str, str]]:
    """(check, "side-torch") and (check, "side-optax") for each check."""
    return {(check, f"{side}-{library}") for check in checks for library in ("torch", "optax")}


def loss_rows(*batches: str) -> set[tuple[str, str]]:
    """The NumPy loss and dlogits rows (smoothing 0.1) of these batches."""
    checks = [f"{q}, smoothing 0.1, {batch}" for q in ("loss", "dlogits") for batch in batches]
    return against_libraries("numpy", *checks)


MUTANTS = [
    pytest.param(
        shared.config,
        "learning_rate",
        warmup_from_zero,
        {  # the warm-up comes before every schedule
            (f"schedule {schedule}, warm-up 5 of 20", pair)
            for schedule in SCHEDULES
            for pair in ("shared-optax", "shared-torch")
        },
        id="warm-up step over W",
    ),
    pytest.param(
        shared.config,
        "learning_rate",
        cosine_over_whole_run,
        {(SCHEDULE, "shared-optax"), (SCHEDULE, "shared-torch")},
        id="cosine over the whole run",
    ),
    pytest.param(
        numpy_layers,
        "softmax_cross_entropy",
        smoothing_over_other_classes,
        loss_rows(F32, F64),
        id="smoothing eps over K - 1",
    ),
    pytest.param(
        numpy_layers,
        "softmax_cross_entropy",
        softmax_without_max_shift,
        loss_rows(F32),  # float64 holds exp(100); float32 overflows above 88.7
        id="no max subtraction",
    ),
    pytest.param(
        metrics,
        "cross_entropy",
        cross_entropy_summed,
        against_libraries(
            "metrics", f"metrics cross-entropy, {F32}", f"metrics cross-entropy, {F64}"
        ),
        id="cross-entropy summed",
    ),
    pytest.param(
        metrics,
        "accuracy",
        accuracy_off_by_one,
        {("accuracy", "metrics-loop")},
        id="accuracy over N + 1",
    ),
    pytest.param(
        metrics,
        "confusion_matrix",
        confusion_transposed,
        {("confusion matrix", "metrics-loop"), (PER_CLASS, "metrics-loop")},
        id="confusion matrix transposed",
    ),
    pytest.param(
        metrics,
        "per_class_accuracy",
        per_class_over_predictions,
        {(PER_CLASS, "metrics-loop")},
        id="per-class over predictions",
    ),
]


@pytest.mark.parametrize(("module", "name", "mutant", "expected"), MUTANTS)
def test_a_broken_shared_piece_fails_exactly_its_rows(monkeypatch, module, name, mutant, expected):
    monkeypatch.setattr(module, name, mutant)
    assert failing(rows_by_name("cosine", 20, 5, 0.1)) == expected


def test_overflow_fails_as_infinite_difference(monkeypatch):
    # An overflowed loss is inf or NaN; compare() reports inf, which no tolerance accepts.
    monkeypatch.setattr(numpy_layers, "softmax_cross_entropy", softmax_without_max_shift)
    rows = rows_by_name("cosine", 20, 5, 0.1)
    assert rows[(f"loss, smoothing 0.1, {F32}", "numpy-torch")][0] == float("inf")
    assert rows[(f"dlogits, smoothing 0.1, {F32}", "numpy-optax")][0] == float("inf")
