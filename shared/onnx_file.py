"""An untrusted ONNX file read into its graph within bounds: its size before it is parsed, its
node and message counts off the protobuf wire format before a node is decoded, its
initialisers' count, its structure as onnx.checker sees it, no operators of other domains;
initialisers stored in other files (external data, torch.onnx.export's default) read only from
files beside it, within their bounds."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from shared.errors import UsageError
from shared.io import regular_file
from shared.spec import MAX_LAYERS

# The largest network the cost bounds accept holds about 50M float32 parameters (1 GiB over
# parameters, gradients and optimizer state); files of real models are far smaller.
MAX_ONNX_FILE_BYTES = 2**28
# Each layer is one node (fc may be MatMul + Add), with the input's Sub and Div and a final
# LogSoftmax or Identity nodes around them.
MAX_NODES = 2 * MAX_LAYERS + 4


def read_graph(path: Path, label: str):
    """The parsed graph, its size and node count bounded, its initialisers' external data
    read in (see _read_external); no other tensor may have any."""
    import onnx

    model, data = _bounded_model(path, label)
    graph = model.graph
    if len(graph.initializer) > MAX_NODES * 4:
        raise UsageError(
            f"{label}: {len(graph.initializer)} initialisers, more than its layers can use"
        )
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            raise UsageError(
                f"{label}: operators of domain {opset.domain!r}; threefold reads ONNX's own"
            )
    if _read_external(graph, path, label):
        data = model.SerializeToString()  # checked below with the tensors read in
    elsewhere = _external_tensor(graph)
    if elsewhere:
        raise UsageError(f"{label}: {elsewhere} is stored in another file (external data)")
    # ONNX's own rules (each node's inputs and outputs by its operator's schema, the nodes in
    # an order that computes each input first, the types and shapes inferred) hold before the
    # reader walks the graph: one that breaks them is no model any runtime reads.
    try:
        onnx.checker.check_model(data, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{label}: not a valid ONNX model ({first})") from None
    _check_opset(model, label)
    names = [node.name for node in graph.node if node.name]
    if len(set(names)) != len(names):  # onnxruntime refuses such a model
        twice = next(name for name in names if names.count(name) > 1)
        raise UsageError(f"{label}: two nodes are named {twice[:80]!r}; ONNX names each once")
    return graph


# Before opset 7, Dropout and BatchNormalization take `is_test`: 0 (the default) trains.
FIRST_OPSET = 7


def _check_opset(model, label: str) -> None:
    """Refuse an opset no ONNX release defines yet, or one before FIRST_OPSET, whose
    operators threefold does not read."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    own = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    version = own[0] if own else newest  # none: no node of ONNX's own, refused as such
    if version > newest:
        raise UsageError(f"{label}: opset {version}, newer than any this onnx defines ({newest})")
    if version < FIRST_OPSET:
        raise UsageError(
            f"{label}: opset {version}; threefold reads opset {FIRST_OPSET} and later (before "
            "it, Dropout and BatchNormalization train unless is_test=1)"
        )


def _bounded_model(path: Path, label: str) -> tuple[Any, bytes]:
    """The parsed model and its file's bytes, their size and node count bounded before it is
    parsed."""
    import onnx
    from google.protobuf.message import DecodeError

    with regular_file(path, label) as file:
        data = file.read(MAX_ONNX_FILE_BYTES + 1)
    if len(data) > MAX_ONNX_FILE_BYTES:
        raise UsageError(
            f"{label}: larger than {MAX_ONNX_FILE_BYTES} bytes; not a model threefold reads"
        )
    nodes = _count_nodes(data, label)
    if nodes > MAX_NODES:  # counted before parsing: a parsed node costs hundreds of bytes
        raise UsageError(f"{label}: more than {MAX_NODES} nodes ({MAX_LAYERS} layers at most)")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise UsageError(f"{label}: not an ONNX model ({type(error).__name__})") from None
    return model, data


def external_files(path: Path) -> list[Path]:
    """The files beside the model that its initialisers' external data names: a command that
    reads the model must not write over them. None where the file is no model threefold
    reads, as reading it will say."""
    import onnx

    try:
        graph = _bounded_model(path, str(path))[0].graph
    except UsageError:
        return []
    external = onnx.TensorProto.EXTERNAL
    names = {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == external
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [path.parent / name for name in sorted(names) if _beside_the_model(name)]


def _beside_the_model(location: str) -> bool:
    """Whether an external data's `location` names a file in the model's own folder: a path,
    or `..`, would let the model read any file."""
    plain = location not in ("", ".", "..") and "\0" not in location
    return plain and Path(location).name == location


def _read_external(graph, path: Path, label: str) -> bool:
    """Read into `graph` each initialiser stored in another file, as torch.onnx.export writes
    them by default (`external_data=True`): whether there was one. The file must be a plain
    name in the model's own folder (_beside_the_model) and a regular file, each tensor's
    bytes within it and exactly its size, and all of them at most MAX_ONNX_FILE_BYTES."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    total = 0
    for tensor in external:
        where = f"{label}: initialiser {tensor.name}'s external data"
        try:
            with warnings.catch_warnings():  # onnx warns of keys it does not know
                warnings.simplefilter("ignore")
                info = ExternalDataInfo(tensor)
            item = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            offset = int(info.offset or 0)
            length = None if info.length is None else int(info.length)
        except (KeyError, ValueError, TypeError) as error:
            raise UsageError(f"{where}: not readable ({type(error).__name__})") from None
        location = str(info.location)
        if not _beside_the_model(location):
            raise UsageError(f"{where}: {location[:60]!r} is not a file beside the model")
        if any(d < 0 for d in tensor.dims):
            raise UsageError(f"{where}: dims {list(tensor.dims)[:8]}, not a tensor's shape")
        size = math.prod(tensor.dims) * item
        length = size if length is None else length
        total += length
        if length != size or not 0 <= offset <= MAX_ONNX_FILE_BYTES or total > MAX_ONNX_FILE_BYTES:
            raise UsageError(f"{where}: {length:,} bytes at {offset:,}, for a tensor of {size:,}")
        # Never through a symlink, which could name any file (/proc/self/environ, say).
        with regular_file(path.parent / location, f"{where} {location}", follow=False) as file:
            file.seek(offset)
            raw = file.read(length)
        if len(raw) != length:
            raise UsageError(f"{where}: {location} ends before the tensor's {length:,} bytes")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = raw
    return bool(external)


def _external_tensor(graph) -> str | None:
    """The first tensor of `graph` whose data lies in another file, named, or None: an
    initialiser, or a node's constant (a Constant's value), in a subgraph too. Read, such a
    tensor's bytes come from a path the file chooses, relative to the working folder."""
    import onnx

    external = onnx.TensorProto.EXTERNAL
    for tensor in graph.initializer:
        if tensor.data_location == external:
            return f"initialiser {tensor.name}"
    for sparse in graph.sparse_initializer:
        if external in (sparse.values.data_location, sparse.indices.data_location):
            return f"sparse initialiser {sparse.values.name}"
    for node in graph.node:
        for attribute in node.attribute:
            sparse = [attribute.sparse_tensor, *attribute.sparse_tensors]
            tensors = [attribute.t, *attribute.tensors, *(s.values for s in sparse)]
            tensors += [s.indices for s in sparse]
            if any(t.data_location == external for t in tensors):
                return f"node {node.name or node.op_type}'s {attribute.name}"
            for subgraph in [attribute.g, *attribute.graphs]:
                if found := _external_tensor(subgraph):
                    return found
    return None


# A parsed protobuf message costs a hundred bytes or more, on the wire as little as two: a file
# of many small messages (nodes, value_info entries, a subgraph in a node's attribute) would
# take gigabytes to parse. A network of MAX_LAYERS layers needs a few thousand. The fields
# walked are bounded too, which bounds the walk's time (tensors' values come packed, one field).
MAX_MESSAGES = 100_000
MAX_FIELDS = 1_000_000


def _count_nodes(data: bytes, label: str) -> int:
    """The nodes in the file, anywhere (a subgraph's too), read off the protobuf wire format
    with ONNX's own schema before anything is decoded; a UsageError past MAX_MESSAGES
    messages of any kind or MAX_FIELDS fields (counting nodes stops past MAX_NODES)."""
    import onnx

    node_type = onnx.NodeProto.DESCRIPTOR
    nodes = messages = fields = 0
    pending = [(onnx.ModelProto.DESCRIPTOR, 0, len(data))]
    while pending:
        descriptor, start, end = pending.pop()
        for number, value_start, value_end in _fields(data, start, end, label):
            field = descriptor.fields_by_number.get(number)
            is_message = field is not None and field.message_type is not None
            fields, messages = fields + 1, messages + (is_message and value_end is not None)
            if messages > MAX_MESSAGES or fields > MAX_FIELDS:
                kind, bound = (
                    ("messages", MAX_MESSAGES)
                    if messages > MAX_MESSAGES
                    else ("fields", MAX_FIELDS)
                )
                raise UsageError(
                    f"{label}: more than {bound} protobuf {kind}; not a model threefold reads"
                )
            if not is_message or value_end is None:
                continue
            nodes += field.message_type is node_type
            if nodes > MAX_NODES:
                return nodes
            pending.append((field.message_type, value_start, value_end))
    return nodes


def _fields(data: bytes, start: int, end: int, label: str):
    """(field number, value start, value end or None) of each field in data[start:end]."""
    position = start
    while position < end:
        key, position = _varint(data, position, label)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, position = _varint(data, position, label)
            yield field, position, None
        elif wire == 2:
            length, position = _varint(data, position, label)
            if position + length > end:
                raise UsageError(f"{label}: not an ONNX model (a field runs past its end)")
            yield field, position, position + length
            position += length
        elif wire in (1, 5):
            position += 8 if wire == 1 else 4
            yield field, position, None
        else:
            raise UsageError(f"{label}: not an ONNX model (protobuf wire type {wire})")


def _varint(data: bytes, position: int, label: str) -> tuple[int, int]:
    value = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            return value, position
    raise UsageError(f"{label}: not an ONNX model (a truncated protobuf number)")
