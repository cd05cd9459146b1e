"""Metrics computed once, in NumPy, from any implementation's logits."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits (N, K) -> log-probabilities (N, K), stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of logits (N, K) against integer labels (N,), in float64."""
    logp = log_softmax(logits.astype(np.float64))
    return float(-logp[np.arange(len(labels)), labels].mean())


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows of logits (N, K) whose argmax equals the label (N,)."""
    return float((logits.argmax(axis=1) == labels).mean())


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, predicted), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """The share of each of the K true classes predicted correctly; None for a class with no
    examples, which has no share to report (and NaN is not JSON)."""
    totals = cm.sum(axis=1)
    return [float(c / t) if t else None for c, t in zip(np.diag(cm), totals, strict=True)]


def epoch_line(
    impl: str,
    epoch: int,
    train_loss: float,
    train_acc: float,
    val_loss: float | None,
    val_acc: float | None,
    seconds: float,
) -> str:
    """The lab's per-epoch line; accuracies are fractions, printed as percentages (the
    validation's left out when a run validates on nothing)."""
    val = (
        ""
        if val_loss is None or val_acc is None
        else f"Val Loss: {val_loss:7.4f} | Val Acc: {100 * val_acc:7.4f} | "
    )
    return (
        f"{impl} | Epoch: {epoch:2d} | Train Loss: {train_loss:7.4f} | "
        f"Train Acc: {100 * train_acc:7.4f} | {val}Epoch time: {seconds:5.2f} sec"
    )
