"""A user's PyTorch files, read as untrusted input: a model file FILE.py:NAME (executed, as
importing it would be) and a state_dict saved by torch.save, its inflated size bounded before
torch.load reads it. The module they hold becomes a network in shared/torch_import.py."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.checkpoint import DIRECTORY_MAX_BYTES, zip_directory_bytes
from shared.errors import USER_CODE_ERRORS, UsageError, first_line
from shared.network import Network
from shared.spec import Arch, Params, tensors
from shared.torch_import import canonical_array, from_torch
from shared.weights_file import renamed

# A model file is a Python module the user names; a weights file holds one state_dict.
MAX_MODEL_FILE_BYTES = 2**20
MAX_WEIGHTS_FILE_BYTES = 2**30
ZIP_SLACK_BYTES = 2**20  # a state_dict zip's names, pickle and alignment, beyond the data


def load_module_file(text: str, where: str = "--arch", seed: int = 0) -> tuple[Any, str]:
    """The module FILE.py:NAME builds (NAME a class or function called with no arguments, or
    a module itself: `Net = nn.Sequential(...)`), and the label naming it. The file is
    executed, as importing it would, with torch's random numbers seeded by `seed` (and the
    caller's left as they were): the weights its layers draw are the same on every call."""
    path_text, _, name = text.rpartition(":")
    path, label = Path(path_text), f"{where} {text}"
    if not path.is_file():
        raise UsageError(f"{label}: {path} is not a file")
    if path.stat().st_size > MAX_MODEL_FILE_BYTES:
        raise UsageError(f"{label}: {path} is larger than {MAX_MODEL_FILE_BYTES} bytes")
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _built_module(path, name, label), label


def _built_module(path: Path, name: str, label: str) -> Any:
    """What NAME is in the Python file `path` once executed: a module, or what calling it
    gives; the user's errors in one UsageError naming `label`."""
    import torch

    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(f"threefold_model_{digest}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{label}: {path} cannot be loaded as Python")
    namespace = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(namespace)
    except USER_CODE_ERRORS as error:  # the user's file: any error is theirs
        raise UsageError(f"{label}: running {path.name} raised {first_line(error)}") from None
    if not hasattr(namespace, name):
        defined = sorted(k for k, v in vars(namespace).items() if callable(v) and k[0] != "_")
        raise UsageError(f"{label}: {path.name} defines no {name} (it has {', '.join(defined)})")
    built = getattr(namespace, name)
    if isinstance(built, torch.nn.Module):  # called, it would run its forward on nothing
        return built
    try:
        return built()
    except USER_CODE_ERRORS as error:
        raise UsageError(f"{label}: {name}() raised {first_line(error)}") from None


def import_file(text: str, where: str = "--arch", seed: int = 0) -> Network:
    """The network of a model file FILE.py:NAME, its weights drawn from `seed`."""
    module, label = load_module_file(text, where, seed)
    return from_torch(module, label)


def _refuse_inflating(path: Path, expected: dict, label: str) -> None:
    """torch.save writes a zip, whose members may be compressed: a small file could inflate
    to gigabytes in torch.load. Refuse members that add up to more than the network's tensors
    in float64, and the zip's own bookkeeping (an older, unzipped file is as large as what
    it holds)."""
    bound = 8 * sum(math.prod(t.shape) for t in expected.values()) + ZIP_SLACK_BYTES
    with path.open("rb") as file:
        if file.read(4) != b"PK\x03\x04":  # torch.load's own test of a zip
            return
        try:
            directory = zip_directory_bytes(file, zip64=True)
            if directory is not None and directory > DIRECTORY_MAX_BYTES:
                raise ValueError(f"a zip directory of {directory:,} bytes")
            with zipfile.ZipFile(file) as archive:
                inflated = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            why = f"not a state_dict torch.load can read ({error})"
            raise UsageError(f"{label}: {why}") from None
    if inflated > bound:
        raise UsageError(
            f"{label}: holds {inflated:,} bytes once inflated, more than the network's "
            f"tensors can take ({bound:,})"
        )


def load_state_dict_file(
    path: Path, arch: Arch, renames: dict[str, str], where: str, unread: Iterable[str] = ()
) -> tuple[Params, str]:
    """A state_dict file (torch.save) read with `torch.load(weights_only=True)` -> (the
    canonical tensors of `arch`, the file's SHA-256), renamed by `renames` (the module's
    names -> canonical; canonical names are taken as they are; names in `unread` passed
    over). Every tensor must be there, of its shape, and finite."""
    import torch

    label = f"{where} {path}"
    if not path.is_file():
        raise UsageError(f"{label}: not a file")
    if path.stat().st_size > MAX_WEIGHTS_FILE_BYTES:
        raise UsageError(f"{label}: larger than {MAX_WEIGHTS_FILE_BYTES} bytes")
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    expected = tensors(arch)
    _refuse_inflating(path, expected, label)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever the file holds, one line
        # torch's own message runs on to "two options", which its first line cuts off.
        unpickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and unpickled:  # a whole module, often
            raise UsageError(
                f"{label}: a pickled {unpickled[1][-60:]}, which torch.load(weights_only=True) "
                "does not run; save the state_dict alone, a dict of tensors "
                "(module.state_dict())"
            ) from None
        why = first_line(error)
        raise UsageError(f"{label}: not a state_dict torch.load can read ({why})") from None
    # A bare tensor's values() is a sparse tensor's method: the dict is asked first.
    is_dict = isinstance(loaded, dict)
    if not is_dict or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UsageError(f"{label}: holds a {type(loaded).__name__}, not a state_dict of tensors")
    weights, names = {}, renamed(loaded, renames, expected, label, unread)
    for theirs, ours in names.items():
        weights[ours] = canonical_array(loaded[theirs], expected[ours], f"{label}: {theirs}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        theirs = {ours: theirs for theirs, ours in renames.items()}.get(missing[0], missing[0])
        named = theirs if theirs == missing[0] else f"{theirs} ({missing[0]})"
        raise UsageError(f"{label}: {len(missing)} tensors missing, the first {named}")
    return weights, digest
