"""Data augmentation: apply the shared pipeline's flip-and-shift maps to a batch."""

from __future__ import annotations

import numpy as np


def augment(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, pad: int, fill: float) -> np.ndarray:
    """x (B, C, H, W) -> (B, C, H, W) with out[b, c, i, j] = padded[b, c, rows[b, i], cols[b, j]],
    `padded` being x with `pad` pixels of `fill` on every side."""
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    b, c = np.arange(x.shape[0])[:, None, None, None], np.arange(x.shape[1])[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]
