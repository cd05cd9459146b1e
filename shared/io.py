"""Writing files so that a crash or Ctrl-C never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it into place.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what `atomic_write` leaves when its process is killed mid-write: hidden
    `.NAME.*.tmp` files, which never look like data but should not pile up."""
    for leftover in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
