"""The network as data: any sequential CNN from one spec, its canonical tensors, their init.

A network is written as a preset name, a compact one-line spec, or a JSON or TOML file; all
three become an `Arch`, a tuple of layers whose sizes are inferred from the input (1, 28, 28)
and the layer before. Each implementation interprets the layers with its own ops.

The canonical tensors are one flat dict with PyTorch `state_dict` names and layouts:
`conv1.weight` (O, I, kH, kW), `fc1.weight` (out, in), flatten in C, H, W order, and BatchNorm's
`bn1.weight`, `bn1.bias`, `bn1.running_mean`, `bn1.running_var`, `bn1.num_batches_tracked`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import CheckpointError, UsageError

Params = dict[str, np.ndarray]
IMAGE_SHAPE = (1, 28, 28)  # every network takes x (N, 1, 28, 28)
IMAGE_SIZE = IMAGE_SHAPE[1]
NUM_CLASSES = 10
# Bounds that keep any spec's memory bounded: parameters (25M, 100 MB in float32, with their
# gradients and momentum buffers well under 1 GB) and one example's output of any one layer
# (1M values, 256 MB at batch 64 in float32).
MAX_PARAMETERS = 25_000_000
MAX_LAYER_OUTPUT = 1_000_000
MAX_CONV_COLUMNS = 2_000_000  # a conv's unfolded input (C*k*k*H'*W') per example: 512 MB at 64
MAX_LAYERS = 64
MAX_SPEC_FILE_BYTES = 2**20
MAX_SPEC_CHARS = 4096

GRAMMAR = """\
A network is a preset (lab, pool, noconv), a file ending in .json or .toml, or layers joined
by '-', applied in order to a 1x28x28 image; channels and features are inferred:
  convC[kK][sS][pP]  convolution, C output channels, K x K kernel (3), stride S (1),
                     padding P (K//2)
  maxpoolK[sS]       max-pooling over K x K windows with stride S (K); must tile the input
  avgpoolK[sS]       average-pooling, the same
  bn                 BatchNorm (2d after a conv or pool, 1d after flatten)
  relu, tanh, sigmoid
  dropoutP           dropout with drop probability P in [0, 1)
  flatten            C x H x W -> C*H*W, before the first fc
  fcN                fully connected, N outputs; the network must end with 10 outputs
Example: conv16-bn-relu-maxpool2-conv32-bn-relu-maxpool2-flatten-fc128-relu-dropout0.3-fc10
A file holds {"layers": [...]}, each entry a token as above or a table such as
{"type": "conv", "channels": 16, "kernel": 5, "stride": 1, "padding": 2}."""


@dataclass(frozen=True)
class Conv:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int


@dataclass(frozen=True)
class Pool:
    name: str
    op: str  # "max" or "avg"
    size: int
    stride: int


@dataclass(frozen=True)
class BatchNorm:
    """PyTorch's BatchNorm: normalise with the batch's mean and biased variance in training and
    track running_stat = (1 - momentum) * running_stat + momentum * batch_stat (the variance
    unbiased); normalise with the running statistics in evaluation."""

    name: str
    num_features: int
    spatial: bool  # BatchNorm2d over (N, H, W) per channel; else BatchNorm1d over N
    momentum: float = 0.1
    eps: float = 1e-5


@dataclass(frozen=True)
class Dropout:
    """Inverted dropout: each unit of one example's input `shape` is zeroed with probability p
    in training and the rest scaled by 1 / (1 - p); the identity in evaluation."""

    name: str
    p: float
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Activation:
    name: str
    fn: str  # "relu", "tanh" or "sigmoid"


@dataclass(frozen=True)
class Flatten:
    name: str


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int


Layer = Conv | Pool | BatchNorm | Dropout | Activation | Flatten | Linear


@dataclass(frozen=True)
class Arch:
    """A network: its layers in order, applied to x (N, 1, 28, 28), giving logits (N, 10).
    `name` is a preset's name or the network's canonical spec, either of which rebuilds it."""

    name: str
    description: str
    layers: tuple[Layer, ...]

    @property
    def spec(self) -> str:
        """The canonical compact spec (defaults left out)."""
        return _spec(self.layers)

    @property
    def dropouts(self) -> tuple[Dropout, ...]:
        return tuple(layer for layer in self.layers if isinstance(layer, Dropout))

    @property
    def has_batch_norm(self) -> bool:
        return any(isinstance(layer, BatchNorm) for layer in self.layers)

    @cached_property
    def trainable(self) -> frozenset[str]:
        """The names of the trainable tensors; worked out once, as every step splits by it."""
        return frozenset(param_shapes(self))

    @property
    def label(self) -> str:
        """A short name for folders: the preset's, or `custom-` and a digest of the spec."""
        if self.name in PRESETS:
            return self.name
        return "custom-" + _digest(self.spec)


PRESETS = {
    "lab": (
        "conv8-relu-flatten-fc128-relu-fc10",
        "the lab's network: conv 3x3x8 -> ReLU -> flatten 6272 -> linear 128 -> ReLU -> linear 10",
    ),
    "pool": (
        "conv8-relu-maxpool2-flatten-fc128-relu-fc10",
        "the lab's proposed improvement: 2x2 max-pooling after the conv (flatten 1568)",
    ),
    "noconv": (
        "flatten-fc128-relu-fc10",
        "the lab's comparison without the conv: flatten 784 -> linear 128 -> ReLU -> linear 10",
    ),
    "strong": (
        "conv32-bn-relu-maxpool2-conv64-bn-relu-maxpool2-flatten-fc128-relu-dropout0.3-fc10",
        "two conv blocks (conv 3x3, BatchNorm, ReLU, 2x2 max-pooling; 32 then 64 channels) -> "
        "flatten 3136 -> linear 128 -> ReLU -> dropout 0.3 -> linear 10",
    ),
}


def get_arch(text: str, where: str = "--arch", files: bool = True) -> Arch:
    """The network `text` describes: a preset name, a .json or .toml file (if `files`), or a
    compact spec. A spec that cannot work raises a UsageError naming `where`, the token and
    the conflict."""
    if text in PRESETS:
        spec, description = PRESETS[text]
        return Arch(text, description, build_layers(_tokens(spec, where), where))
    if files and text.lower().endswith((".json", ".toml")):
        entries = _file_entries(Path(text), where)
        where = f"{where} {text}"
    else:
        entries = _tokens(text, where)
    layers = build_layers(entries, where)
    spec = _spec(layers)
    preset = next((name for name, (s, _) in PRESETS.items() if s == spec), None)
    if preset is not None:  # a preset written out is that preset: one name per network
        return get_arch(preset)
    return Arch(spec, spec, layers)


def presets() -> dict[str, Arch]:
    return {name: get_arch(name) for name in PRESETS}


# --- parsing: a spec's entries as (label, kind, options) ------------------------------------

Entry = tuple[str, str, dict[str, Any]]

_NUMBER = r"(\d{1,7})"
_TOKENS = {
    "conv": re.compile(rf"conv{_NUMBER}(?:k{_NUMBER})?(?:s{_NUMBER})?(?:p{_NUMBER})?"),
    "maxpool": re.compile(rf"maxpool{_NUMBER}(?:s{_NUMBER})?"),
    "avgpool": re.compile(rf"avgpool{_NUMBER}(?:s{_NUMBER})?"),
    "dropout": re.compile(r"dropout(\d?\.\d+|0|1)"),
    "fc": re.compile(rf"fc{_NUMBER}"),
}
_OPTIONS = {  # the options of each kind, in the order of a token's numbers
    "conv": ("channels", "kernel", "stride", "padding"),
    "maxpool": ("size", "stride"),
    "avgpool": ("size", "stride"),
    "dropout": ("p",),
    "fc": ("features",),
    "bn": (),
    "relu": (),
    "tanh": (),
    "sigmoid": (),
    "flatten": (),
}
_REQUIRED = {
    "conv": "channels",
    "maxpool": "size",
    "avgpool": "size",
    "dropout": "p",
    "fc": "features",
}


def _tokens(text: str, where: str) -> list[Entry]:
    """The entries of a compact spec such as `conv16-bn-relu-maxpool2-flatten-fc10`."""
    if not text.strip():
        raise UsageError(
            f"{where}: the spec is empty; write layers such as conv8-relu-flatten-fc10"
        )
    if len(text) > MAX_SPEC_CHARS:
        raise UsageError(f"{where}: the spec is {len(text)} characters, more than {MAX_SPEC_CHARS}")
    entries = []
    for token in text.strip().split("-"):
        label = f"token {token!r}"
        kind = next((k for k in _OPTIONS if token == k or token.startswith(k)), None)
        if kind is None:
            raise UsageError(
                f"{where}: {label} is not a layer; known: conv, maxpool, avgpool, bn, relu, "
                "tanh, sigmoid, dropout, flatten, fc (see --help)"
            )
        pattern = _TOKENS.get(kind)
        match = pattern.fullmatch(token) if pattern else re.fullmatch(kind, token)
        if match is None:
            raise UsageError(f"{where}: {label} is malformed; {_SHAPES[kind]}")
        numbers = match.groups() if pattern else ()
        options = {
            key: (float(value) if key == "p" else int(value))
            for key, value in zip(_OPTIONS[kind], numbers, strict=False)
            if value is not None
        }
        entries.append((label, kind, options))
    return entries


_SHAPES = {
    "conv": "write convC[kK][sS][pP], e.g. conv16 or conv32k5s2p2",
    "maxpool": "write maxpoolK[sS], e.g. maxpool2",
    "avgpool": "write avgpoolK[sS], e.g. avgpool2",
    "dropout": "write dropoutP with P in [0, 1), e.g. dropout0.3",
    "fc": "write fcN, e.g. fc128",
    "bn": "write bn",
    "relu": "write relu",
    "tanh": "write tanh",
    "sigmoid": "write sigmoid",
    "flatten": "write flatten",
}


def _file_entries(path: Path, where: str) -> list[Entry]:
    """The entries of a JSON or TOML file holding {"layers": [token or table, ...]}."""
    where = f"{where} {path}"
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_SPEC_FILE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"{where}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_SPEC_FILE_BYTES:
        raise UsageError(f"{where}: more than {MAX_SPEC_FILE_BYTES} bytes; not a network spec")
    try:
        text = raw.decode("utf-8")
        document = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError) as e:
        raise UsageError(
            f"{where}: not valid {path.suffix[1:].upper()} ({_first_line(e)})"
        ) from None
    layers = document.get("layers") if isinstance(document, dict) else None
    if not isinstance(layers, list) or not layers:
        raise UsageError(f'{where}: expected {{"layers": [...]}} with at least one layer')
    entries = []
    for i, item in enumerate(layers):
        if isinstance(item, str):  # one token or several: "conv16-bn-relu"
            tokens = _tokens(item, f"{where} layers[{i}]")
            entries += [(f"layers[{i}] {label}", kind, opts) for label, kind, opts in tokens]
        elif isinstance(item, dict):
            entries.append(_table_entry(item, f"layers[{i}]", where))
        else:
            raise UsageError(f"{where}: layers[{i}] is neither a token nor a table")
    return entries


def _table_entry(table: dict, label: str, where: str) -> Entry:
    """One layer written as a table: {"type": kind, option: value, ...}."""
    kind = table.get("type")
    if kind not in _OPTIONS:
        shown = repr(kind)[:40]
        raise UsageError(f"{where}: {label} has type {shown}; known: {', '.join(_OPTIONS)}")
    label = f"{label} ({kind})"
    options = {}
    for key, value in table.items():
        if key == "type":
            continue
        if key not in _OPTIONS[kind]:
            known = ", ".join(_OPTIONS[kind]) or "none"
            raise UsageError(f"{where}: {label} has no option {key!r} (options: {known})")
        wanted = (int, float) if key == "p" else (int,)
        kind_of = "a number" if key == "p" else "an integer"
        if isinstance(value, bool) or not isinstance(value, wanted):
            raise UsageError(f"{where}: {label} option {key} is {value!r:.40}, not {kind_of}")
        if key != "p" and not 0 <= value < 10**7:
            # The compact grammar's bound (7 digits), so that the network has a canonical spec.
            raise UsageError(f"{where}: {label} option {key} is {value}, not in [0, 10**7)")
        options[key] = value
    return label, kind, options


# --- building: sizes inferred, every conflict named -------------------------------------------


def build_layers(entries: list[Entry], where: str) -> tuple[Layer, ...]:
    """Layers from parsed entries, each sized from the shape before it; raises a UsageError
    naming the entry for anything that cannot work."""
    if len(entries) > MAX_LAYERS:
        raise UsageError(f"{where}: {len(entries)} layers, more than {MAX_LAYERS}")
    for label, kind, options in entries:
        required = _REQUIRED.get(kind)
        if required is not None and required not in options:
            raise UsageError(f"{where}: {label} needs its {required}")
    names = _names([kind for _, kind, _ in entries])
    shape, layers, parameters = IMAGE_SHAPE, [], 0
    for (label, kind, options), name in zip(entries, names, strict=True):

        def fail(problem: str, label: str = label) -> UsageError:
            return UsageError(f"{where}: {label}: {problem}")

        layer = _layer(kind, name, options, shape, fail)
        shape = output_shape(layer, shape)
        parameters += sum(math.prod(s) for s in _tensor_shapes(layer, trainable=True).values())
        if math.prod(shape) > MAX_LAYER_OUTPUT:
            raise fail(f"its output {_show_shape(shape)} has more than {MAX_LAYER_OUTPUT} values")
        if parameters > MAX_PARAMETERS:
            raise fail(f"the network has more than {MAX_PARAMETERS} parameters by here")
        layers.append(layer)
    if shape != (NUM_CLASSES,):
        raise UsageError(
            f"{where}: the network ends with {_show_shape(shape)} outputs; it must end with "
            f"{NUM_CLASSES} (for example with fc{NUM_CLASSES})"
        )
    return tuple(layers)


def _layer(kind: str, name: str, options: dict, shape: tuple[int, ...], fail) -> Layer:
    """The layer an entry describes at input `shape` (C, H, W) or (F,)."""
    spatial = len(shape) == 3
    if kind in ("conv", "maxpool", "avgpool") and not spatial:
        raise fail(f"its input is already flat ({shape[0]} features); put it before flatten")
    if kind == "fc" and spatial:
        raise fail(f"its input is {_show_shape(shape)}; put flatten before it")
    if kind == "conv":
        k, stride = options.get("kernel", 3), options.get("stride", 1)
        padding = options.get("padding", k // 2)
        channels = options["channels"]
        _at_least_one(fail, channels=channels, kernel=k, stride=stride)
        if padding >= k:
            raise fail(f"padding {padding} is not smaller than the kernel {k}")
        if k > min(shape[1:]) + 2 * padding:
            raise fail(f"its {k}x{k} kernel is larger than its {_padded(shape, padding)} input")
        conv = Conv(name, shape[0], channels, k, stride, padding)
        columns = shape[0] * k * k * math.prod(output_shape(conv, shape)[1:])
        if columns > MAX_CONV_COLUMNS:
            # NumPy's im2col holds this many values per image.
            raise fail(f"it unfolds each image into {columns} values, more than {MAX_CONV_COLUMNS}")
        return conv
    if kind in ("maxpool", "avgpool"):
        size = options["size"]
        stride = options.get("stride", size)
        _at_least_one(fail, size=size, stride=stride)
        if size > min(shape[1:]):
            raise fail(f"its {size}x{size} window is larger than its {_show_shape(shape)} input")
        for extent in shape[1:]:
            if (extent - size) % stride:
                raise fail(
                    f"{size}x{size} windows with stride {stride} do not tile its "
                    f"{_show_shape(shape)} input ({extent} - {size} is not a multiple of {stride})"
                )
        return Pool(name, kind[:3], size, stride)
    if kind == "bn":
        return BatchNorm(name, shape[0], spatial)
    if kind == "dropout":
        p = options["p"]
        if not 0 <= p < 1:
            raise fail(f"drop probability {p} is not in [0, 1)")
        return Dropout(name, float(p), shape)
    if kind == "flatten":
        if not spatial:
            raise fail("its input is already flat")
        return Flatten(name)
    if kind == "fc":
        _at_least_one(fail, features=options["features"])
        return Linear(name, shape[0], options["features"])
    return Activation(name, kind)


def _at_least_one(fail, **values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise fail(f"{key} {value} is not at least 1")


def output_shape(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    """One example's output shape for input `shape` (C, H, W) or (F,)."""
    match layer:
        case Conv(_, _, out, k, stride, padding):
            return (out, *((n + 2 * padding - k) // stride + 1 for n in shape[1:]))
        case Pool(_, _, size, stride):
            return (shape[0], *((n - size) // stride + 1 for n in shape[1:]))
        case Flatten():
            return (math.prod(shape),)
        case Linear(_, _, out):
            return (out,)
    return shape


def _names(kinds: list[str]) -> list[str]:
    """Layer names as in a PyTorch module: the kind (`conv`, `bn`, `fc`, `pool`, `relu`, ...),
    numbered from 1 when the network has more than one of it (the lab's `conv`, `fc1`, `fc2`)."""
    short = [{"maxpool": "pool", "avgpool": "pool"}.get(k, k) for k in kinds]
    seen: dict[str, int] = {}
    names = []
    for kind in short:
        seen[kind] = seen.get(kind, 0) + 1
        names.append(f"{kind}{seen[kind]}" if short.count(kind) > 1 else kind)
    return names


def _spec(layers: tuple[Layer, ...]) -> str:
    return "-".join(_token(layer) for layer in layers)


def _token(layer: Layer) -> str:
    """The canonical token of a layer: its defaults left out."""
    match layer:
        case Conv(_, _, out, k, stride, padding):
            return (
                f"conv{out}"
                + (f"k{k}" if k != 3 else "")
                + (f"s{stride}" if stride != 1 else "")
                + (f"p{padding}" if padding != k // 2 else "")
            )
        case Pool(_, op, size, stride):
            return f"{op}pool{size}" + (f"s{stride}" if stride != size else "")
        case BatchNorm():
            return "bn"
        case Dropout(_, p):
            # Every digit the float has, never an exponent: the spec must rebuild this p.
            return "dropout" + np.format_float_positional(p, trim="-")
        case Activation(_, fn):
            return fn
        case Flatten():
            return "flatten"
        case Linear(_, _, out):
            return f"fc{out}"
    raise TypeError(f"unknown layer {layer!r}")


def _show_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _padded(shape: tuple[int, ...], padding: int) -> str:
    padded = _show_shape((shape[1] + 2 * padding, shape[2] + 2 * padding))
    return f"{padded} (padded by {padding})" if padding else padded


def _first_line(error: Exception) -> str:
    return str(error).split("\n", 1)[0][:80]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# --- canonical tensors ----------------------------------------------------------------------


def _tensor_shapes(layer: Layer, trainable: bool) -> dict[str, tuple[int, ...]]:
    """A layer's parameters (trainable) or buffers, named as in its PyTorch module's state_dict."""
    match layer:
        case Conv(name, i, o, k, _, _) if trainable:
            return {f"{name}.weight": (o, i, k, k), f"{name}.bias": (o,)}
        case Linear(name, i, o) if trainable:
            return {f"{name}.weight": (o, i), f"{name}.bias": (o,)}
        case BatchNorm(name, c) if trainable:
            return {f"{name}.weight": (c,), f"{name}.bias": (c,)}
        case BatchNorm(name, c):
            return {
                f"{name}.running_mean": (c,),
                f"{name}.running_var": (c,),
                f"{name}.num_batches_tracked": (),
            }
    return {}


def param_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """The trainable tensors' names and shapes, in layer order (weight before bias)."""
    return {k: v for layer in arch.layers for k, v in _tensor_shapes(layer, True).items()}


def split_params(tensors: dict[str, Any], arch: Arch) -> tuple[dict[str, Any], dict[str, Any]]:
    """Canonical tensors -> (trainable parameters, buffers), each keeping the canonical order."""
    params = {k: v for k, v in tensors.items() if k in arch.trainable}
    return params, {k: v for k, v in tensors.items() if k not in arch.trainable}


def state_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor, parameters and buffers, in the order of PyTorch's state_dict."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in arch.layers:
        shapes |= _tensor_shapes(layer, True) | _tensor_shapes(layer, False)
    return shapes


def is_counter(name: str) -> bool:
    """Whether a canonical tensor is an integer counter (int64, as in PyTorch), not a float."""
    return name.endswith(".num_batches_tracked")


def tensor_dtype(name: str, dtype: Any) -> np.dtype:
    """The dtype of canonical tensor `name` in a network computing in `dtype`."""
    return np.dtype(np.int64) if is_counter(name) else np.dtype(dtype)


INITS = ("he", "lab", "torch")


def init_params(arch: Arch, scheme: str = "he", seed: int = 0, dtype=np.float32) -> Params:
    """Draw the canonical tensors from `seed`, identically for every implementation.

    Conv and linear layers:
    he:    weights ~ N(0, 2 / fan_in), biases 0 (Kaiming/He, suited to ReLU).
    lab:   weights ~ N(0, 1) * 0.01, biases 0 (the lab's `randn * 0.01`).
    torch: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default).
    BatchNorm, as PyTorch in every scheme: scale 1, shift 0, running mean 0, variance 1.
    """
    if scheme not in INITS:
        raise UsageError(f"unknown initialisation {scheme!r}; choose from {', '.join(INITS)}")
    rng = np.random.default_rng(seed)
    params: Params = {}
    for layer in arch.layers:
        shapes = _tensor_shapes(layer, True) | _tensor_shapes(layer, False)
        for name, shape in shapes.items():
            kind = name.rsplit(".", 1)[1]
            if isinstance(layer, BatchNorm):
                value = np.ones(shape) if kind in ("weight", "running_var") else np.zeros(shape)
            else:
                fan_in = math.prod(shapes[f"{layer.name}.weight"][1:])
                if scheme == "torch":
                    bound = 1 / np.sqrt(fan_in)
                    value = rng.uniform(-bound, bound, size=shape)
                elif kind == "bias":
                    value = np.zeros(shape)
                elif scheme == "he":
                    value = rng.standard_normal(shape) * np.sqrt(2 / fan_in)
                else:
                    value = rng.standard_normal(shape) * 0.01
            params[name] = value.astype(tensor_dtype(name, dtype))
    return params


def check_params(params: Params, arch: Arch, source: str) -> None:
    """Raise if `params` lacks a tensor of `arch`, has an extra one, or one of another shape."""
    expected = state_shapes(arch)
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
