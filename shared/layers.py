"""The layers a network is made of, as data: the classes the implementations match on, and the
records every kind of layer is described by (`LayerKind`, with its `Option`s, `Tensor`s and
`Kinks`). The table of kinds itself is shared/kinds.py."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from shared.errors import UsageError

Shape = tuple[int, ...]
INPUT_SHAPE = (1, 28, 28)  # every network takes x (N, 1, 28, 28)
NUM_CLASSES = 10


# --- the layers, as the implementations match on them ---------------------------------------


@dataclass(frozen=True)
class Conv:
    name: str
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    bias: bool = True
    kind: ClassVar[str] = "conv"


@dataclass(frozen=True)
class Pool:
    """Max- or average-pooling over size x size windows moved by stride over the input padded
    by `padding` on every side (with -inf for max, with zeros counted in the average for avg,
    as PyTorch's defaults); windows that do not fit are dropped, as PyTorch's floor does."""

    name: str
    op: str  # "max" or "avg"
    size: int
    stride: int
    padding: int = 0

    @property
    def kind(self) -> str:
        return f"{self.op}pool"


@dataclass(frozen=True)
class AdaptivePool:
    """Average-pooling to `size` x `size` outputs, each the mean of a `window` x `window`
    block of the input (PyTorch's AdaptiveAvgPool2d where the size divides the input)."""

    name: str
    size: int
    window: int
    kind: ClassVar[str] = "adaptiveavgpool"


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
    """Inverted dropout: each unit of one example's mask `shape` is zeroed with probability p
    in training and the rest scaled by 1 / (1 - p); the identity in evaluation. The mask is
    the input's shape, or (C, 1, 1) for whole channels (`channelwise`, PyTorch's Dropout2d)."""

    name: str
    p: float
    shape: tuple[int, ...]
    channelwise: bool = False

    @property
    def kind(self) -> str:
        return "dropout2d" if self.channelwise else "dropout"


@dataclass(frozen=True)
class Activation:
    """An element-wise function: relu, leakyrelu (its negative `param`, the slope), elu
    (`param` alpha), gelu (exact, with erf), gelutanh (its tanh approximation), tanh,
    sigmoid."""

    name: str
    fn: str
    param: float | None = None

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


@dataclass(frozen=True)
class Residual:
    """out = body(x) + shortcut(x), torchvision's BasicBlock without its last ReLU (which
    follows as a layer of its own): `body` a chain of layers, `shortcut` () for the identity,
    or where the body changes the shape a 1x1 convolution with the body's stride and no bias,
    and a BatchNorm after it when the body has one (torchvision's `downsample`). Its layers'
    names start with the block's: block1.conv1, block1.downsample.0."""

    name: str
    body: tuple[Layer, ...]
    shortcut: tuple[Layer, ...] = ()
    kind: ClassVar[str] = "res"

    @property
    def layers(self) -> tuple[Layer, ...]:
        """Its layers in PyTorch's state_dict order: the body's, then the shortcut's."""
        return self.body + self.shortcut


Layer = Conv | Pool | AdaptivePool | BatchNorm | Dropout | Activation | Flatten | Linear | Residual

Fail = Callable[[str], UsageError]


# Every option's numbers stay below this, the 7 digits a token writes before any point, so
# that every network has a canonical spec.
TOKEN_BOUND = 10**7


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
        # 7 digits before any point, so that every number below TOKEN_BOUND has a token.
        return r"(\d{1,7})" if self.type is int else r"(\d{0,7}\.\d+|\d{1,7})"

    def __post_init__(self):
        if self.type not in (int, float):
            raise ValueError(f"option {self.name}: a number, int or float, not {self.type}")

    def default_in(self, options: dict[str, Any]) -> Any:
        """The default among `options` (the others given)."""
        return self.default(options) if callable(self.default) else self.default

    def check(self, value: Any, fail: Fail) -> None:
        label = self.label or self.name
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        high = min(self.high, TOKEN_BOUND)  # past it, no token could write the value
        if self.type is int and value < self.low:
            raise fail(f"{label} {shown} is not at least {self.low}")
        if self.type is int and value >= high:
            raise fail(f"{label} {shown} is not below {high}")
        if self.type is float and not self.low <= value < high:
            raise fail(f"{label} {shown} is not in [{self.low:g}, {high:g})")


@dataclass(frozen=True)
class Tensor:
    """A canonical tensor of a layer: its shape, whether training moves it, and its initial
    value: "weight" and "bias" are drawn by the initialisation scheme (with the weight's
    `fan_in` and `fan_out`), "one" and "zero" are constant in every scheme, "count" is an
    int64 counter from 0. A `nonnegative` tensor (a running variance) is never below 0."""

    shape: Shape
    trainable: bool
    initial: str
    fan_in: int = 0
    fan_out: int = 0
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
        """The token's form, such as convC[kK][sS][pP][bB]: optional parts in brackets; a
        block's, res(L), holds its layers."""
        if self.layer is Residual:
            return f"{self.name}(L)"
        return self.name + "".join(
            f"{o.letter}{o.metavar}" if o.default is None else f"[{o.letter}{o.metavar}]"
            for o in self.options
        )

    @cached_property
    def pattern(self) -> re.Pattern:
        parts = [re.escape(self.name)]
        for option in self.options:
            written = f"{option.letter}{option.pattern}"
            parts.append(written if option.default is None else f"(?:{written})?")
        return re.compile("".join(parts), re.ASCII)  # \d: no other script's digits

    @property
    def example(self) -> str:
        """How to write a token of this kind, with an example or two."""
        if self.layer is Residual:
            return f"{self.usage}, e.g. {self.name}(conv16-bn-relu-conv16-bn)"
        if not self.options:
            return self.name
        examples = [o.example for o in self.options]
        short = self.name + _number(examples[0])
        full = self.name + "".join(f"{o.letter}{_number(o.example)}" for o in self.options)
        return f"{self.usage}, e.g. {short}" + (f" or {full}" if len(self.options) > 2 else "")

    def token(self, layer: Layer, every: bool = False) -> str:
        """The canonical token of a layer: its options, defaults left out (with `every`,
        written too: conv32k3s1p0b1 says what conv32k3p0 means)."""
        return self.written(self.options_of(layer), every)

    def written(self, options: dict[str, Any], every: bool = False) -> str:
        """The token of a layer of this kind with `options` (each of them given)."""
        text = self.name
        for option in self.options:
            value = options[option.name]
            if not every and option.default is not None and value == option.default_in(options):
                continue
            text += f"{option.letter}{_number(value)}"
        return text


def _number(value: float) -> str:
    """A number as a token writes it: every digit a float has, never an exponent, so that
    the spec rebuilds this very value."""
    return np.format_float_positional(value, trim="-") if isinstance(value, float) else str(value)


def show_shape(shape: Shape) -> str:
    return "x".join(map(str, shape))


# --- sliding windows, as every implementation that slices them takes them --------------------


def window_offsets(x: Any, k: int, stride: int) -> list[Any]:
    """x (N, C, H, W), a NumPy or JAX array -> k*k strided slices (N, C, H', W'), offset (i, j)
    in row-major order: offset (i, j) of every k x k window moved by stride, with H' = (H - k)
    // stride + 1 as in PyTorch (rows that do not fill a window dropped). NumPy's are views."""
    h, w = x.shape[2:]
    ho, wo = (h - k) // stride + 1, (w - k) // stride + 1
    return [
        x[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
        for i in range(k)
        for j in range(k)
    ]


def pass_steps(layers: tuple[Layer, ...]) -> list[tuple[Layer, ...]]:
    """`layers` as NumPy's and JAX's passes run them: a layer a step, but a ReLU and the
    max-pool over its output one step, max-pool first and the ReLU on the pooled values.
    max(relu(x)) = relu(max(x)) and the gradients agree (but for the sign of some zeros),
    for a quarter of the ReLU's work over 2x2 windows (docs/PERFORMANCE.md). PyTorch runs
    the layers as written, as a user's module does. The profile times a step a row."""
    steps: list[tuple[Layer, ...]] = []
    for layer in layers:
        if steps and len(steps[-1]) == 1 and _relu_then_max_pool(steps[-1][0], layer):
            steps[-1] += (layer,)
        else:
            steps.append((layer,))
    return steps


def run_order(layers: tuple[Layer, ...]) -> list[Layer]:
    """`layers` in the order NumPy's and JAX's passes run them: pass_steps, each step's
    layers in turn, but a ReLU after the max-pool it is stepped with."""
    return [layer for step in pass_steps(layers) for layer in reversed(step)]


def step_name(step: tuple[Layer, ...]) -> str:
    """A step's name (pass_steps): its layers' names joined by "+", as `relu1+pool1`."""
    return "+".join(layer.name for layer in step)


def _relu_then_max_pool(first: Layer, second: Layer) -> bool:
    """Whether `second` max-pools `first`'s output, which a ReLU makes."""
    return (
        isinstance(first, Activation)
        and first.fn == "relu"
        and isinstance(second, Pool)
        and second.op == "max"
    )
