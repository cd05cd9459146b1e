"""A network as an ONNX graph: every layer kind as the ONNX operators that compute it in
evaluation mode, the canonical tensors as initialisers under their own names, a dynamic batch
axis, and the input scaling the network was trained with as the graph's first nodes, so the
graph takes raw [0, 1] pixels.

Each layer's output is a value named after the layer (the last one `logits`), so a caller can
expose any of them as a graph output (`every_layer`), as the cross-check's fourth witness does.
ONNX is imported when a graph is built, never when this module is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import UsageError
from shared.io import atomic_write
from shared.layers import (
    INPUT_SHAPE,
    Activation,
    AdaptivePool,
    BatchNorm,
    Conv,
    Dropout,
    Flatten,
    Layer,
    Linear,
    Pool,
    Residual,
)
from shared.spec import Arch, Params

# Opset 20 is the first with Gelu as one operator in both of its forms (approximate="none",
# PyTorch's default, and "tanh"); onnxruntime 1.17 and later run it.
OPSET = 20
INPUT = "images"
OUTPUT = "logits"
# Dropout2d has no ONNX operator of its own (in evaluation every dropout is the identity); the
# node's doc_string says which it was, so that ONNX -> spec gives the network back.
CHANNELWISE = "dropout2d: whole channels, PyTorch's Dropout2d"
# An adaptive average pool to N x N is an AveragePool whose window is the input's size over N;
# its doc_string ("adaptiveavgpool N") keeps which one it was.
ADAPTIVE = "adaptiveavgpool"


def onnx_model(
    arch: Arch,
    tensors: Params,
    standardise: tuple[float, float] | None = None,
    *,
    dtype: Any = np.float32,
    every_layer: bool = False,
):
    """The network as an `onnx.ModelProto` computing its evaluation-mode logits (N, 10) from
    images (N, 1, 28, 28) in `dtype`; with `standardise` (mean, std) the graph first computes
    (x - mean) / std, so it takes raw [0, 1] pixels. With `every_layer`, each layer's output
    is a graph output too, named after the layer."""
    import onnx
    from onnx import TensorProto, helper

    element = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}[np.dtype(dtype).type]
    nodes, initialisers = [], {}

    def constant(name: str, value: Any) -> str:
        initialisers[name] = onnx.numpy_helper.from_array(np.asarray(value, dtype), name)
        return name

    current = INPUT
    if standardise is not None:
        mean, std = standardise
        nodes.append(helper.make_node("Sub", [current, constant("pixels.mean", mean)], ["centred"]))
        nodes.append(helper.make_node("Div", ["centred", constant("pixels.std", std)], ["scaled"]))
        current = "scaled"
    for layer in arch.layers:
        out = OUTPUT if layer is arch.layers[-1] else layer.name
        for name in _tensor_names(layer):
            constant(name, tensors[name])
        nodes += layer_nodes(layer, current, out, constant)
        current = out
    outputs = [helper.make_tensor_value_info(OUTPUT, element, ["batch", 10])]
    if every_layer:
        outputs += [
            helper.make_tensor_value_info(node.layer.name, element, ["batch", *node.out])
            for node in arch.nodes[:-1]
        ]
    graph = helper.make_graph(
        nodes,
        "threefold",
        [helper.make_tensor_value_info(INPUT, element, ["batch", *INPUT_SHAPE])],
        outputs,
        list(initialisers.values()),
        doc_string=_input_note(standardise),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="threefold",
        doc_string=f"threefold network {arch.spec}",
    )
    model.ir_version = 9  # onnxruntime reads IR 9 (ONNX 1.15) and later
    helper.set_model_props(model, {"threefold.spec": arch.spec, "input": _input_note(standardise)})
    return model


def _input_note(standardise: tuple[float, float] | None) -> str:
    if standardise is None:
        return "images (N, 1, 28, 28) as the network was trained on them"
    mean, std = standardise
    return f"raw [0, 1] pixels (N, 1, 28, 28); the graph standardises them (x - {mean!r}) / {std!r}"


def _tensor_names(layer: Layer) -> list[str]:
    """The canonical tensors a layer's ONNX nodes read (not BatchNorm's step counter, which
    evaluation does not use)."""
    match layer:
        case Residual():
            return [name for inner in layer.layers for name in _tensor_names(inner)]
        case Conv(name, bias=bias):
            return [f"{name}.weight"] + ([f"{name}.bias"] if bias else [])
        case Linear(name):
            return [f"{name}.weight", f"{name}.bias"]
        case BatchNorm(name):
            return [f"{name}.{t}" for t in ("weight", "bias", "running_mean", "running_var")]
    return []


def layer_nodes(layer: Layer, x: str, out: str, constant) -> list:
    """The ONNX nodes computing `layer` on the value `x` into the value `out`."""
    from onnx import helper

    node = helper.make_node
    name = layer.name
    match layer:
        case Residual(_, body, shortcut):
            made, paths = [], []
            for chain in (body, shortcut):
                current = x
                for inner in chain:  # each inner layer's output is a value of its name
                    made += layer_nodes(inner, current, inner.name, constant)
                    current = inner.name
                paths.append(current)
            return [*made, node("Add", paths, [out], name)]
        case Conv(_, _, _, k, stride, padding, _):
            window = {"kernel_shape": [k, k], "strides": [stride, stride]}
            return [
                node("Conv", [x, *_tensor_names(layer)], [out], name, pads=[padding] * 4, **window)
            ]
        case Pool(_, op, size, stride, padding):
            window = {
                "kernel_shape": [size, size],
                "strides": [stride, stride],
                "pads": [padding] * 4,
            }
            if op == "max":  # ONNX's MaxPool ignores the padding, as PyTorch's -inf does
                return [node("MaxPool", [x], [out], name, **window)]
            return [node("AveragePool", [x], [out], name, count_include_pad=1, **window)]
        case AdaptivePool(_, 1, _):
            return [node("GlobalAveragePool", [x], [out], name)]
        case AdaptivePool(_, size, window):
            shape = {"kernel_shape": [window, window], "strides": [window, window]}
            doc = f"{ADAPTIVE} {size}"
            return [node("AveragePool", [x], [out], name, doc_string=doc, **shape)]
        case BatchNorm(_, _, _, momentum, eps):
            # ONNX's momentum weighs the running statistic, PyTorch's the batch's.
            inputs = [x, *_tensor_names(layer)]
            return [
                node("BatchNormalization", inputs, [out], name, epsilon=eps, momentum=1 - momentum)
            ]
        case Dropout(_, p, _, channelwise):
            ratio = constant(f"{name}.ratio", p)
            doc = CHANNELWISE if channelwise else ""
            return [node("Dropout", [x, ratio], [out], name, doc_string=doc)]
        case Activation(_, fn, param):
            return [_activation(fn, param, x, out, name)]
        case Flatten():
            return [node("Flatten", [x], [out], name, axis=1)]
        case Linear():
            return [node("Gemm", [x, *_tensor_names(layer)], [out], name, transB=1)]
    raise AssertionError(f"no ONNX nodes for {layer!r}")


ACTIVATIONS = {
    "relu": ("Relu", None),
    "tanh": ("Tanh", None),
    "sigmoid": ("Sigmoid", None),
    "leakyrelu": ("LeakyRelu", "alpha"),
    "elu": ("Elu", "alpha"),
}


def _activation(fn: str, param: float | None, x: str, out: str, name: str):
    from onnx import helper

    if fn in ("gelu", "gelutanh"):
        form = "tanh" if fn == "gelutanh" else "none"
        return helper.make_node("Gelu", [x], [out], name, approximate=form)
    op, attribute = ACTIVATIONS[fn]
    options = {} if attribute is None else {attribute: param}
    return helper.make_node(op, [x], [out], name, **options)


def check_model(model) -> None:
    """onnx.checker with full checking (shape inference strict); a failure is a bug here."""
    import onnx

    onnx.checker.check_model(model, full_check=True)


def write_onnx(model, path: Path) -> None:
    """Check `model`, then write it to `path` atomically (nothing half-written)."""
    check_model(model)
    data = model.SerializeToString()
    atomic_write(Path(path), lambda f: f.write(data))


def require_onnx() -> None:
    """One line when the optional extra is not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UsageError(
            "ONNX export and import need the optional extra: pip install -e '.[onnx]'"
        ) from None
