"""Evaluation of a checkpoint on the test set, by any implementation, with figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared import metrics
from shared.backend import load_backend
from shared.checkpoint import Checkpoint
from shared.data import NUM_CLASSES, Dataset
from shared.plots import plt, save_figure
from shared.spec import get_arch
from shared.train import predict


def evaluate_checkpoint(
    ckpt: Checkpoint, impl: str, data: Dataset, tta: bool = False
) -> dict[str, Any]:
    """Test loss, accuracy, confusion matrix and per-class accuracy of a checkpoint, computed
    by `impl` whatever implementation wrote it (with `tta`, averaged over each image and its
    mirror image); also the logits (N, 10)."""
    backend = load_backend(impl, get_arch(ckpt.meta["arch"]))
    logits = predict(backend, backend.init_state(ckpt.params), data.test.x, tta)
    cm = metrics.confusion_matrix(logits.argmax(axis=1), data.test.y, NUM_CLASSES)
    per_class = metrics.per_class_accuracy(cm).tolist()
    return {
        "written_by": ckpt.meta.get("impl"),
        "evaluated_by": impl,
        "arch": ckpt.meta["arch"],
        "tta": tta,
        "loss": metrics.cross_entropy(logits, data.test.y),
        "acc": metrics.accuracy(logits, data.test.y),
        "confusion_matrix": cm.tolist(),
        "per_class_acc": dict(zip(data.spec.class_names, per_class, strict=True)),
        "logits": logits,
    }


def plot_confusion(cm: np.ndarray, class_names: tuple[str, ...], title: str, path: Path) -> None:
    """Counts of true (rows) against predicted (columns) classes, with the class names."""
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(NUM_CLASSES), class_names, rotation=45, ha="right")
    ax.set_yticks(range(NUM_CLASSES), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = cm.max() / 2
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > threshold else "black",
            )
    save_figure(fig, path)


def plot_misclassified(data: Dataset, predicted: np.ndarray, path: Path, count: int = 36) -> None:
    """A grid of the first `count` misclassified test images, titled true -> predicted."""
    test, spec = data.test, data.spec
    wrong = np.flatnonzero(predicted != test.y)[:count]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(test.x[i, 0] * spec.pixel_std + spec.pixel_mean, cmap="gray_r", vmin=0, vmax=1)
        names = spec.class_names
        ax.set_title(f"{names[test.y[i]]}\n-> {names[predicted[i]]}", fontsize=7)
    fig.suptitle(f"misclassified test images ({len(wrong)} shown): true -> predicted")
    save_figure(fig, path)
