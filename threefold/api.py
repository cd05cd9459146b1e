"""The public API's functions: networks from a spec or a PyTorch module, the cross-check as
data, and the way back to PyTorch."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.backend import torch_module
from shared.checkpoint import FROM_STATE_DICT, STATE_DICT_FILES
from shared.config import FIELDS, IMPLEMENTATIONS, PAIRS, python_int
from shared.data import Dataset, installed_data_dir, load_dataset
from shared.errors import UsageError
from shared.io import a_path
from shared.network import Network, identity_mapping, import_network, load_network
from shared.proof.rows import CheckResult
from shared.spec import Arch, get_arch, init_params, is_model_file
from shared.torch_import import from_torch


def network(spec: str, seed: int = 0, init: str = "he") -> Network:
    """A network from a preset, a spec or a .json/.toml/FILE.py:NAME, with initial weights
    drawn by `init` from `seed`; a model file's own weights for FILE.py:NAME (its layers'
    draws from torch's generator seeded by `seed`) or FILE.onnx."""
    if not isinstance(spec, str):
        raise UsageError(f"network: {spec!r} is not a spec (a str)")
    seed = python_int(seed)
    for name, value in (("seed", seed), ("init", init)):
        problem = FIELDS[name].problem(value)
        if problem is not None:
            raise UsageError(f"network: {name}={value!r}: {problem}")
    if is_model_file(spec):
        return import_network(spec, "network", seed)
    arch = get_arch(spec, "network")
    return Network(
        arch, init_params(arch, init, seed, np.dtype(np.float32)), identity_mapping(arch)
    )


def load(path: str | Path) -> Network:
    """The network of a file, with its weights and the input scaling it expects: a checkpoint
    (train.py's checkpoint.npz), a .safetensors file written by threefold (its metadata
    names the network), or an ONNX graph (.onnx). Each is read as untrusted input, its
    network held to the cost bounds before a tensor is read; its tensors keep the dtype the
    file stores them in (a float64 run's are float64)."""
    return load_network(a_path(path, "load"), "load")


# Files of weights, which name no layers (a .onnx names both), and where they are read.
WEIGHTS_FILES = {
    ".npz": "threefold.load reads it",
    ".safetensors": "threefold.load reads one threefold wrote",
} | dict.fromkeys(STATE_DICT_FILES, FROM_STATE_DICT)


def _as_network(subject: Network | Any | str, where: str) -> Network:
    if isinstance(subject, Network):
        subject.check(where)  # built by hand, perhaps
        return subject
    read = isinstance(subject, str) and WEIGHTS_FILES.get(Path(subject).suffix.lower())
    if read:
        raise UsageError(f"{where}: {subject!r} is a file of weights; {read}")
    if isinstance(subject, str):
        return network(subject)
    if not _is_module(subject):
        raise UsageError(
            f"{where}: a {type(subject).__name__}; it takes a Network, a torch.nn.Module or a "
            "spec (threefold.load reads a file)"
        )
    return from_torch(subject)


def _is_module(subject: Any) -> bool:
    torch = sys.modules.get("torch")  # a module's class has imported torch
    return torch is not None and isinstance(subject, torch.nn.Module)


def to_torch(subject: Network | Any | str):
    """The network of `subject` (a Network, an nn.Module as `from_torch` reads it, or a spec)
    as a plain `torch.nn.Sequential` (a residual block as impl_torch.model.Block) holding its
    weights (canonical state_dict names, in their dtype), in evaluation mode; a network
    trained on standardised pixels standardises raw [0, 1] pixels first
    (`Network.standardise`), so it predicts from the images as they are."""
    net = _as_network(subject, "to_torch")
    return torch_module(net.arch, net.tensors, net.standardise)


@dataclass(frozen=True)
class Report:
    """The cross-check's outcome: every row, and what a reader asks of them."""

    network: Network
    results: tuple[CheckResult, ...]
    images: str  # what the batches were: real images or seeded random ones
    # What was not run or compared, and why: onnxruntime's missing kernels, a lockstep cut
    # short where every implementation's loss left the finite numbers.
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def worst_by_layer(self) -> dict[str, CheckResult]:
        """For each layer (in the network's order; "loss" for the rows of no layer), the row
        of an implementation pair with the largest difference relative to its tolerance."""
        worst: dict[str, CheckResult] = {}
        for row in self.results:
            if row.pair not in PAIRS:
                continue
            layer = layer_of(row.check, self.network.arch)
            if layer not in worst or _share(row) > _share(worst[layer]):
                worst[layer] = row
        order = [node.layer.name for node in self.network.arch.nodes] + ["loss"]
        return {name: worst[name] for name in order if name in worst}

    @property
    def first_divergence(self) -> str | None:
        """The layer where a pair of implementations first parts as the computation runs
        (a row beyond its tolerance); None when every row passes. See `divergence`."""
        found = self.divergence
        return found[0] if found else None

    @property
    def divergence(self) -> tuple[str, str] | None:
        """(layer, how it was found) where the implementations first part: the first layer
        of the forward pass with a failing output ("forward"); else the layer nearest the
        loss whose gradient fails ("backward": it, or a layer after it without weights,
        whose gradients are not compared one by one); else the first layer of any failing
        row (the optimizer's steps, the running statistics). Gradients of layers before a
        fault fail with it, so the network's order alone would name the first layer with
        weights, whatever the fault."""
        arch = self.network.arch
        order = [node.layer.name for node in arch.nodes] + ["loss"]

        def failing(rows) -> list[str]:
            # The images' gradient is the first layer's to compute, the backward's last step.
            layers = {
                order[0] if r.check == "grad input" else layer_of(r.check, arch) for r in rows
            }
            return [name for name in order if name in layers]

        forward = failing(r for r in self.failed if r.check.startswith(FORWARD_ROWS))
        backward = failing(r for r in self.failed if r.check.startswith("grad "))
        if forward:
            return forward[0], "forward"
        if backward:
            return backward[-1], "backward"
        rest = failing(self.failed)
        return (rest[0], "training") if rest else None

    def summary(self) -> str:
        lines = [
            f"{self.network.arch.name}: {len(self.results) - len(self.failed)} passed, "
            f"{len(self.failed)} failed ({self.images})"
        ]
        worst = self.worst_by_layer()
        width = max(map(len, worst), default=0)  # a block's layers: block2.downsample.0
        for layer, row in worst.items():
            lines.append(
                f"  {layer:<{width}} worst {row.max_rel:.1e} of {row.tolerance:.0e} "
                f"({row.check}, {row.pair}, {row.dtype})"
            )
        if self.divergence:
            lines.append("  first divergence: {} ({})".format(*self.divergence))
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# The rows of the forward pass: each layer's output, the dropout masks, the loss.
FORWARD_ROWS = ("activation ", "logits", "dropout mask ", "loss")


def _share(row: CheckResult) -> float:
    return row.max_rel / row.tolerance if row.tolerance else float("inf")


def layer_of(check: str, arch: Arch) -> str:
    """The layer a row's check is about (its tensor's or its activation's; the logits are
    the last layer's output), or "loss"."""
    if check.startswith("logits"):
        return arch.layers[-1].name
    # The longest name that heads a word: block1.conv1.weight is block1.conv1's, not block1's.
    names = sorted((node.layer.name for node in arch.nodes), key=len, reverse=True)
    for word in check.replace("(", " ").split():
        name = next((n for n in names if word == n or word.startswith(f"{n}.")), None)
        if name is not None:
            return name
    return "loss"


class NotEquivalent(AssertionError):
    """The implementations disagree: the failing rows are in the message and `report`."""

    def __init__(self, report: Report):
        rows = "\n".join(
            f"  {r.check} {r.pair} {r.dtype} [{r.setting}]: {r.max_rel:.2e} > {r.tolerance:.0e}"
            + ("" if r.first_step is None else f" from step {r.first_step}")
            for r in report.failed[:20]
        )
        more = len(report.failed) - 20
        super().__init__(
            f"{len(report.failed)} of {len(report.results)} comparisons failed, first "
            "divergence at {} ({}):\n".format(*report.divergence)
            + rows
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
        self.report = report


def crosscheck(
    subject: Network | Any | str,
    *,
    dtypes: tuple[str, ...] = ("float64", "float32"),
    steps: int = 20,
    batch_size: int | None = None,
    seed: int = 0,
    data: Dataset | str | None = "auto",
    impls: tuple[str, ...] = IMPLEMENTATIONS,
    progress: Callable[[str], None] | None = None,
    onnx: bool = False,
) -> Report:
    """Every comparison of the three implementations on `subject` (a Network, an nn.Module or
    a spec), starting from its own weights: each layer's activations, the loss, every
    gradient, a run in lockstep under each setting (the defaults, speedrun.py's fast recipe,
    drawn SGD, Adam and AdamW hyperparameters; single passes at huge logits and, where the
    network keeps them exact, planted ReLU zeros and pooling ties), the code the three share
    against the libraries', NumPy against finite differences; with `onnx`, the network
    exported to ONNX and run by onnxruntime against each implementation in evaluation mode,
    layer by layer. `data`: "auto"
    (Fashion-MNIST where installed, else seeded random images), the folder of its four IDX
    files, a Dataset, or None (random images)."""
    from shared.crosscheck import check_options, run_crosscheck
    from shared.onnx_export import require_onnx

    if not isinstance(onnx, bool):  # "no" would be taken as True
        raise UsageError(f"crosscheck: onnx={onnx!r}: True or False")
    if onnx:
        require_onnx()
    if progress is not None and not callable(progress):
        raise UsageError(f"crosscheck: progress={progress!r}: a callable taking a str, or None")
    net = _as_network(subject, "crosscheck")
    notes: list[str] = []
    images, dataset = _images(data)
    check_options([net.arch], dtypes, steps, batch_size, seed, impls, dataset)
    impls = tuple(impl for impl in IMPLEMENTATIONS if impl in impls)  # pairs named as usual
    results = run_crosscheck(
        [net.arch],
        list(dtypes),
        dataset,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        impls=impls,
        initial={net.arch.name: net.tensors},
        progress=progress,
        onnx=onnx,
        notes=notes,
    )
    return Report(net, tuple(results), images, tuple(notes))


def _images(data: Dataset | str | None) -> tuple[str, Dataset | None]:
    if isinstance(data, Dataset):
        return f"{data.spec.name} images", data
    if data is None:
        return "seeded random images", None
    if not isinstance(data, str | os.PathLike):  # an array's repr ran over 50 lines
        raise UsageError(
            f"crosscheck: data: an object of type {type(data).__name__}; 'auto', a folder, a "
            "Dataset or None"
        )
    if data != "auto":
        folder = a_path(data, "crosscheck: data")
        try:
            dataset = load_dataset(folder)
        except UsageError as e:  # which names the folder
            raise UsageError(f"crosscheck: data: {e}") from None
        return f"{dataset.spec.name} images from {dataset.source}", dataset
    # Random images only where no folder is there at all: a $THREEFOLD_DATA that names none,
    # or a damaged file, is an error, as in every command.
    if installed_data_dir() is None:
        return "seeded random images (Fashion-MNIST not installed)", None
    dataset = load_dataset()
    return f"{dataset.spec.name} images", dataset


def assert_equivalent(subject: Network | Any | str, **options: Any) -> Report:
    """`crosscheck(subject, **options)`, raising NotEquivalent with the failing rows unless
    every comparison passes; the report when they all do."""
    report = crosscheck(subject, **options)
    if not report.passed:
        raise NotEquivalent(report)
    return report
