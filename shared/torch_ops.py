"""What each PyTorch operation becomes in threefold: the modules, functional calls and
tensor methods a user's model may use, each with the options read off it and how they map to
a layer kind's options (or to nothing: an identity, a final log_softmax), and the
arithmetic a forward may start with to standardise its input. What cannot be computed the
same way is `Refused`, naming the option at fault."""

from __future__ import annotations

import operator
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

from shared.config import real_number
from shared.errors import UsageError
from shared.network import scaling_fits
from shared.torch_sizes import size_source, users


class Refused(Exception):
    """What one operation of the module cannot be: the option at fault and why."""

    def __init__(self, option: str, why: str):
        super().__init__(f"{option}: {why}")
        self.option, self.why = option, why


# One operation of the chain: (kind, options) for a layer; None for an identity, "drop" for a
# final log_softmax.
Taken = tuple[str, dict[str, Any]] | None | str
DROP = "drop"


def _pair(value: Any, option: str) -> int:
    """An int, or a pair of equal ints (threefold's windows and strides are square)."""
    if isinstance(value, tuple | list):
        if len(value) != 2 or value[0] != value[1]:
            raise Refused(f"{option}={tuple(value)}", "threefold's windows are square")
        value = value[0]
    if not isinstance(value, int):
        raise Refused(f"{option}={value!r}", "an int is needed")
    return value


def _require(options: dict[str, Any], option: str, wanted: Any, why: str) -> None:
    if options[option] != wanted:
        raise Refused(f"{option}={options[option]!r}", why)


def _conv(options: dict[str, Any]) -> Taken:
    _require(options, "groups", 1, "grouped convolutions are not supported")
    _require(options, "padding_mode", "zeros", "threefold pads with zeros")
    if _pair(options["dilation"], "dilation") != 1:
        raise Refused(f"dilation={options['dilation']!r}", "dilated convolutions are not supported")
    kernel = _pair(options["kernel_size"], "kernel_size")
    stride = _pair(options["stride"], "stride")
    padding = options["padding"]
    if padding == "valid":
        padding = 0
    elif padding == "same":
        if kernel % 2 == 0:  # PyTorch then pads one side more than the other
            raise Refused("padding='same'", f"an even kernel ({kernel}) pads unevenly")
        padding = kernel // 2
    padding = _pair(padding, "padding")
    return "conv", {
        "channels": options["out_channels"],
        "kernel": kernel,
        "stride": stride,
        "padding": padding,
        "bias": int(options["bias"]),
    }


def _pool(op: str) -> Callable[[dict[str, Any]], Taken]:
    def take(options: dict[str, Any]) -> Taken:
        padding = _pair(options["padding"], "padding")
        if op == "max":
            _require(options, "return_indices", False, "indices are not an output")
            if _pair(options["dilation"], "dilation") != 1:
                raise Refused(f"dilation={options['dilation']!r}", "dilated pooling")
        else:
            if padding:  # without it, the mean is the same either way
                why = "threefold averages over the padding too, PyTorch's default"
                _require(options, "count_include_pad", True, why)
            _require(options, "divisor_override", None, "the divisor is the window's size")
        size = _pair(options["kernel_size"], "kernel_size")
        stride = options["stride"]
        stride = size if stride is None or stride == [] else _pair(stride, "stride")
        # ceil_mode, which the importer checks against the traced shapes (see its _floored)
        ceil = bool(options["ceil_mode"])
        return f"{op}pool", {"size": size, "stride": stride, "padding": padding, "ceil": ceil}

    return take


def _adaptive(options: dict[str, Any]) -> Taken:
    size = options["output_size"]
    if isinstance(size, tuple | list) and None in size:
        raise Refused(f"output_size={tuple(size)}", "None keeps an input size; give both")
    return "adaptiveavgpool", {"size": _pair(size, "output_size")}


def _batch_norm(options: dict[str, Any]) -> Taken:
    _require(options, "affine", True, "threefold's BatchNorm learns its scale and shift")
    _require(options, "bias", True, "threefold's BatchNorm learns its shift")
    _require(options, "track_running_stats", True, "threefold keeps running statistics")
    _require(options, "momentum", 0.1, "threefold's running averages use PyTorch's 0.1")
    _require(options, "eps", 1e-5, "threefold's BatchNorm adds PyTorch's 1e-5")
    return "bn", {}


def _dropout(kind: str) -> Callable[[dict[str, Any]], Taken]:
    def take(options: dict[str, Any]) -> Taken:
        # A functional dropout's `training` as traced in training mode (self.training: True);
        # the importer checks that it is False in evaluation mode.
        training = options.get("training", True)
        if not isinstance(training, bool):
            raise Refused(f"training={training!r}", "a constant True or False is needed")
        return (kind, {"p": float(options["p"])}) if training else None  # never drops

    return take


def _gelu(options: dict[str, Any]) -> Taken:
    forms = {"none": "gelu", "tanh": "gelutanh"}
    if options["approximate"] not in forms:
        raise Refused(f"approximate={options['approximate']!r}", "'none' or 'tanh'")
    return forms[options["approximate"]], {}


def _softmax(final: bool) -> Callable[[dict[str, Any]], Taken]:
    def take(options: dict[str, Any]) -> Taken:
        # No dim: PyTorch's implicit one, 1 for the (N, classes) logits at the end (and a
        # deprecation warning); a softmax elsewhere is refused below.
        if options["dim"] not in (1, -1, None):
            raise Refused(f"dim={options['dim']!r}", "a softmax over the classes has dim 1")
        if final:  # only allowed last; the chain walk checks where it stands
            return DROP
        raise Refused(
            f"dim={options['dim']}",
            "threefold trains on logits with softmax cross-entropy, so a final softmax "
            "would be applied twice; return the logits (or log_softmax) instead",
        )

    return take


def _constant(kind: str, **fixed: Any) -> Callable[[dict[str, Any]], Taken]:
    return lambda options: (kind, dict(fixed))


def _with(kind: str, name: str, option: str) -> Callable[[dict[str, Any]], Taken]:
    return lambda options: (kind, {name: float(options[option])})


def _identity(options: dict[str, Any]) -> Taken:
    return None


_BATCH_NORM = ("affine", "bias", "track_running_stats", "momentum", "eps")
# Modules by class name: (the options read off the module, how they map).
MODULES: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], Taken]]] = {
    "Conv2d": (
        (
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "bias",
            "padding_mode",
        ),
        _conv,
    ),
    "MaxPool2d": (
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
        _pool("max"),
    ),
    "AvgPool2d": (
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
        _pool("avg"),
    ),
    "AdaptiveAvgPool2d": (("output_size",), _adaptive),
    "BatchNorm2d": (_BATCH_NORM, _batch_norm),
    "BatchNorm1d": (_BATCH_NORM, _batch_norm),
    "Dropout": (("p",), _dropout("dropout")),
    "Dropout2d": (("p",), _dropout("dropout2d")),
    "ReLU": ((), _constant("relu")),
    "LeakyReLU": (("negative_slope",), _with("leakyrelu", "slope", "negative_slope")),
    "ELU": (("alpha",), _with("elu", "alpha", "alpha")),
    "GELU": (("approximate",), _gelu),
    "Tanh": ((), _constant("tanh")),
    "Sigmoid": ((), _constant("sigmoid")),
    "Flatten": (("start_dim", "end_dim"), lambda o: ("flatten", dict(o))),
    "Linear": (("in_features", "out_features", "bias"), lambda o: ("fc", dict(o))),
    "Identity": ((), _identity),
    "LogSoftmax": (("dim",), _softmax(final=True)),
    "Softmax": (("dim",), _softmax(final=False)),
}

# Functions and tensor methods: (their parameters in order with defaults, how they map).
Signature = tuple[tuple[str, Any], ...]
_REQUIRED = object()
_POOL_MAX: Signature = (
    ("input", _REQUIRED),
    ("kernel_size", _REQUIRED),
    ("stride", None),
    ("padding", 0),
    ("dilation", 1),
    ("ceil_mode", False),
    ("return_indices", False),
)
_POOL_AVG: Signature = (
    ("input", _REQUIRED),
    ("kernel_size", _REQUIRED),
    ("stride", None),
    ("padding", 0),
    ("ceil_mode", False),
    ("count_include_pad", True),
    ("divisor_override", None),
)
_UNARY: Signature = (("input", _REQUIRED), ("inplace", False))
_DROPOUT: Signature = (("input", _REQUIRED), ("p", 0.5), ("training", True), ("inplace", False))
_SOFTMAX: Signature = (("input", _REQUIRED), ("dim", None), ("_stacklevel", 3), ("dtype", None))
_FLATTEN: Signature = (("input", _REQUIRED), ("start_dim", 0), ("end_dim", -1))


@cache  # built once, on the first import of a module, so that torch loads only then
def functions() -> dict[Any, tuple[str, Signature, Callable[[dict[str, Any]], Taken]]]:
    """Functional calls by the function object torch.fx records: (name shown, parameters,
    how it maps). Read, never changed."""
    import torch
    import torch.nn.functional as F

    relu = ("relu", _UNARY, _constant("relu"))
    sigmoid = ("sigmoid", (("input", _REQUIRED),), _constant("sigmoid"))
    tanh = ("tanh", (("input", _REQUIRED),), _constant("tanh"))
    return {
        F.relu: relu,
        torch.relu: relu,
        F.relu_: relu,
        torch.relu_: relu,
        torch.sigmoid: sigmoid,
        F.sigmoid: sigmoid,
        torch.tanh: tanh,
        F.tanh: tanh,
        F.leaky_relu: (
            "F.leaky_relu",
            (("input", _REQUIRED), ("negative_slope", 0.01), ("inplace", False)),
            _with("leakyrelu", "slope", "negative_slope"),
        ),
        F.elu: (
            "F.elu",
            (("input", _REQUIRED), ("alpha", 1.0), ("inplace", False)),
            _with("elu", "alpha", "alpha"),
        ),
        F.gelu: ("F.gelu", (("input", _REQUIRED), ("approximate", "none")), _gelu),
        F.max_pool2d: ("F.max_pool2d", _POOL_MAX, _pool("max")),
        F.avg_pool2d: ("F.avg_pool2d", _POOL_AVG, _pool("avg")),
        F.adaptive_avg_pool2d: (
            "F.adaptive_avg_pool2d",
            (("input", _REQUIRED), ("output_size", _REQUIRED)),
            _adaptive,
        ),
        F.dropout: ("F.dropout", _DROPOUT, _dropout("dropout")),
        F.dropout2d: ("F.dropout2d", _DROPOUT, _dropout("dropout2d")),
        torch.flatten: ("torch.flatten", _FLATTEN, lambda o: ("flatten", dict(o))),
        F.log_softmax: ("F.log_softmax", _SOFTMAX, _softmax(final=True)),
        torch.log_softmax: ("torch.log_softmax", _SOFTMAX, _softmax(final=True)),
        F.softmax: ("F.softmax", _SOFTMAX, _softmax(final=False)),
        torch.softmax: ("torch.softmax", _SOFTMAX, _softmax(final=False)),
    }


METHODS: dict[str, tuple[Signature, Callable[[dict[str, Any]], Taken]]] = {
    "relu": ((("input", _REQUIRED),), _constant("relu")),
    "relu_": ((("input", _REQUIRED),), _constant("relu")),
    "sigmoid": ((("input", _REQUIRED),), _constant("sigmoid")),
    "tanh": ((("input", _REQUIRED),), _constant("tanh")),
    "flatten": (_FLATTEN, lambda o: ("flatten", dict(o))),
    "contiguous": ((("input", _REQUIRED),), _identity),
    "log_softmax": (_SOFTMAX, _softmax(final=True)),
    "softmax": (_SOFTMAX, _softmax(final=False)),
}
RESHAPES = ("view", "reshape")


def bind(signature: Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by parameter name, defaults filled in."""
    names = [name for name, _ in signature]
    if len(args) > len(names) or set(kwargs) - set(names):
        extra = sorted(set(kwargs) - set(names)) or [f"{len(args)} positional arguments"]
        raise Refused(str(extra[0]), "an argument this function does not take here")
    bound = dict(zip(names, args, strict=False)) | kwargs
    for name, default in signature:
        if name not in bound:
            if default is _REQUIRED:
                raise Refused(name, "missing")
            bound[name] = default
    return bound


def input_scaling(graph: Any, where: str) -> tuple[tuple[float, float] | None, list[Any]]:
    """((mean, std), its nodes) of a forward that starts (x - mean) / std, x - mean or x /
    std by numbers: the input's standardisation, as ONNX's leading Sub and Div; (None, [])
    where it starts otherwise. One that is no standardisation (a std of 0) is a UsageError
    naming its nodes."""
    import torch

    # Each way of writing them: operators, tensor methods, torch functions.
    subtracts = {
        ("call_function", operator.sub),
        ("call_method", "sub"),
        ("call_function", torch.sub),
    }
    divides = {
        ("call_function", operator.truediv),
        ("call_method", "div"),
        ("call_function", torch.div),
        ("call_function", torch.true_divide),
    }
    # The images, then what the forward computes in order (an output node ends it).
    images, *computed = (n for n in graph.graph.nodes if size_source(n) is None)
    current, scaling, values = images, [], {"mean": 0.0, "std": 1.0}
    for name, kinds in (("mean", subtracts), ("std", divides)):
        node = computed[len(scaling)]
        by = node.args[1] if len(node.args) == 2 else None
        if (
            (node.op, node.target) in kinds
            and node.args[0] is current
            and not node.kwargs
            and real_number(by)  # not a tensor
            and users(current) == [node]
        ):
            scaling.append(node)
            values[name] = float(by)
            current = node
    mean, std = values["mean"], values["std"]
    if scaling and not scaling_fits((mean, std), np.float64):
        raise UsageError(
            f"{where}: {', '.join(n.name for n in scaling)}: (x - {mean!r}) / {std!r}: a "
            "standardisation of the input needs a finite mean and a positive std"
        )
    return ((mean, std) if scaling else None), scaling
