"""The IDX format of the MNIST family: a header of dims, then unsigned bytes, raw or gzipped.

Files are untrusted: the header is read and checked against what the caller expects before the
body is read or inflated, so no file, whatever it claims or inflates to, makes the reader
allocate more than its declared (and bounded) size.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np

from shared.errors import DataError
from shared.io import read_start

_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
# No IDX file this project reads comes near this (the largest, 60,000 training images, is
# 47 MB): it bounds what a header can make the reader allocate, whatever the file claims.
MAX_IDX_BYTES = 1 << 26
# The body is read (and a gzip stream inflated) this much at a time.
_CHUNK = 1 << 20
# A gzip stream is at most a little larger than what it holds (deflate's stored blocks add
# 5 bytes per 64 KiB); the slack covers the gzip header's optional name and comment fields.
_GZIP_SLACK = 1 << 16


@dataclass(frozen=True)
class IdxExpect:
    """What an IDX file may declare: up to `max_items` items of `item_shape` each, e.g. the
    official count of images (28, 28) or of labels ()."""

    what: str  # "images" or "labels", for the messages
    item_shape: tuple[int, ...]
    max_items: int


class IdxHeader(NamedTuple):
    """An IDX header: the dims it declares and its own bytes (4 + 4 * ndim of them)."""

    dims: tuple[int, ...]
    raw: bytes

    @property
    def size(self) -> int:
        """Bytes the whole file must hold, header included."""
        return len(self.raw) + math.prod(self.dims)

    def describe(self) -> str:
        return f"header says {_shape(self.dims)} ({self.size} bytes)"


class IdxContent(NamedTuple):
    """An IDX file read: its array (the header's dims, uint8) and the SHA-256 of its whole
    uncompressed bytes, header included (what OfficialFile.content_sha256 pins)."""

    array: np.ndarray
    sha256: str


def is_idx_file(path: Path) -> bool:
    """Whether `path` is an IDX file of bytes, raw or gzipped, under any name: its first 4
    bytes (inflated from at most the file's first 64 KiB) are an IDX magic number."""
    start = read_start(path, 1 << 16)
    if start is None:  # none there, or not a file to read
        return False
    if start.startswith(_GZIP_MAGIC):
        try:
            start = zlib.decompressobj(wbits=31).decompress(start, 4)
        except zlib.error:
            return False
    return _is_idx_magic(start[:4])


def _is_idx_magic(magic: bytes) -> bool:
    """Whether 4 bytes are an IDX magic number of unsigned bytes: 0x000008 then 1 to 4 dims."""
    return len(magic) == 4 and magic[:3] == bytes([0, 0, _IDX_UBYTE]) and 1 <= magic[3] <= 4


def _shape(dims: tuple[int, ...]) -> str:
    return "x".join(map(str, dims))


def _read_header(stream: BinaryIO, name: str) -> IdxHeader:
    """The magic number and dims at the start of an uncompressed IDX stream; reads only them."""
    magic = stream.read(4)
    if len(magic) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(magic)} bytes)")
    if not _is_idx_magic(magic):
        raise DataError(
            f"{name}: bad magic number 0x{magic.hex()} (expected 0x000008 followed by 01..04)"
        )
    dims_raw = stream.read(4 * magic[3])
    if len(dims_raw) < 4 * magic[3]:
        raise DataError(
            f"{name}: truncated header ({4 + len(dims_raw)} of {4 + 4 * magic[3]} bytes)"
        )
    dims = tuple(int.from_bytes(dims_raw[i : i + 4], "big") for i in range(0, len(dims_raw), 4))
    return IdxHeader(dims, magic + dims_raw)


def _check_declared(header: IdxHeader, name: str, expect: IdxExpect | None) -> None:
    """Refuse a header whose dims do not fit `expect`, or declare a body larger than
    MAX_IDX_BYTES, before a byte of the body is read."""
    dims = header.dims
    if expect is not None:
        ndim = 1 + len(expect.item_shape)
        if len(dims) != ndim:
            axes = ", ".join(("N", "H", "W")[:ndim])
            plural = "s" if ndim > 1 else ""
            raise DataError(
                f"{name}: expected {ndim} dimension{plural} ({axes}), found {len(dims)}"
            )
        if dims[1:] != expect.item_shape:
            raise DataError(
                f"{name}: {expect.what} are {_shape(dims[1:])}, "
                f"the network takes {_shape(expect.item_shape)}"
            )
        if dims[0] > expect.max_items:
            raise DataError(
                f"{name}: header says {dims[0]} {expect.what}, "
                f"more than the official file's {expect.max_items}"
            )
    # Zeros skipped: an empty file's other dims must still make a shape numpy can hold.
    if math.prod(d or 1 for d in dims) > MAX_IDX_BYTES:
        raise DataError(
            f"{name}: header says {_shape(dims)}, "
            f"more than any IDX file read here ({MAX_IDX_BYTES} bytes)"
        )


def _size_error(name: str, header: IdxHeader, held: int | None) -> DataError:
    """A body shorter or longer than the header says; `held`: the file's uncompressed size,
    None when only known to be larger."""
    if held is not None and held < header.size:
        return DataError(f"{name}: truncated: {header.describe()}, file holds {held}")
    holds = "more" if held is None else held
    return DataError(f"{name}: has trailing bytes: {header.describe()}, file holds {holds}")


def _check_stored_size(header: IdxHeader, name: str, stored: int, gzipped: bool) -> None:
    """Compare the file's size on disk with what its header declares, before reading on: a raw
    file must match exactly, a gzip stream cannot be much larger than what it holds."""
    if not gzipped and stored != header.size:
        raise _size_error(name, header, stored)
    if gzipped and stored > _largest_gzip(header.size):
        raise DataError(
            f"{name}: has trailing bytes: {header.describe()}, yet the file holds {stored} "
            "bytes of gzip"
        )


def _largest_gzip(size: int) -> int:
    """The most bytes a gzip stream of `size` bytes may take: stored blocks and headers."""
    return size + size // 256 + _GZIP_SLACK


def _check_file_size(name: str, stored: int, expect: IdxExpect | None) -> None:
    """Refuse a file larger than any IDX file `expect` allows (any read here without it) could
    be, gzipped, before a byte is read: gzip reads the name field of its header a byte at a
    time, and a file of 100 MB of name took 8.5 s to refuse."""
    most = MAX_IDX_BYTES
    if expect is not None:
        ndim = 1 + len(expect.item_shape)
        most = 4 + 4 * ndim + expect.max_items * math.prod(expect.item_shape)
    if stored > _largest_gzip(most):
        what = "IDX file read here" if expect is None else f"file of {expect.what}"
        raise DataError(f"{name}: {stored:,} bytes, more than any {what} can be")


def _read_body(stream: BinaryIO, header: IdxHeader, name: str) -> IdxContent:
    """The body after `header`, read in chunks into an array of the header's dims and hashed
    after the header as it comes; one byte more than declared is refused, never inflated."""
    digest = hashlib.sha256(header.raw)
    body = np.empty(header.size - len(header.raw), np.uint8)
    view = memoryview(body)
    done = 0
    while done < len(body):
        n = stream.readinto(view[done : done + _CHUNK])
        if not n:
            raise _size_error(name, header, len(header.raw) + done)
        digest.update(view[done : done + n])
        done += n
    if stream.read(1):
        raise _size_error(name, header, None)
    return IdxContent(body.reshape(header.dims), digest.hexdigest())


# Each member hands what follows it in the read on to the next: 2.4 million empty members, in
# what a file of images may take, took 35 s to read (Python's gzip 9.5 s). The official
# files are one member each.
_MOST_MEMBERS = 1024


class _TooManyMembers(Exception):
    """A gzip of more than _MOST_MEMBERS members: no damage, but no data file's either."""


class _Gunzip(io.RawIOBase):
    """A gzip file's members inflated by zlib, headers included, at most a read's size at a
    time. Not Python's gzip, which reads a header's name field a byte at a time: a file of
    47 MB of name took 11 s to refuse. Zero bytes after a member are padding, as for gzip;
    a truncated member is an EOFError, a damaged one a zlib.error."""

    def __init__(self, file: BinaryIO):
        self.file, self.inflate = file, zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.members = 1

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        while len(buffer):
            if self.inflate.eof:  # a member ended: another may follow, after padding
                rest = self.inflate.unused_data.lstrip(b"\0")
                while not rest:
                    chunk = self._read()
                    if not chunk:
                        return 0
                    rest = chunk.lstrip(b"\0")
                self.members += 1
                if self.members > _MOST_MEMBERS:
                    raise _TooManyMembers()
                self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                data = rest
            else:
                data = self.inflate.unconsumed_tail or self._read()
                if not data:
                    raise EOFError("the stream ends inside a member")
            out = self.inflate.decompress(data, len(buffer))
            if out:
                buffer[: len(out)] = out
                return len(out)
        return 0

    def _read(self) -> bytes:
        return self.file.read(_CHUNK)


def _read_stream(
    stream: BinaryIO, name: str, stored: int, gzipped: bool, expect: IdxExpect | None
) -> IdxContent:
    """Header, checks, then body of an uncompressed IDX stream; `stored`: the file's size
    on disk (compressed if `gzipped`)."""
    header = _read_header(stream, name)
    _check_declared(header, name, expect)
    _check_stored_size(header, name, stored, gzipped)
    return _read_body(stream, header, name)


def read_idx_content(
    path: Path, expect: IdxExpect | None = None, label: str | None = None
) -> IdxContent:
    """Read an IDX file of unsigned bytes, gzip-compressed or raw, as untrusted input: the
    header is checked against `expect` and the size on disk before the body is read, and a
    gzip stream is never inflated beyond what its header declares (+1 byte). Errors name
    `label` (default: the path)."""
    gzipped, label = False, label or str(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == _GZIP_MAGIC
            f.seek(0)
            stored = os.fstat(f.fileno()).st_size
            _check_file_size(label, stored, expect)
            stream = io.BufferedReader(_Gunzip(f), _CHUNK) if gzipped else f
            return _read_stream(stream, label, stored, gzipped, expect)
    except _TooManyMembers:
        raise DataError(
            f"{label}: a gzip of more than {_MOST_MEMBERS:,} members, more than any data file's"
        ) from None
    except (OSError, EOFError, zlib.error) as e:
        if gzipped:
            raise DataError(f"{label}: corrupt or truncated gzip stream ({e})") from None
        raise DataError(f"{label}: cannot read ({e.strerror or e})") from None


def read_idx(path: Path, expect: IdxExpect | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes, gzip-compressed or raw -> array of its header's
    shape; see read_idx_content."""
    return read_idx_content(path, expect).array


def parse_idx(raw: bytes, name: str, expect: IdxExpect | None = None) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file; `name` labels the errors."""
    return _read_stream(io.BytesIO(raw), name, len(raw), False, expect).array
