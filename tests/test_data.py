"""IDX reading, the data lookup, integrity, the split and normalisation."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from shared import data, idx
from shared.errors import DataError, UsageError
from tests.conftest import idx_bytes, make_dataset_dir, write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    path = write_idx(tmp_path / "x.idx", array, compress)
    np.testing.assert_array_equal(idx.read_idx(path), array)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: b"\x00\x00\x09" + raw[3:], "bad magic"),
        (lambda raw: b"\x01" + raw[1:], "bad magic"),
        (lambda raw: raw[:3], "too short"),
        (lambda raw: raw[:10], "truncated header"),
        (lambda raw: raw[:-5], "truncated"),
        (lambda raw: raw + b"\x00", "trailing bytes"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, message, compress):
    raw = mutate(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    path = tmp_path / ("bad.gz" if compress else "bad.idx")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(DataError, match=message) as err:
        idx.read_idx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:-20])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        idx.read_idx(path)


def test_load_rejects_label_count_mismatch(tmp_path):
    folder = make_dataset_dir(tmp_path)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(119, np.uint8))
    with pytest.raises(DataError, match="119 labels for 120 images"):
        data.load_dataset(folder)


def test_load_rejects_label_out_of_range(tmp_path):
    folder = make_dataset_dir(tmp_path)
    labels = np.zeros(30, np.uint8)
    labels[17] = 10
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"label 10 at index 17 is outside 0\.\.9"):
        data.load_dataset(folder)


def test_load_rejects_images_of_wrong_rank(tmp_path):
    folder = make_dataset_dir(tmp_path)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((120, 784), np.uint8))
    with pytest.raises(DataError, match="expected 3 dimensions"):
        data.load_dataset(folder)


def test_load_rejects_images_of_another_size_naming_it(tmp_path):
    folder = make_dataset_dir(tmp_path)
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((120, 32, 32), np.uint8))
    with pytest.raises(DataError, match="images are 32x32, the network takes 28x28") as err:
        data.load_dataset(folder)
    assert "train-images-idx3-ubyte.gz" in str(err.value) and "\n" not in str(err.value)


def test_load_rejects_more_labels_than_the_official_file(tmp_path):
    folder = make_dataset_dir(tmp_path)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(10_001, np.uint8))
    with pytest.raises(DataError, match="says 10001 labels, more than the official file's 10000"):
        data.load_dataset(folder)


# --- hostile files: refused within bounded memory and time ---------------------------------

IMAGES = "train-images-idx3-ubyte"
# Runs load_dataset(FOLDER) in a fresh interpreter; prints the DataError, the seconds the
# load took and its own peak RSS: VmHWM, which starts afresh at exec. ru_maxrss does not: a
# child forked from a pytest grown to 420 MB reports at least that, whatever it loads; and
# RUSAGE_CHILDREN would be the largest of all pytest's children so far.
CHILD = """
import json, sys, time
from shared.data import load_dataset
from shared.errors import DataError
start = time.perf_counter()
try:
    load_dataset(sys.argv[1])
    error = None
except DataError as e:
    error = str(e)
seconds = time.perf_counter() - start
with open("/proc/self/status") as status:
    hwm = next(line for line in status if line.startswith("VmHWM:"))
peak_mib = int(hwm.split()[1]) / 1024
print(json.dumps({"error": error, "seconds": seconds, "peak_mib": peak_mib}))
"""


def idx_header(*dims: int) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def write_gzip_of_zeros(path: Path, head: bytes, zeros_mib: int) -> Path:
    """One valid gzip member holding `head` then `zeros_mib` MiB of zeros, built without
    compressing them all: after a full flush deflate starts afresh, so each MiB compresses to
    the same piece of about 1 KB (2 GiB -> 2 MB on disk, in well under a second)."""
    mib = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the gzip framing is ours
    first = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    piece = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(head)
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + first)
        for _ in range(zeros_mib):
            f.write(piece)
            crc = zlib.crc32(mib, crc)
        size = (len(head) + (zeros_mib << 20)) & 0xFFFFFFFF
        f.write(deflate.flush() + struct.pack("<II", crc, size))
    return path


def test_the_gzip_of_zeros_helper_is_a_valid_gzip(tmp_path):
    path = write_gzip_of_zeros(tmp_path / "z.gz", b"head", 3)
    assert gzip.decompress(path.read_bytes()) == b"head" + bytes(3 << 20)


def write_named_gzip(path: Path, name_bytes: int, shape: tuple[int, ...] = (120,)) -> Path:
    """A gzip of an IDX file of zeros of `shape` (120 labels) whose header carries a file
    name of `name_bytes` bytes."""
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    content = idx_bytes(np.zeros(shape, np.uint8))
    deflated = body.compress(content) + body.flush()
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x08\x00\x00\x00\x00\x00\xff" + b"a" * name_bytes + b"\0")
        f.write(deflated + struct.pack("<II", zlib.crc32(content), len(content)))
    return path


def write_gzip_members(path: Path, members: int) -> Path:
    """The official header of 60,000 images in a gzip member, then `members` empty members
    (no image): within the size of a gzip of 60,000 images."""
    path.write_bytes(gzip.compress(idx_header(60_000, 28, 28)) + gzip.compress(b"") * members)
    return path


def test_the_named_gzip_helper_is_a_valid_gzip(tmp_path):
    path = write_named_gzip(tmp_path / "n.gz", 1000, (3, 28, 28))
    assert gzip.decompress(path.read_bytes()) == idx_bytes(np.zeros((3, 28, 28), np.uint8))


def write_raw_header(folder: Path, header: bytes, size: int | None = None) -> Path:
    """A raw IDX file in place of the .gz: `header`, then zeros up to `size` (sparse)."""
    (folder / f"{IMAGES}.gz").unlink()
    path = folder / IMAGES
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size or len(header))
    return path


HOSTILE = {
    # A raw file whose header claims 2**31 images (1.7 TB), itself 16 bytes long.
    "raw header of 2**31 images": (
        lambda folder: write_raw_header(folder, idx_header(2**31, 28, 28)),
        "header says 2147483648 images, more than the official file's 60000",
    ),
    # The official header, then 64 GiB on disk (sparse: no disk space used).
    "raw file of 64 GiB": (
        lambda folder: write_raw_header(folder, idx_header(60_000, 28, 28), 1 << 36),
        "68,719,476,736 bytes, more than any file of images can be",
    ),
    # A gzip header whose name field is 32 MiB: gzip reads it a byte at a time (85 s a GB),
    # before the IDX header it guards. Labels are at most 60,008 bytes.
    "gzip of labels behind a name of 32 MiB": (
        lambda folder: write_named_gzip(folder / "train-labels-idx1-ubyte.gz", 32 << 20),
        "33,554,464 bytes, more than any file of labels can be",
    ),
    # A name of 40 MB, within what a file of 60,000 images may take: Python's gzip read it a
    # byte at a time, 11 s, before the IDX header that gives the file away.
    "gzip of images behind a name of 40 MB": (
        lambda folder: write_named_gzip(folder / f"{IMAGES}.gz", 40_000_000, (120, 28, 28)),
        "has trailing bytes: header says 120x28x28 (94096 bytes), yet the file holds",
    ),
    # 2 million empty gzip members after the header, within what a file of images may take:
    # each hands what follows it on to the next (35 s; Python's gzip 9.5 s).
    "gzip of images in 2 million members": (
        lambda folder: write_gzip_members(folder / f"{IMAGES}.gz", 2_000_000),
        "a gzip of more than 1,024 members, more than any data file's",
    ),
    # 2 MB of gzip inflating to 2 GiB behind a header of 10 images: its size gives it away.
    "gzip of 10 images then 2 GiB": (
        lambda folder: write_gzip_of_zeros(folder / f"{IMAGES}.gz", idx_header(10, 28, 28), 2048),
        "has trailing bytes: header says 10x28x28 (7856 bytes), yet the file holds",
    ),
    # The same behind the official header: inflated only up to the declared 47 MB + 1 byte.
    "gzip of 60000 images then 2 GiB": (
        lambda folder: write_gzip_of_zeros(
            folder / f"{IMAGES}.gz", idx_header(60_000, 28, 28), 2048
        ),
        "has trailing bytes: header says 60000x28x28 (47040016 bytes), file holds more",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_are_refused_in_bounded_memory_and_time(tmp_path, case):
    write, message = HOSTILE[case]
    path = write(make_dataset_dir(tmp_path / "data"))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(path.parent)],
        capture_output=True,
        text=True,
        timeout=120,  # only a guard against a hang: the bound is asserted below
        cwd=Path(__file__).parents[1],
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert result["error"].startswith(f"{path}: {message}") and "\n" not in result["error"]
    assert result["seconds"] < 5 and result["peak_mib"] < 300, result


def test_missing_folder_and_file_say_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*missing"):
        data.load_dataset(tmp_path)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "nowhere"))  # installing: no help
    with pytest.raises(UsageError, match=r"\(\$THREEFOLD_DATA\)\); fetch the files into it with"):
        data.load_dataset()
    # The folder is there, its files are not: it said to install the package, which it hides.
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match=r"missing; fetch the files into it with 'train.py --"):
        data.load_dataset()
    monkeypatch.delenv(data.DATA_DIR_ENV)
    with pytest.raises(UsageError, match="pass --data-dir FOLDER holding the four mnist"):
        data.load_dataset(None, "mnist")  # which has no download
    (tmp_path / "train-images-idx3-ubyte.gz").mkdir()  # there, but not a file
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: not a regular file"):
        data.load_dataset(tmp_path)


def test_a_relative_xdg_data_home_is_ignored(tmp_path, monkeypatch):
    # The XDG spec's rule: a download went to ./rel/threefold, which no other folder finds.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", "rel")
    assert data.FASHION_MNIST.user_dir == tmp_path / ".local/share/threefold/fashion-mnist"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data.FASHION_MNIST.user_dir == tmp_path / "xdg/threefold/fashion-mnist"


def test_lookup_order(tmp_path, monkeypatch):
    env_dir = make_dataset_dir(tmp_path / "env")
    flag_dir = make_dataset_dir(tmp_path / "flag")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(env_dir))
    assert data.find_data_dir(flag_dir) == flag_dir
    assert data.find_data_dir() == env_dir
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert data.find_data_dir() == data.FASHION_MNIST.default_dir


def test_split_is_the_last_sixth_and_deterministic(tiny_data_dir):
    a, b = data.load_dataset(tiny_data_dir), data.load_dataset(tiny_data_dir)
    assert (len(a.train), len(a.val), len(a.test)) == (100, 20, 30)
    np.testing.assert_array_equal(a.val.x, b.val.x)
    raw = idx.read_idx(tiny_data_dir / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(a.val.x, data.normalize(raw[100:]))
    assert a.train.x.dtype == np.float32 and a.train.x.shape == (100, 1, 28, 28)


def test_real_split_sizes(real_data):
    assert (len(real_data.train), len(real_data.val), len(real_data.test)) == (
        50_000,
        10_000,
        10_000,
    )


def test_fashion_mnist_s_files_are_not_taken_for_mnist(real_data):
    # MNIST's files are not pinned: Fashion-MNIST's trained as digits, with MNIST's scaling.
    with pytest.raises(
        DataError,
        match=re.escape(
            "the official fashion-mnist file train-images-idx3-ubyte, not mnist's "
            "train-images-idx3-ubyte; give the folder of mnist's files (or train with "
            "--dataset fashion-mnist)"
        ),
    ):
        data.load_dataset(real_data.source, "mnist")


def test_the_official_test_files_under_the_training_names_are_refused(real_data, tmp_path):
    # It trained on the test set ("8333 train, 1667 validation, 10000 test images"), exit 0.
    files = data.FASHION_MNIST.files
    for slot, official in [
        (files.train_images, files.test_images),
        (files.train_labels, files.test_labels),
        (files.test_images, files.test_images),
        (files.test_labels, files.test_labels),
    ]:
        (tmp_path / f"{slot.name}.gz").symlink_to(real_data.source / f"{official.name}.gz")
    with pytest.raises(
        DataError,
        match=re.escape(
            "train-images-idx3-ubyte.gz: the official fashion-mnist file t10k-images-idx3-ubyte, "
            "not fashion-mnist's train-images-idx3-ubyte; put the official"
        ),
    ):
        data.load_dataset(tmp_path)


def test_test_images_that_are_the_training_images_are_refused(tiny_data_dir):
    # A folder of copies trained and tested on the same 120 images, exit 0.
    for name in ("images-idx3", "labels-idx1"):
        shutil.copy(
            tiny_data_dir / f"train-{name}-ubyte.gz", tiny_data_dir / f"t10k-{name}-ubyte.gz"
        )
    with pytest.raises(DataError, match="the training images are the test images"):
        data.load_dataset(tiny_data_dir)


def test_normalisation_constants_match_the_training_images(real_data):
    pixels = np.concatenate([real_data.train.x, real_data.val.x]).astype(np.float64)
    assert abs(pixels.mean()) < 1e-5 and abs(pixels.std() - 1) < 1e-5


def test_a_test_set_of_no_images_is_named(tmp_path):
    """It was 'too few images to split (600 training)', of the training files."""
    folder = make_dataset_dir(tmp_path / "data", n_train=600, n_test=0)
    with pytest.raises(DataError, match=r"the test files \(t10k-images-idx3-ubyte\) hold no"):
        data.load_dataset(folder)
