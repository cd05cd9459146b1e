"""Fashion-MNIST (or MNIST): the dataset table, data lookup, integrity, the
train/validation/test split and normalisation (the IDX format itself is shared/idx.py).

Every implementation reads its data from here, as NumPy float32 arrays in (N, C, H, W) layout;
shared/batches.py cuts them into batches.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shared.errors import DataError, UsageError
from shared.idx import IdxExpect, read_idx_content
from shared.layers import INPUT_SHAPE, NUM_CLASSES

DATA_DIR_ENV = "THREEFOLD_DATA"
# The last sixth of the official training set validates, as in the lab (50,000 / 10,000).
VALIDATION_FRACTION = 1 / 6


@dataclass(frozen=True)
class OfficialFile:
    """One of a dataset's four IDX files as its authors publish it."""

    name: str  # "train-images-idx3-ubyte", stored as NAME.gz or NAME
    count: int  # images or labels in the official file
    # SHA-256 of the decompressed IDX bytes: the same for every faithful copy, however it was
    # recompressed. Checked whenever a file has the official count; None: not pinned.
    content_sha256: str | None
    # MD5 of NAME.gz as the authors publish it: checked on download from them; None: unknown.
    gzip_md5: str | None


class OfficialFiles(NamedTuple):
    """A dataset's four IDX files; iterating yields them in this order."""

    train_images: OfficialFile
    train_labels: OfficialFile
    test_images: OfficialFile
    test_labels: OfficialFile


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset in the four-file IDX layout, and what is known of its official files."""

    name: str
    class_names: tuple[str, ...]
    # Mean and standard deviation of the official training pixels, scaled to [0, 1].
    pixel_mean: float
    pixel_std: float
    default_dir: Path | None
    files: OfficialFiles
    download_url: str | None

    def standardisation(self, pixels: str) -> tuple[float, float]:
        """(mean, std) the [0, 1] pixels are standardised with: the training set's, or (0, 1)
        for raw pixels."""
        return (self.pixel_mean, self.pixel_std) if pixels == "standardised" else (0.0, 1.0)

    def background(self, pixels: str = "standardised") -> float:
        """A pixel of value 0 as the network sees it: what a shifted image is padded with."""
        mean, std = self.standardisation(pixels)
        return -mean / std

    @property
    def user_dir(self) -> Path:
        """Where --download puts the files: $XDG_DATA_HOME/threefold/NAME."""
        base = Path(os.environ.get("XDG_DATA_HOME") or "")
        if not base.is_absolute():  # unset, or relative: the XDG spec says to ignore it
            base = Path.home() / ".local" / "share"
        return base / "threefold" / self.name


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
        files=OfficialFiles(
            train_images=OfficialFile(
                "train-images-idx3-ubyte",
                60_000,
                content_sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                gzip_md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            ),
            train_labels=OfficialFile(
                "train-labels-idx1-ubyte",
                60_000,
                content_sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                gzip_md5="25c81989df183df01b3e8a0aad5dffbe",
            ),
            test_images=OfficialFile(
                "t10k-images-idx3-ubyte",
                10_000,
                content_sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                gzip_md5="bef4ecab320f06d8554ea6380940ec79",
            ),
            test_labels=OfficialFile(
                "t10k-labels-idx1-ubyte",
                10_000,
                content_sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                gzip_md5="bb300cfdad3c16e7a12a480ee83cd310",
            ),
        ),
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
        files=OfficialFiles(
            train_images=OfficialFile("train-images-idx3-ubyte", 60_000, None, None),
            train_labels=OfficialFile("train-labels-idx1-ubyte", 60_000, None, None),
            test_images=OfficialFile("t10k-images-idx3-ubyte", 10_000, None, None),
            test_labels=OfficialFile("t10k-labels-idx1-ubyte", 10_000, None, None),
        ),
        download_url=None,
    ),
}
FASHION_MNIST = DATASETS["fashion-mnist"]


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]


def how_to_get(spec: DatasetSpec, folder: Path | None = None) -> str:
    """What to do where the data is missing (from `folder`, if one was read)."""
    named = os.environ.get(DATA_DIR_ENV)
    if named and spec.download_url and folder in (None, Path(named)):
        # The one folder read: installing the package would not help.
        return f"fetch the files into it with 'train.py --download', or unset ${DATA_DIR_ENV}"
    if spec.name == "fashion-mnist":
        return (
            "install it with 'apt-get install dataset-fashion-mnist', fetch it with "
            "'train.py --download' (every command then finds it), or pass --data-dir FOLDER"
        )
    return f"pass --data-dir FOLDER holding the four {spec.name} IDX files"


def find_data_dir(data_dir: str | Path | None = None, spec: DatasetSpec = FASHION_MNIST) -> Path:
    """The folder to read: `data_dir`, else $THREEFOLD_DATA, else the system-wide install
    (Debian's), else where --download puts the files. Of those two, one that holds the four
    files comes first: a system install missing a file, whose error says to --download, must
    not hide the download. (One whose files are all there but damaged still does.)"""
    if data_dir is not None:
        candidates = [(Path(data_dir), "--data-dir")]
    elif os.environ.get(DATA_DIR_ENV):
        candidates = [(Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}")]
    else:
        candidates = [(d, "default") for d in (spec.default_dir, spec.user_dir) if d is not None]
    found = []
    for folder, source in candidates:
        try:
            if folder.is_dir():
                found.append(folder)
        except OSError as e:  # a name too long for the file system
            raise UsageError(f"{source} {folder}: {e.strerror or e}") from None
    if found:
        return next((f for f in found if _holds_every_file(f, spec)), found[0])
    tried = ", ".join(f"{folder} ({source})" for folder, source in candidates)
    advice = how_to_get(spec, candidates[0][0] if data_dir is not None else None)
    raise UsageError(f"no {spec.name} folder found (tried {tried}); {advice}")


def installed_data_dir(spec: DatasetSpec = FASHION_MNIST) -> Path | None:
    """The folder the usual lookup reads, or None where none is there at all (and none is
    named by $THREEFOLD_DATA, a folder missing there being an error): what checks that can
    do with random images when the data is not installed ask first."""
    try:
        return find_data_dir(None, spec)
    except UsageError:
        if os.environ.get(DATA_DIR_ENV):
            raise
        return None


def data_files(
    data_dir: str | Path | None = None, spec: DatasetSpec = FASHION_MNIST
) -> list[tuple[str, Path]]:
    """("the data", path) of each IDX file that loading the data would read, as far as can be
    told before reading it (none where no folder is found): an output must not be one."""
    try:
        folder = find_data_dir(data_dir, spec)
    except UsageError:
        return []
    paths = [path for file in spec.files for path in _idx_candidates(folder, file.name)]
    return [("the data", path) for path in paths if path.exists()]


def _holds_every_file(folder: Path, spec: DatasetSpec) -> bool:
    """Whether each of the dataset's four files is in `folder`, gzipped or plain."""
    return all(any(p.is_file() for p in _idx_candidates(folder, f.name)) for f in spec.files)


def _idx_candidates(folder: Path, stem: str) -> tuple[Path, Path]:
    """Where one of the four files may be, in the order looked in: gzipped, then plain."""
    return folder / f"{stem}.gz", folder / stem


def _idx_path(folder: Path, stem: str, spec: DatasetSpec) -> Path:
    for candidate in _idx_candidates(folder, stem):
        if candidate.is_file():
            return candidate
    for candidate in _idx_candidates(folder, stem):
        if os.path.lexists(candidate):  # a folder, a FIFO, a link to nothing or a loop
            raise DataError(f"{candidate}: not a regular file")
    raise DataError(f"{folder / stem}[.gz]: missing; {how_to_get(spec, folder)}")


def read_checked_idx(
    folder: Path, file: OfficialFile, spec: DatasetSpec, what: str, item_shape: tuple[int, ...]
) -> tuple[np.ndarray, str, Path]:
    """Read one of the four files -> ((N, *item_shape) uint8 with N at most the official count,
    SHA-256 of its IDX bytes, path); a file with the official count must also have the official
    content, byte for byte, when that is pinned."""
    path = _idx_path(folder, file.name, spec)
    array, actual = read_idx_content(path, IdxExpect(what, item_shape, file.count))
    expected = file.content_sha256
    if expected and len(array) == file.count and actual != expected:
        raise DataError(
            f"{path}: content differs from the official {spec.name} file (SHA-256 of the "
            f"IDX bytes {actual[:16]}..., expected {expected[:16]}...): the file is damaged; "
            f"reinstall it ('apt-get install --reinstall dataset-fashion-mnist') or fetch "
            "it again with --download --data-dir FOLDER, then pass --data-dir FOLDER"
        )
    # MNIST's files are not pinned, but Fashion-MNIST's are: its files are not MNIST's, nor
    # its test files its training files (a copy under the other's name trained on the test set).
    for other in DATASETS.values():
        for pinned in other.files:
            if pinned.content_sha256 == actual and (other, pinned.name) != (spec, file.name):
                advice = (  # evaluate.py takes the dataset from the checkpoint: no flag
                    f"give the folder of {spec.name}'s files (or train with --dataset {other.name})"
                    if other is not spec
                    else f"put the official {file.name} there"
                )
                raise DataError(
                    f"{path}: the official {other.name} file {pinned.name}, not {spec.name}'s "
                    f"{file.name}; {advice}"
                )
    return array, actual, path


def load_images_and_labels(
    folder: Path, images_file: OfficialFile, labels_file: OfficialFile, spec: DatasetSpec
) -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 from one pair of IDX files, checked, and
    the SHA-256 of each file's IDX bytes."""
    images, images_sha, images_path = read_checked_idx(
        folder, images_file, spec, "images", INPUT_SHAPE[1:]
    )
    labels, labels_sha, labels_path = read_checked_idx(folder, labels_file, spec, "labels", ())
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(f"{labels_path}: label {labels[bad]} at index {bad} is outside 0..9")
    return images, labels, (images_sha, labels_sha)


def normalize(
    images: np.ndarray, spec: DatasetSpec = FASHION_MNIST, pixels: str = "standardised"
) -> np.ndarray:
    """uint8 images (N, H, W) -> float32 (N, 1, H, W), scaled to [0, 1], then (`pixels`
    "standardised") standardised with the dataset's training-set mean and deviation."""
    # In place after the one conversion: no second 188 MB temporary for the training set.
    x = images.astype(np.float32)
    x /= np.float32(255)
    if pixels == "standardised":
        x -= np.float32(spec.pixel_mean)
        x /= np.float32(spec.pixel_std)
    return x[:, None]


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
    spec: DatasetSpec
    # SHA-256 over the four files' content hashes, which the reader computes as it reads: what
    # the data is, the same for any faithful copy wherever it lies.
    content_sha256: str
    pixels: str = "standardised"

    @property
    def background(self) -> float:
        return self.spec.background(self.pixels)


def load_dataset(
    data_dir: str | Path | None = None,
    dataset: str = "fashion-mnist",
    pixels: str = "standardised",
    validation: bool = True,
) -> Dataset:
    """The official training set split into train and validation (last sixth; with
    `validation` False all of it trains and validation is empty), and the test set; pixels
    standardised or raw in [0, 1] (`pixels`)."""
    spec = get_dataset_spec(dataset)
    folder, files = find_data_dir(data_dir, spec), spec.files
    train_images, train_labels, train_sha = load_images_and_labels(
        folder, files.train_images, files.train_labels, spec
    )
    test, test_sha = _test_split(folder, spec, pixels)
    if train_sha[0] == test_sha[0]:  # the test accuracy would be a training accuracy
        raise DataError(
            f"{folder}: the training images are the test images (the same bytes in "
            f"{files.train_images.name} and {files.test_images.name}); nothing would be tested"
        )
    n_val = round(len(train_labels) * VALIDATION_FRACTION) if validation else 0
    n_train = len(train_labels) - n_val
    if n_train < 1 or (validation and n_val < 1):
        raise DataError(f"{folder}: too few images to split ({len(train_labels)} training)")
    x, y = normalize(train_images, spec, pixels), train_labels.astype(np.int64)
    return Dataset(
        train=Split(x[:n_train], y[:n_train]),
        val=Split(x[n_train:], y[n_train:]),
        test=test,
        source=folder,
        spec=spec,
        content_sha256=hashlib.sha256("".join(train_sha + test_sha).encode()).hexdigest(),
        pixels=pixels,
    )


def load_test_set(
    data_dir: str | Path | None = None, dataset: str = "fashion-mnist", pixels: str = "standardised"
) -> Dataset:
    """The test set alone, for what evaluates a trained network: the training files need not
    be there (evaluate.py asked for them, and read 60,000 images it never used). Its train and
    validation splits are empty, and its digest is of the two test files."""
    spec = get_dataset_spec(dataset)
    folder = find_data_dir(data_dir, spec)
    test, test_sha = _test_split(folder, spec, pixels)
    empty = Split(test.x[:0], test.y[:0])
    return Dataset(
        train=empty,
        val=empty,
        test=test,
        source=folder,
        spec=spec,
        content_sha256=hashlib.sha256("".join(test_sha).encode()).hexdigest(),
        pixels=pixels,
    )


def _test_split(folder: Path, spec: DatasetSpec, pixels: str) -> tuple[Split, tuple[str, str]]:
    """The test images (N, 1, 28, 28) and labels (N,) read from `folder`, and their files'
    content hashes; a test set of no images is refused."""
    files = spec.files
    images, labels, sha = load_images_and_labels(folder, files.test_images, files.test_labels, spec)
    if len(labels) < 1:
        raise DataError(f"{folder}: the test files ({files.test_images.name}) hold no images")
    return Split(normalize(images, spec, pixels), labels.astype(np.int64)), sha
