"""A user's PyTorch module traced by torch.fx, as shared/torch_import.py reads it: in both
modes (a forward that branches on self.training is refused), an argument with a plain
default specialised to it, each node's output shape on blank images."""

from __future__ import annotations

import contextlib
import inspect
import io
import operator
import random
import sys
from typing import Any

from shared.errors import USER_CODE_ERRORS, UsageError, first_line
from shared.layers import INPUT_SHAPE
from shared.torch_ops import MODULES, functions
from shared.torch_refusals import refuse_frozen


def trace(module: Any, where: str):
    """The module's graph (torch.fx), each node's output shape on 2 blank images, in evaluation
    mode (the caller leaves the module as it was: from_torch)."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    refuse_frozen(module, where)
    # Traced in training mode: a functional dropout's `training=self.training` is read
    # at trace time, and a dropout is a layer whichever mode the module was left in. A
    # forward that branches on self.training computes two networks; one is read.
    graphs = []
    for training in (True, False):
        module.train() if training else module.eval()  # as a user's code enters each
        refuse_frozen(module, where)  # a train() of its own may keep some layers frozen
        graphs.append(_traced(module, where))
        refuse_frozen(module, where)  # and so may the forward (self.bn.eval() in it)
    graph, evaluated = graphs
    if _operations(evaluated) != _operations(graph):
        raise UsageError(
            f"{where}: its forward computes other operations, or with other options, in "
            "evaluation mode (it reads self.training); threefold reads one network for both "
            "modes"
        )
    for node, in_evaluation in zip(graph.graph.nodes, evaluated.graph.nodes, strict=True):
        node.meta[EVALUATION_CALL] = in_evaluation.args, dict(in_evaluation.kwargs)
    graph.eval()
    parameter = next(iter(module.parameters()), None)
    dtype = torch.float32 if parameter is None else parameter.dtype
    # ShapeProp prints the traceback of the user's error itself, then wraps it: what it
    # writes is kept back, and passed on only where the forward ran (its warnings).
    written = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(written):
            ShapeProp(graph).propagate(torch.zeros(2, *INPUT_SHAPE, dtype=dtype))
    except USER_CODE_ERRORS as error:
        cause = first_line(error.__cause__ or error)
        raise UsageError(f"{where}: its forward fails on 1x28x28 images ({cause})") from None
    sys.stderr.write(written.getvalue())
    return graph


# A traced node's call as the module in evaluation mode makes it: (args, kwargs).
EVALUATION_CALL = "threefold_evaluation_call"


def torch_layer_of(module: Any) -> type | None:
    """The torch.nn layer threefold reads that `module` computes as: its class, or the one a
    subclass of it adds an __init__ alone to (`class Conv(nn.Conv2d)` that initialises its
    weights its own way); None for any other, one whose methods compute otherwise included
    (a quantization-aware Linear's forward rounds its weight)."""
    import torch

    for cls in type(module).__mro__:
        if getattr(torch.nn, cls.__name__, None) is cls:
            return cls if cls.__name__ in MODULES else None
        own = {name for name, value in vars(cls).items() if _a_method(value)}
        if own - {"__init__"}:
            return None
    return None


def _a_method(value: Any) -> bool:
    return callable(value) or isinstance(value, property | staticmethod | classmethod)


def _tracer():
    """torch.fx's tracer, taking a subclass of a layer that changes only its __init__ as the
    layer: traced into, its weights were 'a tensor used directly in forward'."""
    import torch

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module: Any, name: str) -> bool:
            return super().is_leaf_module(module, name) or torch_layer_of(module) is not None

    return Tracer()


def _traced(module: Any, where: str):
    """The module's forward traced by torch.fx, as `module(x)` calls it: an argument after x
    whose default is a plain value (`targets=None`) takes it; any other is refused."""
    import torch

    if isinstance(module, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
        raise UsageError(f"{where}: a {type(module).__name__} wrapper; pass its .module")
    before = set(vars(module))
    parameters = list(inspect.signature(module.forward).parameters.values())
    if not parameters:
        raise UsageError(f"{where}: its forward takes no input")
    for parameter in parameters[1:]:
        if parameter.default is inspect.Parameter.empty:
            raise UsageError(f"{where}: its forward takes more than one input")
        if not _plain(parameter.default):
            raise UsageError(
                f"{where}: its forward's {parameter.name}={str(parameter.default)[:40]}: "
                "threefold traces a forward with plain defaults (None, a bool, a number, a "
                "string)"
            )
    defaults = {p.name: p.default for p in parameters[1:]}
    drawn = _global_draws()
    try:
        tracer = _tracer()
        traced = tracer.trace(module, concrete_args=defaults or None)
        graph = torch.fx.GraphModule(tracer.root, traced, type(module).__name__)
    except USER_CODE_ERRORS as error:  # tracing runs the user's forward: any error is theirs
        raise UsageError(
            f"{where}: torch.fx cannot trace its forward ({first_line(error)}); threefold "
            "reads forwards that are chains of layers and functional calls"
        ) from None
    finally:
        # torch.fx keeps a tensor made in forward (torch.tensor(0.5)) as an attribute of the
        # module (_tensor_constant0), which the graph has copied: the module stays as it was.
        for name in set(vars(module)) - before:
            delattr(module, name)
    if _global_draws() != drawn:
        raise UsageError(
            f"{where}: its forward draws from Python's or NumPy's random numbers (stochastic "
            "depth?); torch.fx records the branch one draw took as the network, so threefold "
            "reads forwards whose random numbers are torch's dropout"
        )
    return _without_placeholders(graph, where) if defaults else graph


def _global_draws() -> tuple[Any, ...]:
    """Python's and NumPy's global random states, which a draw moves on: equal before and
    after a trace where the forward drew none."""
    import numpy as np

    _, keys, position, *gauss = np.random.get_state()
    return random.getstate(), keys.tobytes(), position, *gauss


def _plain(default: Any) -> bool:
    """Whether an argument's default is one torch.fx can trace the forward with."""
    return default is None or type(default) in (bool, int, float, str)


def _without_placeholders(graph: Any, where: str) -> Any:
    """`graph` without the placeholders torch.fx keeps for the arguments it specialised to
    their defaults, and without its checks of their values: a graph of the one input."""
    import torch

    checks = {torch._assert, torch.fx._symbolic_trace._assert_is_none, operator.eq}
    dropped, frontier = set(), [n for n in graph.graph.nodes if n.op == "placeholder"][1:]
    while frontier:
        node = frontier.pop()
        if node.op != "placeholder" and node.target not in checks:
            raise UsageError(
                f"{where}: {node.name} ({name_of(node)}): computes with an argument of "
                "forward other than its input; threefold's networks take one input"
            )
        dropped.add(node)
        frontier.extend(node.users)
    for node in reversed(graph.graph.nodes):  # each check before the value it checks
        if node in dropped:
            graph.graph.erase_node(node)
    graph.recompile()
    return graph


def _operations(graph: Any) -> list[tuple[Any, ...]]:
    """A traced graph's operations in order with their arguments (the nodes they take by
    name), a dropout's aside: its `training` differs between the modes, and each is read."""
    calls = functions()

    def drops(node: Any) -> bool:
        call = calls.get(node.target) if node.op == "call_function" else None
        return call is not None and "training" in dict(call[1])

    return [
        (node.op, node.target)
        if drops(node)
        else (node.op, node.target, repr(node.args), repr(node.kwargs))
        for node in graph.graph.nodes
    ]


def name_of(node: Any) -> str:
    if node.op == "call_module":
        return str(node.target)
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))
