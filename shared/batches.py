"""Batches: which rows of the data make each batch of an epoch, and how each is augmented.

The order and the augmentation depend only on (seed, epoch), so all three implementations see
the very same batches. Only indices and pixel maps are made here: each implementation gathers
and augments its own copy of the data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from shared.layers import Dropout


def batch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of n examples used in `epoch` of a run seeded with `seed`."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(
    n: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True
) -> Iterator[np.ndarray]:
    """Yield the rows (B,) of each batch of an epoch; the last batch may be smaller.

    The order depends only on (seed, epoch), so every implementation sees the same batches.
    """
    order = batch_order(n, seed, epoch) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


@dataclass(frozen=True)
class Batch:
    """One training step: the rows `idx` (B,) of the data and, when augmenting, where each
    output pixel comes from in the image padded by `pad` pixels of value `fill` on every side:
    `rows` (B, H) and `cols` (B, W); when erasing, the rectangle of each image then set to 0,
    `boxes` (B, 4) of (top, left, height, width), height 0 for none; and a keep-mask
    (B, *shape) of bools per dropout layer. Every implementation applies the same maps, boxes
    and masks, so all three see the same images and drop the same units."""

    idx: np.ndarray
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    pad: int = 0
    fill: float = 0.0
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: np.ndarray | None = None

    def part(self, start: int, stop: int) -> Batch:
        """Images start..stop of the batch, with their maps, boxes and masks."""
        rows, cols, boxes = (
            None if m is None else m[start:stop] for m in (self.rows, self.cols, self.boxes)
        )
        masks = {name: mask[start:stop] for name, mask in self.masks.items()}
        return Batch(self.idx[start:stop], rows, cols, self.pad, self.fill, masks, boxes)


def augmentation_maps(
    rng: np.random.Generator, n: int, height: int, width: int, flip: bool, shift: int
) -> tuple[np.ndarray, np.ndarray]:
    """Source rows (n, height) and columns (n, width), in images padded by `shift`, for a
    horizontal flip with probability 1/2 (when `flip`) followed by a translation of up to
    `shift` pixels each way; what moves in from outside is background."""
    dy = rng.integers(-shift, shift + 1, n)[:, None]
    dx = rng.integers(-shift, shift + 1, n)[:, None]
    flipped = (rng.random(n) < 0.5)[:, None] if flip else np.zeros((n, 1), dtype=bool)
    i, j = np.arange(height)[None, :], np.arange(width)[None, :]
    rows = shift + i - dy
    cols = shift + np.where(flipped, width - 1 - j + dx, j - dx)
    return rows, cols


# Random erasing as torchvision's RandomErasing draws it (Zhong et al., "Random Erasing Data
# Augmentation", 2020): a box of a share ERASE_SCALE of the image's area and an aspect ratio
# log-uniform in ERASE_RATIO, drawn up to ERASE_ATTEMPTS times until it fits the image.
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10


def erasing_boxes(
    rng: np.random.Generator, n: int, height: int, width: int, p: float
) -> np.ndarray:
    """Boxes (n, 4) of (top, left, height, width), one an image: with probability p a box as
    RandomErasing draws it (the first of its attempts that fits), else (0, 0, 0, 0), none."""
    shape = (n, ERASE_ATTEMPTS)
    area = height * width * rng.uniform(*ERASE_SCALE, shape)
    ratio = np.exp(rng.uniform(np.log(ERASE_RATIO[0]), np.log(ERASE_RATIO[1]), shape))
    h = np.rint(np.sqrt(area * ratio)).astype(np.int64)
    w = np.rint(np.sqrt(area / ratio)).astype(np.int64)
    fits = (h < height) & (w < width)
    first = fits.argmax(axis=1)[:, None]
    erased = (rng.random(n) < p) & fits.any(axis=1)
    h = np.where(erased, np.take_along_axis(h, first, axis=1)[:, 0], 0)
    w = np.where(erased, np.take_along_axis(w, first, axis=1)[:, 0], 0)
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    return np.stack([top, left, h, w], axis=1) * erased[:, None]


def dropout_masks(
    dropouts: tuple[Dropout, ...], batch_size: int, seed: int, epoch: int, step: int
) -> dict[str, np.ndarray]:
    """A keep-mask (batch_size, *layer.shape) per dropout layer, each unit kept with
    probability 1 - p; drawn from (seed, epoch, step) alone, so any step can be redrawn."""
    if not dropouts:
        return {}
    rng = np.random.default_rng([seed, epoch, 2, step])
    return {d.name: rng.random((batch_size, *d.shape), np.float32) >= d.p for d in dropouts}


def training_batches(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    fill: float,
    flip: bool = False,
    shift: int = 0,
    erase: float = 0.0,
    shuffle: bool = True,
    image_size: tuple[int, int] = (28, 28),
    dropouts: tuple[Dropout, ...] = (),
) -> Iterator[Batch]:
    """The batches of one epoch, with their augmentation (flips and shifts, then erasing with
    probability `erase`) and the masks of `dropouts`; all randomness from (seed, epoch), the
    boxes and masks of a step from (seed, epoch, step). Shifted images are padded with `fill`,
    the dataset's `background` (0 before normalising)."""
    rng = np.random.default_rng([seed, epoch, 1])
    batches = batch_indices(n, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
    for step, idx in enumerate(batches):
        masks = dropout_masks(dropouts, len(idx), seed, epoch, step)
        boxes = None
        if erase:
            erase_rng = np.random.default_rng([seed, epoch, 3, step])
            boxes = erasing_boxes(erase_rng, len(idx), *image_size, erase)
        if flip or shift:
            rows, cols = augmentation_maps(rng, len(idx), *image_size, flip, shift)
            yield Batch(idx, rows, cols, shift, fill, masks, boxes)
        else:
            yield Batch(idx, masks=masks, boxes=boxes)


def steady_batches(
    n: int, batch_size: int, fill: float, dropouts: tuple[Dropout, ...], flip: bool
) -> Iterator[Batch]:
    """Training batches of n images, epoch after epoch, all of `batch_size` (a ragged last
    batch would make JAX compile again), with dropout masks and flips drawn as in training."""
    if batch_size > n:  # no batch would ever be whole: the loop below would never yield
        raise ValueError(f"a batch of {batch_size} from {n} images")
    for epoch in itertools.count():
        for batch in training_batches(
            n, batch_size, seed=0, epoch=epoch, fill=fill, flip=flip, dropouts=dropouts
        ):
            if len(batch.idx) == batch_size:
                yield batch


def iterate_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Images x (N, 1, 28, 28) float32 and labels y (N,) int64 -> batches (x (B, 1, 28, 28),
    y (B,)) in `batch_indices` order."""
    for idx in batch_indices(len(y), batch_size, seed=seed, epoch=epoch, shuffle=shuffle):
        yield x[idx], y[idx]


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
