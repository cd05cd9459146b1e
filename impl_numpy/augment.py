"""Data augmentation: the shared pipeline's flip-and-shift maps and erasing boxes, applied."""

from __future__ import annotations

import numpy as np


def augment(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, pad: int, fill: float) -> np.ndarray:
    """x (B, C, H, W) -> (B, C, H, W) with out[b, c, i, j] = padded[b, c, rows[b, i], cols[b, j]],
    `padded` being x with `pad` pixels of `fill` on every side."""
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    b, c = np.arange(x.shape[0])[:, None, None, None], np.arange(x.shape[1])[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def erase(x: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """x (B, C, H, W), boxes (B, 4) of (top, left, height, width) -> x with each image's box
    set to 0 in every channel."""
    top, left, height, width = (boxes[:, k, None] for k in range(4))
    i, j = np.arange(x.shape[2]), np.arange(x.shape[3])
    rows = (i >= top) & (i < top + height)  # (B, H)
    cols = (j >= left) & (j < left + width)  # (B, W)
    return np.where(rows[:, None, :, None] & cols[:, None, None, :], x.dtype.type(0), x)
