"""What each ONNX operator becomes in threefold: the options read off a node (its attributes
and constant inputs) and the layer kind and options they map to, or nothing (an identity, a
final LogSoftmax); what cannot be computed the same way is `Refused`, naming the option at
fault. The ONNX counterpart of shared/torch_ops.py; shared/onnx_import.py walks the graph."""

from __future__ import annotations

import math

import numpy as np

from shared.errors import UsageError
from shared.onnx_export import ADAPTIVE, CHANNELWISE
from shared.torch_ops import Refused


def constant_array(tensor, where: str) -> np.ndarray:
    """A constant's values, refused in one line where its data does not fill its shape
    exactly (onnx.checker refuses too little data, not too much)."""
    from onnx import numpy_helper

    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{where}: its data does not match its shape ({error})") from None


def scalar(name: str, initialisers: dict, where: str) -> float:
    """The value of a one-element initialiser."""
    if name not in initialisers:
        raise UsageError(f"{where}: {name} is not a constant of the file")
    tensor = initialisers[name]
    if math.prod(tensor.dims) != 1 or len(tensor.dims) > 4:  # a 5th would broadcast images
        raise UsageError(f"{where}: {name} has shape {tuple(tensor.dims)}; one number is needed")
    value = float(constant_array(tensor, f"{where}: {name}").reshape(()))
    if not math.isfinite(value):
        raise UsageError(f"{where}: {name} is {value}")
    return _short(value)


def _short(value: float) -> float:
    """A float32 attribute as the decimal it was written from (0.2, not 0.2000000029802)."""
    return float(str(np.float32(value))) if value == np.float32(value) else value


def _require(attributes: dict, name: str, allowed: tuple, why: str) -> None:
    if name in attributes and attributes[name] not in allowed:
        raise Refused(f"{name}={attributes[name]!r}", why)


def _square(attributes: dict, name: str, default: int | None = None) -> int:
    """A pair of equal ints (threefold's windows and strides are square)."""
    value = attributes.get(name)
    if value is None:
        if default is None:
            raise Refused(name, "is needed")
        return default
    if len(value) != 2 or value[0] != value[1]:
        raise Refused(f"{name}={list(value)}", "threefold's windows are square")
    return int(value[0])


def _pads(attributes: dict, kernel: int) -> int:
    auto = attributes.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        return 0
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if kernel % 2 == 0 or _square(attributes, "strides", 1) != 1:
            raise Refused(f"auto_pad={auto}", "pads unevenly (an even kernel or a stride)")
        return kernel // 2
    if auto != "NOTSET":
        raise Refused(f"auto_pad={auto}", "unknown")
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    if len(set(pads)) != 1:
        raise Refused(f"pads={pads}", "threefold pads every side alike")
    return int(pads[0])


def _dilation(attributes: dict) -> None:
    if any(d != 1 for d in attributes.get("dilations", [1, 1])):
        raise Refused(f"dilations={list(attributes['dilations'])}", "dilation is not supported")


def _conv(node, attributes, initialisers, last):
    _require(attributes, "group", (1,), "grouped convolutions are not supported")
    _dilation(attributes)
    weight = initialiser(node, 1, initialisers)
    if len(weight.dims) != 4 or weight.dims[2] != weight.dims[3]:
        raise Refused(f"weight {tuple(weight.dims)}", "a square kernel (O, I, K, K) is needed")
    kernel = _square(attributes, "kernel_shape", int(weight.dims[2]))
    bias = len(node.input) > 2 and bool(node.input[2])
    options = {
        "channels": int(weight.dims[0]),
        "kernel": kernel,
        "stride": _square(attributes, "strides", 1),
        "padding": _pads(attributes, kernel),
        "bias": int(bias),
    }
    reads = [(node.input[1], "weight")] + ([(node.input[2], "bias")] if bias else [])
    return ("conv", options), reads, ""


def initialiser(node, position: int, initialisers: dict):
    if len(node.input) <= position or node.input[position] not in initialisers:
        raise Refused(f"input {position}", "a constant (initialiser) is needed")
    return initialisers[node.input[position]]


def _pool(op: str):
    def take(node, attributes, initialisers, last):
        # ceil_mode=1 is read where it computes what flooring does (the importer's check)
        _require(attributes, "ceil_mode", (0, 1), "neither flooring nor ceiling")
        _dilation(attributes)
        size = _square(attributes, "kernel_shape")
        padding = _pads(attributes, size)
        stride = _square(attributes, "strides", 1)
        if op == "avg" and padding and not attributes.get("count_include_pad", 0):
            # ONNX's default leaves the padding out of the mean, PyTorch's counts it.
            why = "threefold averages over the padding too, PyTorch's default"
            raise Refused("count_include_pad=0", why)
        if op == "max":
            _require(attributes, "storage_order", (0,), "indices are not an output")
        # Only the exporter's own mark ("adaptiveavgpool N"); any other doc_string is a note.
        mark, _, outputs = node.doc_string.partition(" ")
        if (
            op == "avg"
            and mark == ADAPTIVE
            and outputs.isdigit()
            and size == stride
            and not padding
        ):
            return ("adaptiveavgpool", {"size": int(outputs)}), [], ""
        return (f"{op}pool", {"size": size, "stride": stride, "padding": padding}), [], ""

    return take


def _batch_norm(node, attributes, initialisers, last):
    _require(attributes, "training_mode", (0,), "an evaluation graph is needed")
    # Opsets 7-8: spatial=0 keeps a mean and variance for each activation, not each channel.
    _require(attributes, "spatial", (1,), "threefold's BatchNorm has one for each channel")
    if any(node.output[1:]):  # before opset 14, a node giving its statistics trains
        why = "it normalises with the batch's statistics; an evaluation graph is needed"
        raise Refused(f"outputs {', '.join(o for o in node.output[1:] if o)}", why)
    if not math.isclose(attributes.get("epsilon", 1e-5), 1e-5, rel_tol=1e-6):
        raise Refused(f"epsilon={attributes['epsilon']:.3g}", "threefold's BatchNorm adds 1e-5")
    if not math.isclose(attributes.get("momentum", 0.9), 0.9, rel_tol=1e-6):
        why = "threefold's running averages use PyTorch's 0.1 (ONNX's momentum 0.9)"
        raise Refused(f"momentum={attributes['momentum']:.3g}", why)
    for position in range(1, 5):
        initialiser(node, position, initialisers)
    names = ("weight", "bias", "running_mean", "running_var")
    return ("bn", {}), list(zip(node.input[1:5], names, strict=True)), ""


def _dropout(node, attributes, initialisers, last):
    if len(node.input) > 2 and node.input[2]:
        training = scalar(node.input[2], initialisers, "training_mode")
        if training:
            raise Refused("training_mode=true", "an evaluation graph is needed")
    # An input since opset 12, an attribute before it.
    ratio = (
        scalar(node.input[1], initialisers, "ratio")
        if len(node.input) > 1 and node.input[1]
        else _short(attributes.get("ratio", 0.5))
    )
    kind = "dropout2d" if node.doc_string.startswith(CHANNELWISE) else "dropout"
    return (kind, {"p": ratio}), [], ""


def _activation(kind: str, option: str | None = None, default: float = 0.0):
    def take(node, attributes, initialisers, last):
        if option is None:
            return (kind, {}), [], ""
        return (kind, {option: _short(attributes.get("alpha", default))}), [], ""

    return take


def _gelu(node, attributes, initialisers, last):
    form = attributes.get("approximate", b"none")
    form = form.decode() if isinstance(form, bytes) else form
    if form not in ("none", "tanh"):
        raise Refused(f"approximate={form!r}", "'none' or 'tanh'")
    return ("gelu" if form == "none" else "gelutanh", {}), [], ""


def _reduce_mean(node, attributes, initialisers, last):
    """The mean over each channel's plane, kept as (N, C, 1, 1): AdaptiveAvgPool2d(1) as
    torch.onnx.export's dynamo exporter writes it (axes an input since opset 18)."""
    if len(node.input) > 1 and node.input[1]:
        values = constant_array(initialiser(node, 1, initialisers), node.input[1])
        axes = [int(a) for a in values.ravel()]
    else:
        axes = list(attributes.get("axes", []))
    if sorted(a % 4 for a in axes) != [2, 3]:
        raise Refused(f"axes={axes}", "threefold averages over each plane (axes 2 and 3)")
    _require(attributes, "keepdims", (1,), "threefold's pooling keeps the (1, 1) plane")
    return ("adaptiveavgpool", {"size": 1}), [], ""


def _flatten(node, attributes, initialisers, last):
    _require(attributes, "axis", (1,), "threefold flattens each image whole (axis=1)")
    return ("flatten", {}), [], ""


def _reshape(node, attributes, initialisers, last):
    shape = initialiser(node, 1, initialisers)
    if math.prod(shape.dims) != 2:
        raise Refused(f"shape {tuple(shape.dims)}", "threefold reshapes (N, C, H, W) to (N, -1)")
    target = [int(v) for v in constant_array(shape, node.input[1])]
    if attributes.get("allowzero", 0) and 0 in target:  # a 0 is then a size, not a copy
        raise Refused(f"shape={target} with allowzero=1", "a dimension of 0 holds nothing")
    if target[0] not in (0, -1) or target[1] == 0:
        why = "threefold flattens each image whole: shape [0, -1] or [-1, C*H*W]"
        raise Refused(f"shape={target}", why)
    return ("reshape", {"features": target[1]}), [], ""


def _gemm(node, attributes, initialisers, last):
    _require(attributes, "alpha", (1.0,), "a scaled product is not supported")
    _require(attributes, "beta", (1.0,), "a scaled bias is not supported")
    _require(attributes, "transA", (0,), "the input is not transposed in threefold's fc")
    weight = initialiser(node, 1, initialisers)
    if len(node.input) < 3 or not node.input[2]:
        raise Refused("C", "threefold's fc has a bias")
    initialiser(node, 2, initialisers)
    transposed = attributes.get("transB", 0) != 0  # (out, in), PyTorch's layout; any non-zero
    features = int(weight.dims[0] if transposed else weight.dims[1])
    weight_name = "weight" if transposed else "weight.T"
    return (
        ("fc", {"features": features}),
        [(node.input[1], weight_name), (node.input[2], "bias")],
        "",
    )


def _final(kind: str):
    def take(node, attributes, initialisers, last):
        axis = attributes.get("axis", -1)
        if axis not in (1, -1):
            raise Refused(f"axis={axis}", "a softmax over the classes has axis 1")
        if kind == "Softmax" or not last:
            raise Refused(
                f"{kind} not last" if kind == "LogSoftmax" else "Softmax",
                "threefold trains on logits with softmax cross-entropy; a final softmax would "
                "be applied twice (return the logits, or LogSoftmax last)",
            )
        return None, [], "cross-entropy on log-probabilities is the same loss"

    return take


def _identity(node, attributes, initialisers, last):
    return None, [], "changes nothing"


TAKERS = {
    "Conv": _conv,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda *_: (("adaptiveavgpool", {"size": 1}), [], ""),
    "BatchNormalization": _batch_norm,
    "Dropout": _dropout,
    "Relu": _activation("relu"),
    "Tanh": _activation("tanh"),
    "Sigmoid": _activation("sigmoid"),
    "LeakyRelu": _activation("leakyrelu", "slope", 0.01),
    "Elu": _activation("elu", "alpha", 1.0),
    "Gelu": _gelu,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "ReduceMean": _reduce_mean,
    "Gemm": _gemm,
    "LogSoftmax": _final("LogSoftmax"),
    "Softmax": _final("Softmax"),
    "Identity": _identity,
}
