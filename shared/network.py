"""A network in threefold's terms, wherever it came from (a spec, a PyTorch module, an ONNX
graph, a checkpoint): its layers, its canonical tensors, how each operation of the source was
taken, and the input scaling it expects; and the ways out of it (PyTorch, ONNX, safetensors)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.checkpoint import STATE_DICT_FILES, is_checkpoint, load_checkpoint
from shared.config import real_number
from shared.data import data_files, get_dataset_spec
from shared.errors import CheckpointError, UsageError
from shared.io import a_path
from shared.kinds import KINDS, kind_of, token
from shared.layers import Residual
from shared.outputs import check_nothing_kept
from shared.spec import Arch, Params, cast_params, float_dtype, get_arch, is_onnx_file, tensors
from shared.tensor_checks import tensor_problem


@dataclass(frozen=True)
class Mapped:
    """How one operation of the source was taken: `source` is the submodule's path (or the
    functional call's or ONNX node's name), `what` the operation as its framework prints it,
    `token` the layer it became with every option written ("" when dropped, `note` says
    why), `tensors` the (source's name, canonical name) of each of its tensors, and `block`
    the residual block it is inside, if any (the block's own row is its add)."""

    source: str
    what: str
    token: str
    note: str = ""
    tensors: tuple[tuple[str, str], ...] = ()
    block: str = ""  # the residual block it is a layer of, whose row's token holds its own


@dataclass(frozen=True)
class Network:
    """A network in threefold: `arch` (its layers), `tensors` (canonical names, NumPy: a
    module's own values, a checkpoint's, or drawn), `mapping` (each operation of the source
    and what it became), `standardise`: the (mean, std) its raw [0, 1] pixels are
    standardised with before the first layer, or None when it takes its input as it is, and
    `unread`: the source's tensors of modules its forward never calls (an unused head)."""

    arch: Arch
    tensors: Params
    mapping: tuple[Mapped, ...]
    standardise: tuple[float, float] | None = None
    unread: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """The network's spec with every option written out, as PyTorch computes it."""
        return "-".join(token(layer, every=True) for layer in self.arch.layers)

    @property
    def renames(self) -> dict[str, str]:
        """The module's state_dict names -> canonical names."""
        return {theirs: ours for m in self.mapping for theirs, ours in m.tensors}

    @property
    def copies(self) -> dict[str, list[str]]:
        """Each source tensor fed to more than one layer (an ONNX initialiser two layers
        share) -> the canonical names of the copies threefold trains apart."""
        taken: dict[str, list[str]] = {}
        for m in self.mapping:
            for theirs, ours in m.tensors:
                taken.setdefault(theirs, []).append(ours)
        return {theirs: ours for theirs, ours in taken.items() if len(ours) > 1}

    def describe(self) -> str:
        """The mapping as a table: each source operation, the layer it became, its tensors."""
        rows = [("source", "operation", "threefold", "tensors")]
        if self.standardise is not None:
            mean, std = map(float, self.standardise)  # a Fraction has no format of its own
            rows.append(("(input)", f"(x - {mean:.6g}) / {std:.6g}", "standardise", ""))
        for m in self.mapping:
            moved = ", ".join(f"{a} -> {b}" if a != b else a for a, b in m.tensors)
            token = m.token or f"(dropped: {m.note})"
            rows.append(
                (m.source, m.what, f"  {token} (in {m.block})" if m.block else token, moved)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
            for r in rows
        ).rstrip()

    def check(self, where: str) -> None:
        """Refuse, in one UsageError starting with `where`, a network whose tensors are not
        its layers' (missing, extra, of another dtype or shape) or hold what no network can
        (NaN, a negative variance), or whose input scaling is not a finite mean and a
        positive std: a network built by hand, or altered after it was read."""
        if not isinstance(self.arch, Arch):
            raise UsageError(
                f"{where}: arch is a {type(self.arch).__name__}, not an Arch "
                "(threefold.network(spec).arch)"
            )
        if not isinstance(self.tensors, dict):
            raise UsageError(f"{where}: tensors is a {type(self.tensors).__name__}, not a dict")
        if not (
            isinstance(self.mapping, tuple) and all(isinstance(m, Mapped) for m in self.mapping)
        ):
            raise UsageError(
                f"{where}: mapping is a {type(self.mapping).__name__}, not a tuple of Mapped "
                "(keep the one of the network it was made from)"
            )
        expected = tensors(self.arch)
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing:
            raise UsageError(f"{where}: tensor {missing[0]} is missing ({len(missing)} in all)")
        if extra:
            raise UsageError(f"{where}: {extra[0]} is not a tensor of the network")
        for name, tensor in expected.items():
            value = self.tensors[name]
            # A masked array hides its NaN from np.isfinite; a memmap is an array like any.
            if not isinstance(value, np.ndarray) or isinstance(value, np.ma.MaskedArray):
                raise UsageError(
                    f"{where}: tensor {name} is a {type(value).__name__}, not a plain NumPy array"
                )
            if not value.dtype.isnative:  # torch.from_numpy refuses it; the kernels would swap
                raise UsageError(
                    f"{where}: tensor {name} is {value.dtype.str}, not in this machine's byte "
                    f"order; pass it as .astype({value.dtype.name!r})"
                )
            problem = tensor_problem(tensor, value, self.arch.name)
            if problem is not None:
                raise UsageError(f"{where}: tensor {name} {problem}")
        floats = {name: v.dtype for name, v in self.tensors.items() if v.dtype.kind == "f"}
        if len(set(floats.values())) > 1:
            most = Counter(floats.values()).most_common(1)[0][0]  # the odd one is named
            other = next(name for name, dtype in floats.items() if dtype != most)
            raise UsageError(
                f"{where}: tensor {other} is {floats[other]} where others are {most}; a "
                "network computes in one dtype"
            )
        # In the network's own dtype: a std of 1e-40 makes float32 pixels inf.
        _check_scaling(self.standardise, float_dtype(self.tensors).type, where)

    def to_onnx(self, path: str | Path) -> Path:
        """Write the network as an ONNX graph (float32, a dynamic batch axis, opset
        `shared.onnx_export.OPSET`) taking raw [0, 1] pixels where it standardises them;
        checked by onnx.checker before it is written, atomically. Returns the path."""
        from shared.onnx_export import onnx_model, require_onnx, write_onnx

        require_onnx()
        path = _an_output(path, "to_onnx")
        self.check(str(path))
        try:  # the graph is float32: a float64 weight past its range would be written as inf
            tensors = cast_params(self.tensors, self.arch, np.float32)
        except UsageError as error:
            raise UsageError(f"{path}: {error}") from None
        _check_scaling(self.standardise, np.float32, str(path))  # and so would its scaling
        write_onnx(onnx_model(self.arch, tensors, self.standardise), Path(path))
        return Path(path)

    def to_safetensors(self, path: str | Path) -> Path:
        """Write the canonical tensors (PyTorch's state_dict names) as .safetensors, which
        other tools read without pickle; the input scaling is in its metadata. Returns the
        path."""
        from shared.weights_file import write_safetensors

        path = _an_output(path, "to_safetensors")
        self.check(str(path))
        write_safetensors(Path(path), self.tensors, self.standardise, self.arch.name)
        return Path(path)


def _an_output(path: object, where: str) -> Path:
    """`path` as a Path, refused where export.py refuses its outputs for what writing would
    destroy: a run's checkpoint or other file, a checkpoint under another name, a store of
    finished runs, the data's files. (A write the machine refuses is an OutputError.)"""
    path = a_path(path, where)
    check_nothing_kept(where, path, data_files())
    return path


def scaling_fits(standardise: object, dtype: type) -> bool:
    """Whether `standardise` is an input scaling (mean, std) of numbers, std positive, under
    which pixels of 0 and 1 stay finite in `dtype` (float32's range is a graph's: a mean of
    1e39 overflows it, a std of 1e-40 makes pixels inf)."""
    if not (isinstance(standardise, tuple | list) and len(standardise) == 2):
        return False
    if not all(real_number(v) for v in standardise):
        return False
    with np.errstate(all="ignore"):
        mean, std = (dtype(v) for v in standardise)
        return bool(std > 0 and np.isfinite([(dtype(p) - mean) / std for p in (0, 1)]).all())


def _check_scaling(standardise: object, dtype: type, where: str) -> None:
    """Refuse, naming `where`, an input scaling other than None that does not fit `dtype`
    (see scaling_fits)."""
    if standardise is not None and not scaling_fits(standardise, dtype):
        raise UsageError(
            f"{where}: standardise={standardise!r}: a finite mean and a positive std are needed "
            f"that keep pixels finite in {np.dtype(dtype).name}"
        )


def body_and_shortcut(paths: list[list], taken: Callable[[Any], Any]) -> tuple[list, list]:
    """The two paths an importer read from a block's fork to its add, as (body, shortcut):
    the shortcut is the identity, or a path of at most two layers with one 1x1 conv (the body
    is the path of more layers where both could be). Steps that change nothing (nn.Identity,
    .contiguous()) are no layers. `taken(step)` is a step's (kind, options) or None."""

    def layers(path: list) -> list[tuple]:
        return [t for t in map(taken, path) if isinstance(t, tuple)]

    def could_be_shortcut(path: list) -> bool:
        read = layers(path)
        convs = [options for kind, options in read if kind == "conv"]
        return not read or (len(read) <= 2 and len(convs) == 1 and convs[0]["kernel"] == 1)

    body, shortcut = sorted(paths, key=lambda path: (could_be_shortcut(path), -len(layers(path))))
    return body, shortcut


def check_shortcut(read: list, shown: str, block: Residual, where: str) -> None:
    """A residual block's shortcut as an importer read it (each operation's (kind, options),
    None or "reshape" for one that changes nothing; `shown` as the source writes them) must
    be the one threefold infers for the block's body; else one line starting with `where`."""
    inferred = [(kind_of(inner).name, kind_of(inner).options_of(inner)) for inner in block.shortcut]
    # A view of the block's input to the body's output shape is the identity: no layer.
    layers = [taken for taken in read if isinstance(taken, tuple)]
    if layers != inferred:
        wanted = "-".join(token(layer, every=True) for layer in block.shortcut) or "the identity"
        # As a token too: a source's own form (a Conv's attributes) need not show its bias.
        got = "-".join(KINDS[kind].written(options, every=True) for kind, options in layers)
        rule = (  # the projection's rule, where the body needs one
            ": a 1x1 conv with the body's stride, no bias, a BatchNorm where the body has one"
            if block.shortcut
            else ", as the body keeps its input's shape"
        )
        raise UsageError(
            f"{where}: its shortcut ({shown or 'the identity'}: {got or 'the identity'}) is not "
            f"the one threefold's blocks take for this body ({wanted}{rule})"
        )


def identity_mapping(arch: Arch) -> tuple[Mapped, ...]:
    """Each layer as itself, its tensors under their canonical names."""
    return tuple(
        Mapped(
            layer.name,
            layer.name,
            token(layer, every=True),
            tensors=tuple((n, n) for n in tensors(arch) if n.split(".")[0] == layer.name),
        )
        for layer in arch.layers
    )


def import_network(text: str, where: str = "--arch", seed: int = 0) -> Network:
    """The network of a model file: a PyTorch FILE.py:NAME (the file is executed, torch's
    random numbers seeded by `seed`) or an ONNX FILE.onnx, with the file's own weights."""
    if is_onnx_file(text):
        from shared.onnx_import import from_onnx

        return from_onnx(text, where)
    from shared.torch_files import import_file

    return import_file(text, where, seed)


def load_weights(
    path: Path,
    arch: Arch,
    renames: dict[str, str],
    where: str = "--weights",
    unread: Iterable[str] = (),
) -> tuple[Params, str]:
    """(the canonical tensors of `arch` from a weights file, the file's SHA-256): a
    state_dict saved by torch.save (.pt, .pth, read with weights_only=True), a .safetensors
    file, an ONNX file's initialisers (.onnx) or a threefold checkpoint's weights (.npz).
    `renames` maps the source's names to canonical ones; names in `unread` (an unused
    module's) are passed over."""
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        from shared.weights_file import read_safetensors

        return read_safetensors(Path(path), arch, renames, where, unread)
    if suffix in (".onnx", ".npz"):  # files that name their network too
        try:
            network = load_network(Path(path), where)
        except CheckpointError as e:  # which names the file alone
            raise CheckpointError(f"{where} {e}") from None
        if network.arch.name != arch.name:
            raise UsageError(
                f"{where} {path}: holds {network.arch.name[:80]}, not {arch.name[:80]}"
            )
        with open(path, "rb") as file:
            return network.tensors, hashlib.file_digest(file, "sha256").hexdigest()
    from shared.torch_files import load_state_dict_file

    return load_state_dict_file(Path(path), arch, renames, where, unread)


def load_network(path: Path, where: str) -> Network:
    """The network a file holds, with its weights and input scaling: a checkpoint (.npz), a
    .safetensors file threefold wrote (its metadata names the network) or an ONNX graph."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from shared.weights_file import read_network_file

        return read_network_file(path, where)
    if suffix == ".onnx":
        from shared.onnx_import import from_onnx

        return from_onnx(path, where)
    try:
        ckpt = load_checkpoint(path)  # in the dtype its run trained in
    except CheckpointError:
        named = suffix in (".npz", *STATE_DICT_FILES)  # its error says what is wrong with it
        if named or not os.path.isfile(path) or is_checkpoint(path):
            raise
        # Its error would name only checkpoints: a user gave a file of another kind, or one of
        # the others under another name.
        raise CheckpointError(
            f"{path}: not a checkpoint (.npz); {where} reads a file by its name's suffix, "
            ".onnx as an ONNX graph and .safetensors as weights threefold wrote, any other "
            "as a checkpoint"
        ) from None
    arch = get_arch(ckpt.meta["arch"], str(path), files=False)
    spec = get_dataset_spec(ckpt.meta.get("dataset", "fashion-mnist"))
    standardise = spec.standardisation("standardised") if ckpt.pixels == "standardised" else None
    return Network(arch, ckpt.params, identity_mapping(arch), standardise)
