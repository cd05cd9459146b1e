"""Data augmentation: the shared pipeline's flip-and-shift maps and erasing boxes, applied."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, pad: int, fill: float
) -> torch.Tensor:
    """x (B, C, H, W) -> (B, C, H, W) with out[b, c, i, j] = padded[b, c, rows[b, i], cols[b, j]],
    `padded` being x with `pad` pixels of `fill` on every side."""
    padded = F.pad(x, (pad, pad, pad, pad), value=fill)
    b = torch.arange(x.shape[0])[:, None, None, None]
    c = torch.arange(x.shape[1])[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def erase(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W), boxes (B, 4) of (top, left, height, width) -> x with each image's box
    set to 0 in every channel."""
    top, left, height, width = (boxes[:, k, None] for k in range(4))
    i, j = torch.arange(x.shape[2]), torch.arange(x.shape[3])
    rows = (i >= top) & (i < top + height)  # (B, H)
    cols = (j >= left) & (j < left + width)  # (B, W)
    return x.masked_fill(rows[:, None, :, None] & cols[:, None, None, :], 0)
