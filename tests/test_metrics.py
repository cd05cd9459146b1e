"""Metrics against values worked out by hand."""

import math

import numpy as np

from shared import metrics
from shared.plots import plot_curves


def test_cross_entropy_by_hand():
    logits = np.array([[0.0, 0.0], [math.log(3), 0.0]])
    # Row 0: p = 1/2 for label 0. Row 1: p = 1/4 for label 1.
    expected = (math.log(2) + math.log(4)) / 2
    assert math.isclose(metrics.cross_entropy(logits, np.array([0, 1])), expected, rel_tol=1e-12)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0], [0.0, -1000.0]], dtype=np.float32)
    assert math.isclose(metrics.cross_entropy(logits, np.array([0, 1])), 500.0, rel_tol=1e-9)


def test_accuracy_confusion_and_per_class():
    logits = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2], [5, 0, 0]], dtype=float)
    labels = np.array([0, 1, 1, 2])
    assert metrics.accuracy(logits, labels) == 0.5
    cm = metrics.confusion_matrix(logits.argmax(1), labels, 3)
    np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(metrics.per_class_accuracy(cm), [1.0, 0.5, 0.0])
    # A class without examples has no accuracy: None, which JSON can hold (NaN it cannot).
    assert metrics.per_class_accuracy(np.array([[2, 0], [0, 0]])) == [1.0, None]


def test_epoch_line_has_the_labs_format():
    line = metrics.epoch_line("numpy", 3, 0.41234, 0.8512, 0.399, 0.8601, 11.2)
    assert line == (
        "numpy | Epoch:  3 | Train Loss:  0.4123 | Train Acc: 85.1200 | "
        "Val Loss:  0.3990 | Val Acc: 86.0100 | Epoch time: 11.20 sec"
    )


def test_the_curves_draw_any_finite_loss(tmp_path):
    """A loss near float64's maximum (a diverging float64 run's, or a hand-edited checkpoint's)
    overflowed matplotlib's ticks: "arange: cannot compute length"."""
    history = [
        {"epoch": epoch, "train_loss": loss, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5}
        for epoch, loss in ((1, 1.7e308), (2, 0.5))
    ]
    plot_curves(history, "a diverging run", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
