"""Checkpoints: the canonical parameters (and momentum buffers) in one .npz, with metadata.

Layout: one array per canonical name (`conv.weight`, ...), `velocity/<name>` for the momentum
buffers, and `meta`, a JSON string (architecture, epoch, implementation, metrics, ...).
`np.load(path)["conv.weight"]` is all another tool needs to read the weights.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import CheckpointError, UsageError
from shared.io import atomic_write
from shared.spec import Params, check_params, get_arch

_VELOCITY = "velocity/"


@dataclass
class Checkpoint:
    params: Params
    meta: dict[str, Any]
    velocity: Params | None = field(default=None)


def save_checkpoint(
    path: Path, params: Params, meta: dict[str, Any], velocity: Params | None = None
) -> None:
    """Write atomically: a reader sees the previous checkpoint or this one, never a mix."""
    arrays = dict(params)
    if velocity is not None:
        arrays.update({_VELOCITY + k: v for k, v in velocity.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and validate a checkpoint against the architecture its metadata names."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None
    if "meta" not in arrays or arrays["meta"].dtype.kind != "U":
        raise CheckpointError(f"{path}: no metadata (not a threefold checkpoint)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
        arch = get_arch(meta["arch"])
    except (json.JSONDecodeError, KeyError, TypeError, UsageError) as e:
        raise CheckpointError(f"{path}: unreadable metadata ({e})") from None
    velocity = {k[len(_VELOCITY) :]: arrays.pop(k) for k in list(arrays) if k.startswith(_VELOCITY)}
    for name, value in arrays.items():
        if value.dtype.kind != "f":
            raise CheckpointError(f"{path}: tensor {name} has dtype {value.dtype}, not float")
    check_params(arrays, arch, str(path))
    if velocity:
        check_params(velocity, arch, f"{path} (momentum buffers)")
    return Checkpoint(arrays, meta, velocity or None)
