"""A network from an ONNX file: its nodes read as a chain (and residual blocks) of the
operators threefold computes, its initialisers (and constant nodes) as the canonical tensors,
its leading Sub/Div as the input scaling.

The file is untrusted: shared/onnx_file.py bounds its size and node count before it is parsed,
and an initialiser's claimed shape is checked against the network (itself held to the cost
bounds) before its data is touched. What threefold cannot compute the same way is one line
naming the node and its op type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import UsageError
from shared.io import a_path
from shared.kinds import output_shape, token
from shared.layers import INPUT_SHAPE, Pool, show_shape
from shared.network import Mapped, Network, body_and_shortcut, check_shortcut
from shared.onnx_file import read_graph
from shared.onnx_forms import gelus_written_out, node_attributes, reshapes_by_image
from shared.onnx_ops import TAKERS, constant_array, initialiser, scalar
from shared.spec import Arch, Entry, Params, build_layers, get_arch, tensors
from shared.tensor_checks import value_problem
from shared.torch_ops import Refused

SCALING = ("Sub", "Div")


@dataclass
class _Step:
    """One node (or MatMul + Add) of the chain: what it became and which initialisers it reads
    (as (initialiser, tensor suffix) pairs)."""

    source: str
    what: str
    taken: tuple[str, dict[str, Any]] | None  # None: dropped (an identity, a final LogSoftmax)
    reads: list[tuple[str, str]]
    note: str = ""
    window: int | None = None  # an AveragePool read as adaptive: its own window, to check
    ceil: bool = False  # a pooling's ceil_mode=1, read where its windows fit exactly


@dataclass
class _Block:
    """A residual block: where a value feeds two chains of nodes that an Add of the two joins
    (`shortcut` empty for the identity)."""

    source: str
    what: str
    body: list[_Step]
    shortcut: list[_Step]
    taken: str = "res"


def from_onnx(path: str | Path, where: str = "") -> Network:
    """The network an ONNX file computes, with its initialisers as weights and buffers (a
    BatchNorm's step counter, not in ONNX, starts at 0). Refuses in one UsageError naming the
    node and op type what threefold cannot compute the same way."""
    from shared.onnx_export import require_onnx

    require_onnx()
    path = a_path(path, where or "from_onnx")
    label = f"{where} {path}" if where else str(path)  # where: the flag, from a command
    graph = read_graph(path, label)
    if len(graph.output) != 1:  # onnxruntime's first output need not be the chain's end
        raise UsageError(f"{label}: {len(graph.output)} outputs; threefold's networks give one")
    for index, node in enumerate(graph.node):  # named by their place in the whole file
        node.name = node.name or f"node {index}"
    nodes, initialisers = _constants(
        list(graph.node), {t.name: t for t in graph.initializer}, label
    )
    current, batch = _input(graph, initialisers, label)
    nodes = reshapes_by_image(nodes, initialisers, current, batch)
    nodes = gelus_written_out(nodes, initialisers, {o.name for o in graph.output})
    standardise, nodes, current = _scaling(nodes, initialisers, current, label)
    steps = _steps(nodes, initialisers, current, graph, label)
    widths: dict[int, tuple[int, str]] = {}
    entries = _resolve_shapes(steps, widths)
    if not entries:
        raise UsageError(f"{label}: no layers found in its graph")
    layers = build_layers(entries, label)
    _check_widths(layers, widths, label)
    arch = get_arch("-".join(token(layer) for layer in layers), label)
    params, mapping = _tensors(arch, steps, initialisers, label)
    network = Network(arch, params, tuple(mapping), standardise)
    network.check(label)  # one dtype (opset 15 lets a BatchNorm's differ from its input's)
    return network


def _constants(nodes: list, initialisers: dict, label: str) -> tuple[list, dict]:
    """The nodes that compute from the input, and the initialisers joined by every constant
    node's output: a Constant holding a tensor, and an Identity of a constant (PyTorch's
    exporter writes one for each copy of an initialiser it has deduplicated, such as the
    equal biases of BatchNorms folded into convolutions)."""
    from onnx import TensorProto

    constants, computing = dict(initialisers), []
    for node in nodes:
        if node.op_type == "Identity" and node.input and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
        elif node.op_type == "Constant":
            forms = [a.name for a in node.attribute]
            if forms != ["value"]:
                raise UsageError(
                    f"{label}: {node.name} (Constant): {', '.join(forms)}; threefold reads a "
                    "Constant's `value` tensor"
                )
            tensor = TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            constants[node.output[0]] = tensor
        else:
            computing.append(node)
    return computing, constants


def _input(graph, initialisers: dict, label: str) -> tuple[str, int | None]:
    """The graph's one input (an image batch (N, 1, 28, 28)), not counting initialisers that
    older exporters list as inputs: (its name, N where the graph fixes it)."""
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise UsageError(
            f"{label}: {len(inputs)} inputs; threefold's networks take one image batch"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    if len(shape) != 4 or shape[1:] != INPUT_SHAPE:
        shown = "x".join("?" if d is None else str(d) for d in shape) or "of no shape"
        raise UsageError(
            f"{label}: input {inputs[0].name} is {shown}; threefold's networks take Nx1x28x28"
        )
    return inputs[0].name, shape[0] or None  # a dim_value of 0: none given


def _scaling(nodes: list, initialisers: dict, current: str, label: str):
    """((mean, std) of a leading Sub of a constant then Div by one, or of either alone (as
    PyTorch exports x - mean or x / std), or None; the rest of the nodes; the value they
    start from: the scaling's output, which the next node must take)."""
    values, taken = {"Sub": 0.0, "Div": 1.0}, 0
    for op in SCALING:
        node = nodes[taken] if taken < len(nodes) else None
        if node is not None and node.op_type == op and list(node.input[:1]) == [current]:
            values[op] = scalar(node.input[1], initialisers, f"{label}: {node.name} ({op})")
            current, taken = node.output[0], taken + 1
    if values["Div"] <= 0:
        why = "not a standardisation by a positive std"
        raise UsageError(f"{label}: {nodes[taken - 1].name} (Div): {why}")
    return ((values["Sub"], values["Div"]) if taken else None), nodes[taken:], current


def _steps(
    nodes: list, initialisers: dict, current: str, graph, label: str, chain: bool = False
) -> list[_Step | _Block]:
    """The chain of nodes, each taking the one before's output (and constants); where a value
    feeds two chains that an Add joins, a residual block of them. A `chain` is a block's
    path, which need not end at a graph output."""
    steps, index = [], 0
    used_later = {name for n in nodes for name in n.input}
    outputs = {o.name for o in graph.output}
    while index < len(nodes):
        node = nodes[index]
        where = f"{label}: {node.name} ({node.op_type})"
        takers = [n for n in nodes[index:] if current in n.input]
        if len(takers) > 1:
            block, index = _block(nodes, index, initialisers, current, graph, label)
            steps.append(block)
            current = nodes[index].output[0]
            index += 1
            continue
        if not node.input or node.input[0] != current:
            raise UsageError(
                f"{where}: does not take the previous node's output; threefold reads chains"
            )
        for extra in node.input[1:]:
            if extra and extra not in initialisers:
                raise UsageError(
                    f"{where}: input {extra} is computed, not a constant; threefold reads chains "
                    "and residual blocks (a value feeding two chains that an Add joins)"
                )
        for extra in node.output[1:]:
            if extra and (extra in used_later or extra in outputs):
                raise UsageError(
                    f"{where}: its output {extra} is used; threefold's layers give one output"
                )
        # Last where only identities follow (an exporter may end the graph with one).
        last = all(n.op_type == "Identity" for n in nodes[index + 1 :]) and not chain
        if node.op_type == "MatMul":
            if index + 1 == len(nodes) or nodes[index + 1].op_type != "Add":
                raise UsageError(f"{where}: no Add of a bias after it; threefold's fc has one")
            steps.append(_matmul_add(node, nodes[index + 1], initialisers, where))
            index += 1
        else:
            steps.append(_take(node, initialisers, where, node.name, last))
        current = nodes[index].output[0]
        index += 1
    if not chain and current not in outputs:
        raise UsageError(f"{label}: the chain's last value {current} is not a graph output")
    return steps


def _block(
    nodes: list, index: int, initialisers: dict, fork: str, graph, label: str
) -> tuple[_Block, int]:
    """The residual block from nodes[index], where `fork` feeds two chains: (the block, the
    index of the Add joining them)."""
    join = next(
        (
            i
            for i in range(index, len(nodes))
            if nodes[i].op_type == "Add" and not set(nodes[i].input) & set(initialisers)
        ),
        None,
    )
    if join is None:
        takers = ", ".join(f"{n.name} ({n.op_type})" for n in nodes[index:] if fork in n.input)
        raise UsageError(
            f"{label}: {fork} feeds {takers[:200]}, which no Add joins; threefold reads chains, "
            "and residual blocks whose input feeds two chains that add"
        )
    add, inside = nodes[join], nodes[index:join]
    paths = []
    for start in add.input:  # each path traced back from the Add to the fork
        path, value = [], start
        while value != fork:
            node = next((n for n in inside if n.output and n.output[0] == value), None)
            if node is None:
                raise UsageError(
                    f"{label}: {add.name} (Add): adds {value}, which the chain from "
                    f"{fork} does not compute; a residual block adds two paths from one input"
                )
            path.insert(0, node)
            value = node.input[0]
        paths.append(path)
    shared = next((n for n in paths[0] if any(n is m for m in paths[1])), None)
    if shared is not None:  # counted twice, it would hide a node on neither path
        raise UsageError(
            f"{label}: {shared.name} ({shared.op_type}): on both paths from {fork} to "
            f"{add.name}; a residual block's two paths share no node"
        )
    if len(paths[0]) + len(paths[1]) != len(inside):
        raise UsageError(
            f"{label}: {add.name} (Add): nodes between {fork} and it are on neither "
            "path; a residual block holds two chains"
        )
    read = [_steps(path, initialisers, fork, graph, label, chain=True) for path in paths]
    body, shortcut = body_and_shortcut(read, lambda step: step.taken)
    if all(step.taken is None for step in body):
        raise UsageError(
            f"{label}: {add.name} (Add): both paths change nothing; threefold's residual "
            "blocks add a body of layers to the shortcut"
        )
    return _Block(add.name, "Add(body, shortcut)", body, shortcut), join


def _take(node, initialisers: dict, where: str, source: str, last: bool) -> _Step:
    op, attributes = node.op_type, node_attributes(node)
    shown = ", ".join(f"{k}={_shown(v)}" for k, v in attributes.items())
    what = f"{op}({shown})"
    if op not in TAKERS:
        raise UsageError(f"{where}: not an operator threefold has")
    try:
        taken, reads, note = TAKERS[op](node, attributes, initialisers, last)
    except Refused as refused:
        raise UsageError(f"{where}: {refused.option}: {refused.why}") from None
    except UsageError as error:  # a constant input at fault, which _scalar names
        raise UsageError(f"{where}: {error}") from None
    adaptive = op == "AveragePool" and taken is not None and taken[0] == "adaptiveavgpool"
    window = attributes["kernel_shape"][0] if adaptive else None
    return _Step(source, what, taken, reads, note, window, attributes.get("ceil_mode") == 1)


def _shown(value: Any) -> str:
    """An attribute's value as written: a string's text, other bytes by their length."""
    if isinstance(value, bytes):
        try:
            return repr(value.decode("ascii"))
        except UnicodeDecodeError:
            return f"<{len(value)} bytes>"
    return repr(value)


def _matmul_add(matmul, add, initialisers: dict, where: str) -> _Step:
    """MatMul by a constant (in, out) then Add of a constant (out,), on either side (PyTorch
    writes Add(bias, product) for a Linear on more than two axes): threefold's fc."""
    bias = next((name for name in add.input if name != matmul.output[0]), None)
    try:
        weight = initialiser(matmul, 1, initialisers)
        if matmul.output[0] not in add.input or bias not in initialisers:
            raise Refused("Add", "the bias must be a constant added to the product")
        if len(weight.dims) != 2:
            raise Refused(f"weight {tuple(weight.dims)}", "a matrix (in, out) is needed")
    except Refused as refused:
        raise UsageError(f"{where}: {refused.option}: {refused.why}") from None
    reads = [(matmul.input[1], "weight.T"), (bias, "bias")]
    source = f"{matmul.name} + {add.name}"
    return _Step(source, "MatMul + Add", ("fc", {"features": int(weight.dims[1])}), reads)


def _resolve_shapes(steps: list[_Step], widths: dict[int, tuple[int, str]]) -> list[Entry]:
    """The spec's entries, each flatten and reshape resolved: one of an input already flat
    (after a flatten or an fc) changes nothing and its step is dropped. A reshape that names
    its features puts them in `widths`, by the entry whose output it reshapes (its own
    flatten's, or the entry before a dropped one), for _check_widths."""
    entries: list[Entry] = []
    for step in steps:
        if isinstance(step, _Block):
            body = _resolve_shapes(step.body, {})  # a block's output is added, never flat
            entries.append((f"{step.source}: {step.what}", "res", {"body": body}))
            continue
        if step.taken is None:
            continue
        kind, options = step.taken
        if kind in ("flatten", "reshape"):
            flat = any(k in ("flatten", "fc") for _, k, _ in entries)
            if kind == "reshape" and options["features"] != -1:
                widths[len(entries) - flat] = options["features"], f"{step.source}: {step.what}"
            if flat:
                step.taken, step.note = None, "flattens a flat input: changes nothing"
                continue
            kind, options = "flatten", {}
        step.taken = kind, options
        entries.append((f"{step.source}: {step.what}", kind, options))
    return entries


def _check_widths(layers: tuple, widths: dict[int, tuple[int, str]], label: str) -> None:
    """Refuse a reshape to other than the features per image its input has (Reshape [-1, 5]
    of 10 would give twice the rows)."""
    shape = INPUT_SHAPE
    for index, layer in enumerate(layers):
        shape = output_shape(layer, shape)
        features, where = widths.get(index, (math.prod(shape), ""))
        if features != math.prod(shape):
            raise UsageError(
                f"{label}: {where}: reshapes {math.prod(shape)} features an image to {features}"
            )


@dataclass
class _Reading:
    """What each level of `_map` shares: the canonical tensors expected, the file's
    initialisers, the file's label for errors, each layer's input shape, and what the
    mapping has produced so far (`params`, `mapping`)."""

    expected: dict
    initialisers: dict
    label: str
    shapes: dict[str, tuple[int, ...]]
    params: Params
    mapping: list[Mapped]


def _tensors(arch: Arch, steps: list[_Step | _Block], initialisers: dict, label: str):
    """(the canonical tensors, the mapping): each step's initialisers checked against its
    layer's tensors (shape before data, then the values)."""
    shapes = {node.layer.name: node.shape for node in arch.nodes}
    reading = _Reading(tensors(arch), initialisers, label, shapes, {}, [])
    _map(reading, steps, iter(arch.layers), block="")
    return {name: reading.params[name] for name in reading.expected}, reading.mapping


def _map(reading: _Reading, steps, layers, block: str) -> None:
    """Each step's layer, taken in turn from `layers`, its tensors into `reading.params` and
    its row into `reading.mapping` (`block`: the block the steps are inside); a block's
    layers first."""
    label, mapping, params = reading.label, reading.mapping, reading.params
    for step in steps:
        if step.taken is None:
            mapping.append(Mapped(step.source, step.what, "", step.note, block=block))
            continue
        layer = next(layers)
        if isinstance(step, _Block):
            read = [s.taken for s in step.shortcut]
            check_shortcut(
                read, ", ".join(s.what for s in step.shortcut), layer, f"{label}: {step.source}"
            )
            for part in ("body", "shortcut"):
                _map(reading, getattr(step, part), iter(getattr(layer, part)), layer.name)
            mapping.append(Mapped(step.source, step.what, token(layer, every=True)))
            continue
        if step.window is not None and step.window != layer.window:
            raise UsageError(
                f"{label}: {step.source}: {step.what}: marked as an adaptive pool to "
                f"{layer.size}x{layer.size}, which takes windows of {layer.window}; the graph's "
                "window does not fit its mark"
            )
        if step.ceil and isinstance(layer, Pool):  # an adaptive pool's windows tile its input
            _fits_exactly(layer, reading.shapes[layer.name], f"{label}: {step.source}: {step.what}")
        moved = []
        for name, suffix in step.reads:
            ours = f"{layer.name}.{suffix.removesuffix('.T')}"
            where = f"{label}: {name}"
            params[ours] = _array(
                reading.initialisers[name], reading.expected[ours], suffix.endswith(".T"), where
            )
            moved.append((name, ours))
        for ours, tensor in reading.expected.items():
            if ours.startswith(f"{layer.name}.") and tensor.counter:
                params[ours] = np.zeros(tensor.shape, np.int64)  # not in ONNX: no step taken
        written = token(layer, every=True)
        mapping.append(Mapped(step.source, step.what, written, tensors=tuple(moved), block=block))


def _fits_exactly(pool: Pool, shape: tuple[int, ...], where: str) -> None:
    """Refuse a pooling's ceil_mode=1 unless its windows fit its input exactly, where
    ceiling and flooring count the same windows (2x2 windows on an even size). Elsewhere
    a file's readers disagree: where a last window would start in the padding, onnxruntime
    drops it, as PyTorch does, and ONNX's shape inference counts it (2x2 windows, stride 2,
    padding 1 on 5x5: 3x3 against 4x4), so the PyTorch import's rule, which reads what the
    traced module computes, is not this one."""
    if any((n + 2 * pool.padding - pool.size) % pool.stride for n in shape[1:]):
        raise UsageError(
            f"{where}: ceil_mode=1: its {pool.size}x{pool.size} windows, stride {pool.stride}, "
            f"do not fit its {show_shape(shape[1:])} input exactly; threefold floors like "
            "PyTorch's default"
        )


def _array(tensor, expected, transposed: bool, where: str) -> np.ndarray:
    """One initialiser as the canonical tensor: its claimed shape and type checked first."""
    import onnx

    shape = tuple(reversed(tensor.dims)) if transposed else tuple(tensor.dims)
    if shape != expected.shape:
        raise UsageError(f"{where}: shape {tuple(tensor.dims)}, the layer's {expected.shape}")
    if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        kind = onnx.TensorProto.DataType.Name(tensor.data_type)
        raise UsageError(f"{where}: {kind}; float or double is needed")
    value = constant_array(tensor, where)
    value = np.ascontiguousarray(value.T if transposed else value)
    problem = value_problem(expected, value)
    if problem:
        raise UsageError(f"{where} {problem}")
    return value
