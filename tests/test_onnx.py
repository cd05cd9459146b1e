"""The network out and in as ONNX, and its weights as .safetensors: every layer kind exported,
checked by onnx.checker and run by onnxruntime to the implementations' logits; ONNX -> spec
-> ONNX the identity; onnxruntime as the cross-check's fourth witness, catching planted export
bugs by layer; hostile files refused in one line, within bounds."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import types
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

import shared.onnx_export as onnx_export
import threefold
from shared.checkpoint import load_checkpoint
from shared.config import IMPLEMENTATIONS, TrainConfig
from shared.crosscheck import run_crosscheck
from shared.errors import OutputError, UsageError
from shared.export import main as export_main
from shared.io import staged
from shared.kinds import KINDS, kind_of
from shared.network import Network, load_weights
from shared.onnx_export import check_model, onnx_model
from shared.onnx_file import MAX_FIELDS, MAX_MESSAGES, MAX_NODES
from shared.onnx_forms import node_attributes
from shared.onnx_import import from_onnx
from shared.proof.onnx_witness import WITNESSES, onnx_logits
from shared.proof.rows import TOLERANCES, compare
from shared.spec import PRESETS, get_arch, init_params, param_shapes
from shared.weights_file import read_safetensors, write_safetensors
from tests.conftest import ROOT, run_measured
from tests.test_fuzz import specs

# Between them, every layer kind and option form: padding, no bias, strides, floor pooling
# with padding, adaptive pools to 1 and to 2, both dropouts, every activation, BatchNorm 2d/1d,
# residual blocks with the identity and with a projection.
EVERY_KIND = (
    "conv8k5p0b0-bn-leakyrelu0.2-maxpool3s2p1-conv16-elu-avgpool3s2p1-dropout2d0.1-conv16-gelu"
    "-adaptiveavgpool1-flatten-fc32-gelutanh-fc10",
    "conv6-tanh-avgpool2-conv8-sigmoid-adaptiveavgpool2-flatten-fc16-bn-relu-dropout0.3-fc10",
    "conv8s2-elu0.5-maxpool2-flatten-fc10",
    "conv4-bn-relu-res(conv4b0-bn-relu-conv4b0-bn)-relu-res(conv8s2-relu-conv8)-flatten-fc10",
)
STANDARDISE = (0.2860, 0.3530)
FLOAT32 = TOLERANCES[("float32", "pass")]


def with_statistics(network: threefold.Network, seed: int = 0) -> threefold.Network:
    """The network with BatchNorm running statistics that are not the identity's."""
    rng = np.random.default_rng(seed)
    tensors = dict(network.tensors)
    for name, value in tensors.items():
        if name.endswith("running_mean"):
            tensors[name] = rng.standard_normal(value.shape).astype(value.dtype)
        elif name.endswith("running_var"):
            tensors[name] = (rng.random(value.shape) + 0.5).astype(value.dtype)
    return threefold.Network(network.arch, tensors, network.mapping, STANDARDISE)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_the_specs_here_hold_every_layer_kind():
    kinds = {kind_of(layer).name for spec in EVERY_KIND for layer in get_arch(spec).layers}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("spec", [*PRESETS, *EVERY_KIND])
def test_every_network_exports_a_checked_graph_that_predicts_from_raw_pixels(spec, tmp_path):
    network = with_statistics(threefold.network(spec))
    path = network.to_onnx(tmp_path / "model.onnx")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == onnx_export.OPSET
    raw = np.random.default_rng(1).random((7, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        expected = threefold.to_torch(network)(torch.from_numpy(raw)).numpy()
    for batch in (raw[:1], raw):  # the batch axis is dynamic
        got = onnx_logits(network.arch, network.tensors, batch, network.standardise)
        assert relative(got, expected[: len(batch)]) < FLOAT32


@pytest.mark.parametrize("spec", [*PRESETS, *EVERY_KIND])
def test_spec_to_onnx_to_spec_is_the_identity(spec, tmp_path):
    network = with_statistics(threefold.network(spec, seed=3))
    back = from_onnx(network.to_onnx(tmp_path / "model.onnx"))
    assert back.arch.name == network.arch.name and back.arch.layers == network.arch.layers
    assert back.standardise == network.standardise
    for name, value in network.tensors.items():
        if name.endswith("num_batches_tracked"):  # not in ONNX: an imported one starts at 0
            assert back.tensors[name] == 0
        else:
            np.testing.assert_array_equal(back.tensors[name], value)


def small(spec: str) -> bool:
    try:
        arch = get_arch(spec, files=False)
    except UsageError:
        return False
    return sum(math.prod(s) for s in param_shapes(arch).values()) < 300_000


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs().filter(small))
def test_generated_specs_go_through_onnx_and_back(spec):
    network = threefold.network(spec)
    model = onnx_model(network.arch, network.tensors)
    check_model(model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        assert from_onnx(path).arch.layers == network.arch.layers


# --- PyTorch's own exporter, read back -------------------------------------------------------

MODELS = ["pytorch_examples_net.py:Net", "d2l_lenet.py:LeNet", "bn_cnn.py:Net"]
# Exported without folding its BatchNorms into its convolutions (folded, below): PyTorch's
# exporter then writes an Identity node for each copy of an initialiser it deduplicated.
RESNET = "resnet_basic_block.py:ResNet"


def exported(model: str, path, **options):
    """The module of tests/models/`model`, in evaluation mode, and its graph as
    torch.onnx.export writes it into `path`."""
    from shared.torch_files import load_module_file

    module, _ = load_module_file(str(ROOT / "tests" / "models" / model))
    return export_module(module.eval(), path, **options)


def export_module(module, path, dynamic: bool = True, **options):
    """`module`, its graph written into `path` by torch.onnx.export (dynamo=False), its batch
    dynamic or fixed at 2."""
    dynamic_axes = {"dynamic_axes": {"x": {0: "batch"}}} if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            torch.zeros(2, 1, 28, 28),
            path,
            dynamo=False,
            input_names=["x"],
            **{"opset_version": onnx_export.OPSET, **options},
            **dynamic_axes,
        )
    return module


@pytest.mark.parametrize(
    ("model", "options"),
    [*((model, {}) for model in MODELS), (RESNET, {"do_constant_folding": False})],
)
def test_a_graph_pytorchs_exporter_wrote_imports_and_computes_the_same(model, options, tmp_path):
    path = tmp_path / "exported.onnx"
    module = exported(model, path, **options)
    network = from_onnx(path)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        expected = module(x)
        got = threefold.to_torch(network)(x)
    if any(m.note.startswith("cross-entropy") for m in network.mapping):  # a dropped log_softmax
        got = torch.log_softmax(got, 1)
    assert relative(got.numpy(), expected.numpy()) < FLOAT32


def test_a_resnet_whose_batchnorms_the_exporter_folded_is_one_line_naming_its_shortcut(tmp_path):
    # Folded, a BatchNorm gives its 1x1 shortcut convolution a bias, which no block of
    # threefold's holds; unfolded, the same network imports (above).
    path = tmp_path / "folded.onnx"
    exported(RESNET, path)
    with pytest.raises(
        UsageError,
        match=r"layer2\.0/Add: its shortcut \(Conv\(.*\): conv32k1s2p0b1\) .*\(conv32k1s2p0b0",
    ):
        from_onnx(path)


def test_constant_nodes_are_read_as_initialisers(tmp_path):
    nodes, (weight, bias) = fc_nodes()
    constant = helper.make_node("Constant", [], ["w"], "weights", value=weight)
    copy = helper.make_node("Identity", ["b"], ["b2"], "bias copy")
    nodes[-1].input[2] = "b2"
    network = from_onnx(graph_file(tmp_path, [constant, copy, *nodes], [bias]))
    assert network.arch.name == "flatten-fc10"
    assert dict(network.mapping[-1].tensors) == {"w": "fc.weight", "b2": "fc.bias"}


# --- the fourth witness -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_onnxruntime_agrees_with_every_implementation_layer_by_layer(dtype):
    from shared.backend import make_backend
    from shared.proof.onnx_witness import onnx_rows

    for spec in (*EVERY_KIND, "noconv"):
        network = with_statistics(threefold.network(spec, seed=4))
        arch, tensors = (
            network.arch,
            {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in network.tensors.items()},
        )
        backends = {impl: make_backend(impl, arch, dtype) for impl in IMPLEMENTATIONS}
        x = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(dtype)
        rows, why = onnx_rows(backends, arch, tensors, x)
        if dtype == "float64" and spec != "noconv":  # onnxruntime has no float64 Conv kernel
            assert (rows, why) == ([], "onnxruntime has no float64 CPU kernel for Conv")
            continue
        assert why is None
        tolerance = TOLERANCES[(dtype, "pass")]
        for row in rows:
            assert compare(row.a, row.b)[1] <= tolerance, (spec, row.check, row.pair)
            assert row.b.dtype == dtype
        # every layer, for every implementation against both optimisation levels, and the
        # logits of the graph onnxruntime may fuse
        for pair in (f"{i}-{w}" for i in IMPLEMENTATIONS for w in WITNESSES):
            assert len({r.check for r in rows if r.pair == pair}) >= len(arch.layers)
        assert len([r for r in rows if "logits-only" in r.check]) == 3


def test_the_crosscheck_adds_the_fourth_witness_and_notes_what_it_cannot_run():
    notes: list[str] = []
    archs = [get_arch("noconv"), get_arch("conv2-relu-flatten-fc10")]
    results = run_crosscheck(archs, ["float64"], None, steps=1, onnx=True, notes=notes)
    rows = [r for r in results if r.pair.split("-", 1)[1] in WITNESSES]
    assert rows and all(r.passed for r in rows) and {r.arch for r in rows} == {"noconv"}
    assert notes == [
        "conv2-relu-flatten-fc10 | float64 | onnxruntime not run: onnxruntime has no float64 "
        "CPU kernel for Conv"
    ]


def test_the_crosscheck_s_json_rows_carry_the_notes_on_their_network(tmp_path, capsys):
    """crosscheck.py --json: what onnxruntime could not run is in the rows of that network and
    dtype, for a program reading them, as well as in the printed report."""
    from shared.crosscheck import main

    rows_file, net = tmp_path / "rows.json", "conv2-relu-flatten-fc10"
    flags = ["--onnx", "--quiet", "--dtype", "float64", "--steps", "1", "--batch-size", "4"]
    assert main(["--arch", net, *flags, "--json", str(rows_file)]) == 0
    rows = json.loads(rows_file.read_text())
    why = "onnxruntime not run: onnxruntime has no float64 CPU kernel for Conv"
    assert {r["arch"] for r in rows} == {net, "-"}  # "-": the shared code's own checks
    assert all(r["notes"] == ([why] if r["arch"] == net else []) for r in rows)
    assert f"{net} | float64 | {why}" in capsys.readouterr().out


def transposed_flatten(layer, x, out, constant):
    """A planted export bug: flatten in H, W, C order (a channels-last exporter's mistake)."""
    if isinstance(layer, onnx_export.Flatten):
        return [
            helper.make_node("Transpose", [x], [f"{out}.hwc"], perm=[0, 2, 3, 1]),
            helper.make_node("Flatten", [f"{out}.hwc"], [out], layer.name, axis=1),
        ]
    return ORIGINAL(layer, x, out, constant)


def dropped_pool_padding(layer, x, out, constant):
    """A planted export bug: a pool's padding left out of the graph."""
    if isinstance(layer, onnx_export.Pool) and layer.padding:
        layer = onnx_export.Pool(layer.name, layer.op, layer.size, layer.stride, 0)
    return ORIGINAL(layer, x, out, constant)


ORIGINAL = onnx_export.layer_nodes


@pytest.mark.parametrize(
    ("planted", "spec", "caught_at"),
    [
        (transposed_flatten, "conv4-relu-maxpool2-flatten-fc16-relu-fc10", "flatten"),
        (
            dropped_pool_padding,
            "conv4-relu-maxpool3s2p1-conv6-relu-adaptiveavgpool1-flatten-fc10",
            "pool1",
        ),
    ],
)
def test_a_planted_export_bug_is_caught_and_named(planted, spec, caught_at, monkeypatch):
    from shared.backend import make_backend
    from shared.proof.onnx_witness import onnx_rows
    from shared.proof.rows import judge

    monkeypatch.setattr(onnx_export, "layer_nodes", planted)
    network = threefold.network(spec)
    backends = {impl: make_backend(impl, network.arch) for impl in IMPLEMENTATIONS}
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    rows, why = onnx_rows(backends, network.arch, network.tensors, x)
    assert why is None
    results = [judge(row, "float32", spec, "planted", FLOAT32) for row in rows]
    report = threefold.Report(network, tuple(results), "seeded random images")
    assert {r.pair.split("-", 1)[1] for r in report.failed} == set(WITNESSES)
    assert {r.pair.split("-", 1)[0] for r in report.failed} == set(IMPLEMENTATIONS)
    assert report.first_divergence == caught_at
    before = [layer.name for layer in network.arch.layers]
    before = before[: before.index(caught_at)]
    assert all(threefold.api.layer_of(r.check, network.arch) not in before for r in report.failed)


# --- safetensors ------------------------------------------------------------------------------


def test_safetensors_are_read_by_the_format_s_own_library_and_back(tmp_path):
    from safetensors.numpy import load_file

    network = with_statistics(threefold.network("strong", seed=5))
    path = network.to_safetensors(tmp_path / "w.safetensors")
    theirs = load_file(path)
    assert list(theirs) == list(network.tensors)
    for name, value in network.tensors.items():
        assert theirs[name].shape == np.shape(value)
        np.testing.assert_array_equal(theirs[name], value)
    module = threefold.to_torch(network)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in theirs.items()}, strict=True)
    again = threefold.load(path)
    assert again.arch == network.arch and again.standardise == network.standardise
    params, _ = load_weights(path, network.arch, {})
    for name, value in network.tensors.items():
        np.testing.assert_array_equal(params[name], value)


def safetensors_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


LAB = get_arch("lab")
GOOD = {"dtype": "F32", "shape": [8, 1, 3, 3], "data_offsets": [0, 288]}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (safetensors_bytes({}, length=2**40), "header claims 1099511627776 bytes"),
        (b"\x05\x00", "not a .safetensors file"),
        (struct.pack("<Q", 5) + b"{nope", "header is not JSON"),
        (safetensors_bytes({"conv.weight": {**GOOD, "dtype": "F16"}}), "dtype 'F16'"),
        (safetensors_bytes({"conv.weight": {**GOOD, "shape": [8, 1, 3]}}), "has shape (8, 1, 3)"),
        (safetensors_bytes({"conv.weight": {**GOOD, "data_offsets": [0, 2**40]}}), "data_offsets"),
        (safetensors_bytes({"conv.weight": GOOD}, b"\0" * 288), "tensors missing"),
        (safetensors_bytes({"evil": GOOD}), "evil is not a tensor of the network"),
        # Both were read: a bias from the weight's bytes, the last of two entries.
        (
            safetensors_bytes(
                {"conv.weight": GOOD, "conv.bias": {**GOOD, "shape": [8], "data_offsets": [0, 32]}},
                b"\0" * 288,
            ),
            "conv.bias and conv.weight share bytes of the file",
        ),
        (
            struct.pack("<Q", 54) + b'{"conv.weight": {}, "conv.weight": {}, "fc1.bias": {}}',
            "'conv.weight' given twice",
        ),
        (
            safetensors_bytes({"__metadata__": {"pixels": 0.5}}),
            "its __metadata__ is not an object of strings",
        ),
        # Bytes no tensor holds, which the safetensors library refuses: after the last...
        (
            safetensors_bytes({"conv.weight": GOOD}, b"\0" * 300),
            "its last 12 bytes are no tensor's",
        ),
        # ... or between two.
        (
            safetensors_bytes(
                {
                    "conv.weight": GOOD,
                    "conv.bias": {**GOOD, "shape": [8], "data_offsets": [300, 332]},
                },
                b"\0" * 332,
            ),
            "the 12 bytes at 451 are no tensor's",
        ),
    ],
    ids=[
        "huge-header",
        "short",
        "not-json",
        "f16",
        "shape",
        "offsets",
        "missing",
        "foreign",
        "overlap",
        "twice",
        "metadata",
        "trailing",
        "gap",
    ],
)
def test_a_hostile_safetensors_file_is_one_line(content, message, tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(message)) as caught:
        read_safetensors(path, LAB)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "tensor", "value", "message"),
    [
        ("lab", "conv.weight", np.nan, "conv.weight has NaN or inf values"),
        ("conv4-bn-relu-flatten-fc10", "bn.running_var", -1.0, "bn.running_var has negative"),
    ],
)
def test_safetensors_values_are_checked_for_what_they_mean(spec, tensor, value, message, tmp_path):
    network = threefold.network(spec)
    tensors = {**network.tensors, tensor: np.full_like(network.tensors[tensor], value)}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, tensors)
    with pytest.raises(UsageError, match=message):
        read_safetensors(path, network.arch)


def test_a_safetensors_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "w.safetensors"
    os.mkfifo(path)
    with pytest.raises(UsageError, match="not a regular file"):
        read_safetensors(path, LAB)


# --- hostile ONNX files -----------------------------------------------------------------------


def graph_file(tmp_path, nodes, initialisers=(), name="m.onnx", opset=onnx_export.OPSET):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])
    y = helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, ["n", 10])
    graph = helper.make_graph(nodes, "g", [x], [y], list(initialisers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def fc_nodes(start: str = "x") -> tuple[list, list]:
    weight = numpy_helper.from_array(np.zeros((10, 784), np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    nodes = [
        helper.make_node("Flatten", [start], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], "fc", transB=1),
    ]
    return nodes, [weight, bias]


def test_a_graph_of_supported_nodes_with_a_final_log_softmax_imports(tmp_path):
    nodes, inits = fc_nodes()
    nodes.append(helper.make_node("LogSoftmax", ["logits"], ["logp"], "out", axis=1))
    network = from_onnx(graph_file(tmp_path, nodes, inits))
    assert network.arch.name == "flatten-fc10"
    assert network.mapping[-1].token == "" and "same loss" in network.mapping[-1].note


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            helper.make_node("Softmax", ["logits"], ["p"], "probs", axis=1),
            "probs \\(Softmax\\): Softmax: .*applied twice",
        ),
        (helper.make_node("Erf", ["logits"], ["e"], "odd"), "odd \\(Erf\\): not an operator"),
        (
            helper.make_node("Add", ["logits", "logits"], ["twice"], "sum"),
            "sum \\(Add\\): input logits is computed, not a constant",
        ),
    ],
)
def test_an_unsupported_node_is_one_line_naming_it(extra, message, tmp_path):
    nodes, inits = fc_nodes()
    with pytest.raises(UsageError, match=message) as caught:
        from_onnx(graph_file(tmp_path, [*nodes, extra], inits))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (  # a cycle inside a residual block, which the reader once followed forever
            [
                helper.make_node("Relu", ["x"], ["a"]),
                helper.make_node("Relu", ["q"], ["p"]),
                helper.make_node("Relu", ["p"], ["q"]),
                helper.make_node("Add", ["a", "q"], ["s"]),
                *fc_nodes("s")[0],
            ],
            "topologically sorted",
        ),
        ([helper.make_node("Add", ["x"], ["s"]), *fc_nodes("s")[0]], "input size 1"),
        ([helper.make_node("Relu", ["x"], []), *fc_nodes("x")[0]], "output size 0"),
    ],
)
def test_a_graph_that_breaks_onnx_s_rules_is_refused_by_the_checker(nodes, message, tmp_path):
    path = graph_file(tmp_path, nodes, fc_nodes()[1])
    with pytest.raises(UsageError, match=f"m.onnx: not a valid ONNX model \\(.*{message}"):
        from_onnx(path)


def _overlong(name: str, value: np.ndarray) -> TensorProto:
    """A constant whose raw data holds one element more than its shape: onnx.checker refuses
    too little data, not too much."""
    tensor = numpy_helper.from_array(value, name)
    tensor.raw_data += value.reshape(-1)[:1].tobytes()
    return tensor


@pytest.mark.parametrize(
    ("node", "constant", "message"),
    [
        ("Sub", _overlong("mean", np.array([0.5], np.float32)), "sub \\(Sub\\): mean: its data"),
        ("Reshape", _overlong("shape", np.array([-1, 784])), "to \\(Reshape\\): shape: its data"),
        ("Gemm", _overlong("w", np.zeros((10, 784), np.float32)), "w: its data does not match"),
    ],
)
def test_a_constant_whose_data_overruns_its_shape_is_one_line_naming_it(
    node, constant, message, tmp_path
):
    """It raised numpy's ValueError ("cannot reshape array of size 2 into shape (1,)")."""
    nodes, inits = fc_nodes()
    if node == "Sub":
        nodes = [
            helper.make_node("Sub", ["x", "mean"], ["centred"], "sub"),
            *fc_nodes("centred")[0],
        ]
    elif node == "Reshape":
        nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"], "to"), nodes[1]]
    inits = [constant, *(i for i in inits if i.name != constant.name)]
    with pytest.raises(UsageError, match=f"{message}.*cannot reshape array"):
        from_onnx(graph_file(tmp_path, nodes, inits))


def _conv_bn(dtype=np.float32, **options) -> tuple[list, list]:
    """Conv(1 -> 2) then BatchNormalization (its tensors in `dtype`, its `options`) and fc."""
    conv = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "cw")
    stats = [numpy_helper.from_array(np.ones(2, dtype), n) for n in ("g", "h", "m", "v")]
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], "conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "h", "m", "v"], ["n"], "bn", **options),
        helper.make_node("Flatten", ["n"], ["flat"], "flatten", axis=1),
    ]
    fc, weights = random_fc("flat", 2 * 784)
    return [*nodes, *fc], [conv, *stats, *weights]


def test_a_file_outside_onnx_s_rules_or_threefold_s_reading_is_one_line(tmp_path):
    """Each was read (duplicate names, which onnxruntime refuses; an opset no ONNX defines;
    opset 6, whose BatchNorm and Dropout train by default; a per-activation BatchNorm) or
    read wrongly (a scaling constant of 5 dimensions, which broadcasts the images to 5; float64
    BatchNorm tensors in a float32 graph, blamed on the output at export)."""
    nodes, inits = fc_nodes()
    named_twice = [helper.make_node(n.op_type, n.input, n.output, "n", **node_attributes(n))
                   for n in nodes]  # fmt: skip
    mean = numpy_helper.from_array(np.full((1, 1, 1, 1, 1), 0.5, np.float32), "mean")
    centred = [helper.make_node("Sub", ["x", "mean"], ["centred"], "sub"), *fc_nodes("centred")[0]]
    cases = [
        (graph_file(tmp_path, named_twice, inits, "twice.onnx"), "two nodes are named 'n'"),
        (graph_file(tmp_path, nodes, inits, "new.onnx", opset=99), "opset 99, newer than any"),
        (graph_file(tmp_path, nodes, inits, "old.onnx", opset=6), "opset 6; threefold reads"),
        (
            graph_file(tmp_path, *_conv_bn(spatial=0), "spatial.onnx", opset=8),
            "bn \\(BatchNormalization\\): spatial=0: threefold's BatchNorm has one for each",
        ),
        (
            graph_file(tmp_path, centred, [mean, *inits], "rank5.onnx"),
            "sub \\(Sub\\): mean has shape \\(1, 1, 1, 1, 1\\); one number is needed",
        ),
        (
            graph_file(tmp_path, *_conv_bn(np.float64), "mixed.onnx"),
            "mixed.onnx: tensor .* is float32 where others are float64",
        ),
    ]
    for path, message in cases:
        with pytest.raises(UsageError, match=message):
            from_onnx(path)
    assert from_onnx(graph_file(tmp_path, *_conv_bn(spatial=1), opset=8)).arch.name == (
        "conv2b0-bn-flatten-fc10"
    )


def test_a_log_softmax_followed_by_identities_is_last(tmp_path):
    nodes, inits = fc_nodes()
    nodes += [
        helper.make_node("LogSoftmax", ["logits"], ["logp"], "out", axis=1),
        helper.make_node("Identity", ["logp"], ["y"], "copy"),
    ]
    assert from_onnx(graph_file(tmp_path, nodes, inits)).arch.name == "flatten-fc10"


def test_names_in_a_file_reach_the_terminal_as_one_line_without_control_characters(tmp_path):
    """A node named with a line break, a terminal's colour code and 5,000 characters."""
    nodes, inits = fc_nodes()
    nodes.append(helper.make_node("Erf", ["logits"], ["e"], "\x1b[31mred\nnext" + "n" * 5000))
    path = graph_file(tmp_path, nodes, inits)
    done = subprocess.run(
        [sys.executable, "scripts/crosscheck.py", "--arch", str(path)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("crosscheck.py: error: --arch ")
    assert "\x1b" not in done.stderr and "\\x1b[31mred\\nnext" in said
    assert "characters in all) ... " in said and len(said) < 1100
    assert said.endswith("not an operator threefold has")  # the end, where the reason is


def test_an_exporter_s_mark_is_read_only_as_written_and_a_constant_names_its_node(tmp_path):
    nodes, inits = fc_nodes("pooled")
    inits[0] = numpy_helper.from_array(np.zeros((10, 196), np.float32), "w")
    window = {"kernel_shape": [2, 2], "strides": [2, 2]}
    for note in ("adaptiveavgpool x", "adaptiveavgpool", "a note"):
        pool = helper.make_node("AveragePool", ["x"], ["pooled"], "pool", note, **window)
        network = from_onnx(graph_file(tmp_path, [pool, *nodes], inits))
        assert network.arch.name.startswith("avgpool2")
    # A mark that the window does not fit (2x2 windows make 14x14, not 7x7) is refused.
    pool = helper.make_node("AveragePool", ["x"], ["pooled"], "pool", "adaptiveavgpool 7", **window)
    with pytest.raises(UsageError, match="windows of 4; the graph's window does not fit its mark"):
        from_onnx(graph_file(tmp_path, [pool, *nodes], inits))
    ratio = numpy_helper.from_array(np.array(np.nan, np.float32), "r")
    drop = helper.make_node("Dropout", ["x", "r"], ["pooled"], "drop")
    with pytest.raises(UsageError, match="drop \\(Dropout\\): ratio: r is nan"):
        from_onnx(graph_file(tmp_path, [drop, *fc_nodes("pooled")[0]], [*fc_nodes()[1], ratio]))


@pytest.mark.parametrize(
    ("node", "features", "message"),
    [
        (
            dict(op_type="AveragePool", kernel_shape=[3, 3], pads=[1] * 4, count_include_pad=0),
            28 * 28,
            "count_include_pad=0",
        ),
        (
            dict(op_type="MaxPool", kernel_shape=[2, 3]),
            27 * 26,
            "kernel_shape=\\[2, 3\\]: .*square",
        ),
        (
            dict(op_type="MaxPool", kernel_shape=[3, 3], pads=[0, 0, 1, 1]),
            27 * 27,
            "pads=\\[0, 0, 1, 1\\]",
        ),
    ],
)
def test_an_unsupported_option_is_one_line_naming_node_and_option(
    node, features, message, tmp_path
):
    # Each graph is a valid ONNX model (the fc takes the pool's output): what threefold
    # cannot compute is named, not what onnx.checker would.
    options = dict(node)
    op = options.pop("op_type")
    pool = helper.make_node(op, ["x"], ["pooled"], "pool", **options)
    weight = numpy_helper.from_array(np.zeros((10, features), np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    nodes = [
        pool,
        helper.make_node("Flatten", ["pooled"], ["flat"], "flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], "fc", transB=1),
    ]
    with pytest.raises(UsageError, match=f"pool \\({op}\\): {message}"):
        from_onnx(graph_file(tmp_path, nodes, [weight, bias]))


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_ceil_mode_where_the_windows_fit_exactly_is_read_as_flooring(op, tmp_path):
    """ceil_mode=1 was refused everywhere; 2x2 windows on 28x28, then on 14x14 padded by 1,
    count the same windows either way. 3x3 windows with stride 2 on 28x28 do not: ceiling
    makes 14x14 where flooring makes 13x13."""
    flatten = helper.make_node("Flatten", ["pooled"], ["flat"], "flatten", axis=1)
    counted = {"count_include_pad": 1} if op == "AveragePool" else {}
    pools = [
        helper.make_node(op, ["x"], ["p1"], "pool1", kernel_shape=[2, 2], strides=[2, 2],
                         ceil_mode=1),
        helper.make_node(op, ["p1"], ["pooled"], "pool2", kernel_shape=[2, 2], strides=[2, 2],
                         pads=[1] * 4, ceil_mode=1, **counted),
    ]  # fmt: skip
    fc, weights = random_fc("flat", 8 * 8)
    network = reads_as_onnxruntime_runs_it(graph_file(tmp_path, [*pools, flatten, *fc], weights))
    kind = {"MaxPool": "max", "AveragePool": "avg"}[op]
    assert network.arch.name == f"{kind}pool2-{kind}pool2p1-flatten-fc10"
    pool = helper.make_node(op, ["x"], ["pooled"], "pool", kernel_shape=[3, 3], strides=[2, 2],
                            ceil_mode=1)  # fmt: skip
    fc, weights = random_fc("flat", 14 * 14)
    refused = "ceil_mode=1: its 3x3 windows, stride 2, do not fit its 28x28 input exactly"
    with pytest.raises(UsageError, match=f"m.onnx: pool: {op}\\(.*\\): {refused}"):
        from_onnx(graph_file(tmp_path, [pool, flatten, *fc], weights))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("opset", [11, 17])
def test_a_gelu_an_older_opset_writes_out_is_read_as_one(approximate, opset, tmp_path):
    """Before opset 20 PyTorch's exporter writes GELU out (exact: Div, Erf, Add, Mul, Mul; by
    tanh, nine nodes): each was refused as a value feeding paths that no Add joins."""
    gelu = torch.nn.GELU(approximate=approximate)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), gelu, torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 10)
    )
    export_module(module.eval(), tmp_path / "m.onnx", opset_version=opset)
    assert "Gelu" not in {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    network = reads_as_onnxruntime_runs_it(tmp_path / "m.onnx")
    token = "gelu" if approximate == "none" else "gelutanh"
    assert network.spec == f"conv4k3s1p0b1-{token}-flatten-fc10"
    row = network.mapping[1]
    assert row.token == token and row.what == f"Gelu(approximate='{approximate}')"


def test_a_gelu_written_out_of_two_values_is_not_one(tmp_path):
    """relu(x) * (erf(relu(x) / sqrt(2)) + 1) * 0.5 is a GELU of relu(x); with the images in
    place of the first relu(x) it is none, and read as one it would compute another thing."""
    consts = [
        numpy_helper.from_array(np.array(value, np.float32), name)
        for name, value in (("root2", math.sqrt(2)), ("one", 1.0), ("half", 0.5))
    ]
    fc, weights = random_fc("flat", 784)
    for first in ("r", "x"):
        nodes = [
            helper.make_node("Relu", ["x"], ["r"], "relu"),
            helper.make_node("Div", ["r", "root2"], ["d"], "div"),
            helper.make_node("Erf", ["d"], ["e"], "erf"),
            helper.make_node("Add", ["e", "one"], ["a"], "add"),
            helper.make_node("Mul", [first, "a"], ["m"], "mul"),
            helper.make_node("Mul", ["m", "half"], ["g"], "half"),
            helper.make_node("Flatten", ["g"], ["flat"], "flatten", axis=1),
        ]
        path = graph_file(tmp_path, [*nodes, *fc], [*consts, *weights])
        if first == "r":
            assert reads_as_onnxruntime_runs_it(path).spec == "relu-gelu-flatten-fc10"
        else:
            with pytest.raises(UsageError, match="x feeds relu \\(Relu\\), mul \\(Mul\\)"):
                from_onnx(path)


def test_a_gelu_written_out_with_another_constant_is_not_one(tmp_path):
    """x * (erf(x / sqrt(2)) + 1) * 0.6 is no GELU: its Div is read as the input's scaling,
    and its Erf refused."""
    consts = [
        numpy_helper.from_array(np.array(value, np.float32), name)
        for name, value in (("root2", math.sqrt(2)), ("one", 1.0), ("scale", 0.6))
    ]
    nodes = [
        helper.make_node("Div", ["x", "root2"], ["d"], "div"),
        helper.make_node("Erf", ["d"], ["e"], "erf"),
        helper.make_node("Add", ["e", "one"], ["a"], "add"),
        helper.make_node("Mul", ["x", "a"], ["m"], "mul"),
        helper.make_node("Mul", ["m", "scale"], ["g"], "scale"),
        helper.make_node("Flatten", ["g"], ["flat"], "flatten", axis=1),
    ]
    fc, weights = random_fc("flat", 784)
    with pytest.raises(UsageError, match="erf \\(Erf\\): not an operator threefold has"):
        from_onnx(graph_file(tmp_path, [*nodes, *fc], [*consts, *weights]))


def test_an_initialiser_whose_shape_is_not_its_layer_s_is_named(tmp_path):
    # A valid ONNX model (a Gemm's bias broadcasts): the layer's shape is threefold's check.
    nodes, inits = fc_nodes()
    inits[1] = numpy_helper.from_array(np.zeros(5, np.float32), "b")
    with pytest.raises(UsageError, match=r"m\.onnx: b: shape \(5,\), the layer's \(10,\)"):
        from_onnx(graph_file(tmp_path, nodes, inits))


def test_external_data_elsewhere_than_beside_the_model_is_refused(tmp_path):
    nodes, inits = fc_nodes()
    inits[0].data_location = TensorProto.EXTERNAL
    inits[0].ClearField("raw_data")
    inits[0].external_data.add(key="location", value="/etc/passwd")
    with pytest.raises(UsageError, match="'/etc/passwd' is not a file beside the model"):
        from_onnx(graph_file(tmp_path, nodes, inits))


def test_not_an_onnx_file_is_one_line(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\xff\xfe not protobuf at all" * 10)
    with pytest.raises(UsageError, match="not an ONNX model"):
        from_onnx(path)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def million_nodes(path) -> None:
    """A 14 MB graph of a million Relu nodes, written at the wire level (building it with
    onnx.helper would take gigabytes in this process)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])
    y = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["n", 10])
    node = helper.make_node("Relu", ["v"], ["v"]).SerializeToString()
    graph = (b"\x0a" + varint(len(node)) + node) * 1_000_000  # GraphProto.node is field 1
    graph += helper.make_graph([], "g", [x], [y]).SerializeToString()
    model = helper.make_model(helper.make_graph([], "g", [x], [y]))
    model.ClearField("graph")
    path.write_bytes(model.SerializeToString() + b"\x3a" + varint(len(graph)) + graph)


def graph_field_repeated(path, number: int, message: bytes, times: int, nodes=()) -> None:
    """A model whose graph holds `times` copies of one serialised message as its field
    `number`, written at the wire level, before a graph with `nodes`."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])
    y = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["n", 10])
    key = varint(number << 3 | 2)  # a length-delimited field
    graph = (key + varint(len(message)) + message) * times
    graph += helper.make_graph(list(nodes), "g", [x], [y]).SerializeToString()
    model = helper.make_model(helper.make_graph([], "g", [x], [y]))
    model.ClearField("graph")
    path.write_bytes(model.SerializeToString() + b"\x3a" + varint(len(graph)) + graph)


def many_value_infos(path) -> None:
    """200,000 value_info entries (GraphProto field 13): 8 MB, each a few messages deep."""
    entry = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["n", 1, 28, 28])
    graph_field_repeated(path, 13, entry.SerializeToString(), 200_000)


def a_subgraph_of_many_nodes(path) -> None:
    """A node whose attribute holds a graph of a million nodes, which the top level's node
    count does not see."""
    relu = helper.make_node("Relu", ["v"], ["v"]).SerializeToString()
    subgraph = (b"\x0a" + varint(len(relu)) + relu) * 1_000_000
    attribute = b"\x0a\x0bthen_branch" + b"\x32" + varint(len(subgraph)) + subgraph
    node = helper.make_node("Relu", ["x"], ["v"]).SerializeToString()
    node += b"\x2a" + varint(len(attribute)) + attribute  # NodeProto.attribute is field 5
    graph_field_repeated(path, 1, node, 1)


def many_small_fields(path) -> None:
    """One initialiser of 1.5 million dims, each its own 2-byte field (unpacked): 3 MB, few
    messages, a walk of many fields."""
    dims = b"\x08\x01" * 1_500_000  # TensorProto.dims is field 1, a varint
    graph_field_repeated(path, 5, dims, 1)  # GraphProto.initializer is field 5


def huge_initialiser(path) -> None:
    """An fc whose weight claims 2**32 floats and holds 40 bytes."""
    nodes, _ = fc_nodes()
    weight = TensorProto(
        name="w", data_type=TensorProto.FLOAT, dims=[2**16] * 2, raw_data=b"0" * 40
    )
    bias = TensorProto(name="b", data_type=TensorProto.FLOAT, dims=[10], raw_data=b"0" * 40)
    graph_file(path.parent, nodes, [weight, bias], path.name)


REFUSE = """
import sys, time
from shared.errors import UsageError
started = time.perf_counter()
from shared.onnx_forms import node_attributes
from shared.onnx_import import from_onnx
try:
    from_onnx(sys.argv[1])
except UsageError as e:
    print(f"{time.perf_counter() - started:.2f} {e}")
"""


@pytest.mark.parametrize(
    ("write", "message"),
    [
        # onnx.checker finds the data short of the claim before any array is made.
        (huge_initialiser, "w\\) raw_data size \\(40 bytes\\) is too small"),
        (million_nodes, f"more than {MAX_NODES} nodes"),
        (many_value_infos, f"more than {MAX_MESSAGES} protobuf messages"),
        (many_small_fields, f"more than {MAX_FIELDS} protobuf fields"),
        (a_subgraph_of_many_nodes, f"more than {MAX_NODES} nodes"),
    ],
)
def test_a_graph_claiming_a_huge_size_is_refused_within_bounds(write, message, tmp_path):
    path = tmp_path / "m.onnx"
    write(path)
    done, peak_mib = run_measured(["-c", REFUSE, str(path)], tmp_path / "peak", timeout=300)
    assert done.returncode == 0, done.stderr
    seconds, text = done.stdout.strip().split(" ", 1)
    assert re.search(message, text), text
    assert float(seconds) < 5  # imports included
    assert peak_mib < 1024


# --- the commands -----------------------------------------------------------------------------


def test_export_writes_a_checked_graph_and_weights_and_checks_them(
    tmp_path, tiny_data_dir, monkeypatch, capsys
):
    from shared.config import TrainConfig
    from shared.data import load_dataset
    from shared.loop import train

    run = tmp_path / "run"
    run.mkdir()
    config = TrainConfig(impl="numpy", arch="pool", epochs=1, batch_size=16)
    train(config, load_dataset(tiny_data_dir), run, log=lambda _: None)
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "scripts/export.py", str(run / "checkpoint.npz")]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--onnx", str(out / "pool.onnx"), "--data-dir", str(tiny_data_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert time.perf_counter() - started < 120
    assert sorted(p.name for p in out.iterdir()) == ["pool.onnx", "pool.safetensors"]
    assert (
        "30 test images, raw pixels" in done.stdout and "0 predicted classes differ" in done.stdout
    )
    onnx.checker.check_model(onnx.load(out / "pool.onnx"), full_check=True)
    network = threefold.load(out / "pool.onnx")
    assert network.standardise is not None  # the checkpoint's standardisation is in the graph
    # Bad input: one line, non-zero exit, nothing written; no output over the checkpoint or
    # over the other output.
    checkpoint = (run / "checkpoint.npz").read_bytes()
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / "checkpoint.npz").write_bytes(checkpoint)
    store = tmp_path / "grid" / "runs.json"
    store.parent.mkdir()
    store.write_text('{"runs": {}}')
    (tmp_path / "grid" / "link.safetensors").symlink_to(store)
    results = store.with_name("results.json")
    results.write_text('{"comparisons": {}}')
    labels = tmp_path / "other-data" / "labels.gz"  # a folder the command does not read
    labels.parent.mkdir()
    labels.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 1, 3])))
    # The user's own weights under the name the graph's gives: replaced without a word.
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "m.safetensors").write_bytes(b"the user's tensors")
    for args, message in [
        (["--onnx", str(theirs / "m.onnx")], "m.safetensors: there already, and not a threefold"),
        (["--safetensors", str(store)], "runs.json: holds the finished runs of a grid or a"),
        (["--safetensors", str(store.with_name("link.safetensors"))], "holds the finished runs"),
        (["--safetensors", str(results)], "a result of the grid or speedrun whose finished"),
        (["--safetensors", str(labels)], "a dataset's IDX file; choose another name"),
        (["--safetensors", str(other_run / "checkpoint.npz")], "one of the files of the run in"),
        (["--safetensors", str(other_run / "metrics.json")], "one of the files of the run in"),
        (["--onnx", str(other_run / "evaluation.json")], "one of the files of the run in"),
        ([], "give --onnx FILE.onnx, --safetensors FILE or both"),
        (["--onnx", str(out / "missing" / "m.onnx")], "folder .* does not exist"),
        (["--onnx", "."], "--onnx .: is a folder; give a file name"),  # once a ValueError
        (["--safetensors", str(run / "checkpoint.npz")], "the same file as the checkpoint"),
        # The weights' name follows the graph's; --safetensors was never typed.
        (["--onnx", str(out / "w.safetensors")], "the weights beside --onnx, .*: the same file"),
        (["--onnx", str(out / "a.onnx"), "--safetensors", str(out / "a.onnx")], "same file"),
        (["--onnx", str(out / "b.onnx"), "--data-dir", str(tmp_path / "typo")], "typo"),
    ]:
        bad = subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT)
        last = bad.stderr.strip().splitlines()[-1]
        assert bad.returncode == 2 and last.startswith("export.py: error: ")
        assert re.search(message, last) and "Traceback" not in bad.stderr
    assert (run / "checkpoint.npz").read_bytes() == checkpoint
    assert [p.name for p in other_run.iterdir()] == ["checkpoint.npz"]
    assert results.read_text() == '{"comparisons": {}}'
    assert gzip.decompress(labels.read_bytes()) == bytes([0, 0, 8, 1, 0, 0, 0, 1, 3])
    assert (other_run / "checkpoint.npz").read_bytes() == checkpoint
    assert store.read_text() == '{"runs": {}}'
    assert [p.name for p in theirs.iterdir()] == ["m.safetensors"]
    assert (theirs / "m.safetensors").read_bytes() == b"the user's tensors"
    missing = subprocess.run(
        [
            sys.executable,
            "scripts/export.py",
            str(tmp_path / "no.npz"),
            "--onnx",
            str(out / "x.onnx"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert sorted(p.name for p in out.iterdir()) == ["pool.onnx", "pool.safetensors"]
    # The weights' write refused: the older graph and weights stay as they were.
    older = {p.name: p.read_bytes() for p in out.iterdir()}

    def refused(self, path):
        raise OutputError(f"{path}: cannot write it (planted); nothing written")

    for method in ("to_safetensors", "to_onnx"):
        with monkeypatch.context() as patch:
            patch.setattr(Network, method, refused)
            status = export_main([str(run / "checkpoint.npz"), "--onnx", str(out / "pool.onnx")])
        # The graph is written under a hidden name first; the error names the user's.
        named = out / ("pool.safetensors" if method == "to_safetensors" else "pool.onnx")
        assert status == 1 and f"{named}: cannot write it (planted)" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == older


@pytest.mark.parametrize(
    ("alter", "message"),
    [
        (lambda t: {k: v for k, v in t.items() if k != "fc.bias"}, "tensor fc.bias is missing"),
        (lambda t: {**t, "fc.weight": t["fc.weight"] * np.nan}, "fc.weight has NaN or inf"),
        (lambda t: {**t, "fc.bias": np.zeros(3, np.float32)}, "fc.bias has shape \\(3,\\)"),
        (lambda t: {**t, "fc.bias": np.zeros(10, np.float16)}, "dtype float16"),
        (lambda t: {**t, "bn.running_var": -t["bn.running_var"]}, "running_var has negative"),
        (lambda t: {**t, "extra": t["fc.bias"]}, "extra is not a tensor of the network"),
        (lambda t: {**t, "fc.bias": [0.0] * 10}, "fc.bias is a list, not a plain NumPy array"),
        (  # a masked array hides its NaN from np.isfinite
            lambda t: {**t, "fc.bias": np.ma.masked_invalid(t["fc.bias"] * np.nan)},
            "tensor fc.bias is a MaskedArray, not a plain NumPy array",
        ),
        (lambda t: None, "tensors is a NoneType, not a dict"),
        # NumPy's default dtype: the module PyTorch made from it failed on float32 images.
        (
            lambda t: {**t, "fc.bias": np.zeros(10)},
            "fc.bias is float64 where others are float32; a network computes in one dtype",
        ),
        # The odd one is named, wherever it comes: before, the first tensor was the norm.
        (
            lambda t: {**t, "conv.weight": t["conv.weight"].astype(np.float64)},
            "conv.weight is float64 where others are float32",
        ),
        # Big-endian: torch.from_numpy raised its own ValueError in to_torch.
        (
            lambda t: {k: v.astype(v.dtype.newbyteorder(">")) for k, v in t.items()},
            "tensor conv.weight is >f4, not in this machine's byte order",
        ),
    ],
)
def test_a_network_altered_by_hand_is_refused_before_a_file_is_written(alter, message, tmp_path):
    original = threefold.network("conv4-bn-relu-flatten-fc10")
    network = dataclasses.replace(original, tensors=alter(dict(original.tensors)))
    for write in (network.to_onnx, network.to_safetensors):
        with pytest.raises(UsageError, match=message):
            write(tmp_path / "m")
    with pytest.raises(UsageError, match=f"to_torch: .*{message}"):
        threefold.to_torch(network)
    scalings = ((0.5, 0.0), 0.5, (0.5,), ("a", "b"), (1e39, 1.0), (0.0, 1e-50), (0.0, 1e-40))
    for standardise in scalings:  # the last three fit float64, not this network's float32
        scaled = dataclasses.replace(original, standardise=standardise)
        for write in (scaled.to_onnx, scaled.to_safetensors, threefold.to_torch):
            with pytest.raises(UsageError, match="a finite mean and a positive std"):
                write(scaled if write is threefold.to_torch else tmp_path / "m")
    on_disk = tmp_path.parent / f"{tmp_path.name}-mapped.npy"  # a memmap is an array
    np.save(on_disk, original.tensors["fc.weight"])
    tensors = {**original.tensors, "fc.weight": np.load(on_disk, mmap_mode="r")}
    dataclasses.replace(original, tensors=tensors).check("memmap")
    unmapped = dataclasses.replace(original, mapping=None)  # describe() raised a TypeError
    with pytest.raises(UsageError, match="mapping is a NoneType, not a tuple of Mapped"):
        unmapped.to_onnx(tmp_path / "m")
    halves = dataclasses.replace(original, standardise=(Fraction(1, 2), Fraction(1, 4)))
    assert "(x - 0.5) / 0.25" in halves.describe()  # a Fraction had no format of its own
    assert list(tmp_path.iterdir()) == []


def test_a_graph_onnxruntime_computes_otherwise_replaces_nothing(
    tmp_path, tiny_data_dir, monkeypatch, capsys
):
    """It was written, then verified, and left in place: exit 1, the user's older graph and
    weights gone. And what was verified was the file at --onnx, which a second export racing
    to the same name could have replaced."""
    source = threefold.network("conv4-relu-flatten-fc10", seed=1).to_onnx(tmp_path / "src.onnx")
    out = tmp_path / "out"
    out.mkdir()
    command = [str(source), "--onnx", str(out / "m.onnx"), "--data-dir", str(tiny_data_dir)]
    assert export_main(command) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["m.onnx", "m.safetensors"]
    capsys.readouterr()
    monkeypatch.setattr("shared.export.onnx_logits", lambda *args: onnx_logits(*args) + 1.0)
    assert export_main(command) == 1
    said = capsys.readouterr()
    assert said.out == "" and len(said.err.strip().splitlines()) == 1
    assert re.fullmatch(
        r"export\.py: error: --onnx .*m\.onnx, on 30 test images: onnxruntime's logits are "
        r"\S+ from PyTorch's, over the tolerance 1e-04, and \d+ predicted classes differ; "
        r"nothing written",
        said.err.strip(),
    ), said.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_onnx_file_is_a_network_for_train_and_its_weights_a_start(tmp_path, tiny_data_dir):
    network = with_statistics(threefold.network("conv4-bn-relu-maxpool2-flatten-fc10", seed=2))
    network = dataclasses.replace(network, standardise=(0.5, 0.25))
    model = network.to_onnx(tmp_path / "m.onnx")
    weights = network.to_safetensors(tmp_path / "m.safetensors")
    for start in (model, weights, None):
        run = tmp_path / f"run-{start.suffix[1:] if start else 'none'}"
        done = subprocess.run(
            [
                sys.executable,
                "scripts/train.py",
                "--arch",
                str(model),
                *(["--weights", str(start)] if start else []),
                "--impl",
                "torch",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--data-dir",
                str(tiny_data_dir),
                "--out",
                str(run),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        # Without --weights the graph's trained weights are not the start, which is said.
        note = f"note: --arch {model} gives the layers; training starts from --init he, not"
        assert (note in done.stdout) == (start is None), done.stdout
        # Nor is its input scaling, which this run's pixels replace.
        scaling = f"--arch {model} scales its input as (x - 0.5) / 0.25; training feeds it "
        assert scaling + "--pixels standardised (the training set's mean" in done.stdout
        if start is None:
            continue
        # The run is the file's network, trained from the file's weights: one epoch moved each
        # weight less than the seeded start (seed 0, where the file's are seed 2's) is from them.
        trained = load_checkpoint(run / "checkpoint.npz")
        assert trained.meta["arch"] == network.arch.spec
        seeded = init_params(network.arch, TrainConfig().init, 0)
        for name in ("conv.weight", "fc.weight"):  # drawn: the others start as constants
            given = network.tensors[name]
            moved = np.abs(trained.params[name] - given).max()
            assert 0 < moved < np.abs(seeded[name] - given).max(), (start.name, name)


def test_one_initialiser_fed_to_two_layers_becomes_two_copies_and_train_says_so(
    tmp_path, tiny_data_dir
):
    """An exporter merges equal initialisers (two fresh BatchNorms' weights of ones): each
    layer gets its own copy, which training then moves apart, and train.py says so."""
    arch = get_arch("conv4-bn-relu-conv4-bn-relu-flatten-fc10")
    model = onnx_model(arch, init_params(arch, TrainConfig().init, 0))
    second = [n for n in model.graph.node if n.op_type == "BatchNormalization"][1]
    second.input[1] = "bn1.weight"
    del model.graph.initializer[[i.name for i in model.graph.initializer].index("bn2.weight")]
    path = tmp_path / "merged.onnx"
    onnx.save(model, path)
    network = from_onnx(path)
    assert network.copies == {"bn1.weight": ["bn1.weight", "bn2.weight"]}
    assert np.array_equal(network.tensors["bn1.weight"], network.tensors["bn2.weight"])
    flags = ["--impl", "numpy", "--epochs", "1", "--batch-size", "16", "--limit", "64"]
    done = subprocess.run(
        [sys.executable, "scripts/train.py", "--arch", str(path), *flags, "--weights", str(path),
         "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    note = f"note: --arch {path} feeds bn1.weight to 2 layers; each trains its own copy "
    assert note + "(bn1.weight, bn2.weight)" in done.stdout
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.npz").params
    assert not np.array_equal(trained["bn1.weight"], trained["bn2.weight"])


def test_the_crosscheck_proves_a_graph_pytorchs_exporter_wrote_from_its_weights(tmp_path):
    """crosscheck.py --arch FILE.onnx --onnx: the file's own weights in all three and in
    onnxruntime (Keras' MNIST convnet written in PyTorch, exported by torch.onnx.export)."""
    from shared.torch_files import load_module_file

    module, _ = load_module_file(str(ROOT / "tests" / "models" / "keras_simple_convnet.py:build"))
    path = tmp_path / "keras.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.zeros(1, 1, 28, 28), path, dynamo=False)
    flags = ["--onnx", "--quiet", "--dtype", "float32", "--steps", "1", "--batch-size", "4"]
    rows = str(tmp_path / "rows.json")
    done = subprocess.run(
        [sys.executable, "scripts/crosscheck.py", "--arch", str(path), *flags, "--json", rows],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    results = json.loads((tmp_path / "rows.json").read_text())
    assert any(r["pair"] == "torch-onnx-opt" and r["passed"] for r in results)
    assert all(r["passed"] for r in results)


# --- read as onnxruntime runs the file (found by a review of the API) -------------------------


def random_fc(start: str, features: int, seed: int = 0) -> tuple[list, list]:
    """A Gemm of `start` (N, features) to 10 logits, its weights drawn."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((10, features), np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b")
    return [helper.make_node("Gemm", [start, "w", "b"], ["logits"], "fc", transB=1)], [weight, bias]


def reads_as_onnxruntime_runs_it(path: Path) -> Network:
    """The file's network, checked to compute what onnxruntime computes from the file."""
    import onnxruntime

    network = from_onnx(path)
    x = np.random.default_rng(1).random((4, 1, 28, 28), np.float32)
    run = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = run.run(None, {"x": x})[0]
    got = onnx_logits(network.arch, network.tensors, x, network.standardise)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    return network


def test_a_padded_average_pool_counts_its_padding_only_where_the_file_says_so(tmp_path):
    """ONNX leaves the padding out of the mean unless count_include_pad=1; PyTorch, and
    threefold, count it. Read as counting it, the first was 7.24 off onnxruntime."""
    fc, weights = random_fc("flat", 14 * 14)
    window = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    flatten = helper.make_node("Flatten", ["pooled"], ["flat"], "flatten", axis=1)
    for counted in ({}, {"count_include_pad": 0}):
        pool = helper.make_node("AveragePool", ["x"], ["pooled"], "pool", **window, **counted)
        path = graph_file(tmp_path, [pool, flatten, *fc], weights)
        with pytest.raises(UsageError, match=r"pool \(AveragePool\): count_include_pad=0: "):
            from_onnx(path)
    pool = helper.make_node("AveragePool", ["x"], ["pooled"], "pool", **window, count_include_pad=1)
    network = reads_as_onnxruntime_runs_it(graph_file(tmp_path, [pool, flatten, *fc], weights))
    assert network.arch.name.startswith("avgpool3s2p1-")


@pytest.mark.parametrize(
    ("ops", "standardise"), [(["Sub"], (0.5, 1.0)), (["Div"], (0.0, 0.25)), (["Div"], None)]
)
def test_a_lone_sub_or_div_is_the_input_scaling(ops, standardise, tmp_path):
    """x - mean or x / std as PyTorch exports them: the PyTorch import read them, this one
    refused a lone Div as "not an operator threefold has". A std that is not positive is
    refused naming the Div."""
    value = 0.5 if ops == ["Sub"] else 0.25 if standardise else -0.25
    const = numpy_helper.from_array(np.array(value, np.float32), "c")
    scale = helper.make_node(ops[0], ["x", "c"], ["scaled"], "scale")
    flatten = helper.make_node("Flatten", ["scaled"], ["flat"], "flatten", axis=1)
    fc, weights = random_fc("flat", 784)
    path = graph_file(tmp_path, [scale, flatten, *fc], [const, *weights])
    if standardise is None:
        with pytest.raises(UsageError, match="scale \\(Div\\): not a standardisation by a pos"):
            from_onnx(path)
    else:
        assert reads_as_onnxruntime_runs_it(path).standardise == standardise


def test_a_scaling_the_next_node_does_not_take_is_refused(tmp_path):
    """A leading Sub and Div whose output nothing reads once set the network's
    standardisation while its Flatten read the raw images (71 off onnxruntime)."""
    consts = [
        numpy_helper.from_array(np.array(0.5, np.float32), "mean"),
        numpy_helper.from_array(np.array(0.25, np.float32), "std"),
    ]
    scaling = [
        helper.make_node("Sub", ["x", "mean"], ["centred"], "sub"),
        helper.make_node("Div", ["centred", "std"], ["scaled"], "div"),
    ]
    fc, weights = random_fc("flat", 784)
    for read in ("x", "scaled"):
        flatten = helper.make_node("Flatten", [read], ["flat"], "flatten", axis=1)
        path = graph_file(tmp_path, [*scaling, flatten, *fc], [*consts, *weights])
        if read == "x":
            with pytest.raises(UsageError, match="flatten \\(Flatten\\): does not take the prev"):
                from_onnx(path)
        else:
            assert reads_as_onnxruntime_runs_it(path).standardise == (0.5, 0.25)


def test_a_constant_stored_in_another_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    """A Constant node's tensor may name any file as its data, read from the working folder:
    its bytes once became a bias."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(b"SECRETDATA" * 4)
    bias = helper.make_tensor(
        "b", TensorProto.FLOAT, [10], np.zeros(10, np.float32).tobytes(), raw=True
    )
    bias.data_location = TensorProto.EXTERNAL
    bias.ClearField("raw_data")
    bias.external_data.add(key="location", value="secret.bin")
    constant = helper.make_node("Constant", [], ["b"], "bias", value=bias)
    fc, weights = random_fc("flat", 784)
    flatten = helper.make_node("Flatten", ["x"], ["flat"], "flatten", axis=1)
    path = graph_file(tmp_path, [constant, flatten, *fc], weights[:1])
    message = "node bias's value is stored in another file \\(external data\\)"
    with pytest.raises(UsageError, match=message):
        from_onnx(path)


def test_an_older_opset_s_dropout_ratio_attribute_is_read(tmp_path):
    fc, weights = random_fc("dropped", 784)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], "flatten", axis=1),
        helper.make_node("Dropout", ["flat"], ["dropped"], "drop", ratio=0.2),
        *fc,
    ]
    network = reads_as_onnxruntime_runs_it(graph_file(tmp_path, nodes, weights, opset=11))
    assert network.arch.name == "flatten-dropout0.2-fc10"


def test_a_reshape_to_other_than_an_image_s_features_is_refused(tmp_path):
    """Reshape [-1, 392] of 784 pixels makes two rows an image (onnxruntime gives 2N rows);
    threefold's flatten gives one, so it is refused, however the graph goes on."""
    target = numpy_helper.from_array(np.array([-1, 392], np.int64), "target")
    fc, weights = random_fc("flat", 392)
    reshape = helper.make_node("Reshape", ["x", "target"], ["flat"], "reshape")
    path = graph_file(tmp_path, [reshape, *fc], [target, *weights])
    with pytest.raises(
        UsageError, match="reshape: Reshape\\(\\): reshapes 784 features an image to 392"
    ):
        from_onnx(path)
    target = numpy_helper.from_array(np.array([-1, 784], np.int64), "target")
    fc, weights = random_fc("flat", 784)
    network = reads_as_onnxruntime_runs_it(graph_file(tmp_path, [reshape, *fc], [target, *weights]))
    assert network.arch.name == "flatten-fc10"


def test_a_refusal_of_a_graph_staged_under_a_hidden_name_names_the_user_s_file(tmp_path):
    """export.py writes the graph under a hidden name first: a weight past float32's range
    was reported as "/.../.m.onnx.4121.x1y2.tmp: fc.weight: ..."."""
    network = threefold.network("flatten-fc10")
    tensors = {k: v.astype(np.float64) for k, v in network.tensors.items()}
    tensors["fc.weight"][0, 0] = 1e300
    network = dataclasses.replace(network, tensors=tensors)
    named = re.escape(str(tmp_path / "m.onnx"))
    refused = pytest.raises(UsageError, match=f"^{named}: fc.weight: a value of 1e\\+300")
    with refused, staged(tmp_path / "m.onnx") as graph:
        network.to_onnx(graph)
    assert list(tmp_path.iterdir()) == []


def test_writing_where_no_file_can_be_is_one_output_error(tmp_path):
    """A folder that is a file, a name too long: each was an OSError from deep inside."""
    network = threefold.network("flatten-fc10")
    (tmp_path / "file").write_text("not a folder")
    for path in (tmp_path / "file" / "m.out", tmp_path / ("a" * 300)):
        for write in (network.to_safetensors, network.to_onnx):
            with pytest.raises(OutputError, match=r"cannot write it \(.*\); nothing written"):
                write(path)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_numpy_scalars_as_the_input_scaling_write_a_file_that_loads(tmp_path):
    """Written by repr, np.float32(0.5) gave metadata no reader parses, threefold's included."""
    network = threefold.network("flatten-fc10")
    scaled = Network(
        network.arch, network.tensors, network.mapping, (np.float32(0.5), np.float64(0.25))
    )
    assert threefold.load(scaled.to_safetensors(tmp_path / "m.safetensors")).standardise == (
        0.5,
        0.25,
    )


def test_a_float64_weight_past_float32_s_range_is_refused_before_the_graph_is_written(tmp_path):
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).double()
    with torch.no_grad():
        module[1].weight[0, 0] = 1e300
    network = threefold.from_torch(module)
    with pytest.raises(
        UsageError, match=r"m\.onnx: fc\.weight: a value of 1e\+300 does not fit float32"
    ):
        network.to_onnx(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# A module given for a file: its repr runs over lines, and the type is said instead.
NOT_PATHS = [None, 3, b"m.onnx", "", "m\0.onnx", torch.nn.Sequential(torch.nn.Flatten())]


@pytest.mark.parametrize("value", NOT_PATHS, ids=lambda value: type(value).__name__)
def test_what_is_not_a_path_is_one_line_naming_the_call(value):
    network = threefold.network("flatten-fc10")
    calls = {
        "load": threefold.load,
        "from_onnx": threefold.from_onnx,
        "to_onnx": network.to_onnx,
        "to_safetensors": network.to_safetensors,
    }
    for name, call in calls.items():
        with pytest.raises(UsageError, match=f"^{name}: .* is not a file's path$"):
            call(value)


def test_a_batch_norm_that_gives_its_statistics_is_refused_as_training(tmp_path):
    """Before opset 14 a BatchNormalization with its statistics among its outputs normalises
    with the batch's (PyTorch's exporter writes it so in training mode): read with the running
    statistics, it was 162 off onnxruntime."""
    rng = np.random.default_rng(0)
    stats = [
        numpy_helper.from_array(v.astype(np.float32), name)
        for name, v in zip(
            ("s", "o", "m", "v"),
            (rng.random(1), rng.random(1), rng.random(1), rng.random(1) + 0.5),
            strict=True,
        )
    ]
    fc, weights = random_fc("flat", 784)
    flatten = helper.make_node("Flatten", ["n"], ["flat"], "flatten", axis=1)
    for outputs, refused in ((["n", "o1", "o2", "o3", "o4"], True), (["n"], False)):
        norm = helper.make_node("BatchNormalization", ["x", "s", "o", "m", "v"], outputs, "bn")
        path = graph_file(tmp_path, [norm, flatten, *fc], [*stats, *weights], opset=9)
        if refused:
            with pytest.raises(
                UsageError,
                match=r"bn \(BatchNormalization\): outputs o1, o2, o3, o4: it normalises with",
            ):
                from_onnx(path)
        else:
            assert reads_as_onnxruntime_runs_it(path).arch.name == "bn-flatten-fc10"


def test_any_non_zero_trans_b_transposes_and_a_max_pool_is_never_a_marked_average(tmp_path):
    """onnxruntime transposes for transB=2 as for 1 (read untransposed, 96 off); a MaxPool
    carrying the exporter's adaptive mark was read as an average pool (9.5 off)."""
    rng = np.random.default_rng(2)
    square = numpy_helper.from_array(rng.standard_normal((10, 10), np.float32), "w2")
    bias = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2")
    fc, weights = random_fc("flat", 14 * 14)
    nodes = [
        helper.make_node(
            "MaxPool",
            ["x"],
            ["pooled"],
            "pool",
            "adaptiveavgpool 14",
            kernel_shape=[2, 2],
            strides=[2, 2],
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], "flatten", axis=1),
        *fc,
        helper.make_node("Gemm", ["logits", "w2", "b2"], ["out"], "fc2", transB=2),
    ]
    network = reads_as_onnxruntime_runs_it(graph_file(tmp_path, nodes, [*weights, square, bias]))
    assert network.arch.name == "maxpool2-flatten-fc10-fc10"


@pytest.mark.parametrize("bias_first", [False, True])
def test_a_matmul_and_its_bias_read_as_an_fc_whichever_side_of_the_add_the_bias_is(
    tmp_path, bias_first
):
    # PyTorch writes Add(bias, product) for a Linear on more than two axes; read as an fc, the
    # Linear on 4-d images is then refused for its input, not "the bias must be a constant".
    rng = np.random.default_rng(2)
    weight = numpy_helper.from_array(rng.standard_normal((784, 10), np.float32), "wt")
    bias = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "bias")

    def matmul_add(start: str, out: str = "logits") -> list:
        added = ["bias", "product"] if bias_first else ["product", "bias"]
        return [
            helper.make_node("MatMul", [start, "wt"], ["product"], "linear"),
            helper.make_node("Add", added, [out], "linear_bias"),
        ]

    flatten = helper.make_node("Flatten", ["x"], ["flat"], "flatten", axis=1)
    flat = graph_file(tmp_path, [flatten, *matmul_add("flat")], [weight, bias], "flat.onnx")
    assert reads_as_onnxruntime_runs_it(flat).arch.name == "flatten-fc10"
    images = numpy_helper.from_array(rng.standard_normal((28, 10), np.float32), "wt")
    gemm, gemm_weights = random_fc("rows", 280)
    nodes = [*matmul_add("x", "columns"), helper.make_node("Flatten", ["columns"], ["rows"]), *gemm]
    on_images = graph_file(tmp_path, nodes, [images, bias, *gemm_weights], "images.onnx")
    with pytest.raises(
        UsageError, match=r"linear \+ linear_bias: MatMul \+ Add: its input is 1x28x28"
    ):
        from_onnx(on_images)


def test_what_the_reader_cannot_take_is_named_in_the_file_s_own_terms(tmp_path):
    fc, weights = random_fc("flat", 784)
    flatten = helper.make_node("Flatten", ["x"], ["flat"], "flatten", axis=1)
    x, h = (
        helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
        for n, s in (("x", ["n", 1, 28, 28]), ("flat", ["n", 784]))
    )
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])
    two = helper.make_model(
        helper.make_graph([flatten, *fc], "g", [x], [h, y], weights),
        opset_imports=[helper.make_opsetid("", onnx_export.OPSET)],
    )
    (tmp_path / "two.onnx").write_bytes(two.SerializeToString())
    matmul = helper.make_node("MatMul", ["flat", "wt"], ["logits"])
    wt = numpy_helper.from_array(np.zeros((784, 10), np.float32), "wt")
    std = helper.make_node("Constant", [], ["std"], value_float=0.25)
    mean = numpy_helper.from_array(np.array(0.5, np.float32), "mean")
    scaling = [
        helper.make_node("Sub", ["x", "mean"], ["c"]),
        helper.make_node("Div", ["c", "std"], ["s"]),
    ]
    again = [
        helper.make_node("Sub", ["s", "mean"], ["c2"]),
        helper.make_node("Flatten", ["c2"], ["flat"], axis=1),
    ]
    same = [
        helper.make_node("Identity", ["x"], ["i"]),
        helper.make_node("Add", ["x", "i"], ["a"]),
        helper.make_node("Flatten", ["a"], ["flat"], axis=1),
    ]
    # A conv on both paths, a node reading x read by none: counted twice, the conv hid it,
    # and the block was read with two convs where the file has one.
    conv_weight = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "cw")
    wide_fc, wide_weights = random_fc("flat", 2 * 784)
    on_both = [
        helper.make_node("Conv", ["x", "cw"], ["c"], "conv", kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["x"], ["unread"], "unread"),
        helper.make_node("Relu", ["c"], ["r"], "relu"),
        helper.make_node("Add", ["r", "c"], ["a"], "add"),
        helper.make_node("Flatten", ["a"], ["flat"], axis=1),
    ]
    for path, message in [
        (tmp_path / "two.onnx", "two.onnx: 2 outputs; threefold's networks give one"),
        (
            graph_file(tmp_path, [*on_both, *wide_fc], [conv_weight, *wide_weights], "both.onnx"),
            r"conv \(Conv\): on both paths from x to add",
        ),
        (
            graph_file(tmp_path, [flatten, matmul], [wt], "mm.onnx"),
            r"node 1 \(MatMul\): no Add of a bias after it",
        ),
        (
            graph_file(tmp_path, [std, *scaling, flatten, *fc], [mean, *weights], "c.onnx"),
            r"node 0 \(Constant\): value_float; threefold reads a Constant's `value`",
        ),
        (
            graph_file(
                tmp_path,
                [*scaling, *again, *fc],
                [mean, numpy_helper.from_array(np.array(0.25, np.float32), "std"), *weights],
                "sd.onnx",
            ),
            r"node 2 \(Sub\): not an operator",
        ),
        (
            graph_file(tmp_path, [*same, *fc], weights, "same.onnx"),
            r"node 1 \(Add\): both paths change nothing",
        ),
    ]:
        with pytest.raises(UsageError, match=message):
            from_onnx(path)


# --- files as torch.onnx.export writes them by default (found by a review of the API) ---------


class _ViewNet(torch.nn.Module):
    """A flatten by the batch's size, as tutorials write it: x.view(x.size(0), -1)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("folded", [True, False])
@pytest.mark.parametrize("batch", ["dynamic", "static"])
def test_a_view_by_the_batch_s_size_imports_whether_the_batch_is_fixed_or_not(
    batch, folded, tmp_path
):
    """Exported with a dynamic batch, its target was computed from the batch's size (Shape,
    Gather, Unsqueeze, Concat): "feeds several nodes that no Add joins". With a static one
    it was the constant [2, -1]: "threefold flattens each image whole". Unfolded, as a
    ResNet is exported, the -1 is a Constant unsqueezed: "does not take the previous node's
    output"."""
    path = tmp_path / "view.onnx"
    dynamic = batch == "dynamic"
    module = export_module(_ViewNet().eval(), path, dynamic, do_constant_folding=folded)
    network = from_onnx(path)
    assert network.arch.name == "conv4p0-relu-flatten-fc10"
    x = torch.rand(5, 1, 28, 28)  # any batch: the static file's too reshapes each image alike
    with torch.no_grad():
        assert relative(threefold.to_torch(network)(x).numpy(), module(x).numpy()) < FLOAT32


def _by_sizes(m, x):
    h = torch.relu(m.conv(x))
    n, c, height, width = h.size()
    return m.fc(h.view(n, c * height * width))


def _by_a_product(m, x):
    h = torch.relu(m.conv(x))
    return m.fc(h.view(-1, h.size(1) * h.size(2) * h.size(3)))


def _images_to_their_shape(m, x):
    return m.fc(torch.relu(m.conv(x.view(-1, 1, 28, 28))).flatten(1))


@pytest.mark.parametrize("forward", [_by_sizes, _by_a_product, _images_to_their_shape])
@pytest.mark.parametrize("batch", ["dynamic", "static"])
def test_views_the_pytorch_import_reads_are_read_from_onnx_too(forward, batch, tmp_path):
    """Read from the module, each was refused from ONNX: the views by sizes with a dynamic
    batch ("does not take the previous node's output"), the images' view with either
    ("threefold reshapes (N, C, H, W) to (N, -1)"). With a static batch the first two were
    read already: the controls."""
    module = _ViewNet().eval()
    module.forward = types.MethodType(forward, module)
    path = tmp_path / "view.onnx"
    export_module(module, path, dynamic=batch == "dynamic")
    network = from_onnx(path)
    assert network.arch.name == "conv4p0-relu-flatten-fc10"
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert relative(threefold.to_torch(network)(x).numpy(), module(x).numpy()) < FLOAT32


def test_initialisers_in_a_file_beside_the_model_are_read_from_there_alone(tmp_path):
    """torch.onnx.export's default writes the weights into m.onnx.data (external data): such
    files were refused. The data file must be a plain name beside the model, hold each tensor
    whole, and be a regular file."""
    fc, weights = random_fc("flat", 784)
    flatten = helper.make_node("Flatten", ["x"], ["flat"], "flatten", axis=1)
    model = onnx.load(graph_file(tmp_path, [flatten, *fc], weights, "inline.onnx"))
    onnx.save_model(
        model,
        tmp_path / "m.onnx",
        save_as_external_data=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    assert (tmp_path / "m.onnx.data").stat().st_size == 4 * (10 * 784 + 10)
    network = reads_as_onnxruntime_runs_it(tmp_path / "m.onnx")
    assert np.array_equal(network.tensors["fc.weight"], numpy_helper.to_array(weights[0]))
    (tmp_path / "elsewhere").mkdir()
    os.replace(tmp_path / "m.onnx.data", tmp_path / "elsewhere" / "w.data")
    (tmp_path / "link.data").symlink_to(tmp_path / "elsewhere" / "w.data")  # any file
    cases = {
        "../elsewhere/w.data": r"'\.\./elsewhere/w\.data' is not a file beside the model",
        "missing.data": r"initialiser w's external data missing\.data: cannot read it",
        "link.data": r"external data link\.data: a symlink, which is not followed$",
        "m.onnx.data\0": r"'m\.onnx\.data\\x00' is not a file beside the model",
    }
    for location, message in cases.items():
        stored = onnx.load(tmp_path / "m.onnx", load_external_data=False)
        for tensor in stored.graph.initializer:
            tensor.external_data[0].value = location
        (tmp_path / "moved.onnx").write_bytes(stored.SerializeToString())
        with pytest.raises(UsageError, match=message):
            from_onnx(tmp_path / "moved.onnx")
    # A tensor of negative size (read(-1) read the whole file first), an offset past the bound.
    stored = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    stored.graph.initializer[0].dims[:] = [-1]
    (tmp_path / "negative.onnx").write_bytes(stored.SerializeToString())
    with pytest.raises(UsageError, match=r"external data: dims \[-1\], not a tensor's shape"):
        from_onnx(tmp_path / "negative.onnx")
    # A data file cut short of its tensors.
    os.replace(tmp_path / "elsewhere" / "w.data", tmp_path / "m.onnx.data")
    with open(tmp_path / "m.onnx.data", "r+b") as data:
        data.truncate(100)
    with pytest.raises(UsageError, match=r"m\.onnx\.data ends before the tensor's 31,360 bytes"):
        from_onnx(tmp_path / "m.onnx")


def test_no_command_writes_over_the_file_that_holds_a_model_s_weights(tmp_path, capsys):
    """crosscheck.py's --json and --plot and export.py's --safetensors refuse an ONNX model's
    external data file, as they refuse the model: crosscheck.py wrote its rows there, and the
    model then read them as its weights."""
    from shared.crosscheck import main as crosscheck_main

    fc, weights = random_fc("flat", 784)
    flatten = helper.make_node("Flatten", ["x"], ["flat"], "flatten", axis=1)
    model = onnx.load(graph_file(tmp_path, [flatten, *fc], weights, "inline.onnx"))
    path, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    onnx.save_model(model, path, save_as_external_data=True, location=data.name, size_threshold=0)
    kept = data.read_bytes()
    runs = {
        "--json": (crosscheck_main, ["--arch", str(path), "--onnx", "--json", str(data)]),
        "--plot": (crosscheck_main, ["--arch", str(path), "--plot", str(data)]),
        "--safetensors": (export_main, [str(path), "--safetensors", str(data)]),
    }
    for flag, (main, argv) in runs.items():
        assert main(argv) == 2  # a usage error
        error = capsys.readouterr().err.strip()
        assert f"{flag} {data}: the same file as " in error, error
        assert data.read_bytes() == kept
    assert np.array_equal(from_onnx(path).tensors["fc.weight"], numpy_helper.to_array(weights[0]))


@pytest.mark.parametrize("opset", [13, 18])  # axes an attribute, then an input
def test_a_mean_over_each_plane_is_a_global_average_pool(opset, tmp_path):
    """AdaptiveAvgPool2d(1) as the dynamo exporter writes it: "ReduceMean: not an operator"."""
    conv_w = numpy_helper.from_array(
        np.random.default_rng(2).standard_normal((8, 1, 3, 3), np.float32), "cw"
    )
    fc, weights = random_fc("flat", 8)
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    conv = helper.make_node("Conv", ["x", "cw"], ["c"], "conv", kernel_shape=[3, 3])
    mean = (
        helper.make_node("ReduceMean", ["c", "axes"], ["m"], "mean", keepdims=1)
        if opset >= 18
        else helper.make_node("ReduceMean", ["c"], ["m"], "mean", axes=[-2, -1], keepdims=1)
    )
    flatten = helper.make_node("Flatten", ["m"], ["flat"], "flatten", axis=1)
    initialisers = [conv_w, *weights, *([axes] if opset >= 18 else [])]
    path = graph_file(tmp_path, [conv, mean, flatten, *fc], initialisers, opset=opset)
    assert reads_as_onnxruntime_runs_it(path).arch.name == "conv8p0b0-adaptiveavgpool1-flatten-fc10"
    if opset == 13:  # the mean over the channels is no pooling
        over_channels = helper.make_node("ReduceMean", ["c"], ["m"], "mean", axes=[1], keepdims=1)
        fc, weights = random_fc("flat", 26 * 26)
        path = graph_file(
            tmp_path, [conv, over_channels, flatten, *fc], [conv_w, *weights], "c.onnx", opset=13
        )
        with pytest.raises(
            UsageError, match=r"mean \(ReduceMean\): axes=\[1\]: threefold averages"
        ):
            from_onnx(path)


def test_a_target_from_the_size_of_a_constant_is_not_read_as_the_batch(tmp_path):
    """Shape of an initialiser (2 rows) in the target's place of the batch's size imported as
    a flatten, which onnxruntime computed at batch 2 alone."""
    fc, weights = random_fc("flat", 784)
    rows = numpy_helper.from_array(np.zeros((2, 3), np.float32), "rows")
    first = numpy_helper.from_array(np.array(0, np.int64), "first")
    rest = numpy_helper.from_array(np.array([-1], np.int64), "rest")
    nodes = [
        helper.make_node("Shape", ["rows"], ["shape"], "shape"),
        helper.make_node("Gather", ["shape", "first"], ["n"], "n", axis=0),
        helper.make_node("Unsqueeze", ["n", "zero"], ["n1"], "n1"),
        helper.make_node("Concat", ["n1", "rest"], ["target"], "target", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], "view"),
        *fc,
    ]
    zero = numpy_helper.from_array(np.array([0], np.int64), "zero")
    path = graph_file(tmp_path, nodes, [rows, first, rest, zero, *weights])
    with pytest.raises(UsageError, match=r"shape \(Shape\): does not take the previous node's"):
        from_onnx(path)


def test_a_reshape_to_zero_with_allowzero_is_not_read_as_keeping_the_batch(tmp_path):
    """With allowzero=1 a 0 in the target is a size of 0, not a copy of the input's."""
    fc, weights = random_fc("flat", 784)
    target = numpy_helper.from_array(np.array([0, 784], np.int64), "target")
    reshape = helper.make_node("Reshape", ["x", "target"], ["flat"], "view", allowzero=1)
    path = graph_file(tmp_path, [reshape, *fc], [target, *weights])
    with pytest.raises(UsageError, match=r"view \(Reshape\): shape=\[0, 784\] with allowzero=1"):
        from_onnx(path)


def test_a_value_feeding_paths_that_no_add_joins_names_the_nodes_it_feeds(tmp_path):
    """relu(x) * tanh(x) was read as a broken residual block, naming none of the nodes (so
    was GELU written out before opset 20, which is now read as GELU)."""
    fc, weights = random_fc("flat", 784)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], "relu"),
        helper.make_node("Tanh", ["x"], ["t"], "tanh"),
        helper.make_node("Mul", ["r", "t"], ["m"], "product"),
        helper.make_node("Flatten", ["m"], ["flat"], "flatten", axis=1),
        *fc,
    ]
    with pytest.raises(UsageError, match=r": x feeds relu \(Relu\), tanh \(Tanh\), which no Add"):
        from_onnx(graph_file(tmp_path, nodes, weights))
