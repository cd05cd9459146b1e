"""The kinds of layer a network is made of, one entry each in `KINDS`.

An entry holds everything the shared code knows about its kind: its token and options with
their bounds, how a layer is built and checked against its input shape, its output shape,
how it is written back as a token, its canonical tensors with their shapes and initial
values, and what the cross-check asks of it. The spec parser, the grammar text,
`init_params` and the cross-check read this table; the implementations keep their own
`match` over the layer classes of shared/layers.py (the mirror a reader diffs), and a test
checks that each handles every kind. Adding a kind: docs/ARCHITECTURE.md, "Where to add".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from shared.layers import (
    INPUT_SHAPE,
    Activation,
    AdaptivePool,
    BatchNorm,
    Conv,
    Dropout,
    Fail,
    Flatten,
    Kinks,
    Layer,
    LayerKind,
    Linear,
    Option,
    Pool,
    Residual,
    Shape,
    Tensor,
    show_shape,
)

MAX_CONV_COLUMNS = 2_000_000  # a conv's unfolded input (C*k*k*H'*W') per example: 512 MB at 64


def _same_shape(layer: Layer, shape: Shape) -> Shape:
    return shape


def _no_options(layer: Layer) -> dict[str, Any]:
    return {}


def _no_tensors(layer: Layer) -> dict[str, Tensor]:
    return {}


def _nothing(layer: Layer, shape: Shape, out: Shape) -> int:
    return 0


def _weight_and_bias(name: str, weight_shape: Shape) -> dict[str, Tensor]:
    """A weight (out, in, k, k) or (out, in) and its bias (out,), drawn by the initialisation
    scheme with the weight's fans as PyTorch computes them (in or out x the kernel's size)."""
    field = math.prod(weight_shape[2:])
    fans = (weight_shape[1] * field, weight_shape[0] * field)
    return {
        f"{name}.weight": Tensor(weight_shape, True, "weight", *fans),
        f"{name}.bias": Tensor(weight_shape[:1], True, "bias", *fans),
    }


def _windows(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    """x (N, C, H, W) -> view (N, C, H', W', size*size) of its windows moved by stride."""
    windows = sliding_window_view(x, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]
    return windows.reshape(*windows.shape[:4], -1)


def _padded(shape: Shape, padding: int) -> str:
    padded = show_shape((shape[1] + 2 * padding, shape[2] + 2 * padding))
    return f"{padded} (padded by {padding})" if padding else padded


def sliding(extent: int, size: int, stride: int, padding: int = 0) -> int:
    """Windows along one axis, as PyTorch counts them."""
    return (extent + 2 * padding - size) // stride + 1


def _build_conv(name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> Conv:
    k, padding = o["kernel"], o["padding"]
    if padding >= k:
        raise fail(f"padding {padding} is not smaller than the kernel {k}")
    if k > min(shape[1:]) + 2 * padding:
        raise fail(f"its {k}x{k} kernel is larger than its {_padded(shape, padding)} input")
    conv = Conv(name, shape[0], o["channels"], k, o["stride"], padding, bool(o["bias"]))
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
    return (conv.out_channels, *(sliding(n, k, s, p) for n in shape[1:]))


def _conv_tensors(c: Conv) -> dict[str, Tensor]:
    shape = (c.out_channels, c.in_channels, c.kernel_size, c.kernel_size)
    tensors = _weight_and_bias(c.name, shape)
    return tensors if c.bias else {f"{c.name}.weight": tensors[f"{c.name}.weight"]}


def _build_pool(op: str) -> Callable[[str, dict[str, Any], Shape, Fail], Pool]:
    def build(name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> Pool:
        size, stride, padding = o["size"], o["stride"], o["padding"]
        if 2 * padding > size:  # PyTorch's bound: a window never wholly in the padding
            raise fail(f"padding {padding} is more than half its {size}x{size} window")
        if size > min(shape[1:]) + 2 * padding:
            raise fail(
                f"its {size}x{size} window is larger than its {_padded(shape, padding)} input"
            )
        return Pool(name, op, size, stride, padding)

    return build


def _pool_shape(pool: Pool, shape: Shape) -> Shape:
    return (shape[0], *(sliding(n, pool.size, pool.stride, pool.padding) for n in shape[1:]))


def _pool_kind(op: str, help: str, kinks: Kinks | None) -> LayerKind:
    return LayerKind(
        name=f"{op}pool",
        layer=Pool,
        help=help,
        module_name="pool",
        options=(
            Option("size", "", "K", int),
            Option("stride", "s", "S", int, default=lambda o: o["size"]),
            Option("padding", "p", "P", int, default=0, low=0),
        ),
        input="spatial",
        build=_build_pool(op),
        output_shape=_pool_shape,
        options_of=lambda p: {"size": p.size, "stride": p.stride, "padding": p.padding},
        tensors=_no_tensors,
        macs=_nothing,
        unfolded=lambda p, shape, out: math.prod(out) * p.size * p.size,
        batch_statistics=False,
        keeps_zeros=True,
        kinks=kinks,
    )


def _build_adaptive(name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> AdaptivePool:
    size = o["size"]
    if any(extent % size for extent in shape[1:]):
        raise fail(
            f"its {show_shape(shape)} input does not divide into {size}x{size} blocks "
            "(PyTorch's adaptive pooling would overlap its windows there)"
        )
    return AdaptivePool(name, size, shape[1] // size)


def _max_pool_windows(pool: Pool, x: np.ndarray) -> np.ndarray:
    """A max-pool's windows (N, C, H', W', k*k) of x padded with -inf, as it pools them."""
    p = pool.padding
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf) if p else x
    return _windows(padded, pool.size, pool.stride)


def _batch_norm_tensors(bn: BatchNorm) -> dict[str, Tensor]:
    c = (bn.num_features,)
    return {
        f"{bn.name}.weight": Tensor(c, True, "one"),
        f"{bn.name}.bias": Tensor(c, True, "zero"),
        f"{bn.name}.running_mean": Tensor(c, False, "zero"),
        f"{bn.name}.running_var": Tensor(c, False, "one", nonnegative=True),
        f"{bn.name}.num_batches_tracked": Tensor((), False, "count"),
    }


def _activation_kind(
    fn: str, help: str, keeps_zeros: bool, kinks: Kinks | None, param: Option | None = None
) -> LayerKind:
    """An element-wise kind, with its one option (a slope, an alpha) if it has one."""
    options = () if param is None else (param,)
    return LayerKind(
        name=fn,
        layer=Activation,
        help=help,
        module_name=fn,
        options=options,
        input="any",
        build=lambda name, o, shape, fail: Activation(
            name, fn, None if param is None else o[param.name]
        ),
        output_shape=_same_shape,
        options_of=lambda a: {} if param is None else {param.name: a.param},
        tensors=_no_tensors,
        macs=_nothing,
        unfolded=_nothing,
        batch_statistics=False,
        keeps_zeros=keeps_zeros,
        kinks=kinks,
    )


def _dropout_kind(name: str, help: str, channelwise: bool) -> LayerKind:
    def build(layer_name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> Dropout:
        mask = (shape[0], 1, 1) if channelwise else shape
        return Dropout(layer_name, o["p"], mask, channelwise)

    return LayerKind(
        name=name,
        layer=Dropout,
        help=help,
        module_name=name,
        options=(
            Option("p", "", "P", float, low=0.0, high=1.0, label="drop probability", example=0.3),
        ),
        input="spatial" if channelwise else "any",
        build=build,
        output_shape=_same_shape,
        options_of=lambda d: {"p": d.p},
        tensors=_no_tensors,
        macs=_nothing,
        unfolded=_nothing,
        batch_statistics=False,
        keeps_zeros=True,
        kinks=None,
    )


def _build_flatten(name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> Flatten:
    return Flatten(name)


def _build_residual(name: str, o: dict[str, Any], shape: Shape, fail: Fail) -> Residual:
    """The block of the body `o["body"]` (its layers built, named under `name`), with the
    shortcut its shapes need: the identity, or a 1x1 convolution with the stride that takes
    the input's size to the body's output's (and a BatchNorm where the body has one)."""
    body = o["body"]
    if any(isinstance(layer, Residual) for layer in body):
        raise fail("a block holds a chain of layers, not another block")
    out = _chain_shape(body, shape)
    if len(out) != 3:
        raise fail(f"its layers end flat ({out[0]} features); a block keeps C x H x W")
    if out == shape:
        return Residual(name, body)
    stride = -(-shape[1] // out[1])
    if any(sliding(n, 1, stride) != m for n, m in zip(shape[1:], out[1:], strict=True)):
        raise fail(
            f"its layers take {show_shape(shape)} to {show_shape(out)}, which no strided 1x1 "
            "convolution can match for the shortcut"
        )
    conv = Conv(f"{name}.downsample.0", shape[0], out[0], 1, stride, 0, bias=False)
    if not any(isinstance(layer, BatchNorm) for layer in body):
        return Residual(name, body, (conv,))
    return Residual(name, body, (conv, BatchNorm(f"{name}.downsample.1", out[0], spatial=True)))


def _chain_shape(layers: tuple[Layer, ...], shape: Shape) -> Shape:
    for layer in layers:
        shape = output_shape(layer, shape)
    return shape


def _block_tensors(block: Residual) -> dict[str, Tensor]:
    return {k: v for layer in block.layers for k, v in kind_of(layer).tensors(layer).items()}


_ZERO_KINK = Kinks("zero", lambda a, x: x)  # where the derivative jumps at an input of 0

_KINDS = (
    LayerKind(
        name="conv",
        layer=Conv,
        help="convolution, C output channels, K x K kernel (3), stride S (1), padding P "
        "(K//2, where PyTorch's Conv2d pads 0), bias B (1; 0: none)",
        module_name="conv",
        options=(
            Option("channels", "", "C", int, example=16),
            Option("kernel", "k", "K", int, default=3, example=5),
            Option("stride", "s", "S", int, default=1),
            Option("padding", "p", "P", int, default=lambda o: o["kernel"] // 2, low=0),
            Option("bias", "b", "B", int, default=1, low=0, high=2, example=0),
        ),
        input="spatial",
        build=_build_conv,
        output_shape=_conv_shape,
        options_of=lambda c: {
            "channels": c.out_channels,
            "kernel": c.kernel_size,
            "stride": c.stride,
            "padding": c.padding,
            "bias": int(c.bias),
        },
        tensors=_conv_tensors,
        macs=lambda c, shape, out: math.prod(out) * c.in_channels * c.kernel_size**2,
        unfolded=_columns,
        batch_statistics=False,
        keeps_zeros=True,
        kinks=None,
    ),
    _pool_kind(
        "max",
        "max-pooling over K x K windows, stride S (K), padding P (0) with -inf; windows that "
        "do not fit are dropped, as PyTorch's MaxPool2d",
        Kinks("tie", _max_pool_windows),
    ),
    _pool_kind("avg", "average-pooling, the same; padding counts as zeros (PyTorch's)", None),
    LayerKind(
        name="adaptiveavgpool",
        layer=AdaptivePool,
        help="average-pooling to N x N, N dividing the input (AdaptiveAvgPool2d; 1: global)",
        module_name="pool",
        options=(Option("size", "", "N", int, example=1),),
        input="spatial",
        build=_build_adaptive,
        output_shape=lambda a, s: (s[0], a.size, a.size),
        options_of=lambda a: {"size": a.size},
        tensors=_no_tensors,
        macs=_nothing,
        unfolded=lambda a, shape, out: math.prod(shape),
        batch_statistics=False,
        keeps_zeros=True,
        kinks=None,
    ),
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
    _activation_kind("relu", "max(x, 0)", True, _ZERO_KINK),
    _activation_kind(
        "leakyrelu",
        "x, or A x below 0 (A 0.01, in [0, 1))",
        True,
        _ZERO_KINK,
        Option("slope", "", "A", float, default=0.01, low=0.0, high=1.0, example=0.2),
    ),
    _activation_kind(
        "elu",
        "x, or A (exp(x) - 1) below 0 (A 1)",
        True,
        _ZERO_KINK,
        Option("alpha", "", "A", float, default=1.0, low=0.0, high=math.inf, example=0.5),
    ),
    _activation_kind("gelu", "x Phi(x), exact with erf (PyTorch's default)", True, None),
    _activation_kind(
        "gelutanh", "GELU's tanh approximation (JAX's default, PyTorch's 'tanh')", True, None
    ),
    _activation_kind("tanh", "tanh(x)", True, None),
    # sigmoid(0) is 1/2: after it, equal values come from sums in orders that differ.
    _activation_kind("sigmoid", "1 / (1 + exp(-x))", False, None),
    _dropout_kind("dropout", "dropout with drop probability P in [0, 1)", channelwise=False),
    _dropout_kind("dropout2d", "dropout of whole channels (Dropout2d)", channelwise=True),
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
    # What the shared code asks of a block itself is what it asks of its add: its layers
    # come before it in `nodes` and answer for themselves (tensors too, which a block lists
    # for its layers but which are counted once, theirs).
    LayerKind(
        name="res",
        layer=Residual,
        help="residual block: the '-'-joined layers L (no block) plus the block's input; "
        "where L changes the shape, the input through a 1x1 conv with L's stride (and a "
        "BatchNorm if L has one), as torchvision's BasicBlock. A ReLU after it is a layer "
        "of its own: res(conv16-bn-relu-conv16-bn)-relu",
        module_name="block",
        options=(),
        input="spatial",
        build=_build_residual,
        output_shape=lambda r, s: _chain_shape(r.body, s),
        options_of=_no_options,
        tensors=_block_tensors,
        macs=_nothing,
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


def token(layer: Layer, every: bool = False) -> str:
    """The layer's canonical token (`every`: with its default options written too); a
    block's holds its body's: res(conv16-bn-relu-conv16-bn)."""
    if isinstance(layer, Residual):
        return f"res({'-'.join(token(inner, every) for inner in layer.body)})"
    return kind_of(layer).token(layer, every)


@dataclass(frozen=True)
class Node:
    """One layer where it runs: `input` is the name of the layer whose output it takes (None:
    the images), `shape` one example's input shape and `out` its output's."""

    layer: Layer
    input: str | None
    shape: Shape
    out: Shape


def nodes(layers: tuple[Layer, ...], shape: Shape = INPUT_SHAPE) -> tuple[Node, ...]:
    """Every layer in an order it can run in, a block's after its body's and shortcut's (its
    node is the add): the graph that passes, costs and the cross-check walk."""
    return tuple(_nodes(layers, shape, None))


def _nodes(layers: tuple[Layer, ...], shape: Shape, source: str | None) -> list[Node]:
    found = []
    for layer in layers:
        if isinstance(layer, Residual):
            found += _nodes(layer.body, shape, source) + _nodes(layer.shortcut, shape, source)
        after = output_shape(layer, shape)
        found.append(Node(layer, source, shape, after))
        shape, source = after, layer.name
    return found
