"""The network as data, its canonical parameters, and their initialisations.

An architecture is a tuple of layers; each implementation interprets it with its own ops.
Parameters are one flat dict with PyTorch `state_dict` names and layouts: `conv.weight`
(O, I, kH, kW), `fc1.weight` (out, in), flatten in C, H, W order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import CheckpointError, UsageError

Params = dict[str, np.ndarray]
IMAGE_SIZE = 28  # every network takes x (N, 1, 28, 28)


@dataclass(frozen=True)
class Conv:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    padding: int


@dataclass(frozen=True)
class ReLU:
    name: str


@dataclass(frozen=True)
class MaxPool:
    name: str
    size: int


@dataclass(frozen=True)
class Flatten:
    name: str


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int


Layer = Conv | ReLU | MaxPool | Flatten | Linear


@dataclass(frozen=True)
class Arch:
    """A network: its layers in order, applied to x (N, 1, 28, 28), giving logits (N, 10)."""

    name: str
    description: str
    layers: tuple[Layer, ...]


ARCHS = {
    "lab": Arch(
        "lab",
        "the lab's network: conv 3x3x8 -> ReLU -> flatten 6272 -> linear 128 -> ReLU -> linear 10",
        (
            Conv("conv", 1, 8, 3, 1),
            ReLU("relu1"),
            Flatten("flatten"),
            Linear("fc1", 8 * 28 * 28, 128),
            ReLU("relu2"),
            Linear("fc2", 128, 10),
        ),
    ),
    "pool": Arch(
        "pool",
        "the lab's proposed improvement: 2x2 max-pooling after the conv (flatten 1568)",
        (
            Conv("conv", 1, 8, 3, 1),
            ReLU("relu1"),
            MaxPool("pool", 2),
            Flatten("flatten"),
            Linear("fc1", 8 * 14 * 14, 128),
            ReLU("relu2"),
            Linear("fc2", 128, 10),
        ),
    ),
    "noconv": Arch(
        "noconv",
        "the lab's comparison without the conv: flatten 784 -> linear 128 -> ReLU -> linear 10",
        (
            Flatten("flatten"),
            Linear("fc1", 28 * 28, 128),
            ReLU("relu2"),
            Linear("fc2", 128, 10),
        ),
    ),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise UsageError(f"unknown architecture {name!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[name]


def param_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes, in layer order (weight before bias)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in arch.layers:
        match layer:
            case Conv(name, i, o, k, _):
                shapes[f"{name}.weight"] = (o, i, k, k)
                shapes[f"{name}.bias"] = (o,)
            case Linear(name, i, o):
                shapes[f"{name}.weight"] = (o, i)
                shapes[f"{name}.bias"] = (o,)
    return shapes


INITS = ("he", "lab", "torch")


def init_params(arch: Arch, scheme: str = "he", seed: int = 0, dtype=np.float32) -> Params:
    """Draw the canonical parameters from `seed`, identically for every implementation.

    he:    weights ~ N(0, 2 / fan_in), biases 0 (Kaiming/He, suited to ReLU).
    lab:   weights ~ N(0, 1) * 0.01, biases 0 (the lab's `randn * 0.01`).
    torch: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default).
    """
    if scheme not in INITS:
        raise UsageError(f"unknown initialisation {scheme!r}; choose from {', '.join(INITS)}")
    rng = np.random.default_rng(seed)
    shapes = param_shapes(arch)
    params: Params = {}
    for name, shape in shapes.items():
        layer, kind = name.rsplit(".", 1)
        fan_in = int(np.prod(shapes[f"{layer}.weight"][1:]))
        if scheme == "torch":
            bound = 1 / np.sqrt(fan_in)
            value = rng.uniform(-bound, bound, size=shape)
        elif kind == "bias":
            value = np.zeros(shape)
        elif scheme == "he":
            value = rng.standard_normal(shape) * np.sqrt(2 / fan_in)
        else:
            value = rng.standard_normal(shape) * 0.01
        params[name] = value.astype(dtype)
    return params


def check_params(params: Params, arch: Arch, source: str) -> None:
    """Raise if `params` lacks a tensor of `arch`, has an extra one, or one of another shape."""
    expected = param_shapes(arch)
    for name, shape in expected.items():
        if name not in params:
            raise CheckpointError(f"{source}: tensor {name} missing (arch {arch.name!r})")
        if tuple(params[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(params[name].shape)}, "
                f"arch {arch.name!r} expects {shape}"
            )
    extra = sorted(set(params) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: tensor {extra[0]} is not part of arch {arch.name!r}")
