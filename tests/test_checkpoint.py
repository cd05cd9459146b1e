"""Checkpoints are untrusted input: every way a file can be wrong ends in one line naming the
file and the member, tensor or metadata field at fault, in bounded memory and time."""

from __future__ import annotations

import io
import json
import os
import struct
import time
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.errors import CheckpointError
from shared.spec import get_arch, init_params, split_params, state_shapes
from tests.conftest import run_measured
from tests.test_training import run_script

META = {
    "arch": "noconv",
    "impl": "numpy",
    "epoch": 2,
    "dataset": "fashion-mnist",
    "data": {"dataset": "fashion-mnist", "sha256": "0" * 64},
    "config": {"lr": 0.1, "epochs": 2},
    "history": [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "train_acc": 0.5,
            "val_loss": 1.0,
            "val_acc": 0.7,
            "train_seconds": 1.0,
            "epoch_seconds": 1.5,
        }
        for e in (1, 2)
    ],
}


# --- building checkpoints member by member -------------------------------------------------


def npy(array: np.ndarray) -> bytes:
    """`array` as a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple, fortran: bool = False, version=(1, 0)) -> bytes:
    """A .npy header claiming `descr`, `shape` and order, whatever data follows it."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran, "shape": shape}
    if version == (1, 0):
        np.lib.format.write_array_header_1_0(buffer, header)
    else:
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def meta_npy(meta: Any) -> bytes:
    """The `meta` member as save_checkpoint writes it: JSON in a 0-d unicode array."""
    return npy(np.array(json.dumps(meta)))


def checkpoint_members(
    arch: str = "noconv", meta: Any = None, momentum: bool = True, dtype=np.float32
) -> dict[str, bytes]:
    """The members of a valid checkpoint of `arch` (a preset or a spec), by name, for a test
    to edit: every canonical tensor, BatchNorm's buffers included, and (with `momentum`) SGD's
    momentum buffer for each trainable one."""
    tensors = init_params(get_arch(arch), "he", 0, dtype)
    members = {"meta.npy": meta_npy({**META, "arch": arch} if meta is None else meta)}
    members |= {f"{name}.npy": npy(value) for name, value in tensors.items()}
    if momentum:
        params, _ = split_params(tensors, get_arch(arch))
        members |= {
            f"optimizer/momentum/{name}.npy": npy(value * 0.5) for name, value in params.items()
        }
    return members


def write_zip(
    path: Path, members: Iterable[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED
) -> Path:
    """A zip of `members` (name, content) in order; a name may come twice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of a duplicate name
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for name, content in members:
                zf.writestr(name, content)
    return path


def with_member(name: str, content: bytes, **kwargs: Any) -> dict[str, bytes]:
    """A valid checkpoint's members with `name` replaced (or added)."""
    return checkpoint_members(**kwargs) | {name: content}


def declare_size(path: Path, member: str, size: int) -> None:
    """Make the zip's central directory claim that `member` inflates to `size` bytes."""
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")
    while at >= 0:
        name_length = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46 : at + 46 + name_length] == member.encode():
            struct.pack_into("<I", raw, at + 24, size)
        at = raw.find(b"PK\x01\x02", at + 46)
    path.write_bytes(bytes(raw))


def refused(path: Path, *parts: str, **kwargs: Any) -> str:
    """The one-line CheckpointError of loading `path`, which names it and each of `parts`."""
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, **kwargs)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert "allow_pickle" not in message
    for part in parts:
        assert part in message, message
    return message


# --- what loads ---------------------------------------------------------------------------


def test_a_valid_checkpoint_loads_writable_and_cast_on_request(tmp_path):
    path = write_zip(tmp_path / "c.npz", checkpoint_members().items())
    ckpt = load_checkpoint(path)
    assert ckpt.meta == META and set(ckpt.optimizer["momentum"]) == set(ckpt.params)
    assert ckpt.params["fc1.weight"].dtype == np.float32
    ckpt.params["fc1.weight"][0, 0] = 1.0  # the backends update their copies in place
    assert (
        load_checkpoint(path, dtype=np.float64).optimizer["momentum"]["fc2.bias"].dtype
        == np.float64
    )
    compressed = write_zip(tmp_path / "z.npz", checkpoint_members().items(), zipfile.ZIP_DEFLATED)
    np.testing.assert_array_equal(
        load_checkpoint(compressed).params["fc2.weight"],
        load_checkpoint(path).params["fc2.weight"],
    )


def test_big_endian_tensors_load_in_native_order(tmp_path):
    value = init_params(get_arch("noconv"), "he", 0)["fc2.weight"]
    path = write_zip(
        tmp_path / "c.npz", with_member("fc2.weight.npy", npy(value.astype(">f4"))).items()
    )
    loaded = load_checkpoint(path).params["fc2.weight"]
    assert loaded.dtype == np.float32 and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, value)


def test_a_checkpoint_without_momentum_buffers_or_history_loads(tmp_path):
    members = checkpoint_members(meta={"arch": "noconv"}, momentum=False)
    ckpt = load_checkpoint(write_zip(tmp_path / "c.npz", members.items()))
    assert ckpt.meta == {"arch": "noconv"} and ckpt.optimizer is None


# A network of the spec grammar with BatchNorm 2d and 1d: buffers and int64 counters.
BN = "conv4-bn-relu-maxpool2-flatten-fc16-bn-relu-fc10"
BUFFERS = {
    f"{bn}.{kind}"
    for bn in ("bn1", "bn2")
    for kind in ("running_mean", "running_var", "num_batches_tracked")
}


def test_a_batch_norm_network_round_trips_with_its_buffers(tmp_path):
    arch = get_arch(BN)
    rng = np.random.default_rng(0)
    tensors = init_params(arch, "he", 0)
    for name, value in tensors.items():
        if name.endswith(("running_mean", "running_var")):
            tensors[name] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
    tensors["bn1.num_batches_tracked"] = np.array(7, np.int64)
    tensors["bn2.num_batches_tracked"] = np.array(2**40, np.int64)
    params, buffers = split_params(tensors, arch)
    assert set(buffers) == BUFFERS
    path = tmp_path / "c.npz"
    save_checkpoint(
        path,
        tensors,
        {"arch": arch.name, "epoch": 0},
        {"momentum": {k: -v for k, v in params.items()}},
    )
    for dtype, floats in ((None, np.float32), (np.float64, np.float64), ("float32", np.float32)):
        ckpt = load_checkpoint(path, dtype=dtype)
        assert ckpt.meta["arch"] == BN and set(ckpt.params) == set(state_shapes(arch))
        assert set(ckpt.optimizer["momentum"]) == set(params)  # what is trained, not buffers
        for name, value in tensors.items():
            loaded = ckpt.params[name]
            np.testing.assert_array_equal(loaded, value)
            counter = name.endswith("num_batches_tracked")
            assert loaded.dtype == (np.int64 if counter else floats), name
            assert loaded.shape == value.shape
        assert int(ckpt.params["bn2.num_batches_tracked"]) == 2**40
        np.testing.assert_array_equal(
            ckpt.optimizer["momentum"]["bn2.weight"], -params["bn2.weight"]
        )


def test_a_big_endian_counter_loads_as_a_native_int64(tmp_path):
    members = with_member("bn1.num_batches_tracked.npy", npy(np.array(5, ">i8")), arch=BN)
    loaded = load_checkpoint(write_zip(tmp_path / "c.npz", members.items())).params
    counter = loaded["bn1.num_batches_tracked"]
    assert counter.dtype == np.int64 and counter.dtype.isnative and counter == 5


@pytest.mark.parametrize(
    "value, problem",
    [
        (np.array(3.0), "has dtype float64, not int64"),
        (np.array(3.0, np.float32), "has dtype float32, not int64"),
        (np.array(3, np.int32), "has dtype int32, not int64"),
        (np.array(3, np.uint64), "has dtype uint64, not int64"),
        (np.array(True), "has dtype bool, not int64"),
        (np.array(-1, np.int64), "is negative"),
        (np.array(-(2**63), np.int64), "is negative"),
        (np.array([3], np.int64), "has shape (1,), arch"),
    ],
    ids=["float64", "float32", "int32", "uint64", "bool", "minus-one", "int64-min", "shape"],
)
def test_a_counter_of_another_dtype_or_negative_is_refused(tmp_path, value, problem):
    members = with_member("bn2.num_batches_tracked.npy", npy(value), arch=BN)
    path = write_zip(tmp_path / "c.npz", members.items())
    refused(path, f"tensor bn2.num_batches_tracked {problem}")


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("bn2.num_batches_tracked", np.array(2**62 + 1), "the step counter would overflow int64"),
        ("bn1.running_var", np.array([1.0, -1e-3, 1.0, 1.0], np.float32), "negative values"),
    ],
    ids=["counter", "variance"],
)
def test_a_buffer_that_cannot_mean_what_it_says_is_refused_read_or_written(
    tmp_path, name, value, problem
):
    members = with_member(f"{name}.npy", npy(value), arch=BN)
    refused(write_zip(tmp_path / "c.npz", members.items()), f"tensor {name} ", problem)
    tensors = init_params(get_arch(BN), "he", 0) | {name: value}
    path = tmp_path / "written.npz"
    with pytest.raises(CheckpointError, match=f"not written: tensor {name} .*{problem}"):
        save_checkpoint(path, tensors, {"arch": BN})
    assert not path.exists()


def test_a_momentum_buffer_for_a_batch_norm_buffer_is_foreign(tmp_path):
    member = "optimizer/momentum/bn1.running_mean.npy"
    members = with_member(member, npy(np.zeros(4, np.float32)), arch=BN)
    path = write_zip(tmp_path / "c.npz", members.items())
    refused(path, f"member '{member}' is not part of a checkpoint of arch")


# --- not a checkpoint at all ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [npy(np.zeros(3)), b"arch: lab\n", b"", b"PK\x05\x06" + bytes(18), b"PK\x03\x04garbage"],
    ids=["npy", "text", "empty", "empty-zip-record", "damaged-zip"],
)
def test_not_an_npz(tmp_path, content):
    path = tmp_path / "c.npz"
    path.write_bytes(content)
    refused(path, "not a threefold checkpoint (.npz)")


def test_a_zip_without_meta(tmp_path):
    members = checkpoint_members()
    del members["meta.npy"]
    refused(
        write_zip(tmp_path / "c.npz", members.items()), "not a threefold checkpoint", "meta.npy"
    )


def test_a_file_larger_than_any_checkpoint_is_not_opened(tmp_path):
    path = tmp_path / "c.npz"
    with open(path, "wb") as f:
        f.truncate(2**30)  # sparse: takes no room on disk
    refused(path, "not a threefold checkpoint (.npz)", "1073741824 bytes")


def test_a_file_larger_than_its_network_allows_is_refused_before_its_tensors(tmp_path):
    padding = ("padding.npy", bytes(8 * 2**20))  # a noconv checkpoint weighs at most ~6.9 MB
    path = write_zip(tmp_path / "c.npz", [*checkpoint_members().items(), padding])
    refused(path, "more than a checkpoint of its network can be (")
    # The same padding beside a bigger network's tensors is read on, and named as foreign.
    path = write_zip(tmp_path / "d.npz", [*checkpoint_members("lab").items(), padding])
    refused(path, "member 'padding.npy' is not part of a checkpoint of arch 'lab'")


def never_parse_the_zip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any use of zipfile.ZipFile fail the test: the loader must refuse first."""

    def never(*args, **kwargs):
        raise AssertionError("zipfile parsed a directory the loader should have refused")

    monkeypatch.setattr(zipfile, "ZipFile", never)


def end_record(raw: bytes | bytearray) -> int:
    """The offset of the zip's end of central directory record."""
    return raw.rfind(b"PK\x05\x06")


def test_a_zip_directory_claiming_over_a_mebibyte_is_refused_before_zipfile(tmp_path, monkeypatch):
    path = write_zip(tmp_path / "c.npz", checkpoint_members().items())
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, end_record(raw) + 12, 2**20 + 1)  # the directory's size
    path.write_bytes(bytes(raw))
    never_parse_the_zip(monkeypatch)
    refused(path, "its zip directory is 1048577 bytes, more than any checkpoint's (1048576)")


def test_a_zip_directory_of_over_a_mebibyte_is_refused_before_zipfile(tmp_path, monkeypatch):
    # 4000 members of long names: a directory of about 1.2 MB, in a file of about 2.4 MB.
    names = [(f"{i:04d}" + "x" * 250, b"") for i in range(4000)]
    path = write_zip(tmp_path / "c.npz", [*checkpoint_members().items(), *names])
    raw = path.read_bytes()
    directory = struct.unpack_from("<I", raw, end_record(raw) + 12)[0]
    assert directory > 2**20
    never_parse_the_zip(monkeypatch)
    refused(path, f"its zip directory is {directory} bytes, more than any checkpoint's")


def test_a_zip64_directory_of_over_a_mebibyte_is_refused_before_zipfile(tmp_path, monkeypatch):
    # Over 65535 members: zipfile writes a zip64 end record, which zipfile reads in preference
    # to the classic one. Here the classic record claims 1000 bytes, the zip64 one the truth.
    names = [(f"x{i:06d}", b"") for i in range(70_000)]
    path = write_zip(tmp_path / "c.npz", [*checkpoint_members().items(), *names])
    raw = bytearray(path.read_bytes())
    at = end_record(raw)
    assert raw[at - 20 : at - 16] == b"PK\x06\x07"  # the zip64 end record's locator
    struct.pack_into("<I", raw, at + 12, 1000)
    path.write_bytes(bytes(raw))
    never_parse_the_zip(monkeypatch)
    refused(path, "a zip64 directory")


def test_missing_file_and_folder(tmp_path):
    refused(tmp_path / "nothing.npz", "no such checkpoint")
    refused(tmp_path, "not a regular file")


def test_a_fifo_or_a_device_is_refused_without_reading_it(tmp_path):
    # A FIFO would wait for a writer forever; /dev/zero would fill the memory.
    os.mkfifo(tmp_path / "fifo.npz")
    refused(tmp_path / "fifo.npz", "not a regular file")
    refused(Path("/dev/zero"), "not a regular file")


# --- the zip's directory ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["notes.txt", "conv.weight.npy", "fc1.weight", "optimizer/meta.npy", "fc1.weight.npy/x.npy"],
)
def test_a_foreign_member_is_named(tmp_path, name):
    members = with_member(name, npy(np.zeros(3, np.float32)))
    refused(write_zip(tmp_path / "c.npz", members.items()), repr(name), "arch 'noconv'")


def test_a_member_twice_is_refused(tmp_path):
    members = checkpoint_members()
    entries = [*members.items(), ("fc2.bias.npy", members["fc2.bias.npy"])]
    refused(write_zip(tmp_path / "c.npz", entries), "'fc2.bias.npy' appears twice")


def test_a_missing_tensor_or_momentum_buffer_is_named(tmp_path):
    members = checkpoint_members()
    del members["fc2.bias.npy"]
    refused(write_zip(tmp_path / "c.npz", members.items()), "tensor fc2.bias missing")
    members = checkpoint_members()
    del members["optimizer/momentum/fc1.weight.npy"]
    missing = "tensor optimizer/momentum/fc1.weight missing"
    refused(write_zip(tmp_path / "d.npz", members.items()), missing)


def test_a_checkpoint_written_before_adam_loads_its_momentum(tmp_path):
    """SGD's momentum was stored as velocity/NAME; such a file loads, every buffer in place."""
    members = {
        name.replace("optimizer/momentum/", "velocity/"): content
        for name, content in checkpoint_members().items()
    }
    ckpt = load_checkpoint(write_zip(tmp_path / "old.npz", members.items()))
    assert set(ckpt.optimizer) == {"momentum"}
    assert set(ckpt.optimizer["momentum"]) == set(ckpt.params)


def adam_members(step: float = 3.0) -> dict[str, bytes]:
    """A valid checkpoint of a run trained by Adam: its moments and one step count."""
    tensors = init_params(get_arch("noconv"), "he", 0)
    meta = {**META, "config": {**META["config"], "optimizer": "adam"}}
    members = checkpoint_members(meta=meta, momentum=False)
    for name, value in split_params(tensors, get_arch("noconv"))[0].items():
        members[f"optimizer/exp_avg/{name}.npy"] = npy(value * 0.1)
        members[f"optimizer/exp_avg_sq/{name}.npy"] = npy(value * value)
        members[f"optimizer/step/{name}.npy"] = npy(np.array(step, np.float32))
    return members


def test_adam_s_state_that_cannot_mean_what_it_says_is_refused(tmp_path):
    """A negative, fractional or uneven step count, or a negative mean of squares, resumed
    with a traceback (a division by zero) or a different bias correction, or diverged."""
    assert load_checkpoint(write_zip(tmp_path / "a.npz", adam_members().items())).optimizer
    square = "optimizer/exp_avg_sq/fc1.bias.npy"
    for members, problem in [
        (adam_members(-1.0), "optimizer/step/fc1.weight has negative values"),
        (adam_members(0.5), "Adam's step count 0.5 is not a whole count"),
        (adam_members() | {"optimizer/step/fc2.bias.npy": npy(np.float32(4))}, "counts differ"),
        (adam_members() | {square: npy(-np.ones(128, np.float32))}, "fc1.bias has negative"),
    ]:
        refused(write_zip(tmp_path / "c.npz", members.items()), problem)


def test_a_legacy_member_beside_its_current_name_or_a_second_dtype_is_refused(tmp_path):
    """Both loaded, one quietly winning; a float64 tensor among float32 ones was blamed on
    export's output file."""
    members = checkpoint_members()
    legacy = members | {"velocity/fc2.bias.npy": members["optimizer/momentum/fc2.bias.npy"]}
    refused(write_zip(tmp_path / "a.npz", legacy.items()), "'velocity/fc2.bias.npy' and its")
    mixed = members | {"fc2.bias.npy": npy(np.zeros(10))}
    path = write_zip(tmp_path / "b.npz", mixed.items())
    refused(path, "tensor fc2.bias is float64 where fc1.weight is float32", dtype=np.float32)


def test_only_stored_or_deflated_members_are_read(tmp_path):
    path = write_zip(tmp_path / "c.npz", checkpoint_members().items(), zipfile.ZIP_BZIP2)
    refused(path, "'meta.npy' uses compression method 12")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_damaged_member_is_named(tmp_path, compression):
    path = write_zip(tmp_path / "c.npz", checkpoint_members().items(), compression)
    raw = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("fc1.weight.npy")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    raw[middle] ^= 0xFF
    path.write_bytes(bytes(raw))
    refused(path, "tensor fc1.weight")  # damaged, truncated or too long, as the bits fall


@pytest.mark.parametrize("declared", [0, 10, 1000])
def test_a_directory_claiming_too_few_bytes_is_refused(tmp_path, declared):
    path = write_zip(tmp_path / "c.npz", checkpoint_members().items(), zipfile.ZIP_DEFLATED)
    declare_size(path, "fc1.weight.npy", declared)
    refused(path, "tensor fc1.weight")


def test_a_directory_claiming_gigabytes_is_not_trusted(tmp_path):
    path = write_zip(tmp_path / "c.npz", checkpoint_members().items(), zipfile.ZIP_DEFLATED)
    expected = load_checkpoint(path).params["fc1.weight"]
    declare_size(path, "fc1.weight.npy", 2**32 - 2)
    np.testing.assert_array_equal(load_checkpoint(path).params["fc1.weight"], expected)


# --- each tensor's header, data and values ------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.array([None] * 10, dtype=object),
        np.zeros(10, np.int32),
        np.zeros(10, np.float16),
        np.zeros(10, np.complex128),
        np.zeros(10, [("a", "<f4")]),
    ],
    ids=["object", "int32", "float16", "complex", "structured"],
)
def test_a_tensor_of_another_dtype_is_named(tmp_path, array):
    path = write_zip(tmp_path / "c.npz", with_member("fc2.bias.npy", npy(array)).items())
    refused(path, "tensor fc2.bias has dtype", "not float32 or float64")


@pytest.mark.parametrize("shape", [(10, 1), (9,), (), (2**62,), (10**30, 10**30)])
def test_a_tensor_of_another_shape_is_named_before_its_data_is_read(tmp_path, shape):
    header = npy_header("<f4", shape)
    path = write_zip(tmp_path / "c.npz", with_member("fc2.bias.npy", header + bytes(40)).items())
    refused(path, "tensor fc2.bias has shape (", "arch 'noconv' expects (10,)")


def test_a_fortran_order_tensor_is_refused(tmp_path):
    header = npy_header("<f4", (10, 128), fortran=True)
    path = write_zip(
        tmp_path / "c.npz", with_member("fc2.weight.npy", header + bytes(5120)).items()
    )
    refused(path, "tensor fc2.weight is stored in Fortran order")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x93NUMPY",
        b"not an npy at all",
        b"\x93NUMPY\x03\x00" + bytes(100),
        b"\x93NUMPY\x01\x00\x20\x00{'descr': '<f4'}" + bytes(100),
        b"\x93NUMPY\x02\x00\xff\xff\xff\xff" + bytes(100),  # a header of 4 GiB, claimed
    ],
    ids=["empty", "magic-only", "text", "version-3", "bad-dict", "huge-header"],
)
def test_a_member_without_an_npy_header_is_named(tmp_path, content):
    path = write_zip(tmp_path / "c.npz", with_member("fc2.bias.npy", content).items())
    refused(path, "tensor fc2.bias has no .npy header")


def test_an_npy_2_0_header_is_read(tmp_path):
    value = np.arange(10, dtype=np.float32)
    content = npy_header("<f4", (10,), version=(2, 0)) + value.tobytes()
    path = write_zip(tmp_path / "c.npz", with_member("fc2.bias.npy", content).items())
    np.testing.assert_array_equal(load_checkpoint(path).params["fc2.bias"], value)


@pytest.mark.parametrize("extra", [-1, -40, 1, 1000])
def test_truncated_or_trailing_data_is_named(tmp_path, extra):
    data = np.zeros(10, np.float32).tobytes()
    data = data[:extra] if extra < 0 else data + bytes(extra)
    content = npy_header("<f4", (10,)) + data
    path = write_zip(tmp_path / "c.npz", with_member("fc2.bias.npy", content).items())
    problem = "is truncated" if extra < 0 else "has data beyond its 40 bytes"
    refused(path, f"tensor fc2.bias {problem}")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["fc1.weight", "optimizer/momentum/fc2.bias"])
def test_non_finite_values_are_named(tmp_path, name, bad):
    value = np.load(io.BytesIO(checkpoint_members()[f"{name}.npy"]))
    value.flat[3] = bad
    path = write_zip(tmp_path / "c.npz", with_member(f"{name}.npy", npy(value)).items())
    refused(path, f"tensor {name} has NaN or inf values")


def test_values_beyond_float32_are_refused_only_when_cast(tmp_path):
    members = checkpoint_members(dtype=np.float64)
    value = np.load(io.BytesIO(members["fc2.weight.npy"]))
    value[0, 0] = 1e300
    path = write_zip(tmp_path / "c.npz", (members | {"fc2.weight.npy": npy(value)}).items())
    assert load_checkpoint(path).params["fc2.weight"][0, 0] == 1e300
    refused(path, "tensor fc2.weight has values beyond float32's range", dtype=np.float32)
    assert load_checkpoint(path, dtype="float64").params["fc2.weight"].dtype == np.float64


def test_save_refuses_non_finite_tensors(tmp_path):
    params = init_params(get_arch("noconv"), "he", 0)
    momentum = {k: v.copy() for k, v in params.items()}
    momentum["fc1.bias"][5] = np.nan
    with pytest.raises(CheckpointError, match=r"optimizer/momentum/fc1\.bias has NaN or inf"):
        save_checkpoint(tmp_path / "c.npz", params, {"arch": "noconv"}, {"momentum": momentum})
    assert list(tmp_path.iterdir()) == []


# --- the metadata -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, problem",
    [
        (npy(np.zeros(3)), "meta is not a JSON string"),
        (npy(np.array(["{}", "{}"])), "meta is not a JSON string"),
        (npy_header("<U2000000", ()), "meta is 8000000 bytes"),
        (npy_header("<U100000000", ()) + bytes(400), "meta is 400000000 bytes"),
        (npy(np.array("{'arch': 'lab'}")), "meta is not valid JSON"),
        (npy_header("<U1", ()) + b"\xff\xff\xff\xff", "meta is not valid JSON"),
        (npy_header("<U1", ()) + b"\x00\xd8\x00\x00", "meta is not valid JSON"),
        (npy(np.array("[" * 100_000 + "]" * 100_000)), "meta is not valid JSON"),
        (npy_header("<U5", ()) + bytes(8), "meta is truncated"),
    ],
    ids=[
        "float",
        "array",
        "too-big",
        "huge-claim",
        "python-not-json",
        "code-point",
        "surrogate",
        "deep",
        "truncated",
    ],
)
def test_unreadable_metadata_is_refused(tmp_path, content, problem):
    refused(write_zip(tmp_path / "c.npz", with_member("meta.npy", content).items()), problem)


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"arch": None}, "field arch is null"),
        ({"arch": "noconv", "history": None}, "field history is not an array of objects"),
        ({"arch": 3}, "field arch is 3, not a network's name or spec"),
        ({"arch": ["noconv"]}, "field arch is an array, not a network's name or spec"),
        ({"arch": "vgg\n"}, "field arch: token 'vgg' is not a layer"),
        ({"arch": "fc10\n-relu"}, "field arch: token 'fc10\\n' is malformed"),
        ({"epoch": -1}, "field epoch is -1, not an integer >= 0"),
        ({"epoch": 2.0}, "field epoch is 2.0"),
        ({"epoch": True}, "field epoch is true"),
        ({"epoch": "2"}, "field epoch is a string"),
        ({"impl": 3}, "field impl is 3, not a string"),
        ({"dataset": ["mnist"]}, "field dataset is an array, not a string"),
        ({"config": []}, "field config is an array, not an object"),
        ({"data": "sha"}, "field data is a string, not an object"),
        ({"history": {}}, "field history is not an array of objects"),
        ({"history": [1, 2]}, "field history is not an array of objects"),
        ({"epoch": 3, "history": [{}] * 5}, "field history has 5 entries for epoch 3"),
        ({"history": [{}]}, "field history has 1 entries for epoch 2"),
        (
            {"epoch": 1, "history": [{"val_acc": float("nan")}]},
            "field history entry 1 'val_acc' is nan",
        ),
        (
            {"epoch": 1, "history": [{"train_loss": float("inf")}]},
            "field history entry 1 'train_loss' is inf",
        ),
        (
            {"epoch": 1, "history": [{"val_acc": "0.9"}]},
            "field history entry 1 'val_acc' is a string",
        ),
        (
            {"epoch": 1, "history": [{"train_acc": None}]},
            "field history entry 1 'train_acc' is null",
        ),
        (
            {"epoch": 1, "history": [{"val_acc": 0.9}]},
            "field history entry 1 has other fields than",
        ),
        (
            {"epoch": 1, "history": [{**META["history"][0], "epoch": 3}]},
            "field history entry 1 is of epoch 3",
        ),
        (
            {"epoch": 1, "history": [{**META["history"][0], "train_loss": 10**400}]},
            "field history entry 1 'train_loss' is a big integer",
        ),
        # Accepted, then --resume's curves, or a report, failed on them in a traceback.
        (
            {"epoch": 1, "history": [{**META["history"][0], "val_acc": 2.0}]},
            "field history entry 1 'val_acc' is 2.0",
        ),
        (
            {"epoch": 1, "history": [{**META["history"][0], "epoch_seconds": -1.0}]},
            "field history entry 1 'epoch_seconds' is -1.0",
        ),
        ({"impl": "tensorflow"}, "field impl is 'tensorflow', not one of numpy, jax, torch"),
        ({"dataset": "cifar10"}, "field dataset is 'cifar10', not one of fashion-mnist, mnist"),
        ({"config": {"flip": "yes"}}, "field config.flip is 'yes', not true or false"),
        ({"config": {"shift": 100}}, "field config.shift is 100, out of range"),
        ({"config": {"tta": 0}}, "field config.tta is 0, not true or false"),
    ],
)
def test_metadata_of_the_wrong_type_or_shape_names_the_field(tmp_path, change, problem):
    members = with_member("meta.npy", meta_npy({**META, **change}))
    refused(write_zip(tmp_path / "c.npz", members.items()), f"meta {problem}")


@pytest.mark.parametrize("meta", [[], "noconv", 3, None], ids=["array", "string", "int", "null"])
def test_metadata_must_be_an_object(tmp_path, meta):
    members = with_member("meta.npy", meta_npy(meta))
    refused(write_zip(tmp_path / "c.npz", members.items()), "meta is", "not a JSON object")


def test_metadata_without_arch_is_refused(tmp_path):
    meta = {k: v for k, v in META.items() if k != "arch"}
    members = with_member("meta.npy", meta_npy(meta))
    refused(write_zip(tmp_path / "c.npz", members.items()), "meta has no field arch")


@pytest.mark.parametrize("arch", ["flatten-fc128-relu-fc10", "flatten-fc0128-relu-fc10"])
def test_a_meta_arch_may_be_any_spelling_of_the_network(tmp_path, arch):
    members = with_member("meta.npy", meta_npy({**META, "arch": arch}))
    ckpt = load_checkpoint(write_zip(tmp_path / "c.npz", members.items()))
    assert ckpt.meta["arch"] == arch and set(ckpt.params) == set(state_shapes(get_arch("noconv")))


def test_a_meta_arch_of_another_network_names_the_tensor(tmp_path):
    members = with_member("meta.npy", meta_npy({**META, "arch": "flatten-fc64-relu-fc10"}))
    refused(
        write_zip(tmp_path / "c.npz", members.items()),
        "tensor fc1.weight has shape (128, 784), arch 'flatten-fc64-relu-fc10' expects (64, 784)",
    )


NOCONV_TOML = 'layers = ["flatten", "fc128", "relu", "fc10"]\n'
NOCONV_JSON = '{"layers": ["flatten", {"type": "fc", "features": 128}, "relu", "fc10"]}'


@pytest.mark.parametrize(
    "arch", ["x.toml", "noconv.json", "NOCONV.JSON", "/etc/passwd.json", "../x.toml"]
)
def test_a_meta_arch_naming_a_file_is_refused_without_reading_it(tmp_path, monkeypatch, arch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # Files of those names holding the very network of the tensors: read, they would load.
    for folder in (work, tmp_path):
        (folder / "x.toml").write_text(NOCONV_TOML)
    (work / "noconv.json").write_text(NOCONV_JSON)
    (work / "NOCONV.JSON").write_text(NOCONV_JSON)
    noconv = get_arch("noconv").layers
    assert get_arch("x.toml").layers == get_arch("noconv.json").layers == noconv
    # Read, any of them would load or say it cannot be read; refused as a token, none was.
    members = with_member("meta.npy", meta_npy({**META, "arch": arch}))
    refused(
        write_zip(tmp_path / "c.npz", members.items()),
        f"meta field arch: token {arch!r} is not a layer",
    )


@pytest.mark.parametrize(
    "arch, problem",
    [
        ("conv8-flatten-conv8-fc10", "token 'conv8': its input is already flat"),
        ("flatten-fc128", "the network ends with 128 outputs; it must end with 10"),
        ("flatten-fc128-relu-fc10-", "token '' is not a layer"),
        ("flatten-fc128-rel-fc10", "token 'rel' is not a layer"),
        ("flatten-fc12x8-relu-fc10", "token 'fc12x8' is malformed"),
        ("maxpool3p2-flatten-fc10", "token 'maxpool3p2': padding 2 is more than half its 3x3"),
        ("flatten-dropout1-fc10", "token 'dropout1': drop probability 1.0 is not in [0, 1)"),
        ("flatten-fc100000-fc10", "token 'fc100000': the network has more than 25000000"),
        ("", "the spec is empty"),
        ("relu-" * 1000 + "flatten-fc10", "the spec is 5012 characters, more than 4096"),
        ("relu-" * 70 + "flatten-fc10", "72 layers, more than 64"),
    ],
    ids=[
        "conv-after-flatten",
        "not-10",
        "empty-token",
        "unknown",
        "malformed",
        "pool-padding",
        "dropout-1",
        "too-many-parameters",
        "empty",
        "too-long",
        "too-many-layers",
    ],
)
def test_a_meta_arch_that_is_no_network_names_the_token(tmp_path, arch, problem):
    members = with_member("meta.npy", meta_npy({**META, "arch": arch}))
    refused(write_zip(tmp_path / "c.npz", members.items()), f"meta field arch: {problem}")


def test_a_history_without_its_epoch_is_refused(tmp_path):
    meta = {k: v for k, v in META.items() if k != "epoch"}
    members = with_member("meta.npy", meta_npy(meta))
    refused(
        write_zip(tmp_path / "c.npz", members.items()),
        "history has 2 entries and there is no epoch",
    )


# --- bounded memory and time, and the command line ----------------------------------------

# Inflating it whole would take 1 GiB, far beyond the peak allowed below; deflated at level 1
# it takes about 5 MB, within the size of a noconv checkpoint (about 6.9 MB), so the loader
# must stream it and stop, not refuse it for its file size.
BOMB_BYTES = 2**30
# Loads the checkpoint in argv[1] under a 4 GiB address-space limit (a regression then fails
# at once instead of taking the machine's memory); prints the error and the load's seconds.
LOAD_IN_CHILD = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2**32, 2**32))
from shared.checkpoint import load_checkpoint
from shared.errors import CheckpointError
start = time.perf_counter()
try:
    load_checkpoint(sys.argv[1])
except CheckpointError as e:
    print(e)
print(time.perf_counter() - start)
"""


def write_bomb(path: Path, member: str, header: bytes) -> Path:
    """A checkpoint of about 5 MB whose `member`, `header` then zeros, inflates to 1 GiB:
    streamed in chunks, so writing it takes little memory and a second or so."""
    members = checkpoint_members(momentum=False)
    chunk = bytes(2**24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, content in members.items():
            if name != member:
                zf.writestr(name, content)
        with zf.open(member, "w", force_zip64=True) as stream:
            stream.write(header)
            for _ in range(BOMB_BYTES // len(chunk)):
                stream.write(chunk)
    return path


@pytest.mark.parametrize(
    "member, header, problem",
    [
        ("fc1.weight.npy", npy_header("<f4", (128, 784)), "tensor fc1.weight has data beyond"),
        ("meta.npy", b"\x93NUMPY\x02\x00\xff\xff\xff\xff", "meta has no .npy header"),
    ],
    ids=["tensor", "header"],
)
def test_a_compression_bomb_costs_bounded_memory_and_time(tmp_path, member, header, problem):
    path = write_bomb(tmp_path / "bomb.npz", member, header)
    assert path.stat().st_size < 6 * 2**20  # within what a noconv checkpoint may weigh
    done, peak_mib = run_measured(["-c", LOAD_IN_CHILD, str(path)], tmp_path / "peak")
    message, seconds = done.stdout.splitlines()
    assert done.returncode == 0 and problem in message and str(path) in message
    assert peak_mib < 500, f"peak RSS {peak_mib:.0f} MiB"
    assert float(seconds) < 3


@pytest.mark.parametrize("damage", ["nan", "npy"])
def test_evaluate_refuses_a_bad_checkpoint_in_one_line(tmp_path, tiny_data_dir, damage):
    path = tmp_path / "c.npz"
    if damage == "nan":
        value = np.load(io.BytesIO(checkpoint_members()["fc1.weight.npy"]))
        value[:] = np.nan
        write_zip(path, with_member("fc1.weight.npy", npy(value)).items())
    else:
        path.write_bytes(npy(np.zeros(3)))
    start = time.perf_counter()
    result = run_script(
        "evaluate.py", str(path), "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and str(path) in result.stderr
    problem = "tensor fc1.weight has NaN or inf values" if damage == "nan" else "not a threefold"
    assert problem in result.stderr
    assert time.perf_counter() - start < 120
