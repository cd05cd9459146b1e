"""Data augmentation: the shared pipeline's flip-and-shift maps and erasing boxes, applied."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(x: jax.Array, rows: jax.Array, cols: jax.Array, pad: int, fill: float) -> jax.Array:
    """x (B, C, H, W) -> (B, C, H, W) with out[b, c, i, j] = padded[b, c, rows[b, i], cols[b, j]],
    `padded` being x with `pad` pixels of `fill` on every side."""
    padded = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    b, c = jnp.arange(x.shape[0])[:, None, None, None], jnp.arange(x.shape[1])[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def erase(x: jax.Array, boxes: jax.Array) -> jax.Array:
    """x (B, C, H, W), boxes (B, 4) of (top, left, height, width) -> x with each image's box
    set to 0 in every channel."""
    top, left, height, width = (boxes[:, k, None] for k in range(4))
    i, j = jnp.arange(x.shape[2]), jnp.arange(x.shape[3])
    rows = (i >= top) & (i < top + height)  # (B, H)
    cols = (j >= left) & (j < left + width)  # (B, W)
    return jnp.where(rows[:, None, :, None] & cols[:, None, None, :], jnp.zeros((), x.dtype), x)
