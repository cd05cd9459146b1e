"""A network from a user's PyTorch module: its layers read from the module's graph (traced
with torch.fx, so `nn.Sequential`, nested ones and a `forward` of functional calls all
count), its weights from its `state_dict`, both in threefold's terms: the spec, with every
option written out as PyTorch computes it (a `Conv2d` pads 0 where threefold's grammar
defaults to K//2), and the canonical tensors.

Anything threefold cannot compute the same way is refused in one line naming the
submodule's path, its type and the option at fault. PyTorch is imported when a module is
read, never when this module is.
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.errors import UsageError
from shared.kinds import sliding, token
from shared.layers import Layer, Tensor, show_shape
from shared.network import Mapped, Network, body_and_shortcut, check_shortcut
from shared.spec import Entry, build_layers, get_arch, tensors
from shared.tensor_checks import value_problem
from shared.torch_ops import (
    DROP,
    METHODS,
    MODULES,
    RESHAPES,
    Refused,
    Taken,
    bind,
    functions,
    input_scaling,
)
from shared.torch_refusals import (
    left_as_it_was,
    refuse_cut_gradients,
    refuse_hidden_behaviour,
    refuse_other_outputs,
    refuse_shared_weights,
)
from shared.torch_sizes import image_shape, size_source, tensor_inputs, users
from shared.torch_trace import EVALUATION_CALL, name_of, torch_layer_of, trace

# --- the chain ----------------------------------------------------------------------------------


@dataclass
class _Step:
    """One operation read off the graph, before it is built into a layer."""

    source: str
    what: str
    taken: Taken
    module_path: str | None  # its tensors' prefix in the module's state_dict
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]


@dataclass
class _Block:
    """A residual block read off the graph: where the chain forks into two paths of steps
    (`shortcut` empty for the identity) that the add node `source` joins."""

    source: str
    what: str
    body: list[_Step]
    shortcut: list[_Step]


def _read_steps(module: Any, graph: Any, scaling: list[Any], where: str) -> list[_Step | _Block]:
    """The module's operations in order after its input's `scaling` (its nodes), each
    checked to take the one before's output; where the output feeds two paths that an add
    joins, a residual block of them."""
    calls = functions()
    returned = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    if isinstance(returned, tuple | list | dict):  # before its paths read as a block
        kind = type(returned).__name__
        raise UsageError(
            f"{where}: its forward returns a {kind} of {len(returned)}; threefold's networks "
            "return the logits alone (a tensor)"
        )
    current, steps, read = None, [], set(scaling)
    for node in graph.graph.nodes:
        if node in read:
            continue
        if node.op == "placeholder":  # the one input (_traced)
            current = scaling[-1] if scaling else node
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise UsageError(
                    f"{where}: its forward does not return its last operation's output "
                    "(threefold reads chains of layers)"
                )
            break
        if size_source(node) is not None:
            continue  # x.size(0) or x.shape[0] in a view: read with the view
        if len(users(current)) > 1:
            block, join, nodes = _read_block(module, current, calls, where)
            steps.append(block)
            read |= nodes
            current = join
            continue
        steps.append(_read_step(module, node, current, calls, where))
        current = node
    return steps


def _read_step(module: Any, node: Any, current: Any, calls: dict, where: str) -> _Step:
    """One operation, checked to take `current` alone."""
    if node.op == "get_attr":
        raise UsageError(
            f"{where}: {node.target}: a tensor used directly in forward; threefold reads "
            "layers (modules and functional calls)"
        )
    if _adds(node) and len(tensor_inputs(node)) < 2 and current in node.args[:2]:
        # Reached as a step, not as a block's join: "add: add: not an operation threefold has".
        what = "a value to itself" if node.args[:2] == (current, current) else "a number"
        raise UsageError(
            f"{where}: {node.name} ({name_of(node)}): an add of {what}, not of two paths from "
            "one value; threefold reads residual blocks, body(x) + shortcut(x)"
        )
    inputs = tensor_inputs(node)  # a size read from any tensor is the batch's, a number
    read = node.all_input_nodes
    if read and not inputs and all(size_source(a) is not None for a in read):
        raise UsageError(
            f"{where}: {node.name} ({name_of(node)}): computes with the batch's size; an "
            "image's features in threefold's layers do not depend on the batch"
        )
    if inputs != [current] or (node.args and node.args[0] is not current):
        takes = "several tensors" if len(inputs) > 1 else "a tensor other than the one before"
        raise UsageError(
            f"{where}: {node.name} ({name_of(node)}): takes {takes}; threefold's networks "
            "are chains of layers and residual blocks, each taking the one before's output"
        )
    shape_in, shape_out = image_shape(current), image_shape(node)
    if shape_out is None:
        raise UsageError(f"{where}: {node.name} ({name_of(node)}): does not give a tensor")
    source, what, taken, path = _take(module, node, calls, where)
    return _Step(source, what, taken, path, shape_in, shape_out)


def _writes_its_input(module: Any, node: Any, calls: dict) -> bool:
    """Whether `node` overwrites its input (inplace=True, relu_): every other reader of that
    input then reads the result."""
    if node.op == "call_module":
        return getattr(module.get_submodule(node.target), "inplace", False) is True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return True
    if node.op == "call_function" and node.target in calls:
        try:
            return bind(calls[node.target][1], node.args, dict(node.kwargs)).get("inplace") is True
        except Refused:  # refused with its own message once read
            return False
    return False


def _gives_its_input(taken: Taken) -> bool:
    """Whether an operation read as `taken` may return its input, or a view of it: an
    identity, a reshape, and a dropout (in evaluation mode). An operation in place after it
    writes the value it was given."""
    return (
        taken is None or isinstance(taken, str) or taken[0] in ("flatten", "dropout", "dropout2d")
    )


def _is_add(node: Any) -> bool:
    """x + y, torch.add(x, y) or x.add(y) of two tensors, with no scaling."""
    return len(tensor_inputs(node)) == 2 and len(node.args) == 2 and not node.kwargs and _adds(node)


def _adds(node: Any) -> bool:
    """Whether `node` is an add (+, torch.add, x.add), of whatever."""
    import torch

    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")


def _read_block(module: Any, fork: Any, calls: dict, where: str) -> tuple[_Block, Any, set]:
    """The residual block starting where `fork`'s output feeds two paths: (the block, the add
    node joining them, every node it read)."""
    takers = users(fork)
    if len(takers) != 2:
        raise UsageError(
            f"{where}: {fork.name}: its output feeds {len(takers)} operations; threefold reads "
            "residual blocks, whose input feeds two paths that add"
        )
    paths, ends, read = [], [], set()
    for user in takers:
        steps, previous, node = [], fork, user
        aliased = True  # the fork's output itself, or a view of it
        while len(tensor_inputs(node)) < 2:  # up to the node joining the paths
            if aliased and _writes_its_input(module, node, calls):
                raise UsageError(
                    f"{where}: {node.name} ({name_of(node)}): in place on a value another "
                    "path also reads, which then reads the result; threefold's layers make "
                    "new values (drop inplace=True)"
                )
            steps.append(_read_step(module, node, previous, calls, where))
            aliased = aliased and _gives_its_input(steps[-1].taken)
            read.add(node)
            following = users(node)
            if not following:
                raise UsageError(
                    f"{where}: {node.name} ({name_of(node)}): its result is never used; "
                    "threefold reads chains of layers (drop the call)"
                )
            if len(following) != 1:
                raise UsageError(
                    f"{where}: {node.name} ({name_of(node)}): inside a residual block its "
                    "output feeds other than the next layer; a block holds a chain"
                )
            previous, node = node, following[0]
        paths.append(steps)
        ends.append(node)
    join = ends[0]
    if ends[1] is not join or not _is_add(join):
        raise UsageError(
            f"{where}: {join.name} ({name_of(join)}): joins two paths other than by adding "
            "them; threefold's residual blocks add body and shortcut"
        )
    body, shortcut = body_and_shortcut(paths, lambda step: step.taken)
    read.add(join)
    block = _Block(join.name, f"{name_of(join)}(body, shortcut)", body, shortcut)
    return block, join, read


def _take(module: Any, node: Any, calls: dict, where: str):
    """(source, what, taken, tensors' prefix) for one node; refusals named by the node."""
    if node.op == "call_module":
        sub = module.get_submodule(node.target)
        type_name, layer = type(sub).__name__, torch_layer_of(sub)
        if type_name not in MODULES and layer is None:
            raise UsageError(f"{where}: {node.target}: {type_name}: not a layer threefold has")
        if layer is None:  # torch.fx keeps torch.ao's too
            raise UsageError(
                f"{where}: {node.target}: {type(sub).__module__}.{type_name}: not torch.nn's "
                f"{type_name}; it computes its own way (a quantization-aware Linear rounds "
                "its weight)"
            )
        type_name = layer.__name__
        names, mapper = MODULES[type_name]
        options = {name: _module_option(sub, name) for name in names}
        try:
            taken = mapper(options)
        except Refused as refused:
            raise UsageError(
                f"{where}: {node.target}: {type_name}({refused.option}): {refused.why}"
            ) from None
        return node.target, repr(sub), taken, node.target
    if node.op == "call_function":
        if node.target not in calls:
            raise UsageError(
                f"{where}: {node.name}: {name_of(node)}: not an operation threefold has"
            )
        shown, signature, mapper = calls[node.target]
    elif node.op == "call_method" and node.target in RESHAPES:
        shape = (
            node.args[1]
            if len(node.args) == 2 and isinstance(node.args[1], tuple | list)
            else node.args[1:]
        )
        if shape and isinstance(shape[0], int) and shape[0] != -1:
            # Read off the trace's 2 images alone: x.view(2, -1) flattens at that batch only.
            raise UsageError(
                f"{where}: {node.name}: x.{node.target}({shape[0]}, ...) fixes the batch at "
                f"{shape[0]}; write x.{node.target}(x.size(0), -1)"
            )
        return node.name, f"x.{node.target}(...)", "reshape", None
    elif node.op == "call_method" and node.target in METHODS:
        signature, mapper = METHODS[node.target]
        shown = f"x.{node.target}"
    else:
        raise UsageError(f"{where}: {node.name}: {name_of(node)}: not an operation threefold has")
    try:
        options = bind(signature, node.args, dict(node.kwargs))
        options.pop("input")
        if "training" in options:  # F.dropout(x, p) drops in evaluation too: the default
            in_evaluation = bind(signature, *node.meta[EVALUATION_CALL])["training"]
            if in_evaluation is not False:
                why = "it would drop in evaluation too; pass training=self.training"
                raise Refused(f"training={in_evaluation!r} in evaluation mode", why)
        taken = mapper(options)
    except Refused as refused:
        raise UsageError(
            f"{where}: {node.name}: {shown}({refused.option}): {refused.why}"
        ) from None
    shown_options = ", ".join(f"{k}={v!r}" for k, v in options.items() if k != "_stacklevel")
    return node.name, f"{shown}({shown_options})", taken, None


def _module_option(sub: Any, name: str) -> Any:
    value = getattr(sub, name)
    if name == "bias":
        return value is not None if not isinstance(value, bool) else value
    return value


# Where a step's layer is: (i,) the network's i-th, (i, "body", k) or (i, "shortcut", k) the
# k-th of its block's body or shortcut; None for a step that is dropped.
Position = tuple[Any, ...] | None


def _entries(
    steps: list[_Step | _Block], where: str, network: bool = True
) -> tuple[list[Entry], list[tuple[_Step | _Block, Position]]]:
    """The spec's entries from the steps (each labelled with its source), and for each step
    the position of the layer it became; a block's steps before the block's own. `network`:
    the steps are the whole network's, not a block's path (whose last step is not the
    network's)."""
    entries, placed = [], []
    for position, step in enumerate(steps):
        if isinstance(step, _Block):
            index = len(entries)
            for part in ("body", "shortcut"):
                inner, inner_placed = _entries(getattr(step, part), where, network=False)
                if part == "body":
                    body = inner
                placed += [(s, None if p is None else (index, part, *p)) for s, p in inner_placed]
            if not body:
                raise UsageError(
                    f"{where}: {step.source}: both paths change nothing; threefold's residual "
                    "blocks add a body of layers to the shortcut"
                )
            placed.append((step, (index,)))
            entries.append((f"{step.source}: {step.what}", "res", {"body": body}))
            continue
        label = f"{step.source}: {step.what}"
        taken = step.taken
        if taken == "reshape":
            taken = _reshape(step, where)
        elif isinstance(taken, tuple) and taken[0] == "flatten":
            taken = _flatten(step, taken[1], where)
        elif isinstance(taken, tuple) and taken[0] == "fc":
            taken = _linear(step, taken[1], where)
        elif isinstance(taken, tuple) and taken[0] in ("maxpool", "avgpool"):
            taken = _floored(step, taken, where)
        if taken == DROP and not (network and position == len(steps) - 1):
            raise UsageError(
                f"{where}: {label}: a log_softmax before the last layer is not a layer "
                "threefold has"
            )
        if taken is None or taken == DROP:
            placed.append((step, None))
            continue
        kind, options = taken
        if kind == "dropout2d" and len(step.shape_in) != 3:
            raise UsageError(f"{where}: {label}: Dropout2d on a flat input drops features")
        placed.append((step, (len(entries),)))
        entries.append((label, kind, options))
    return entries, placed


def _layer_at(layers: tuple[Layer, ...], position: tuple[Any, ...]) -> Layer:
    layer = layers[position[0]]
    return layer if len(position) == 1 else getattr(layer, position[1])[position[2]]


def _reshape(step: _Step, where: str) -> Taken:
    """A view or reshape that flattens each image (x.view(x.size(0), -1)) or changes nothing."""
    if step.shape_out == step.shape_in:
        return None
    if len(step.shape_in) == 3 and step.shape_out == (math.prod(step.shape_in),):
        return "flatten", {}
    raise UsageError(
        f"{where}: {step.source}: {step.what}: reshapes {step.shape_in} to {step.shape_out}; "
        "threefold flattens each image whole (x.view(x.size(0), -1))"
    )


def _flatten(step: _Step, options: dict[str, Any], where: str) -> Taken:
    if options["start_dim"] != 1 or options["end_dim"] not in (-1, len(step.shape_in)):
        raise UsageError(
            f"{where}: {step.source}: {step.what}: threefold flattens from dim 1 to the last"
        )
    return None if len(step.shape_in) == 1 else ("flatten", {})


def _floored(step: _Step, taken: Taken, where: str) -> Taken:
    """A pooling, whose ceil_mode=True is read where it computes what flooring does: where
    the windows fit the input exactly (2x2 windows on an even size), no window is added."""
    kind, options = taken
    options = dict(options)
    if options.pop("ceil"):
        window = options["size"], options["stride"], options["padding"]
        floored = tuple(sliding(n, *window) for n in step.shape_in[1:])
        if tuple(step.shape_out[1:]) != floored:
            raise UsageError(
                f"{where}: {step.source}: {step.what}: ceil_mode=True adds a window here "
                f"({show_shape(step.shape_in[1:])} -> {show_shape(step.shape_out[1:])}, not "
                f"{show_shape(floored)}); threefold floors like PyTorch's default"
            )
    return kind, options


def _linear(step: _Step, options: dict[str, Any], where: str) -> Taken:
    if not options["bias"]:
        raise UsageError(f"{where}: {step.source}: Linear(bias=False): threefold's fc has a bias")
    if len(step.shape_in) != 1:
        raise UsageError(
            f"{where}: {step.source}: {step.what}: on a {len(step.shape_in) + 1}-d input; "
            "threefold's fc takes flattened images"
        )
    return "fc", {"features": options["out_features"]}


# --- the network --------------------------------------------------------------------------------


def from_torch(module: Any, where: str = "module") -> Network:
    """The network a PyTorch module computes, with the module's weights and buffers. Refuses,
    in one UsageError naming the submodule, its type and the option, what threefold cannot
    compute the same way."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"{where}: {type(module).__name__} is not a torch.nn.Module")
    # torch.compile(model) wraps the module it compiles (and has loaded torch._dynamo, whose
    # import takes a second that a plain module need not wait for).
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and isinstance(module, dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod  # what it compiles computes as the module does
    for name, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):  # a quantized module's, an extra state
            raise UsageError(
                f"{where}: {name}: a {type(value).__name__} in its state_dict; threefold reads "
                "modules whose state is tensors"
            )
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            raise UsageError(f"{where}: {name}: {value.dtype}; threefold computes in float32/64")
    refuse_hidden_behaviour(module, where)
    with left_as_it_was(module):  # tracing and the probe run its forward
        graph = trace(module, where)
        refuse_shared_weights(module, graph, where)
        standardise, scaling = input_scaling(graph, where)
        steps = _read_steps(module, graph, scaling, where)
        entries, placed = _entries(steps, where)
        if not entries:
            raise UsageError(f"{where}: no layers found in its forward")
        refuse_cut_gradients(module, graph, where)
    layers = build_layers(entries, where)  # one per entry, refusals named by its source
    arch = get_arch("-".join(token(layer) for layer in layers), where)
    state = module.state_dict()
    mapping, canonical, expected = [], {}, tensors(arch)
    for step, position in placed:  # each block's shortcut first, which its steps are mapped to
        if isinstance(step, _Block):
            shown = ", ".join(s.what for s in step.shortcut)
            layer = _layer_at(arch.layers, position)
            check_shortcut(
                [s.taken for s in step.shortcut], shown, layer, f"{where}: {step.source}"
            )
    for step, position in placed:
        if position is None:
            same_loss = "cross-entropy on log-probabilities is the same loss"
            note = same_loss if step.taken == DROP else "changes nothing here"
            mapping.append(Mapped(step.source, step.what, "", note))
            continue
        layer = _layer_at(arch.layers, position)
        if isinstance(step, _Block):
            mapping.append(Mapped(step.source, step.what, token(layer, every=True)))
            continue
        moved = []
        for name in expected:
            if not name.startswith(f"{layer.name}."):
                continue
            attribute = name[len(layer.name) + 1 :]
            theirs = f"{step.module_path}.{attribute}"
            canonical[name] = _tensor_read(
                module, step, attribute, expected[name], f"{where}: {theirs}"
            )
            moved.append((theirs, name))
        written = token(layer, every=True)
        block = arch.layers[position[0]].name if len(position) > 1 else ""
        mapping.append(Mapped(step.source, step.what, written, tensors=tuple(moved), block=block))
    network = Network(arch, canonical, tuple(mapping), standardise, _unread(state, graph))
    network.check(where)
    with left_as_it_was(module):
        refuse_other_outputs(module, network, where)
    return network


def _tensor_read(
    module: Any, step: _Step, attribute: str, tensor: Tensor, where: str
) -> np.ndarray:
    """The tensor the submodule's forward reads (not the state_dict's, which a class may
    rewrite): a parameter where training moves it, a buffer where not, of the shape its
    settings give; errors name `where` (the module and the tensor's name)."""
    import torch

    value = getattr(module.get_submodule(step.module_path), attribute, None)
    if tensor.trainable and not isinstance(value, torch.nn.Parameter | type(None)):
        raise UsageError(
            f"{where}: not a parameter (a buffer, or a plain tensor), which the module never "
            "trains; threefold trains every weight"
        )
    return canonical_array(value, tensor, where, f"where {step.what} computes")


def _unread(state: dict[str, Any], graph: Any) -> tuple[str, ...]:
    """The state_dict's names under modules the forward never calls (an auxiliary head),
    which a weights file of the module holds and the network does not read."""
    called = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    return tuple(name for name in state if not any(name.startswith(f"{path}.") for path in called))


def canonical_array(
    value: Any, tensor: Tensor, where: str, whose: str = "the network's"
) -> np.ndarray:
    """A torch tensor as a NumPy copy holding `tensor`: dense, of its shape (`whose` names
    where that shape comes from), float32 or float64 (int64 for a counter), its values
    checked; anything else is refused, naming `where` (a complex or int8 weight was cast to
    int64, a bfloat16 or sparse one a traceback)."""
    import torch

    if not isinstance(value, torch.Tensor):  # an attribute set to None (running stats)
        raise UsageError(f"{where}: a {type(value).__name__}, not a tensor")
    if tuple(value.shape) != tensor.shape:
        raise UsageError(f"{where} has shape {tuple(value.shape)}, {whose} {tensor.shape}")
    if value.is_quantized or value.is_meta or value.layout != torch.strided:
        form = "quantized" if value.is_quantized else "meta" if value.is_meta else value.layout
        raise UsageError(f"{where}: a {form} tensor; threefold reads dense tensors")
    wanted = (torch.int64,) if tensor.counter else (torch.float32, torch.float64)
    if value.dtype not in wanted:
        raise UsageError(f"{where}: {value.dtype}, not {' or '.join(map(str, wanted))}")
    array = value.detach().cpu().numpy().copy()
    problem = value_problem(tensor, array)
    if problem is not None:
        raise UsageError(f"{where} {problem}")
    return array
