"""Sizes in a traced PyTorch graph (torch.fx): each node's shape per image, as ShapeProp
recorded it, and which nodes compute sizes rather than tensors (x.size(0), x.shape[1],
products of an image's sizes), which the importer reads with the view that takes them, never
as layers. A size computed with the batch's is none: each image's features would then
depend on the batch."""

from __future__ import annotations

import operator
from typing import Any


def image_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of one image of `node`'s output (its batch axis dropped), None where it
    gives no tensor."""
    meta = node.meta.get("tensor_meta")
    return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)[1:]


def users(node: Any) -> list[Any]:
    """The nodes that take `node`'s output as a tensor (not only its size)."""
    return [user for user in node.users if size_source(user) is not node]


def tensor_inputs(node: Any) -> list[Any]:
    """The nodes whose tensors `node` takes (not those it only takes the size of)."""
    return [a for a in node.all_input_nodes if size_source(a) is None]


def size_source(node: Any) -> Any | None:
    """The node whose size `node` reads (x.size(...), x.shape, or an item of either, as in
    x.view(x.shape[0], -1); or a product or sum of an image's sizes and numbers, as in
    x.view(-1, x.size(1) * x.size(2) * x.size(3))), or None where `node` is no size."""
    if node.op == "call_method" and node.target == "size":
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return node.args[0]
    if node.op == "call_function" and node.target is operator.getitem:
        return size_source(node.args[0])
    if node.op == "call_function" and node.target in (operator.mul, operator.add):
        sizes = [a for a in node.args if hasattr(a, "op")]  # the rest are numbers
        sources = {size_source(a) for a in sizes}
        # Not of the batch's size: each image's features would then depend on the batch.
        if len(sources) == 1 and None not in sources and not any(map(_batch_size, sizes)):
            return sources.pop()
    return None


def _batch_size(node: Any) -> bool:
    """Whether a size node reads the batch's size: x.size(0), x.shape[0], x.size()[0], the
    same by a negative dim (x.size(-4) of an image batch), or a slice of the shape."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        # None: the whole size, the batch's among them
        return dim is None or _batch_dim(dim, node.args[0])
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        return isinstance(index, slice) or _batch_dim(index, size_source(node.args[0]))
    return node.op == "call_function" and node.target is getattr  # the whole shape


def _batch_dim(dim: Any, tensor: Any) -> bool:
    """Whether `dim` of the value `tensor` computes is its batch's: 0, or minus its rank (any
    negative dim where its shape is not known)."""
    shape = None if tensor is None else image_shape(tensor)
    if not isinstance(dim, int):
        return True
    return dim == 0 or (dim == -(len(shape) + 1) if shape is not None else dim < 0)
