"""Checkpoints: the canonical tensors (and the optimizer's state) in one .npz, with metadata.

Layout: one array per canonical name (`conv.weight`, `bn1.running_mean`, ...: a PyTorch
state_dict's names and layouts), `optimizer/<buffer>/<name>` for the optimizer's state (SGD's
`momentum`; Adam's `exp_avg`, `exp_avg_sq` and `step`; checkpoints written before Adam hold
SGD's as `velocity/<name>`, which still load), and `meta`, a JSON string (the network,
epoch, implementation, metrics, ...). `np.load(path)["conv.weight"]` is all another tool needs
to read the weights; `impl_torch.model.as_module` takes them all.

A checkpoint to load is untrusted input: the loader reads the zip's directory, then each
member's .npy header, and inflates no more bytes than the architecture's tensors take, so a
hostile file costs a bounded amount of memory and time and fails in one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from tokenize import TokenError
from typing import IO, Any

import numpy as np

from shared.config import FIELDS, OPTIMIZER_BUFFERS, check_saved_field
from shared.errors import CheckpointError, UsageError, first_line
from shared.io import atomic_write, regular_file
from shared.layers import Tensor
from shared.spec import (
    MAX_PARAMETERS,
    Arch,
    Params,
    get_arch,
    param_shapes,
    tensors,
)
from shared.tensor_checks import MAX_COUNT, cut, form_problem, tensor_problem, value_problem

_OPTIMIZER = "optimizer/"  # optimizer/BUFFER/PARAMETER: optimizer/momentum/conv.weight, ...
# Checkpoints written before Adam held SGD's momentum buffers as velocity/PARAMETER.
_LEGACY_MOMENTUM = "velocity/"
_META = "meta"
# The metadata is a 0-d unicode array, 4 bytes a character: a million characters of JSON.
_META_MAX_BYTES = 4 * 2**20
# numpy itself refuses .npy headers of more than 10,000 characters.
_HEADER_MAX_BYTES = 2**14
# Stored (np.savez) or deflated (np.savez_compressed): the other methods inflate without bound.
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# What zipfile and zlib raise for a damaged, encrypted or unsupported member.
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, zlib.error)


# A checkpoint's zip directory has a few records per layer: a megabyte is far more than any
# needs, and zipfile reads the whole directory into memory before anything else.
DIRECTORY_MAX_BYTES = 2**20


def _checkpoint_bytes(parameters: int, buffers: int) -> int:
    """Bytes of the biggest checkpoint of a network of this many parameters and buffer values
    (each in float64, the parameters with the largest optimizer state: Adam's two moments and
    steps), the largest metadata, and room for the zip's records."""
    return 8 * (4 * parameters + buffers) + _META_MAX_BYTES + DIRECTORY_MAX_BYTES


def _numel(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


# BatchNorm has as many buffer values (two per feature) as parameters, so buffers are bounded
# by the parameters; the largest file any legal network can write is refused beyond.
_MAX_FILE_BYTES = _checkpoint_bytes(MAX_PARAMETERS, MAX_PARAMETERS)


@dataclass
class Checkpoint:
    params: Params
    meta: dict[str, Any]
    # The optimizer's state tensors by buffer, then parameter (SGD's momentum; Adam's moments
    # and step), if the run saved them.
    optimizer: dict[str, Params] | None = field(default=None)

    @property
    def pixels(self) -> str:
        """How the run's network takes its images ("standardised" or "raw"; runs from before
        the choice existed standardised them)."""
        return self.meta.get("config", {}).get("pixels", "standardised")


def params_digest(params: Params) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes in name order: equal exactly
    when the weights are bit-identical, wherever they were trained."""
    digest = hashlib.sha256()
    for name in sorted(params):
        value = np.ascontiguousarray(params[name])
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: Path,
    params: Params,
    meta: dict[str, Any],
    optimizer: dict[str, Params] | None = None,
) -> None:
    """Write atomically: a reader sees the previous checkpoint or this one, never a mix.
    What the loader would refuse (metadata, a tensor's form or values: NaN weights, a
    negative variance) is refused here, and nothing is written."""
    arrays = dict(params)
    for buffer, values in (optimizer or {}).items():
        arrays.update({f"{_OPTIMIZER}{buffer}/{k}": v for k, v in values.items()})
    where = f"{path}: not written"
    arch = _check_meta(meta, where)
    expected = _expected(arch, _optimizer_of(meta))
    wanted = [k for k in expected if optimizer is not None or not k.startswith(_OPTIMIZER)]
    if sorted(arrays) != sorted(wanted):
        raise CheckpointError(f"{where}: its tensors are not those of arch {arch.name!r}")
    for name, value in arrays.items():
        problem = tensor_problem(expected[name], np.asarray(value), arch.name)
        if problem is not None:
            raise CheckpointError(f"{where}: tensor {name} {problem}")
    text = json.dumps(meta, allow_nan=False)
    if 4 * len(text) > _META_MAX_BYTES:  # as the loader measures it: 4 bytes a character
        raise CheckpointError(f"{where}: its metadata would be more than {_META_MAX_BYTES} bytes")
    arrays[_META] = np.array(text)
    atomic_write(Path(path), lambda f: np.savez(f, **arrays))


# torch.save's files of a state_dict: tensors by name, without the layers they are for.
STATE_DICT_FILES = (".pt", ".pth")
FROM_STATE_DICT = "load it into your module, then threefold.from_torch(module)"


def load_checkpoint(path: Path, dtype: Any = None) -> Checkpoint:
    """Read and validate a checkpoint against the architecture its metadata names; with
    `dtype` (the run's), cast the tensors to it. Anything amiss is one CheckpointError that
    names the file and the member, tensor or metadata field at fault."""
    return _load(path, dtype, with_tensors=True)


def checkpoint_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata alone, checked as `load_checkpoint` checks it (and the file's
    size against its network's), without reading a tensor: what a command needs to refuse a
    flag costs no copy of the weights."""
    return _load(path, None, with_tensors=False).meta


def _load(path: Path, dtype: Any, with_tensors: bool) -> Checkpoint:
    """See load_checkpoint; without `with_tensors`, a Checkpoint of the metadata alone."""
    where = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{where}: no such checkpoint")
    if Path(path).suffix.lower() in STATE_DICT_FILES:  # read, "a zip64 directory" at best
        raise CheckpointError(f"{where}: a state_dict, which names no layers; {FROM_STATE_DICT}")
    try:
        # A FIFO or a device would wait for a writer or never end (/dev/zero).
        with regular_file(path, where) as file:
            return _read_file(file, where, None if dtype is None else np.dtype(dtype), with_tensors)
    except UsageError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read it ({e.strerror or e})") from None


def _read_file(
    file: IO[bytes], where: str, dtype: np.dtype | None, with_tensors: bool
) -> Checkpoint:
    """The checkpoint in an open file, if it is an .npz no larger than any can be."""
    size = os.fstat(file.fileno()).st_size
    if size > _MAX_FILE_BYTES:
        raise CheckpointError(
            f"{where}: not a threefold checkpoint (.npz): {size} bytes, more than any "
            f"network's ({_MAX_FILE_BYTES})"
        )
    try:
        directory = zip_directory_bytes(file)
    except ValueError as e:
        raise CheckpointError(f"{where}: not a threefold checkpoint (.npz): {e}") from None
    if directory is not None and directory > DIRECTORY_MAX_BYTES:
        raise CheckpointError(
            f"{where}: not a threefold checkpoint (.npz): its zip directory is {directory} "
            f"bytes, more than any checkpoint's ({DIRECTORY_MAX_BYTES})"
        )
    try:
        archive = zipfile.ZipFile(file)
    except _ZIP_ERRORS:
        raise CheckpointError(f"{where}: not a threefold checkpoint (.npz)") from None
    with archive:
        return _read(archive, where, dtype, size, with_tensors)


def zip_directory_bytes(file: IO[bytes], zip64: bool = False) -> int | None:
    """The size of a zip's central directory, from its end record, read before zipfile builds
    an entry for each member (None if there is none, which zipfile then reports). A zip64
    directory (torch.save writes one) is read from its own record where `zip64`, else a
    ValueError."""
    end = file.seek(0, os.SEEK_END)
    tail_size = min(end, 22 + 2**16)  # the end record: 22 bytes and a comment of < 64 KiB
    file.seek(end - tail_size)
    tail = file.read(tail_size)
    file.seek(0)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return None
    if tail[max(at - 20, 0) : max(at - 16, 0)] != b"PK\x06\x07":
        return int.from_bytes(tail[at + 12 : at + 16], "little")
    if not zip64:
        # zipfile would take the directory's size from the zip64 record instead: a form only
        # needed past 65,535 members or 4 GiB, which no checkpoint comes near.
        raise ValueError("a zip64 directory")
    file.seek(int.from_bytes(tail[at - 12 : at - 4], "little"))  # the locator's offset
    record = file.read(56)
    file.seek(0)
    if len(record) < 56 or record[:4] != b"PK\x06\x06":
        raise ValueError("a damaged zip64 directory")
    return int.from_bytes(record[40:48], "little")


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a threefold checkpoint under any name: a zip holding its metadata
    (the zip's directory, at its end, tells however large the file)."""
    try:
        with regular_file(path, str(path)) as file, zipfile.ZipFile(file) as archive:
            return _META + ".npy" in archive.namelist()
    # None there, not a regular file (a FIFO would wait for a writer), or not a zip.
    except (OSError, UsageError, zipfile.BadZipFile, ValueError):
        return False


def _read(
    archive: zipfile.ZipFile, where: str, dtype: np.dtype | None, size: int, with_tensors: bool
) -> Checkpoint:
    """The checkpoint in an open zip: its directory, then `meta`, then each tensor (none
    without `with_tensors`)."""
    members = _directory(archive, where)
    if _META + ".npy" not in members:
        raise CheckpointError(f"{where}: not a threefold checkpoint (.npz): no {_META}.npy")
    meta = _read_meta(archive, members.pop(_META + ".npy"), where)
    arch = _check_meta(meta, where)
    params = _numel(param_shapes(arch))
    largest = _checkpoint_bytes(
        params, _numel({k: t.shape for k, t in tensors(arch).items()}) - params
    )
    if size > largest:
        raise CheckpointError(
            f"{where}: {size} bytes, more than a checkpoint of its network can be ({largest})"
        )
    if not with_tensors:
        return Checkpoint({}, meta, None)
    current = {_current_name(name): name for name in members}
    if len(current) < len(members):  # a legacy member beside its current name
        twice = next(n for n in members if _current_name(n) != n and _current_name(n) in members)
        raise CheckpointError(f"{where}: members {_show(twice)} and its current name both hold it")
    members = {name: members[old] for name, old in current.items()}
    stored: dict[str, np.dtype] = {}  # each float tensor's dtype as stored: one for all
    read = {
        key: _read_tensor(archive, info, key, tensor, arch.name, where, dtype, stored)
        for key, (info, tensor) in _tensor_members(members, arch, meta, where).items()
    }
    optimizer: dict[str, Params] = {}
    for key, value in read.items():
        if key.startswith(_OPTIMIZER):
            buffer, param = key[len(_OPTIMIZER) :].split("/", 1)
            optimizer.setdefault(buffer, {})[param] = value
    _check_steps(optimizer.get("step", {}), where)
    params = {k: v for k, v in read.items() if not k.startswith(_OPTIMIZER)}
    return Checkpoint(params, meta, optimizer or None)


def _check_steps(steps: Params, where: str) -> None:
    """Refuse Adam's step counts (one for each parameter, as PyTorch keeps them) that are not
    one whole number: its bias correction divides by 1 - beta**step."""
    values = {float(v) for v in steps.values()}
    if len(values) > 1:
        raise CheckpointError(f"{where}: Adam's step counts differ between parameters")
    step = values.pop() if values else 0.0
    if not step.is_integer():
        raise CheckpointError(f"{where}: Adam's step count {step} is not a whole count")
    if step > MAX_COUNT:
        raise CheckpointError(f"{where}: Adam's step count {step:g} is beyond {MAX_COUNT}")


def _current_name(member: str) -> str:
    """A member's name as checkpoints now write it (a legacy momentum buffer renamed)."""
    if member.startswith(_LEGACY_MOMENTUM):
        return f"{_OPTIMIZER}momentum/{member[len(_LEGACY_MOMENTUM) :]}"
    return member


def _optimizer_of(meta: dict[str, Any]) -> str:
    """The optimizer whose state a checkpoint holds: its run's (SGD before there was another)."""
    return meta.get("config", {}).get("optimizer", "sgd")


def _directory(archive: zipfile.ZipFile, where: str) -> dict[str, zipfile.ZipInfo]:
    """The members by name, each once and stored or deflated."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = _show(info.filename)
        if info.filename in members:
            raise CheckpointError(f"{where}: member {name} appears twice")
        if info.compress_type not in _COMPRESSIONS:
            raise CheckpointError(
                f"{where}: member {name} uses compression method {info.compress_type}; "
                "only stored or deflated members are read"
            )
        members[info.filename] = info
    return members


def _expected(arch: Arch, optimizer: str) -> dict[str, Tensor]:
    """What a checkpoint of `arch` trained by `optimizer` may hold: each canonical tensor, and
    the optimizer's buffers (as free as a trainable float; a step, 0-dimensional) for each
    trainable one."""
    state = {
        f"{_OPTIMIZER}{buffer}/{name}": Tensor(
            () if buffer == "step" else shape,
            True,
            "zero",
            nonnegative=buffer in ("step", "exp_avg_sq"),  # a count, a mean of squares
        )
        for buffer in OPTIMIZER_BUFFERS[optimizer]
        for name, shape in param_shapes(arch).items()
    }
    return tensors(arch) | state


def _tensor_members(
    members: dict[str, zipfile.ZipInfo], arch: Arch, meta: dict[str, Any], where: str
) -> dict[str, tuple[zipfile.ZipInfo, Tensor]]:
    """Each tensor member with what `arch` says of it: every parameter, and either all the
    optimizer's buffers or none; any other member is foreign."""
    expected = _expected(arch, _optimizer_of(meta))
    for name, info in members.items():
        if not name.endswith(".npy") or name.removesuffix(".npy") not in expected:
            shown = _show(info.filename)  # as the file names it
            raise CheckpointError(
                f"{where}: member {shown} is not part of a checkpoint of arch {arch.name!r}"
            )
    has_state = any(name.startswith(_OPTIMIZER) for name in members)
    wanted = [n for n in expected if has_state or not n.startswith(_OPTIMIZER)]
    for key in wanted:
        if key + ".npy" not in members:
            raise CheckpointError(f"{where}: tensor {key} missing (arch {arch.name!r})")
    return {key: (members[key + ".npy"], expected[key]) for key in wanted}


def _read_meta(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Any:
    """The parsed JSON of the `meta` member, a 0-d unicode array of bounded size."""

    def check(dtype: np.dtype, shape: tuple[int, ...]) -> None:
        if dtype.kind != "U" or shape != () or dtype.itemsize == 0:
            raise CheckpointError(
                f"{where}: meta is not a JSON string (dtype {cut(str(dtype))}, "
                f"shape {cut(str(shape))})"
            )
        if dtype.itemsize > _META_MAX_BYTES:
            raise CheckpointError(
                f"{where}: meta is {dtype.itemsize} bytes, more than {_META_MAX_BYTES}"
            )

    array = _read_npy(archive, info, _META, where, check)
    try:
        # Decoded here, not by numpy, which fails with a SystemError on an invalid code point.
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        return json.loads(raw.decode("utf-32-le").rstrip("\0"))
    except (ValueError, RecursionError) as e:
        # ValueError: invalid code points or JSON; RecursionError: JSON nested too deep.
        raise CheckpointError(f"{where}: meta is not valid JSON ({first_line(e)})") from None


def _read_tensor(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    key: str,
    tensor: Tensor,
    arch: str,
    where: str,
    dtype: np.dtype | None,
    floats: dict[str, np.dtype],
) -> np.ndarray:
    """`tensor`'s stored array, of its form and with values it can hold, its float dtype that
    of the `floats` read before it (added to them); a float cast to `dtype` (if given)
    without overflow, a counter as int64."""

    def check(stored: np.dtype, stored_shape: tuple[int, ...]) -> None:
        problem = form_problem(tensor, stored, stored_shape, arch)
        if problem is not None:
            raise CheckpointError(f"{where}: tensor {key} {problem}")
        if not tensor.counter:
            first = next(iter(floats.items()), (key, stored))
            if first[1].newbyteorder("=") != stored.newbyteorder("="):
                raise CheckpointError(
                    f"{where}: tensor {key} is {stored.name} where {first[0]} is "
                    f"{first[1].name}; a network computes in one dtype"
                )
            floats[key] = stored

    value = _read_npy(archive, info, f"tensor {key}", where, check)
    problem = value_problem(tensor, value)
    if problem is not None:
        raise CheckpointError(f"{where}: tensor {key} {problem}")
    if tensor.counter:
        return value.astype(np.int64)
    if dtype is None:
        return value.astype(value.dtype.newbyteorder("="))
    with np.errstate(over="ignore"):
        cast = value.astype(dtype)
    if not np.isfinite(cast).all():
        raise CheckpointError(f"{where}: tensor {key} has values beyond {dtype}'s range")
    return cast


def _read_npy(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    label: str,
    where: str,
    check: Callable[[np.dtype, tuple[int, ...]], None],
) -> np.ndarray:
    """The array in one .npy member. Its header is read from a bounded prefix and `check`ed
    before any data is inflated; then exactly the bytes the header implies (+1, to notice
    trailing data) are, never what the zip's directory declares."""
    with _member(archive, info, label, where) as stream:
        head = stream.read(_HEADER_MAX_BYTES)
        dtype, shape, start = _header(head, label, where)
        check(dtype, shape)
        size = math.prod(shape) * dtype.itemsize
        data = head[start : start + size + 1]
        data += stream.read(size + 1 - len(data))
    if len(data) < size:
        raise CheckpointError(f"{where}: {label} is truncated ({len(data)} of {size} bytes)")
    if len(data) > size:
        raise CheckpointError(f"{where}: {label} has data beyond its {size} bytes")
    return np.frombuffer(data, dtype).reshape(shape)


@contextmanager
def _member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, where: str
) -> Iterator[IO[bytes]]:
    """The member's stream; zipfile's and zlib's errors (bad CRC, corrupt deflate data, an
    encrypted member) become one line naming it."""
    try:
        with archive.open(info) as stream:
            yield stream
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{where}: {label} is damaged ({first_line(e)})") from None


def _header(head: bytes, label: str, where: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """dtype, shape and data offset of the .npy header at the start of `head`."""
    buffer = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"version {version}")
    except (ValueError, TypeError, SyntaxError, OverflowError, RecursionError, TokenError):
        # numpy's own messages would advise loading with allow_pickle; its parser of old
        # headers tokenizes them, and an unterminated bracket ends in a TokenError.
        raise CheckpointError(
            f"{where}: {label} has no .npy header of version 1.0 or 2.0"
        ) from None
    if fortran_order:
        raise CheckpointError(f"{where}: {label} is stored in Fortran order")
    return dtype, shape, buffer.tell()


def _check_meta(meta: Any, where: str) -> Arch:
    """The network `meta` names, after refusing any field of the wrong type or shape."""

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: meta {problem}")

    if not isinstance(meta, dict):
        raise refuse(f"is {_json_type(meta)}, not a JSON object")
    if "arch" not in meta:
        raise refuse("has no field arch")
    if not isinstance(meta["arch"], str):
        raise refuse(f"field arch is {_json_type(meta['arch'])}, not a network's name or spec")
    try:
        # Never a file: a checkpoint names its network by a preset or its canonical spec.
        arch = get_arch(meta["arch"], where=f"{where}: meta field arch", files=False)
    except UsageError as e:
        raise CheckpointError(str(e)) from None
    for name, kind in (("impl", str), ("dataset", str), ("config", dict), ("data", dict)):
        if name in meta and not isinstance(meta[name], kind):
            raise refuse(f"field {name} is {_json_type(meta[name])}, not {_json_type(kind())}")
    for name in ("impl", "dataset"):
        if name in meta and meta[name] not in FIELDS[name].choices:
            shown = _show(meta[name])
            raise refuse(f"field {name} is {shown}, not one of {', '.join(FIELDS[name].choices)}")
    # Every stored setting a command may read is checked as its flag is (a run's whole
    # configuration, field by field, is checked again when it is resumed).
    for name, value in meta.get("config", {}).items():
        if name in FIELDS:
            check_saved_field(name, value, where)
    epoch = meta.get("epoch", 0)
    if type(epoch) is not int or epoch < 0:
        raise refuse(f"field epoch is {_json_type(epoch)}, not an integer >= 0")
    if "history" in meta:
        history = meta["history"]
        if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
            raise refuse("field history is not an array of objects")
        if "epoch" not in meta:
            raise refuse(f"field history has {len(history)} entries and there is no epoch")
        if len(history) != epoch:
            raise refuse(f"field history has {len(history)} entries for epoch {epoch}")
        for i, entry in enumerate(history, 1):
            _check_history_entry(entry, i, refuse)
    return arch


# An epoch's history entry (shared/loop.py's evaluate_epoch): the validation's figures are null
# in a run that holds no images out to validate on.
HISTORY_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "train_seconds",
    "epoch_seconds",
)
_MAY_BE_NULL = ("val_loss", "val_acc")


def _check_history_entry(entry: dict, i: int, refuse: Callable[[str], CheckpointError]) -> None:
    """Entry i of a run's history: finite numbers within float's range (or null where there
    was no validation), exactly the fields an epoch records, its epoch its place."""
    for name, value in entry.items():
        if value is None and name in _MAY_BE_NULL:
            continue
        if not _finite_number(value):
            raise refuse(
                f"field history entry {i} {_show(name)} is {_json_type(value)}, not a finite number"
            )
    if set(entry) != set(HISTORY_FIELDS):
        differ = ", ".join(sorted(set(entry) ^ set(HISTORY_FIELDS)))
        raise refuse(f"field history entry {i} has other fields than an epoch's ({differ})")
    if entry["epoch"] != i:
        raise refuse(f"field history entry {i} is of epoch {_json_type(entry['epoch'])}")
    for name, value in entry.items():  # losses and times are >= 0, accuracies shares
        high = 1 if name.endswith("_acc") else math.inf
        if value is not None and not 0 <= value <= high:
            raise refuse(f"field history entry {i} {_show(name)} is {_json_type(value)}")


def _finite_number(value: Any) -> bool:
    """A finite float, or an int within float's range (a JSON integer may have any size)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= sys.float_info.max
    return isinstance(value, float) and math.isfinite(value)


def _json_type(value: Any) -> str:
    """What a JSON value is, for a message (never the value itself, which may be huge)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) or abs(value) < 10**12 else "a big integer"
    names = {str: "a string", list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(text: str) -> str:
    """`text` quoted on one line and cut short, for a message."""
    return cut(repr(text))
