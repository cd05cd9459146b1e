"""The kinds of layer a network is made of, one entry each in `KINDS`.

An entry holds everything the shared code knows about its kind: its token and options with
their bounds, how a layer is built and checked against its input shape, its output shape,
how it is written back as a token, its canonical tensors with their shapes and initial
values, and what the cross-check asks of it. The spec parser, the grammar text,
`init_params` and the cross-check read this table; the implementations keep their own
`match` over the layer classes below (the mirror a reader diffs), and a test checks that each
handles every kind. Adding a kind: docs/ARCHITECTURE.md, "Where to add".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from shared.errors import UsageError

Shape = tuple[int, ...]
INPUT_SHAPE = (1, 28, 28)  # every network takes x (N, 1, 28, 28)
NUM_CLASSES = 10
MAX_CONV_COLUMNS = 2_000_000  # a conv's unfolded input (C*k*k*H'*W') per example: 512 MB at 64


# --- the layers, as the implementations match on them ---------------------------------------


@dataclass(frozen=True)
class Conv:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    kind: ClassVar[str] = "conv"


@dataclass(frozen=True)
class Pool:
    name: str
    op: str  # "max" or "avg"
    size: int
    stride: int

    @property
    def kind(self) -> str:
        return f"{self.op}pool"


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
    kind: ClassVar[str] = "bn"


@dataclass(frozen=True)
class Dropout:
    """Inverted dropout: each unit of one example's input `shape` is zeroed with probability p
    in training and the rest scaled by 1 / (1 - p); the identity in evaluation."""

    name: str
    p: float
    shape: tuple[int, ...]
    kind: ClassVar[str] = "dropout"


@dataclass(frozen=True)
class Activation:
    name: str
    fn: str  # "relu", "tanh" or "sigmoid"

    @property
    def kind(self) -> str:
        return self.fn


@dataclass(frozen=True)
class Flatten:
    name: str
    kind: ClassVar[str] = "flatten"


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    kind: ClassVar[str] = "fc"


Layer = Conv | Pool | BatchNorm | Dropout | Activation | Flatten | Linear


# --- the table of layer kinds ----------------------------------------------------------------

Fail = Callable[[str], UsageError]


@dataclass(frozen=True)
class Option:
    """One option of a layer kind. In a token it is a number after `letter` ("" for the
    number right after the kind's name: the 16 of conv16k5); in a file table it is `name`.
    `default` None makes it required; a function computes it from the other options.
    Numbers below `low` (or from `high` on, for a float) are refused, naming it as `label`."""

    name: str
    letter: str
    metavar: str
    type: type  # int or float
    default: Any = None
    low: float = 1
    high: float = math.inf
    label: str = ""
    example: float = 2  # for the message that shows how to write a token

    @property
    def pattern(self) -> str:
        # 7 digits, so that every number a table may hold has a token (see `_table_entry`).
        return r"(\d{1,7})" if self.type is int else r"(\d?\.\d+|\d)"

    def __post_init__(self):
        if self.type not in (int, float):
            raise ValueError(f"option {self.name}: a number, int or float, not {self.type}")

    def default_in(self, options: dict[str, Any]) -> Any:
        """The default among `options` (the others given)."""
        return self.default(options) if callable(self.default) else self.default

    def check(self, value: Any, fail: Fail) -> None:
        label = self.label or self.name
        if self.type is int and value < self.low:
            raise fail(f"{label} {value} is not at least {self.low}")
        if self.type is float and not self.low <= value < self.high:
            raise fail(f"{label} {value} is not in [{self.low:g}, {self.high:g})")


@dataclass(frozen=True)
class Tensor:
    """A canonical tensor of a layer: its shape, whether training moves it, and its initial
    value: "weight" and "bias" are drawn by the initialisation scheme (with the weight's
    `fan_in`), "one" and "zero" are constant in every scheme, "count" is an int64 counter
    from 0. A `nonnegative` tensor (a running variance) can never hold a value below 0."""

    shape: Shape
    trainable: bool
    initial: str
    fan_in: int = 0
    nonnegative: bool = False

    INITIAL_VALUES: ClassVar[tuple[str, ...]] = ("weight", "bias", "one", "zero", "count")

    def __post_init__(self):
        if self.initial not in self.INITIAL_VALUES:
            raise ValueError(f"a tensor's initial value is one of {self.INITIAL_VALUES}")
        if self.initial in ("weight", "bias") and self.fan_in < 1:
            raise ValueError("a drawn weight or bias needs its weight's fan_in")

    @property
    def counter(self) -> bool:
        """Whether it counts (int64, as in PyTorch) rather than holds floats."""
        return self.initial == "count"


@dataclass(frozen=True)
class Kinks:
    """Where a layer's derivative jumps, which the cross-check keeps its batches away from:
    at an input value of 0 ("zero": ReLU; `values` gives the inputs), or at a tie between
    the two largest values of a window ("tie": max-pooling; `values` gives the windows,
    (N, C, H', W', k*k))."""

    at: str
    values: Callable[[Any, np.ndarray], np.ndarray]

    def __post_init__(self):
        if self.at not in ("zero", "tie"):
            raise ValueError(f"a kink is at a zero or a tie, not at {self.at!r}")


@dataclass(frozen=True)
class LayerKind:
    """Everything the shared code knows about one kind of layer; no field has a default, so
    an entry missing a piece fails when this module is imported.

    `input` is "spatial" (C, H, W), "flat" (F,) or "any"; `build(name, options, shape, fail)`
    makes the layer for its input shape, refusing (with `fail`) what cannot work;
    `options_of(layer)` gives back the options its token writes; `tensors(layer)` its
    canonical tensors by state_dict name, in PyTorch's order. What one image costs it, from
    its input and output shapes (shared/cost.py): `macs`, the multiply-adds of its forward
    pass (element-wise work is memory traffic, not counted), and `unfolded`, the values NumPy
    copies its input into (a conv's columns, a pool's windows). For the cross-check:
    `batch_statistics` (it normalises across the batch, so a batch of one cannot train it),
    `keeps_zeros` (an exact-zero input gives an exact-zero output with zero biases), `kinks`."""

    name: str
    layer: type
    help: str
    module_name: str  # the name its layers get, numbered when repeated: conv1, pool2
    options: tuple[Option, ...]
    input: str
    build: Callable[[str, dict[str, Any], Shape, Fail], Any]
    output_shape: Callable[[Any, Shape], Shape]
    options_of: Callable[[Any], dict[str, Any]]
    tensors: Callable[[Any], dict[str, Tensor]]
    macs: Callable[[Any, Shape, Shape], int]
    unfolded: Callable[[Any, Shape, Shape], int]
    batch_statistics: bool
    keeps_zeros: bool
    kinks: Kinks | None

    def __post_init__(self):
        letters = [option.letter for option in self.options]
        if letters[:1] not in ([], [""]) or "" in letters[1:] or len(set(letters)) < len(letters):
            raise ValueError(f"layer kind {self.name}: only the first option goes without letter")
        if self.input not in ("spatial", "flat", "any"):
            raise ValueError(f"layer kind {self.name}: input {self.input!r}")

    @property
    def usage(self) -> str:
        """The token's form, such as convC[kK][sS][pP]."""
        first, rest = self.options[:1], self.options[1:]
        return (
            self.name
            + "".join(o.metavar for o in first)
            + "".join(f"[{o.letter}{o.metavar}]" for o in rest)
        )

    @cached_property
    def pattern(self) -> re.Pattern:
        parts = [re.escape(self.name)]
        for option in self.options:
            number = option.pattern
            parts.append(number if not option.letter else f"(?:{option.letter}{number})?")
        return re.compile("".join(parts))

    @property
    def example(self) -> str:
        """How to write a token of this kind, with an example or two."""
        if not self.options:
            return self.name
        examples = [o.example for o in self.options]
        short = self.name + _number(examples[0])
        full = self.name + "".join(f"{o.letter}{_number(o.example)}" for o in self.options)
        return f"{self.usage}, e.g. {short}" + (f" or {full}" if len(self.options) > 2 else "")

    def token(self, layer: Layer) -> str:
        """The canonical token of a layer: its options, defaults left out."""
        options = self.options_of(layer)
        text = self.name
        for option in self.options:
            value = options[option.name]
            if option.default is not None and value == option.default_in(options):
                continue
            text += f"{option.letter}{_number(value)}"
        return text


def _number(value: float) -> str:
    """A number as a token writes it: every digit a float has, never an exponent, so that
    the spec rebuilds this very value."""
    return np.format_float_positional(value, trim="-") if isinstance(value, float) else str(value)


def _same_shape(layer: Layer, shape: Shape) -> Shape:
    return shape


def _no_options(layer: Layer) -> dict[str, Any]:
    return {}


def _no_tensors(layer: Layer) -> dict[str, Tensor]:
    return {}


def _nothing(layer: Layer, shape: Shape, out: Shape) -> int:
    return 0


def _weight_and_bias(name: str, weight_shape: Shape) -> dict[str, Tensor]:
    """A weight (out, in, ...) and its bias (out,), drawn by the initialisation scheme."""
    fan_in = math.prod(weight_shape[1:])
    return {
        f"{name}.weight": Tensor(weight_shape, True, "weight", fan_in),
        f"{name}.bias": Tensor(weight_shape[:1], True, "bias", fan_in),
    }


def _windows(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    """x (N, C, H, W) -> view (N, C, H', W', size*size) of its windows moved by stride."""
    windows = sliding_window_view(x, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]
    return windows.reshape(*windows.shape[:4], -1)


def show_shape(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _padded(shape: Shape, padding: int) -> str:
    padded = show_shape((shape[1] + 2 * padding, shape[2] + 2 * padding))
    return f"{padded} (padded by {padding})" if padding else padded


def _sliding(extent: int, size: int, stride: int, padding: int = 0) -> int:
    """Windows along one axis, as PyTorch counts them."""
    return (extent + 2 * padding - size) // stride + 1


def _build_conv(name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> Conv:
    k, padding = o["kernel"], o["padding"]
    if padding >= k:
        raise fail(f"padding {padding} is not smaller than the kernel {k}")
    if k > min(shape[1:]) + 2 * padding:
        raise fail(f"its {k}x{k} kernel is larger than its {_padded(shape, padding)} input")
    conv = Conv(name, shape[0], o["channels"], k, o["stride"], padding)
    columns = _columns(conv, shape, _conv_shape(conv, shape))
    if columns > MAX_CONV_COLUMNS:
        # NumPy's im2col holds this many values per image.
        raise fail(f"it unfolds each image into {columns} values, more than {MAX_CONV_COLUMNS}")
    return conv


def _columns(conv: Conv, shape: Shape, out: Shape) -> int:
    """The values of one image's input unfolded for the conv's product (NumPy's im2col)."""
    return math.prod(out[1:]) * conv.in_channels * conv.kernel_size**2


def _conv_shape(conv: Conv, shape: Shape) -> Shape:
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    return (conv.out_channels, *(_sliding(n, k, s, p) for n in shape[1:]))


def _build_pool(op: str) -> Callable[[str, dict[str, Any], Shape, Fail], Pool]:
    def build(name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> Pool:
        size, stride = o["size"], o["stride"]
        if size > min(shape[1:]):
            raise fail(f"its {size}x{size} window is larger than its {show_shape(shape)} input")
        for extent in shape[1:]:
            if (extent - size) % stride:
                raise fail(
                    f"{size}x{size} windows with stride {stride} do not tile its "
                    f"{show_shape(shape)} input ({extent} - {size} is not a multiple of {stride})"
                )
        return Pool(name, op, size, stride)

    return build


def _pool_kind(op: str, help: str, kinks: Kinks | None) -> LayerKind:
    return LayerKind(
        name=f"{op}pool",
        layer=Pool,
        help=help,
        module_name="pool",
        options=(
            Option("size", "", "K", int),
            Option("stride", "s", "S", int, default=lambda o: o["size"]),
        ),
        input="spatial",
        build=_build_pool(op),
        output_shape=lambda p, s: (s[0], *(_sliding(n, p.size, p.stride) for n in s[1:])),
        options_of=lambda p: {"size": p.size, "stride": p.stride},
        tensors=_no_tensors,
        macs=_nothing,
        unfolded=lambda p, shape, out: math.prod(out) * p.size * p.size,
        batch_statistics=False,
        keeps_zeros=True,
        kinks=kinks,
    )


def _batch_norm_tensors(bn: BatchNorm) -> dict[str, Tensor]:
    c = (bn.num_features,)
    return {
        f"{bn.name}.weight": Tensor(c, True, "one"),
        f"{bn.name}.bias": Tensor(c, True, "zero"),
        f"{bn.name}.running_mean": Tensor(c, False, "zero"),
        f"{bn.name}.running_var": Tensor(c, False, "one", nonnegative=True),
        f"{bn.name}.num_batches_tracked": Tensor((), False, "count"),
    }


def _activation_kind(fn: str, help: str, keeps_zeros: bool, kinks: Kinks | None) -> LayerKind:
    return LayerKind(
        name=fn,
        layer=Activation,
        help=help,
        module_name=fn,
        options=(),
        input="any",
        build=lambda name, o, shape, fail: Activation(name, fn),
        output_shape=_same_shape,
        options_of=_no_options,
        tensors=_no_tensors,
        macs=_nothing,
        unfolded=_nothing,
        batch_statistics=False,
        keeps_zeros=keeps_zeros,
        kinks=kinks,
    )


def _build_flatten(name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> Flatten:
    return Flatten(name)


_KINDS = (
    LayerKind(
        name="conv",
        layer=Conv,
        help="convolution, C output channels, K x K kernel (3), stride S (1), padding P (K//2)",
        module_name="conv",
        options=(
            Option("channels", "", "C", int, example=16),
            Option("kernel", "k", "K", int, default=3, example=5),
            Option("stride", "s", "S", int, default=1),
            Option("padding", "p", "P", int, default=lambda o: o["kernel"] // 2, low=0),
        ),
        input="spatial",
        build=_build_conv,
        output_shape=_conv_shape,
        options_of=lambda c: {
            "channels": c.out_channels,
            "kernel": c.kernel_size,
            "stride": c.stride,
            "padding": c.padding,
        },
        tensors=lambda c: _weight_and_bias(
            c.name, (c.out_channels, c.in_channels, c.kernel_size, c.kernel_size)
        ),
        macs=lambda c, shape, out: math.prod(out) * c.in_channels * c.kernel_size**2,
        unfolded=_columns,
        batch_statistics=False,
        keeps_zeros=True,
        kinks=None,
    ),
    _pool_kind(
        "max",
        "max-pooling over K x K windows with stride S (K); must tile the input",
        Kinks("tie", lambda p, x: _windows(x, p.size, p.stride)),
    ),
    _pool_kind("avg", "average-pooling, the same", None),
    LayerKind(
        name="bn",
        layer=BatchNorm,
        help="BatchNorm (2d after a conv or pool, 1d after flatten)",
        module_name="bn",
        options=(),
        input="any",
        build=lambda name, o, shape, fail: BatchNorm(name, shape[0], len(shape) == 3),
        output_shape=_same_shape,
        options_of=_no_options,
        tensors=_batch_norm_tensors,
        macs=_nothing,
        unfolded=_nothing,
        # The batch mean it subtracts is a sum in an order that differs by implementation.
        batch_statistics=True,
        keeps_zeros=False,
        kinks=None,
    ),
    _activation_kind("relu", "max(x, 0)", True, Kinks("zero", lambda a, x: x)),
    _activation_kind("tanh", "tanh(x)", True, None),
    # sigmoid(0) is 1/2: after it, equal values come from sums in orders that differ.
    _activation_kind("sigmoid", "1 / (1 + exp(-x))", False, None),
    LayerKind(
        name="dropout",
        layer=Dropout,
        help="dropout with drop probability P in [0, 1)",
        module_name="dropout",
        options=(
            Option("p", "", "P", float, low=0.0, high=1.0, label="drop probability", example=0.3),
        ),
        input="any",
        build=lambda name, o, shape, fail: Dropout(name, float(o["p"]), shape),
        output_shape=_same_shape,
        options_of=lambda d: {"p": d.p},
        tensors=_no_tensors,
        macs=_nothing,
        unfolded=_nothing,
        batch_statistics=False,
        keeps_zeros=True,
        kinks=None,
    ),
    LayerKind(
        name="flatten",
        layer=Flatten,
        help="C x H x W -> C*H*W, before the first fc",
        module_name="flatten",
        options=(),
        input="spatial",
        build=_build_flatten,
        output_shape=lambda f, s: (math.prod(s),),
        options_of=_no_options,
        tensors=_no_tensors,
        macs=_nothing,
        unfolded=_nothing,
        batch_statistics=False,
        keeps_zeros=True,
        kinks=None,
    ),
    LayerKind(
        name="fc",
        layer=Linear,
        help="fully connected, N outputs; the network must end with 10 outputs",
        module_name="fc",
        options=(Option("features", "", "N", int, example=128),),
        input="flat",
        build=lambda name, o, shape, fail: Linear(name, shape[0], o["features"]),
        output_shape=lambda f, s: (f.out_features,),
        options_of=lambda f: {"features": f.out_features},
        tensors=lambda f: _weight_and_bias(f.name, (f.out_features, f.in_features)),
        macs=lambda f, shape, out: f.in_features * f.out_features,
        unfolded=_nothing,
        batch_statistics=False,
        keeps_zeros=True,
        kinks=None,
    ),
)
KINDS: dict[str, LayerKind] = {kind.name: kind for kind in _KINDS}


def _check_table() -> None:
    """Every layer class has a kind, and names its kind as `kind_of` needs (a ClassVar or a
    property); checked when this module is imported."""
    unbuilt = set(Layer.__args__) - {kind.layer for kind in _KINDS}
    if unbuilt:
        raise TypeError(f"layer classes without a kind: {sorted(c.__name__ for c in unbuilt)}")
    for kind in _KINDS:
        if "name" not in {f.name for f in fields(kind.layer)} or not hasattr(kind.layer, "kind"):
            raise TypeError(f"layer class {kind.layer.__name__} needs a name and a kind")
        named = kind.layer.kind  # a ClassVar; a property (one class, several kinds) is not a str
        if isinstance(named, str) and named != kind.name:
            raise TypeError(
                f"layer class {kind.layer.__name__} names kind {named}, not {kind.name}"
            )


_check_table()


def kind_of(layer: Layer) -> LayerKind:
    return KINDS[layer.kind]


def output_shape(layer: Layer, shape: Shape) -> Shape:
    """One example's output shape for input `shape` (C, H, W) or (F,)."""
    return kind_of(layer).output_shape(layer, shape)
