"""Data augmentation: apply the shared pipeline's flip-and-shift maps to a batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(x: jax.Array, rows: jax.Array, cols: jax.Array, pad: int, fill: float) -> jax.Array:
    """x (B, C, H, W) -> (B, C, H, W) with out[b, c, i, j] = padded[b, c, rows[b, i], cols[b, j]],
    `padded` being x with `pad` pixels of `fill` on every side."""
    padded = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill)
    b, c = jnp.arange(x.shape[0])[:, None, None, None], jnp.arange(x.shape[1])[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]
