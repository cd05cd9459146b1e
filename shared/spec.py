"""Networks as data: any sequential CNN from one spec, its canonical tensors, their init.

A network is written as a preset name, a compact one-line spec, or a JSON or TOML file; all
three become an `Arch`, a tuple of layers whose sizes are inferred from the input (1, 28, 28)
and the layer before. The kinds of layer, and everything known about each, are the table in
shared/kinds.py, which the parser here reads; each implementation interprets the layers with
its own ops.

The canonical tensors are one flat dict with PyTorch `state_dict` names and layouts:
`conv1.weight` (O, I, kH, kW), `fc1.weight` (out, in), flatten in C, H, W order, and BatchNorm's
`bn1.weight`, `bn1.bias`, `bn1.running_mean`, `bn1.running_var`, `bn1.num_batches_tracked`.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from shared.cost import check_network
from shared.errors import UsageError, first_line
from shared.io import once_each, regular_file
from shared.kinds import KINDS, Node, kind_of, nodes, output_shape
from shared.kinds import token as layer_token
from shared.layers import (
    INPUT_SHAPE,
    NUM_CLASSES,
    Dropout,
    Fail,
    Flatten,
    Layer,
    LayerKind,
    Residual,
    Shape,
    Tensor,
    show_shape,
)

Params = dict[str, np.ndarray]
# Bounds that keep any spec's memory bounded: parameters (25M, 100 MB in float32, with their
# gradients and momentum buffers well under 1 GB) and one example's output of any one layer
# (1M values, 256 MB at batch 64 in float32).
MAX_PARAMETERS = 25_000_000
MAX_LAYER_OUTPUT = 1_000_000
MAX_LAYERS = 64
MAX_SPEC_FILE_BYTES = 2**20
MAX_SPEC_CHARS = 4096
# tomllib reads a dotted key in memory quadratic in its parts: an 80 KB key of 40,000 took
# 6.3 GB; 4,096 take 77 MB. A spec's floats need a dot a layer.
MAX_TOML_DOTS = 4096


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

    @cached_property
    def nodes(self) -> tuple[Node, ...]:
        """Every layer, those inside blocks too, in an order it can run in, with its input
        (shared/kinds.py's `nodes`)."""
        return nodes(self.layers)

    @property
    def dropouts(self) -> tuple[Dropout, ...]:
        return tuple(n.layer for n in self.nodes if isinstance(n.layer, Dropout))

    @property
    def uses_batch_statistics(self) -> bool:
        """Whether a layer normalises across the batch (a batch of one cannot train it)."""
        return any(kind_of(n.layer).batch_statistics for n in self.nodes)

    @cached_property
    def counters(self) -> frozenset[str]:
        """The names of the int64 counters among the canonical tensors."""
        return frozenset(k for k, t in tensors(self).items() if t.counter)

    @cached_property
    def trainable(self) -> frozenset[str]:
        """The names of the trainable tensors; worked out once, as every step splits by it."""
        return frozenset(param_shapes(self))

    @property
    def label(self) -> str:
        """A short name for folders: the preset's, or `custom-` and a digest of the spec."""
        if self.name in PRESETS:
            return self.name
        return "custom-" + hashlib.sha256(self.spec.encode()).hexdigest()[:8]

    def shapes(self) -> list[tuple[Layer, Shape, Shape]]:
        """(layer, one example's input shape, its output shape) for every layer, in order."""
        rows, shape = [], INPUT_SHAPE
        for layer in self.layers:
            after = output_shape(layer, shape)
            rows.append((layer, shape, after))
            shape = after
        return rows


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
    "deep": (
        "conv32b0-bn-relu-maxpool2-conv32b0-bn-relu-conv32b0-bn-relu-conv64s2b0-bn-relu-"
        "conv64b0-bn-relu-flatten-fc128-relu-dropout0.3-fc10",
        "five convs (3x3 without bias, BatchNorm, ReLU): 32 channels, 2x2 max-pooling, 32, 32, "
        "64 at stride 2, 64 -> flatten 3136 -> linear 128 -> ReLU -> dropout 0.3 -> linear 10; "
        "93.6% with --recipe deep",
    ),
}


def _grammar() -> str:
    """The grammar, as `--help` shows it: one entry of KINDS a line."""
    width = max(len(kind.usage) for kind in KINDS.values()) + 2
    lines = [
        f"A network is a preset ({', '.join(PRESETS)}), a file ending in .json or .toml, or",
        "layers joined by '-', applied in order to a 1x28x28 image; channels and features are",
        "inferred:",
    ]
    for kind in KINDS.values():
        wrapped = textwrap.wrap(kind.help, 90 - width - 2)
        lines.append(f"  {kind.usage:<{width}}{wrapped[0]}")
        lines += [" " * (width + 2) + more for more in wrapped[1:]]
    lines += [
        f"Example: {PRESETS['strong'][0]}",
        'A file holds {"layers": [...]}, each entry a token as above or a table such as',
        '{"type": "conv", "channels": 16, "kernel": 5, "stride": 1, "padding": 2}.',
    ]
    return "\n".join(lines)


GRAMMAR = _grammar()


def get_arch(text: str, where: str = "--arch", files: bool = True) -> Arch:
    """The network `text` describes: a preset name, a .json or .toml file, a PyTorch model
    FILE.py:NAME or an ONNX FILE.onnx (if `files`), or a compact spec. A spec that cannot
    work raises a UsageError naming `where`, the token and the conflict."""
    if text.strip() in PRESETS:  # as a spec's tokens are, " lab" is the preset
        name = text.strip()
        spec, description = PRESETS[name]
        return Arch(name, description, build_layers(_tokens(spec, where), where))
    if files and is_model_file(text):
        from shared.network import import_network  # imports PyTorch or ONNX, as only this needs

        return import_network(text, where).arch
    if files and text.lower().endswith((".json", ".toml")):
        entries = _file_entries(Path(text), where)
        where = f"{where} {text}"
    else:
        entries = _tokens(text, where)
    layers = build_layers(entries, where)
    spec = _spec(layers)
    if len(spec) > MAX_SPEC_CHARS:  # so that the network's name parses back to it
        raise UsageError(
            f"{where}: its canonical spec would be {len(spec)} characters, more than "
            f"{MAX_SPEC_CHARS} (write fewer digits)"
        )
    preset = next((name for name, (s, _) in PRESETS.items() if s == spec), None)
    if preset is not None:  # a preset written out is that preset: one name per network
        return get_arch(preset)
    return Arch(spec, spec, layers)


def is_onnx_file(text: str) -> bool:
    """Whether a network's text names an ONNX file (FILE.onnx, in any case)."""
    return text.lower().endswith(".onnx")


def is_model_file(text: str) -> bool:
    """Whether a network's text names a model file: a PyTorch FILE.py:NAME or an ONNX
    FILE.onnx."""
    path, _, name = text.rpartition(":")
    return (path.lower().endswith(".py") and name.isidentifier()) or is_onnx_file(text)


def network_files(text: str) -> list[Path]:
    """The files a network's text names, which a command reading it must not write over: a
    model file's (see is_model_file), with an ONNX model's external data beside it, or a
    .json or .toml spec; none for a preset or a spec written out."""
    if is_onnx_file(text):
        from shared.onnx_file import external_files  # which imports this module

        return [Path(text), *external_files(Path(text))]
    if is_model_file(text):
        return [Path(text.rpartition(":")[0])]
    return [Path(text)] if text.lower().endswith((".json", ".toml")) else []


def presets() -> dict[str, Arch]:
    return {name: get_arch(name) for name in PRESETS}


def build_layers(entries: list[Entry], where: str) -> tuple[Layer, ...]:
    """Layers from parsed entries, each sized from the shape before it; raises a UsageError
    naming the entry for anything that cannot work."""
    count = _count(entries)
    if count > MAX_LAYERS:
        raise UsageError(f"{where}: {count} layers, more than {MAX_LAYERS}")
    layers, shape = _build_chain(entries, where, "", INPUT_SHAPE)
    if shape != (NUM_CLASSES,):
        raise UsageError(
            f"{where}: the network ends with {show_shape(shape)} outputs; it must end with "
            f"{NUM_CLASSES} (for example with fc{NUM_CLASSES})"
        )
    check_network(layers, where)
    return layers


def _count(entries: list[Entry]) -> int:
    """The layers of `entries`, a block's own counted with its body's."""
    return sum(1 + _count(options.get("body", [])) for _, _, options in entries)


def _build_chain(
    entries: list[Entry], where: str, prefix: str, shape: Shape
) -> tuple[tuple[Layer, ...], Shape]:
    """The layers of `entries` from input `shape`, named under `prefix` (a block's body:
    "block1."), and their output shape."""
    for label, kind, options in entries:
        for option in KINDS[kind].options:
            if option.default is None and option.name not in options:
                raise UsageError(f"{where}: {label} needs its {option.name}")
    names = _names([KINDS[kind].module_name for _, kind, _ in entries])
    layers, parameters = [], 0
    for (label, kind, options), name in zip(entries, names, strict=True):

        def fail(problem: str, label: str = label) -> UsageError:
            return UsageError(f"{where}: {label}: {problem}")

        if "body" in options:  # a block: its layers first, from its input, named under it
            if len(shape) != 3:
                raise fail(f"its input is already flat ({shape[0]} features)")
            body, _ = _build_chain(options["body"], where, f"{prefix}{name}.", shape)
            options = {"body": body}
        layer = _build(KINDS[kind], prefix + name, options, shape, fail)
        shape = output_shape(layer, shape)
        parameters += sum(
            math.prod(t.shape) for t in kind_of(layer).tensors(layer).values() if t.trainable
        )
        if math.prod(shape) > MAX_LAYER_OUTPUT:
            raise fail(f"its output {show_shape(shape)} has more than {MAX_LAYER_OUTPUT} values")
        if parameters > MAX_PARAMETERS:
            raise fail(f"the network has more than {MAX_PARAMETERS} parameters by here")
        layers.append(layer)
    return tuple(layers), shape


def _build(kind: LayerKind, name: str, given: dict[str, Any], shape: Shape, fail: Fail) -> Layer:
    """The layer of `kind` at input `shape` (C, H, W) or (F,): its input checked, then its
    options (defaults filled in) against their bounds, then the kind's own checks."""
    if kind.input == "spatial" and len(shape) != 3:
        where_to = "" if kind.layer is Flatten else "; put it before flatten"
        raise fail(f"its input is already flat ({shape[0]} features){where_to}")
    if kind.input == "flat" and len(shape) != 1:
        raise fail(f"its input is {show_shape(shape)}; put flatten before it")
    options = dict(given)
    for option in kind.options:
        if option.name not in options:
            options[option.name] = option.default_in(options)
        option.check(options[option.name], fail)
        if option.type is float:  # a float, and never -0.0, whose token would read "-0"
            options[option.name] = float(options[option.name]) + 0.0
    return kind.build(name, options, shape, fail)


def _names(module_names: list[str]) -> list[str]:
    """Layer names as in a PyTorch module: the kind's (`conv`, `bn`, `fc`, `pool`, `relu`, ...),
    numbered from 1 when the network has more than one of it (the lab's `conv`, `fc1`, `fc2`)."""
    seen: dict[str, int] = {}
    names = []
    for short in module_names:
        seen[short] = seen.get(short, 0) + 1
        names.append(f"{short}{seen[short]}" if module_names.count(short) > 1 else short)
    return names


def _spec(layers: tuple[Layer, ...]) -> str:
    return "-".join(layer_token(layer) for layer in layers)


# --- parsing: a spec's entries as (label, kind, options) ------------------------------------

# An entry of a spec: (label for messages, kind, options given).
Entry = tuple[str, str, dict[str, Any]]
# Longest names first, so that a kind whose name starts another's is not taken for it.
_BY_LENGTH = sorted(KINDS, key=len, reverse=True)


def _tokens(text: str, where: str, in_block: bool = False) -> list[Entry]:
    """The entries of a compact spec such as `conv16-bn-relu-maxpool2-flatten-fc10`
    (`in_block`: a block's layers)."""
    if not text.strip():
        raise UsageError(
            f"{where}: the spec is empty; write layers such as conv8-relu-flatten-fc10"
        )
    if len(text) > MAX_SPEC_CHARS:
        raise UsageError(f"{where}: the spec is {len(text)} characters, more than {MAX_SPEC_CHARS}")
    entries = []
    for token in _split(text.strip(), where):
        label = f"token {token!r}"
        name = next((k for k in _BY_LENGTH if token.startswith(k)), None)
        if name is None:
            raise UsageError(
                f"{where}: {label} is not a layer; known: {', '.join(KINDS)} (see --help)"
            )
        kind = KINDS[name]
        if kind.layer is Residual:
            if in_block:  # refused before reading deeper: 500 nested blocks overflowed
                raise UsageError(
                    f"{where}: {label}: a block holds a chain of layers, not another block"
                )
            if not (token.startswith(f"{name}(") and _closes_at_the_end(token)):
                raise UsageError(f"{where}: {label} is malformed; write {kind.example}")
            body = _tokens(token[len(name) + 1 : -1], f"{where} {name}(...)", in_block=True)
            body = [(f"{inner} in {label}", k, o) for inner, k, o in body]
            entries.append((label, name, {"body": body}))
            continue
        match = kind.pattern.fullmatch(token)
        if match is None:
            raise UsageError(f"{where}: {label} is malformed; write {kind.example}")
        options = {
            option.name: option.type(number)
            for option, number in zip(kind.options, match.groups(), strict=True)
            if number is not None
        }
        entries.append((label, name, options))
    return entries


def _closes_at_the_end(token: str) -> bool:
    """Whether a block's token `res(...)` ends where its first '(' closes: res(a)res(b) does
    not (a '-' is missing)."""
    depth = 0
    for i, char in enumerate(token):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and char == ")":
            return i == len(token) - 1
    return False


def _split(text: str, where: str) -> list[str]:
    """A spec's tokens: split at each '-' outside parentheses (a block's layers stay whole)."""
    tokens, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise UsageError(f"{where}: a ')' at character {i + 1} closes nothing")
        if char == "-" and depth == 0:
            tokens.append(text[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"{where}: a '(' is never closed")
    return [*tokens, text[start:]]


def _file_entries(path: Path, where: str) -> list[Entry]:
    """The entries of a JSON or TOML file holding {"layers": [token or table, ...]}."""
    where = f"{where} {path}"
    try:
        with regular_file(path, where) as file:
            raw = file.read(MAX_SPEC_FILE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"{where}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_SPEC_FILE_BYTES:
        raise UsageError(f"{where}: more than {MAX_SPEC_FILE_BYTES} bytes; not a network spec")
    try:
        text = raw.decode("utf-8")
        if path.suffix.lower() == ".json":  # TOML refuses a key given twice; JSON keeps the last
            document = json.loads(text, object_pairs_hook=once_each)
        elif text.count(".") > MAX_TOML_DOTS:
            raise UsageError(
                f"{where}: {text.count('.')} dots, more than {MAX_TOML_DOTS}; not a network spec"
            )
        else:
            document = tomllib.loads(text)
    except (ValueError, RecursionError) as e:
        raise UsageError(
            f"{where}: not valid {path.suffix[1:].upper()} ({first_line(e)})"
        ) from None
    layers = document.get("layers") if isinstance(document, dict) else None
    if not isinstance(layers, list) or not layers:
        raise UsageError(f'{where}: expected {{"layers": [...]}} with at least one layer')
    if len(document) > 1:  # a key misspelt, or meant for another tool, would go unread
        other = sorted(set(document) - {"layers"})[0]
        raise UsageError(f'{where}: {other!r}: a spec holds "layers" alone')
    return _list_entries(layers, "layers", where)


def _list_entries(items: Any, label: str, where: str) -> list[Entry]:
    """The entries of a file's list of layers (`label` names it: layers, or a block's
    layers[2] (res) layers), each a token or a table."""
    if not isinstance(items, list) or not items:
        raise UsageError(f"{where}: expected {label} as a list of at least one layer")
    entries = []
    for i, item in enumerate(items):
        if isinstance(item, str):  # one token or several: "conv16-bn-relu"
            tokens = _tokens(item, f"{where} {label}[{i}]")
            entries += [(f"{label}[{i}] {text}", kind, opts) for text, kind, opts in tokens]
        elif isinstance(item, dict):
            entries.append(_table_entry(item, f"{label}[{i}]", where))
        else:
            raise UsageError(f"{where}: {label}[{i}] is neither a token nor a table")
    return entries


def _table_entry(table: dict, label: str, where: str) -> Entry:
    """One layer written as a table: {"type": kind, option: value, ...}."""
    name = table.get("type")
    if not isinstance(name, str) or name not in KINDS:
        shown = repr(name)[:40]
        raise UsageError(f"{where}: {label} has type {shown}; known: {', '.join(KINDS)}")
    label = f"{label} ({name})"
    if KINDS[name].layer is Residual:  # {"type": "res", "layers": [...]}
        extra = sorted(set(table) - {"type", "layers"})
        if extra:
            raise UsageError(f"{where}: {label} has no option {extra[0]!r:.40} (only layers)")
        return label, name, {"body": _list_entries(table.get("layers"), f"{label} layers", where)}
    known = {option.name: option for option in KINDS[name].options}
    options = {}
    for key, value in table.items():
        if key == "type":
            continue
        if key not in known:
            names = ", ".join(known) or "none"
            raise UsageError(f"{where}: {label} has no option {key!r} (options: {names})")
        is_int = known[key].type is int
        wanted = (int,) if is_int else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            kind = "an integer" if is_int else "a number"
            raise UsageError(f"{where}: {label} option {key} is {value!r:.40}, not {kind}")
        options[key] = value
    return label, name, options


# --- canonical tensors ----------------------------------------------------------------------


def tensors(arch: Arch) -> dict[str, Tensor]:
    """Every canonical tensor, parameters and buffers, in the order of PyTorch's state_dict."""
    return {k: v for layer in arch.layers for k, v in kind_of(layer).tensors(layer).items()}


def layer_trainable(layer: Layer) -> list[str]:
    """The names of one layer's trainable tensors (weight before bias)."""
    return [k for k, t in kind_of(layer).tensors(layer).items() if t.trainable]


def param_shapes(arch: Arch) -> dict[str, Shape]:
    """The trainable tensors' names and shapes, in layer order (weight before bias)."""
    return {k: t.shape for k, t in tensors(arch).items() if t.trainable}


def state_shapes(arch: Arch) -> dict[str, Shape]:
    """Every canonical tensor's name and shape, parameters and buffers, in state_dict order."""
    return {k: t.shape for k, t in tensors(arch).items()}


def split_params(tensors: dict[str, Any], arch: Arch) -> tuple[dict[str, Any], dict[str, Any]]:
    """Canonical tensors -> (trainable parameters, buffers), each keeping the canonical order."""
    params = {k: v for k, v in tensors.items() if k in arch.trainable}
    return params, {k: v for k, v in tensors.items() if k not in arch.trainable}


def tensor_dtype(arch: Arch, name: str, dtype: Any) -> np.dtype:
    """The dtype of canonical tensor `name` (or of its momentum buffer) in a network of `arch`
    computing in `dtype`: int64 for a counter, as in PyTorch."""
    return np.dtype(np.int64) if name in arch.counters else np.dtype(dtype)


def float_dtype(params: Params) -> np.dtype:
    """The dtype a network's float tensors compute in (a checked network has one); float64
    where it has none."""
    return next((v.dtype for v in params.values() if v.dtype.kind == "f"), np.dtype(np.float64))


def cast_params(params: Params, arch: Arch, dtype: Any) -> Params:
    """Canonical tensors in `dtype` (counters int64), copied; a UsageError naming a tensor
    whose finite values `dtype` cannot hold (a float64 weight of 1e300 in float32)."""
    cast = {}
    for name, value in params.items():
        value = np.asarray(value)
        with np.errstate(over="ignore"):
            cast[name] = value.astype(tensor_dtype(arch, name, dtype))
        finite = cast[name].dtype.kind != "f" or np.isfinite(cast[name]).all()
        if not finite and np.isfinite(value).all():  # NaN and infinities are refused elsewhere
            largest = float(np.abs(value).max())
            raise UsageError(f"{name}: a value of {largest:.3g} does not fit {cast[name].dtype}")
    return cast


INITS = ("he", "lab", "torch", "xavier-uniform", "xavier-normal")


def init_params(arch: Arch, scheme: str = "he", seed: int = 0, dtype=np.float32) -> Params:
    """Draw the canonical tensors from `seed`, identically for every implementation.

    Weights and biases (conv and linear layers):
    he:    weights ~ N(0, 2 / fan_in), biases 0 (Kaiming/He, suited to ReLU).
    lab:   weights ~ N(0, 1) * 0.01, biases 0 (the lab's `randn * 0.01`).
    torch: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default).
    xavier-uniform: weights ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)), biases 0;
    xavier-normal: weights ~ N(0, 2 / (fan_in + fan_out)), biases 0 (Glorot's, as
    torch.nn.init.xavier_uniform_/xavier_normal_ with gain 1).
    Every other tensor as its kind's entry says, in every scheme (BatchNorm's scale and
    running variance 1, its shift and running mean 0, as PyTorch's).
    """
    if scheme not in INITS:
        raise UsageError(f"unknown initialisation {scheme!r}; choose from {', '.join(INITS)}")
    rng = np.random.default_rng(seed)
    return {
        name: _initial_value(tensor, scheme, rng).astype(tensor_dtype(arch, name, dtype))
        for name, tensor in tensors(arch).items()
    }


def _initial_value(tensor: Tensor, scheme: str, rng: np.random.Generator) -> np.ndarray:
    match tensor.initial, scheme:
        case (("weight" | "bias"), "torch"):
            bound = 1 / np.sqrt(tensor.fan_in)
            return rng.uniform(-bound, bound, size=tensor.shape)
        case "weight", "he":
            return rng.standard_normal(tensor.shape) * np.sqrt(2 / tensor.fan_in)
        case "weight", "lab":
            return rng.standard_normal(tensor.shape) * 0.01
        case "weight", "xavier-uniform":
            bound = np.sqrt(6 / (tensor.fan_in + tensor.fan_out))
            return rng.uniform(-bound, bound, size=tensor.shape)
        case "weight", "xavier-normal":
            return rng.standard_normal(tensor.shape) * np.sqrt(2 / (tensor.fan_in + tensor.fan_out))
        case "bias" | "zero" | "count", _:
            return np.zeros(tensor.shape)
        case "one", _:
            return np.ones(tensor.shape)
    raise ValueError(f"no initial value for a {tensor.initial} tensor under {scheme}")
