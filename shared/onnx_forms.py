"""An ONNX graph's nodes rewritten into the forms the importer reads, before it reads them:
a Reshape that keeps the batch, its target computed from the batch's size (as
`x.view(x.size(0), -1)` exports), with the target threefold reads; and GELU written out in
elementary operations (as exporters write it before opset 20) as one Gelu node."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.errors import UsageError
from shared.layers import INPUT_SHAPE
from shared.onnx_ops import constant_array


def node_attributes(node) -> dict[str, Any]:
    """A node's attributes by name, as Python values."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# A Reshape's target item that is the batch's size, read off the graph (x.size(0)).
BATCH = "batch"


@dataclass(frozen=True)
class _Sizes:
    """A product of a value's sizes along `axes` (none the batch's), read off the graph:
    x.size(1) * x.size(2) * x.size(3)."""

    value: str
    axes: frozenset[int]


def reshapes_by_image(nodes: list, constants: dict, images: str, batch: int | None) -> list:
    """The nodes with each Reshape that keeps the batch and reshapes every image given the
    target threefold reads ([0, F] or [-1, F]), and the nodes computing its target from the
    value's sizes dropped: x.view(x.size(0), -1) exported with a dynamic batch (Shape,
    Gather, Unsqueeze, Concat), a view by the product of an image's sizes (n, c, h, w =
    x.size(); x.view(n, c * h * w)), or a target leading with the batch the input fixes
    (exported with a static one; the reshape of each image is the same at any batch). A
    reshape of the images to their own shape (x.view(-1, 1, 28, 28)) becomes an Identity. A
    target computed otherwise stays as it is, for the Reshape's own refusal. `images`: the
    graph's input."""
    sizes: dict[str, Any] = {}  # value -> ("shape", of), BATCH, _Sizes, or a list of those
    from_images, kept = {images}, []  # values computed from the images: their first axis
    for node in nodes:
        op, attributes = node.op_type, node_attributes(node)
        given = [sizes.get(name) for name in node.input]
        if op == "Shape" and attributes.get("start", 0) == 0 and node.input[0] in from_images:
            sizes[node.output[0]] = ("shape", node.input[0])
        elif op == "Gather" and isinstance(given[0], tuple) and attributes.get("axis", 0) == 0:
            index = _constant_ints(node.input[1], constants)
            axes = [index] if isinstance(index, int) else index or []
            if len(axes) == 1 and axes[0] >= 0:
                item = BATCH if axes[0] == 0 else _Sizes(given[0][1], frozenset(axes))
                sizes[node.output[0]] = item if isinstance(index, int) else [item]
        elif op == "Mul" and all(isinstance(g, _Sizes) for g in given) and len(given) == 2:
            first, second = given
            if first.value == second.value and not first.axes & second.axes:
                sizes[node.output[0]] = _Sizes(first.value, first.axes | second.axes)
        elif op == "Unsqueeze" and (given[0] == BATCH or isinstance(given[0], _Sizes)):
            sizes[node.output[0]] = [given[0]]
        elif op == "Unsqueeze" and isinstance(_constant_ints(node.input[0], constants), int):
            # The -1 of x.view(x.size(0), -1), exported without folding its constants.
            sizes[node.output[0]] = [_constant_ints(node.input[0], constants)]
        elif op == "Concat" and attributes.get("axis") == 0:
            parts = [
                g if g is not None else _constant_ints(n, constants)
                for g, n in zip(given, node.input, strict=True)
            ]
            if all(isinstance(part, list) for part in parts):
                sizes[node.output[0]] = [item for part in parts for item in part]
        if node.output[0] in sizes:
            continue  # computes a size, not from the images
        from_images.update(node.output)
        if op == "Reshape" and len(node.input) > 1:
            _read_target(node, sizes, constants, images, batch)
        kept.append(node)
    return kept


def _every_feature(item: Any, value: str) -> bool:
    """Whether a target's item is the product of every size of `value` after the batch's,
    x.size(1) * x.size(2) * x.size(3): as exported, the product fits the value."""
    if not isinstance(item, _Sizes) or item.value != value:
        return False
    return item.axes == set(range(1, max(item.axes) + 1))


def _read_target(node, sizes: dict, constants: dict, images: str, batch: int | None) -> None:
    """A Reshape's target rewritten as threefold reads it, where it keeps the batch (see
    reshapes_by_image); left as it is otherwise."""
    from onnx import numpy_helper

    data = node.input[0]
    target = sizes.get(node.input[1]) or _constant_ints(node.input[1], constants)
    if not isinstance(target, list) or not target:
        return
    if batch is not None and target[0] == batch:
        target = [BATCH, *target[1:]]
    if len(target) == 2 and target[0] in (BATCH, -1) and _every_feature(target[1], data):
        target = [BATCH, -1]
    if data == images and target[0] in (BATCH, -1) and target[1:] == list(INPUT_SHAPE):
        node.op_type = "Identity"  # the images to their own shape
        del node.input[1:]
        del node.attribute[:]
        return
    if target[:1] == [BATCH] and all(isinstance(t, int) or t == BATCH for t in target[1:]):
        if BATCH in target[1:]:
            return
        # The batch as -1 where the rest has none, else as 0, which copies it (with
        # allowzero off: this target is now the reader's own).
        rest = target[1:]
        target = [-1, *rest] if -1 not in rest else [0, *rest]
        name = f"{node.output[0]} target"
        constants[name] = numpy_helper.from_array(np.array(target, np.int64), name)
        node.input[1] = name
        kept_attributes = [a for a in node.attribute if a.name != "allowzero"]
        del node.attribute[:]
        node.attribute.extend(kept_attributes)


# GELU as PyTorch's exporter writes it out before opset 20 (x: the value it takes), each Add
# and Mul of its two values in either order: exact, x * (erf(x / sqrt(2)) + 1) * 0.5, and by
# tanh, x * (tanh((x + x * x * x * 0.044715) * sqrt(2 / pi)) + 1) * 0.5.
_X = "x"


def _gelu_of(inner: tuple) -> tuple:
    """x * (inner + 1) * 0.5, as operations."""
    return ("Mul", ("Mul", _X, ("Add", inner, 1.0)), 0.5)


_CUBIC = ("Add", _X, ("Mul", ("Mul", _X, ("Mul", _X, _X)), 0.044715))
_GELUS = {
    "none": _gelu_of(("Erf", ("Div", _X, math.sqrt(2)))),
    "tanh": _gelu_of(("Tanh", ("Mul", _CUBIC, math.sqrt(2 / math.pi)))),
}


def gelus_written_out(nodes: list, constants: dict, outputs: set[str]) -> list:
    """The nodes with each GELU written out (_GELUS) as one Gelu node, where nothing else
    takes the values computed on the way, nor are they among the graph's `outputs`."""
    from onnx import helper

    made = {node.output[0]: node for node in nodes}
    takers = dict.fromkeys(outputs, 1)
    for node in nodes:
        for name in node.input:
            takers[name] = takers.get(name, 0) + 1

    def match(pattern: Any, name: str, found: dict) -> dict | None:
        """`found` grown by the value `name` computed as `pattern` (x bound, the nodes
        matched), or None."""
        if pattern == _X:
            return found if found.setdefault(_X, name) == name else None
        if isinstance(pattern, float):
            value = _constant_float(name, constants)
            # float32's nearest: sqrt(2)'s is 1.7e-8 off
            close = value is not None and math.isclose(value, pattern, rel_tol=1e-6)
            return found if close else None
        node, (op, *parts) = made.get(name), pattern
        if node is None or node.op_type != op or len(node.input) != len(parts):
            return None
        if found.get("nodes") and takers.get(name) != 1:
            return None  # a value on the way that something else takes too
        orders = [node.input] if op in ("Div", "Tanh", "Erf") else [node.input, node.input[::-1]]
        for inputs in orders:
            tried = {**found, "nodes": [*found.get("nodes", []), node]}
            for part, given in zip(parts, inputs, strict=True):
                tried = tried and match(part, given, tried)
            if tried:
                return tried
        return None

    replaced: dict[int, Any] = {}  # by node id: its Gelu, or None where dropped
    for node in reversed(nodes):
        if id(node) in replaced:
            continue
        for approximate, pattern in _GELUS.items():
            found = match(pattern, node.output[0], {})
            if found:
                name = f"{found['nodes'][-1].name}..{node.name}"
                gelu = helper.make_node("Gelu", [found[_X]], node.output, name)
                gelu.attribute.append(helper.make_attribute("approximate", approximate))
                replaced.update({id(n): None for n in found["nodes"]})
                replaced[id(node)] = gelu
                break
    kept = [replaced.get(id(node), node) for node in nodes]
    return [node for node in kept if node is not None]


def _values(name: str, constants: dict) -> np.ndarray | None:
    """A constant's values; None where there is none, or where its data does not fill its
    shape (the node that reads it is then read, or refused, on its own)."""
    try:
        return constant_array(constants[name], name) if name in constants else None
    except UsageError:
        return None


def _constant_float(name: str, constants: dict) -> float | None:
    """A one-element floating constant's value, None otherwise."""
    if name not in constants or math.prod(constants[name].dims) != 1:
        return None
    value = _values(name, constants)
    return float(value.reshape(())) if value is not None and value.dtype.kind == "f" else None


def _constant_ints(name: str, constants: dict) -> list[int] | int | None:
    """A constant integer tensor's values (a list, or an int for a scalar), None otherwise."""
    value = _values(name, constants)
    if value is None or value.dtype.kind not in "iu" or value.ndim > 1 or value.size > 8:
        return None
    return int(value) if value.ndim == 0 else [int(v) for v in value]
