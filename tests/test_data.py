"""IDX reading, the data lookup, integrity, the split and normalisation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from shared import data
from shared.errors import DataError, UsageError
from tests.conftest import idx_bytes, make_dataset_dir, write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, (7, 28, 28)).astype(np.uint8)
    path = write_idx(tmp_path / "x.idx", array, compress)
    np.testing.assert_array_equal(data.read_idx(path), array)


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
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(mutate(idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    with pytest.raises(DataError, match=message) as err:
        data.read_idx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:-20])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        data.read_idx(path)


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


def test_missing_folder_and_file_say_how_to_get_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*missing"):
        data.load_dataset(tmp_path)


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
    raw = data.read_idx(tiny_data_dir / "train-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(a.val.x, data.normalize(raw[100:]))
    assert a.train.x.dtype == np.float32 and a.train.x.shape == (100, 1, 28, 28)


def test_real_split_sizes(real_data):
    assert (len(real_data.train), len(real_data.val), len(real_data.test)) == (
        50_000,
        10_000,
        10_000,
    )


def test_normalisation_constants_match_the_training_images(real_data):
    pixels = np.concatenate([real_data.train.x, real_data.val.x]).astype(np.float64)
    assert abs(pixels.mean()) < 1e-5 and abs(pixels.std() - 1) < 1e-5
