"""Fashion-MNIST (or MNIST): IDX files, integrity, the train/validation/test split,
normalisation and batches.

Every implementation is fed from here, so given a seed and an epoch all three see the very same
batches, as NumPy float32 arrays in (N, C, H, W) layout.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import DataError, UsageError

DATA_DIR_ENV = "THREEFOLD_DATA"
NUM_CLASSES = 10
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# The last sixth of the official training set validates, as in the lab (50,000 / 10,000).
VALIDATION_FRACTION = 1 / 6


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset in the four-file IDX layout, and what is known of its official files."""

    name: str
    class_names: tuple[str, ...]
    # Mean and standard deviation of the official training pixels, scaled to [0, 1].
    pixel_mean: float
    pixel_std: float
    default_dir: Path | None
    # SHA-256 of each file's decompressed IDX bytes: the same for every faithful copy, however
    # it was recompressed. Checked whenever a file has the official image count.
    content_sha256: dict[str, str]
    official_counts: dict[str, int]
    # MD5 of the .gz files as the authors publish them: checked on download from them.
    gzip_md5: dict[str, str]
    download_url: str | None

    @property
    def background(self) -> float:
        """A pixel of value 0 after normalisation: what a shifted image is padded with."""
        return -self.pixel_mean / self.pixel_std

    @property
    def user_dir(self) -> Path:
        """Where --download puts the files: $XDG_DATA_HOME/threefold/NAME."""
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "threefold" / self.name


DATASETS = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        class_names=(
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
        ),
        pixel_mean=0.2860406,
        pixel_std=0.3530242,
        default_dir=Path("/usr/share/datasets/fashion-mnist"),
        content_sha256={
            FILES[
                "train_images"
            ]: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            FILES[
                "train_labels"
            ]: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            FILES[
                "test_images"
            ]: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            FILES[
                "test_labels"
            ]: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        official_counts={
            FILES["train_images"]: 60_000,
            FILES["train_labels"]: 60_000,
            FILES["test_images"]: 10_000,
            FILES["test_labels"]: 10_000,
        },
        gzip_md5={
            FILES["train_images"]: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            FILES["train_labels"]: "25c81989df183df01b3e8a0aad5dffbe",
            FILES["test_images"]: "bef4ecab320f06d8554ea6380940ec79",
            FILES["test_labels"]: "bb300cfdad3c16e7a12a480ee83cd310",
        },
        download_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    # The original handwritten digits, read from a local folder (no copy on this machine to
    # pin a content checksum against, and no download).
    "mnist": DatasetSpec(
        name="mnist",
        class_names=tuple(str(d) for d in range(10)),
        pixel_mean=0.1307,
        pixel_std=0.3081,
        default_dir=None,
        content_sha256={},
        official_counts={},
        gzip_md5={},
        download_url=None,
    ),
}
FASHION_MNIST = DATASETS["fashion-mnist"]


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


_IDX_UBYTE = 0x08


def read_idx_bytes(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file, gzip-compressed or raw."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from None
    return raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes, checking its header -> array of the header's shape."""
    return parse_idx(read_idx_bytes(path), str(path))


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


def _how_to_get(spec: DatasetSpec) -> str:
    if spec.name == "fashion-mnist":
        return (
            "install it with 'apt-get install dataset-fashion-mnist', fetch it with "
            "--download, or pass --data-dir FOLDER"
        )
    return f"pass --data-dir FOLDER holding the four {spec.name} IDX files"


def find_data_dir(data_dir: str | Path | None = None, spec: DatasetSpec = FASHION_MNIST) -> Path:
    """The folder to read: `data_dir`, else $THREEFOLD_DATA, else the system-wide install
    (Debian's), else where --download puts the files."""
    if data_dir is not None:
        candidates = [(Path(data_dir), "--data-dir")]
    elif os.environ.get(DATA_DIR_ENV):
        candidates = [(Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}")]
    else:
        candidates = [(d, "default") for d in (spec.default_dir, spec.user_dir) if d is not None]
    for folder, _ in candidates:
        if folder.is_dir():
            return folder
    tried = ", ".join(f"{folder} ({source})" for folder, source in candidates)
    raise UsageError(f"no {spec.name} folder found (tried {tried}); {_how_to_get(spec)}")


def _idx_path(folder: Path, stem: str, spec: DatasetSpec) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder / stem}[.gz]: missing; {_how_to_get(spec)}")


def read_checked_idx(folder: Path, stem: str, spec: DatasetSpec) -> tuple[np.ndarray, Path]:
    """Read one of the four files; a file with the official image count must also have the
    official content, byte for byte."""
    path = _idx_path(folder, stem, spec)
    raw = read_idx_bytes(path)
    array = parse_idx(raw, str(path))
    expected = spec.content_sha256.get(stem)
    if expected and len(array) == spec.official_counts[stem]:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != expected:
            raise DataError(
                f"{path}: content differs from the official {spec.name} file (SHA-256 of the "
                f"IDX bytes {actual[:16]}..., expected {expected[:16]}...): the file is damaged; "
                f"reinstall it ('apt-get install --reinstall dataset-fashion-mnist') or fetch "
                "it again with --download"
            )
    return array, path


def load_images_and_labels(
    folder: Path, images_stem: str, labels_stem: str, spec: DatasetSpec = FASHION_MNIST
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 from one pair of IDX files, checked."""
    images, images_path = read_checked_idx(folder, images_stem, spec)
    labels, labels_path = read_checked_idx(folder, labels_stem, spec)
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


def normalize(images: np.ndarray, spec: DatasetSpec = FASHION_MNIST) -> np.ndarray:
    """uint8 images (N, H, W) -> float32 (N, 1, H, W), scaled to [0, 1] then standardised
    with the dataset's training-set mean and deviation."""
    scaled = images.astype(np.float32) / np.float32(255)
    return ((scaled - np.float32(spec.pixel_mean)) / np.float32(spec.pixel_std))[:, None]


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
    spec: DatasetSpec = FASHION_MNIST


def load_dataset(data_dir: str | Path | None = None, dataset: str = "fashion-mnist") -> Dataset:
    """The official training set split into train and validation (last sixth), and the test set."""
    spec = get_dataset_spec(dataset)
    folder = find_data_dir(data_dir, spec)
    train_images, train_labels = load_images_and_labels(
        folder, FILES["train_images"], FILES["train_labels"], spec
    )
    test_images, test_labels = load_images_and_labels(
        folder, FILES["test_images"], FILES["test_labels"], spec
    )
    n_val = round(len(train_labels) * VALIDATION_FRACTION)
    n_train = len(train_labels) - n_val
    if n_train < 1 or n_val < 1 or len(test_labels) < 1:
        raise DataError(f"{folder}: too few images to split ({len(train_labels)} training)")
    x, y = normalize(train_images, spec), train_labels.astype(np.int64)
    return Dataset(
        train=Split(x[:n_train], y[:n_train]),
        val=Split(x[n_train:], y[n_train:]),
        test=Split(normalize(test_images, spec), test_labels.astype(np.int64)),
        source=folder,
        spec=spec,
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


@dataclass(frozen=True)
class Batch:
    """One training step: the rows `idx` (B,) of the data and, when augmenting, where each
    output pixel comes from in the image padded by `pad` pixels of value `fill` on every side:
    `rows` (B, H) and `cols` (B, W). Every implementation applies the same maps, so the
    augmentation is identical."""

    idx: np.ndarray
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    pad: int = 0
    fill: float = 0.0


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
    fill: float = FASHION_MNIST.background,
) -> Iterator[Batch]:
    """The batches of one epoch, with their augmentation; all randomness from (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch, 1])
    for idx in batch_indices(n, batch_size, seed=seed, epoch=epoch, shuffle=shuffle):
        if flip or shift:
            rows, cols = augmentation_maps(rng, len(idx), *image_size, flip, shift)
            yield Batch(idx, rows, cols, shift, fill)
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
