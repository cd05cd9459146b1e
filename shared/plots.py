"""Figures written by training runs."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from shared.io import atomic_write


def save_figure(fig, path: Path) -> None:
    """Render in memory in the format the name's suffix names where matplotlib writes it
    (.pdf, .svg; a user's --plot), else PNG, then write atomically."""
    suffix = Path(path).suffix.lower().removeprefix(".")
    kind = suffix if suffix in fig.canvas.get_supported_filetypes() else "png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format=kind, dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(path), lambda f: f.write(buffer.getvalue()))


def plot_curves(history: list[dict], title: str, path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, side by side."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (("train", "-o"), ("val", "--s")):
        if any(h[f"{split}_loss"] is None for h in history):
            continue  # a run without a validation split
        # Drawn at most at float32's maximum: matplotlib's ticks overflow on a finite loss
        # near float64's (a diverging float64 run's), where the curve looks the same.
        losses = np.minimum([h[f"{split}_loss"] for h in history], np.finfo(np.float32).max)
        ax_loss.plot(epochs, losses, style, label=split, ms=3)
        ax_acc.plot(epochs, [100 * h[f"{split}_acc"] for h in history], style, label=split, ms=3)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)
