"""Data augmentation: apply the shared pipeline's flip-and-shift maps to a batch."""

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
