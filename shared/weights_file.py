"""The canonical tensors as a .safetensors file: PyTorch's state_dict names, no pickle, read by
any tool that reads the format (https://huggingface.co/docs/safetensors).

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the bytes. Written here by hand (it is that small) and read with the
bounds of a checkpoint: the header's size and every entry checked against the network before a
tensor's bytes are read, each tensor's values checked for what they mean.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shared.errors import UsageError
from shared.io import atomic_write, once_each, regular_file
from shared.spec import Arch, Params, get_arch, tensors
from shared.tensor_checks import form_problem, value_problem

DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8")}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 2**20  # a header names each tensor in about 80 bytes; 64 layers need 20 KB
SPEC = "threefold.spec"
PIXELS = "threefold.standardise"  # "mean std", or "none" for a network taking its input as is


def write_safetensors(
    path: Path, params: Params, standardise: tuple[float, float] | None = None, spec: str = ""
) -> None:
    """Write `params` (canonical names, in their order) as .safetensors, atomically; the
    network's spec and input scaling go in the header's metadata."""
    header: dict = {"__metadata__": {"format": "pt", PIXELS: _pixels_text(standardise)}}
    if spec:
        header["__metadata__"][SPEC] = spec
    arrays, offset = [], 0
    for name, value in params.items():
        array = np.array(value, dtype=np.asarray(value).dtype.newbyteorder("<"), order="C")
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned, as the format's writer does

    def write(file) -> None:
        file.write(struct.pack("<Q", len(text)) + text)
        for array in arrays:
            file.write(array.tobytes())

    atomic_write(path, write)


def _pixels_text(standardise: tuple[float, float] | None) -> str:
    # As Python floats: a NumPy scalar's repr is "np.float32(0.5)", which no reader parses.
    return "none" if standardise is None else " ".join(repr(float(v)) for v in standardise)


def read_header(file, size: int, where: str) -> tuple[dict, int]:
    """(the header, where the tensors' bytes start), checked to be a JSON object of at most
    MAX_HEADER_BYTES within the file."""
    head = file.read(8)
    if len(head) < 8:
        raise UsageError(f"{where}: not a .safetensors file (shorter than its header length)")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise UsageError(
            f"{where}: its header claims {length} bytes (at most {MAX_HEADER_BYTES}, within "
            f"the file's {size}); not a .safetensors file threefold reads"
        )
    try:
        header = json.loads(
            file.read(length), parse_constant=_no_constant, object_pairs_hook=once_each
        )
    except (ValueError, RecursionError) as error:
        raise UsageError(f"{where}: its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise UsageError(f"{where}: its header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):  # the safetensors library refuses any other
        raise UsageError(f"{where}: its __metadata__ is not an object of strings")
    return header, 8 + length


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def read_safetensors(
    path: Path,
    arch: Arch,
    renames: dict[str, str] | None = None,
    where: str = "--weights",
    unread: Iterable[str] = (),
) -> tuple[Params, str]:
    """(the canonical tensors of `arch` read from a .safetensors file, the file's SHA-256).
    Names are renamed by `renames` (source -> canonical; canonical names are taken as they
    are; names in `unread` passed over). Every other entry must be a tensor of the network,
    of its shape and a float (int64 for a counter), within the file, and finite; every tensor
    must be there."""
    renames = renames or {}
    label = f"{where} {path}"
    expected = tensors(arch)
    with regular_file(path, label) as file:
        size = file.seek(0, 2)
        file.seek(0)
        header, start = read_header(file, size, label)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        checked, names = {}, renamed(entries, renames, expected, label, unread)
        for name, ours in names.items():
            entry = entries[name]
            checked[ours] = _entry(entry, expected[ours], size - start, arch, f"{label}: {name}")
        # Every entry's, an unused module's too: the bytes between them count.
        spans = {name: _span(e, size - start, f"{label}: {name}") for name, e in entries.items()}
        _refuse_gaps_and_overlaps(spans, start, size, label)
        missing = sorted(set(expected) - set(checked))
        if missing:
            raise UsageError(f"{label}: {len(missing)} tensors missing, the first {missing[0]}")
        params = {}
        for ours, (dtype, shape, begin) in checked.items():
            file.seek(start + begin)
            count = math.prod(shape)
            value = np.frombuffer(file.read(count * dtype.itemsize), dtype, count).reshape(shape)
            problem = value_problem(expected[ours], value)
            if problem:
                raise UsageError(f"{label}: {ours} {problem}")
            params[ours] = value.astype(dtype.newbyteorder("="))
        file.seek(0)
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return {name: params[name] for name in expected}, digest


def renamed(
    names: Iterable[str],
    renames: dict[str, str],
    expected: Params,
    label: str,
    unread: Iterable[str] = (),
) -> dict[str, str]:
    """Each of a weights file's names but those `unread` (an unused module's) -> its canonical
    one (`renames`, else the name itself), refused in one line where one is no tensor of the
    network, or where two give one tensor (a module's unused layer named like a canonical
    tensor, not known to be unused, would overwrite a used one's). Names are passed over only
    in a file of the module's own names: in a file of canonical ones, an unused layer's name
    (fc) may be a used one's canonical name."""
    names = list(names)
    own = any(name in renames for name in names)
    canonical, given, passed_over = {}, {}, set(unread) if own else set()
    for theirs in names:
        if theirs in passed_over:
            continue
        ours = renames.get(theirs, theirs)
        if ours not in expected:
            raise UsageError(f"{label}: {theirs} is not a tensor of the network")
        first = given.setdefault(ours, theirs)
        if first != theirs:
            raise UsageError(f"{label}: {first} and {theirs} both give {ours}")
        canonical[theirs] = ours
    return canonical


def _span(entry, data_bytes: int, where: str) -> tuple[int, int]:
    """An entry's data_offsets (begin, end), in order within the tensors' `data_bytes`."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    valid = isinstance(offsets, list) and len(offsets) == 2
    if not (valid and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise UsageError(f"{where}: data_offsets {str(offsets)[:60]} are not a span of bytes")
    if offsets[1] > data_bytes:
        raise UsageError(f"{where}: data_offsets {str(offsets)[:60]} end past the file's end")
    return offsets[0], offsets[1]


def _refuse_gaps_and_overlaps(
    spans: dict[str, tuple[int, int]], start: int, size: int, label: str
) -> None:
    """Refuse a file whose tensors' bytes, in order, do not fill it after the header exactly,
    as the safetensors library does: bytes shared read one tensor as another's, and bytes no
    tensor holds (between them or after the last) are no part of a .safetensors file."""
    end, previous = 0, None
    for begin, stop, name in sorted((begin, stop, name) for name, (begin, stop) in spans.items()):
        if begin < end:
            raise UsageError(f"{label}: {previous} and {name} share bytes of the file")
        if begin > end:
            raise UsageError(f"{label}: the {begin - end} bytes at {start + end} are no tensor's")
        end, previous = stop, name
    if start + end != size:
        raise UsageError(
            f"{label}: its last {size - start - end} bytes are no tensor's (a file cut and "
            "joined to another, or not a .safetensors file)"
        )


def _entry(entry, tensor, data_bytes: int, arch: Arch, where: str) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, first byte) of one header entry, checked against its tensor."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise UsageError(f"{where}: not an entry of dtype, shape and data_offsets")
    dtype, shape = entry["dtype"], entry["shape"]
    if dtype not in DTYPES:
        raise UsageError(f"{where}: dtype {str(dtype)[:20]!r}; threefold reads F32, F64 and I64")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise UsageError(f"{where}: its shape is not a list of sizes")
    problem = form_problem(tensor, DTYPES[dtype], tuple(shape), arch.name)
    if problem:
        raise UsageError(f"{where} {problem}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    begin, end = _span(entry, data_bytes, where)
    if end - begin != nbytes:
        raise UsageError(f"{where}: data_offsets [{begin}, {end}] are not its {nbytes} bytes")
    return DTYPES[dtype], tuple(shape), begin


def read_network_file(path: Path, where: str = "load"):
    """The network a .safetensors file written by threefold holds: its spec from the metadata
    (held to the cost bounds before a tensor is read), its tensors, its input scaling."""
    from shared.network import Network, identity_mapping

    label = f"{where} {path}"
    with regular_file(path, label) as file:
        size = file.seek(0, 2)
        file.seek(0)
        header, _ = read_header(file, size, label)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get(SPEC), str):
        raise UsageError(
            f"{label}: its metadata names no network ({SPEC}); a run takes it as "
            "--arch NETWORK --weights FILE"
        )
    arch = get_arch(metadata[SPEC], f"{label} metadata {SPEC}", files=False)
    params, _ = read_safetensors(path, arch, where=where)
    standardise = _standardise(metadata.get(PIXELS, "none"), f"{label} metadata {PIXELS}")
    network = Network(arch, params, identity_mapping(arch), standardise)
    network.check(label)  # a std so small that pixels overflow, named here, not at export
    return network


def _standardise(text, where: str) -> tuple[float, float] | None:
    if text == "none":
        return None
    try:
        mean, std = (float(v) for v in str(text).split())
    except ValueError:
        raise UsageError(f"{where}: {str(text)[:40]!r} is not 'MEAN STD' or 'none'") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise UsageError(f"{where}: mean {mean} and std {std} must be finite, std > 0")
    return mean, std
