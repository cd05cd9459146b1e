"""Fashion-MNIST: IDX files, the train/validation/test split, normalisation and batches.

Every implementation is fed from here, so given a seed and an epoch all three see the very same
batches, as NumPy float32 arrays in (N, C, H, W) layout.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import DataError, UsageError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "THREEFOLD_DATA"
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Mean and standard deviation of the 60,000 official training images, pixels scaled to [0, 1].
PIXEL_MEAN = 0.2860406
PIXEL_STD = 0.3530242
# The last sixth of the official training set validates, as in the lab (50,000 / 10,000).
VALIDATION_FRACTION = 1 / 6

_IDX_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes, gzip-compressed or raw, checking its header.

    Returns an array of shape given by the header's dimensions, dtype uint8.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    return parse_idx(raw, str(path))


def parse_idx(raw: bytes, name: str) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file; `name` labels the errors."""
    if len(raw) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code != _IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(
            f"{name}: bad magic number 0x{raw[:4].hex()} (expected 0x000008 followed by 01..04)"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{name}: truncated header ({len(raw)} of {header_len} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{name}: {what}: header says {'x'.join(map(str, dims))} "
            f"({expected} bytes), file holds {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder to read: `data_dir`, else $THREEFOLD_DATA, else Debian's install location."""
    if data_dir is not None:
        chosen, source = Path(data_dir), "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        chosen, source = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    else:
        chosen, source = DEFAULT_DATA_DIR, "the default location"
    if not chosen.is_dir():
        raise UsageError(
            f"{chosen} ({source}): no such folder; install Fashion-MNIST with "
            "'apt-get install dataset-fashion-mnist' or pass --data-dir FOLDER"
        )
    return chosen


def _idx_path(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{folder / stem}[.gz]: missing; install Fashion-MNIST with "
        "'apt-get install dataset-fashion-mnist' or pass --data-dir FOLDER"
    )


def load_images_and_labels(folder: Path, images_stem: str, labels_stem: str):
    """Images (N, 28, 28) uint8 and labels (N,) uint8 from one pair of IDX files, checked."""
    images_path, labels_path = _idx_path(folder, images_stem), _idx_path(folder, labels_stem)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected 3 dimensions (N, H, W), found {images.ndim}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected 1 dimension (N,), found {labels.ndim}")
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(f"{labels_path}: label {labels[bad]} at index {bad} is outside 0..9")
    return images, labels


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) -> float32 (N, 1, H, W), scaled to [0, 1] then standardised."""
    scaled = images.astype(np.float32) / np.float32(255)
    return ((scaled - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD))[:, None]


@dataclass(frozen=True)
class Split:
    """One part of the data: x (N, 1, 28, 28) float32 normalised, y (N,) int64."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> Split:
        return Split(self.x[:n], self.y[:n])


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split
    test: Split
    source: Path


def load_dataset(data_dir: str | Path | None = None) -> Dataset:
    """The official training set split into train and validation (last sixth), and the test set."""
    folder = find_data_dir(data_dir)
    train_images, train_labels = load_images_and_labels(
        folder, FILES["train_images"], FILES["train_labels"]
    )
    test_images, test_labels = load_images_and_labels(
        folder, FILES["test_images"], FILES["test_labels"]
    )
    n_val = round(len(train_labels) * VALIDATION_FRACTION)
    n_train = len(train_labels) - n_val
    if n_train < 1 or n_val < 1 or len(test_labels) < 1:
        raise DataError(f"{folder}: too few images to split ({len(train_labels)} training)")
    x, y = normalize(train_images), train_labels.astype(np.int64)
    return Dataset(
        train=Split(x[:n_train], y[:n_train]),
        val=Split(x[n_train:], y[n_train:]),
        test=Split(normalize(test_images), test_labels.astype(np.int64)),
        source=folder,
    )


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


# A pixel of value 0 after normalisation: what a shifted image is padded with.
BACKGROUND = -PIXEL_MEAN / PIXEL_STD


@dataclass(frozen=True)
class Batch:
    """One training step: the rows `idx` (B,) of the data and, when augmenting, where each
    output pixel comes from in the image padded by `pad` on every side: `rows` (B, H) and
    `cols` (B, W). Every implementation applies the same maps, so augmentation is identical."""

    idx: np.ndarray
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    pad: int = 0


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


def training_batches(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    flip: bool = False,
    shift: int = 0,
    shuffle: bool = True,
    image_size: tuple[int, int] = (28, 28),
) -> Iterator[Batch]:
    """The batches of one epoch, with their augmentation; all randomness from (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch, 1])
    for idx in batch_indices(n, batch_size, seed=seed, epoch=epoch, shuffle=shuffle):
        if flip or shift:
            rows, cols = augmentation_maps(rng, len(idx), *image_size, flip, shift)
            yield Batch(idx, rows, cols, shift)
        else:
            yield Batch(idx)


def iterate_batches(
    split: Split, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (x (B, 1, 28, 28) float32, y (B,) int64) batches in `batch_indices` order."""
    for idx in batch_indices(len(split), batch_size, seed=seed, epoch=epoch, shuffle=shuffle):
        yield split.x[idx], split.y[idx]


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
