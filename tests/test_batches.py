"""The batch order and the augmentation maps every implementation shares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from shared.batches import (
    augmentation_maps,
    batch_order,
    dropout_masks,
    erasing_boxes,
    iterate_batches,
    training_batches,
)
from shared.data import FASHION_MNIST, load_dataset
from shared.layers import Dropout

BACKGROUND = FASHION_MNIST.background()


def test_batches_are_deterministic_per_seed_and_epoch(tiny_data_dir):
    split = load_dataset(tiny_data_dir).train

    def order(seed, epoch):
        return np.concatenate(
            [y for _, y in iterate_batches(split.x, split.y, 32, seed=seed, epoch=epoch)]
        )

    np.testing.assert_array_equal(order(3, 1), order(3, 1))
    assert not np.array_equal(order(3, 1), order(3, 2))
    assert not np.array_equal(order(3, 1), order(4, 1))
    sizes = [len(y) for _, y in iterate_batches(split.x, split.y, 32, seed=0, epoch=1)]
    assert sizes == [32, 32, 32, 4]
    # Every image exactly once per epoch.
    perm = batch_order(len(split), 3, 1)
    np.testing.assert_array_equal(np.sort(perm), np.arange(len(split)))
    np.testing.assert_array_equal(order(3, 1), split.y[perm])


def apply_maps(x, flip, shift, seed=0):
    from impl_numpy.augment import augment

    rows, cols = augmentation_maps(np.random.default_rng(seed), len(x), 28, 28, flip, shift)
    return augment(x, rows, cols, shift, BACKGROUND), rows, cols


def test_augmentation_maps_flip_and_shift_as_documented():
    x = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
    out, _, _ = apply_maps(x, flip=False, shift=0)
    np.testing.assert_array_equal(out, x)
    out, _, _ = apply_maps(x, flip=True, shift=0)
    flipped = [np.array_equal(o, xi[:, :, ::-1]) for o, xi in zip(out, x, strict=True)]
    kept = [np.array_equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 16 < sum(flipped) < 48
    out, rows, cols = apply_maps(x, flip=False, shift=2)
    for o, xi, r, c in zip(out, x, rows, cols, strict=True):
        dy, dx = 2 - r[0], 2 - c[0]  # rows = shift + i - dy
        assert -2 <= dy <= 2 and -2 <= dx <= 2
        shifted = np.full_like(xi, BACKGROUND)
        src = xi[:, max(0, -dy) : 28 - max(0, dy), max(0, -dx) : 28 - max(0, dx)]
        shifted[:, max(0, dy) : 28 - max(0, -dy), max(0, dx) : 28 - max(0, -dx)] = src
        np.testing.assert_array_equal(o, shifted)


def test_training_batches_are_deterministic_and_augmented_per_epoch():
    def plan(epoch):
        return list(
            training_batches(100, 32, seed=5, epoch=epoch, fill=BACKGROUND, flip=True, shift=2)
        )

    a, b, c = plan(1), plan(1), plan(2)
    assert all(np.array_equal(p.cols, q.cols) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p.cols, q.cols) for p, q in zip(a, c, strict=True))
    assert [len(p.idx) for p in a] == [32, 32, 32, 4] and a[0].rows.shape == (32, 28)
    unaugmented = training_batches(100, 32, seed=5, epoch=1, fill=BACKGROUND)
    assert all(p.rows is None for p in unaugmented)


def test_the_batches_do_not_pull_in_the_file_reader():
    code = "import sys, shared.batches; assert 'shared.data' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --- against independent statements: counts and probabilities, not the implementations ----


def test_dropout_masks_change_every_step_and_keep_one_minus_p():
    """Each step draws its own masks (a mask reused across steps passes every comparison
    between the implementations, which all apply the same one), redrawable from
    (seed, epoch, step); kept units are Binomial(n, 1 - p), held to 5 standard deviations."""
    dropouts = (Dropout("d2", 0.3, (4, 6, 6)), Dropout("d1", 0.5, (16,)))
    plan = list(
        training_batches(640, 64, seed=7, epoch=2, fill=BACKGROUND, flip=True, dropouts=dropouts)
    )
    for layer in dropouts:
        masks = [batch.masks[layer.name] for batch in plan]
        assert all(m.shape == (64, *layer.shape) and m.dtype == bool for m in masks)
        distinct = {m.tobytes() for m in masks}
        assert len(distinct) == len(masks)  # no two steps share a mask
        for step, mask in enumerate(masks):
            again = dropout_masks(dropouts, 64, seed=7, epoch=2, step=step)[layer.name]
            np.testing.assert_array_equal(mask, again)
        n = sum(m.size for m in masks)
        kept = sum(int(m.sum()) for m in masks)
        expected, sd = n * (1 - layer.p), np.sqrt(n * layer.p * (1 - layer.p))
        assert abs(kept - expected) < 5 * sd
    other_epoch = dropout_masks(dropouts, 64, seed=7, epoch=3, step=0)
    assert not np.array_equal(other_epoch["d1"], plan[0].masks["d1"])


def test_the_two_shifts_are_drawn_independently_and_uniformly():
    """dy and dx are separate uniform draws over [-shift, shift]: not equal, uncorrelated
    (within 5 standard errors of 0), each value about 1/(2 shift + 1) of the time."""
    n, shift = 20_000, 3
    rows, cols = augmentation_maps(np.random.default_rng(0), n, 28, 28, False, shift)
    dy, dx = shift - rows[:, 0], shift - cols[:, 0]  # rows = shift + i - dy
    assert not np.array_equal(dy, dx)
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 5 / np.sqrt(n)
    for draws in (dy, dx):
        counts = np.bincount(draws + shift, minlength=2 * shift + 1)
        p = 1 / (2 * shift + 1)
        assert len(counts) == 2 * shift + 1
        assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p)))


def test_erasing_boxes_follow_random_erasing():
    """With probability p a box of 2-33% of the image with aspect ratio 0.3-3.3 inside the
    image (torchvision's RandomErasing); the share of images erased within 5 standard
    deviations of p; the box's corner uniform over where it fits (it reaches every edge)."""
    n, p = 20_000, 0.4
    boxes = erasing_boxes(np.random.default_rng(1), n, 28, 28, p)
    top, left, h, w = boxes.T
    erased = h > 0
    assert abs(erased.sum() - n * p) < 5 * np.sqrt(n * p * (1 - p))
    assert np.all(boxes[~erased] == 0)
    top, left, h, w = top[erased], left[erased], h[erased], w[erased]
    assert np.all((h < 28) & (w < 28) & (top >= 0) & (left >= 0))
    assert np.all((top + h <= 28) & (left + w <= 28))
    # The rounded sides keep the drawn area and ratio to within their rounding.
    area = h * w / 784
    assert area.min() > 0.02 * 0.5 and area.max() < 0.33 * 1.25
    ratio = h / w
    assert ratio.min() > 0.3 * 0.7 and ratio.max() < 3.3 / 0.7
    assert (top + h == 28).any() and (left + w == 28).any() and (top == 0).any()


def test_erasing_is_drawn_per_step_and_off_by_default():
    def plan(epoch, erase):
        return list(training_batches(100, 32, seed=5, epoch=epoch, fill=BACKGROUND, erase=erase))

    a, b, c = plan(1, 0.5), plan(1, 0.5), plan(2, 0.5)
    assert all(np.array_equal(p.boxes, q.boxes) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p.boxes, q.boxes) for p, q in zip(a, c, strict=True))
    assert len({p.boxes.tobytes() for p in a}) == len(a)  # every step its own
    assert a[0].boxes.shape == (32, 4) and a[0].rows is None  # erasing without flips
    assert all(p.boxes is None for p in plan(1, 0.0))
    # The flips' and shifts' maps are the same with erasing on: it draws from its own stream.
    flips = [
        training_batches(100, 32, seed=5, epoch=1, fill=0.0, flip=True, erase=e) for e in (0, 0.5)
    ]
    assert all(np.array_equal(p.cols, q.cols) for p, q in zip(*flips, strict=True))
    part = a[0].part(3, 9)
    np.testing.assert_array_equal(part.boxes, a[0].boxes[3:9])
