"""Checkpoints are untrusted input: every way a file can be wrong ends in one line naming the
file and the member, tensor or metadata field at fault, in bounded memory and time."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
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
from shared.spec import get_arch, init_params
from tests.test_training import ROOT, run_script

META = {
    "arch": "noconv",
    "impl": "numpy",
    "epoch": 2,
    "dataset": "fashion-mnist",
    "data": {"dataset": "fashion-mnist", "sha256": "0" * 64},
    "config": {"lr": 0.1, "epochs": 2},
    "history": [
        {"epoch": 1, "train_loss": 0.9, "val_acc": 0.7},
        {"epoch": 2, "train_loss": 0.6, "val_acc": 0.8},
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
    arch: str = "noconv", meta: Any = None, velocity: bool = True, dtype=np.float32
) -> dict[str, bytes]:
    """The members of a valid checkpoint of `arch`, by name, for a test to edit."""
    params = init_params(get_arch(arch), "he", 0, dtype)
    members = {"meta.npy": meta_npy({**META, "arch": arch} if meta is None else meta)}
    members |= {f"{name}.npy": npy(value) for name, value in params.items()}
    if velocity:
        members |= {f"velocity/{name}.npy": npy(value * 0.5) for name, value in params.items()}
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
    assert ckpt.meta == META and set(ckpt.velocity) == set(ckpt.params)
    assert ckpt.params["fc1.weight"].dtype == np.float32
    ckpt.params["fc1.weight"][0, 0] = 1.0  # the backends update their copies in place
    assert load_checkpoint(path, dtype=np.float64).velocity["fc2.bias"].dtype == np.float64
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
    members = checkpoint_members(meta={"arch": "noconv"}, velocity=False)
    ckpt = load_checkpoint(write_zip(tmp_path / "c.npz", members.items()))
    assert ckpt.meta == {"arch": "noconv"} and ckpt.velocity is None


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


def test_missing_file_and_folder(tmp_path):
    refused(tmp_path / "nothing.npz", "no such checkpoint")
    refused(tmp_path, "cannot read it")


# --- the zip's directory ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["notes.txt", "conv.weight.npy", "fc1.weight", "velocity/meta.npy", "fc1.weight.npy/x.npy"],
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
    del members["velocity/fc1.weight.npy"]
    refused(write_zip(tmp_path / "d.npz", members.items()), "tensor velocity/fc1.weight missing")


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
@pytest.mark.parametrize("name", ["fc1.weight", "velocity/fc2.bias"])
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
    velocity = {k: v.copy() for k, v in params.items()}
    velocity["fc1.bias"][5] = np.nan
    with pytest.raises(CheckpointError, match=r"tensor velocity/fc1\.bias has NaN or inf values"):
        save_checkpoint(tmp_path / "c.npz", params, {"arch": "noconv"}, velocity)
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
        ({"arch": 3}, "field arch is 3, not one of lab, pool, noconv"),
        ({"arch": "vgg\n"}, "field arch is 'vgg\\n'"),
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
        ({"epoch": 1, "history": [{"val_acc": None}]}, "field history entry 1 'val_acc' is null"),
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


def test_a_history_without_its_epoch_is_refused(tmp_path):
    meta = {k: v for k, v in META.items() if k != "epoch"}
    members = with_member("meta.npy", meta_npy(meta))
    refused(
        write_zip(tmp_path / "c.npz", members.items()),
        "history has 2 entries and there is no epoch",
    )


# --- bounded memory and time, and the command line ----------------------------------------

BOMB_BYTES = 2 * 2**30
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
    """A checkpoint of about 10 MB whose `member`, `header` then zeros, inflates to 2 GiB:
    streamed in chunks, so writing it takes little memory and a few seconds."""
    members = checkpoint_members(velocity=False)
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
    assert path.stat().st_size < 16 * 2**20
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        child = subprocess.Popen(
            [sys.executable, "-c", LOAD_IN_CHILD, str(path)], stdout=f, stderr=f, cwd=ROOT
        )
    # This child's own usage: RUSAGE_CHILDREN would also count earlier children of pytest.
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    message, seconds = out.read_text().splitlines()
    assert child.returncode == 0 and problem in message and str(path) in message
    assert usage.ru_maxrss < 500 * 1024, f"peak RSS {usage.ru_maxrss} KiB"
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
