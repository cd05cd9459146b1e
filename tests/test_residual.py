"""Residual blocks: written in the grammar and in files, named as torchvision's BasicBlock,
their shortcut inferred, refused in one line where they cannot work, and computed the same
by every implementation, PyTorch's own modules and onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from impl_torch.model import as_module
from shared.backend import IMPLEMENTATIONS, make_backend
from shared.batches import dropout_masks
from shared.errors import UsageError
from shared.layers import BatchNorm, Conv, Residual
from shared.spec import MAX_LAYERS, get_arch, init_params, param_shapes, tensors

# An identity shortcut, a strided projection with BatchNorm, one without; dropout inside.
SPEC = (
    "conv4-bn-relu-res(conv4b0-bn-relu-conv4b0-bn)-relu-res(conv6s2b0-bn-relu-conv6b0-bn)-relu"
    "-res(conv6-relu-dropout0.2-conv8)-relu-adaptiveavgpool1-flatten-fc10"
)


def test_a_block_is_named_and_shaped_as_torchvision_s_basic_block():
    arch = get_arch(SPEC)
    identity, strided, plain = (layer for layer in arch.layers if isinstance(layer, Residual))
    assert [layer.name for layer in strided.body] == [
        "block2.conv1",
        "block2.bn1",
        "block2.relu",
        "block2.conv2",
        "block2.bn2",
    ]
    assert identity.shortcut == ()
    conv, bn = strided.shortcut
    assert conv == Conv("block2.downsample.0", 4, 6, 1, 2, 0, bias=False)
    assert bn == BatchNorm("block2.downsample.1", 6, spatial=True)
    assert [type(layer) for layer in plain.shortcut] == [Conv]  # no BatchNorm in its body
    names = list(tensors(arch))
    assert names.index("block2.bn2.num_batches_tracked") < names.index("block2.downsample.0.weight")
    assert "block2.downsample.0.bias" not in names
    assert get_arch(arch.spec).layers == arch.layers
    assert arch.spec == SPEC  # canonical as written: b0 and the inferred shortcut not spelled


def test_a_block_s_nodes_run_body_then_shortcut_then_the_add():
    arch = get_arch("conv4-res(conv6s2-relu-conv6)-flatten-fc10")
    rows = [(n.layer.name, n.input, n.out) for n in arch.nodes]
    assert rows == [
        ("conv", None, (4, 28, 28)),
        ("block.conv1", "conv", (6, 14, 14)),
        ("block.relu", "block.conv1", (6, 14, 14)),
        ("block.conv2", "block.relu", (6, 14, 14)),
        ("block.downsample.0", "conv", (6, 14, 14)),
        ("block", "conv", (6, 14, 14)),
        ("flatten", "block", (1176,)),
        ("fc", "flatten", (10,)),
    ]
    assert arch.dropouts == () and get_arch(SPEC).dropouts[0].name == "block3.dropout"


def test_a_file_writes_a_block_as_a_table_or_a_token(tmp_path):
    path = tmp_path / "net.json"
    table = {"type": "res", "layers": ["conv4b0-bn-relu", {"type": "conv", "channels": 4}]}
    path.write_text(json.dumps({"layers": ["conv4", table, "relu-flatten-fc10"]}))
    assert get_arch(str(path)).spec == "conv4-res(conv4b0-bn-relu-conv4)-relu-flatten-fc10"
    path.write_text(json.dumps({"layers": ["conv4-res(conv4-relu)", "flatten-fc10"]}))
    assert get_arch(str(path)).spec == "conv4-res(conv4-relu)-flatten-fc10"


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("conv4-res(conv4-relu-flatten-fc10", ["'(' is never closed"]),
        ("conv4-res(conv4))-flatten-fc10", ["')' at character 17 closes nothing"]),
        ("conv4-res()-flatten-fc10", ["spec is empty"]),
        ("conv4-res-flatten-fc10", ["token 'res'", "malformed", "res(L)"]),
        # "a ')' at character 6 closes nothing", of the text between the two blocks
        ("conv4-res(conv4)res(conv4)-flatten-fc10", ["'res(conv4)res(conv4)' is malformed"]),
        ("conv4-res(res(conv4))-flatten-fc10", ["a block holds a chain"]),
        # 500 deep, 2,523 characters: a RecursionError's traceback
        ("conv4-" + "res(" * 500 + "relu" + ")" * 500 + "-flatten-fc10", ["a block holds a chain"]),
        ("conv4-res(conv4-flatten)-fc10", ["end flat"]),
        ("conv4-res(conv8k3p0)-flatten-fc10", ["4x28x28 to 8x26x26", "1x1"]),
        ("conv4-res(fc10)-flatten-fc10", ["token 'fc10' in token 'res(fc10)'", "flatten"]),
        ("flatten-res(relu)-fc10", ["token 'res(relu)'", "already flat"]),
        ("conv4-res(" + "relu-" * MAX_LAYERS + "relu)-flatten-fc10", ["more than 64"]),
    ],
)
def test_a_block_that_cannot_work_is_refused_in_one_line(spec, parts):
    with pytest.raises(UsageError) as refused:
        get_arch(spec)
    message = str(refused.value)
    assert "\n" not in message and all(part in message for part in parts), message


def test_a_table_block_takes_only_its_layers(tmp_path):
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"layers": [{"type": "res", "stride": 2, "layers": ["relu"]}]}))
    with pytest.raises(UsageError, match="has no option 'stride'"):
        get_arch(str(path))
    path.write_text(json.dumps({"layers": ["conv4", {"type": "res"}, "flatten-fc10"]}))
    with pytest.raises(UsageError, match=r"layers\[1\] \(res\) layers as a list"):
        get_arch(str(path))


def test_as_module_loads_strictly_and_computes_what_the_implementations_do():
    arch = get_arch(SPEC)
    rng = np.random.default_rng(0)
    params = init_params(arch, "torch", 0, np.float64)
    params = {
        k: rng.uniform(0.5, 2.0, v.shape) if k.endswith("running_var") else v
        for k, v in params.items()
    }
    module = as_module(arch).double()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
    assert list(module.state_dict()) == list(tensors(arch))
    x = rng.standard_normal((3, 1, 28, 28))
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(x)).numpy()
    for impl in IMPLEMENTATIONS:
        logits = make_backend(impl, arch, np.float64).activations(params, x)["fc"]
        np.testing.assert_allclose(logits, expected, rtol=1e-10, atol=1e-12)


def test_the_shortcut_s_gradient_reaches_the_layers_before_the_block():
    """With the body's last BatchNorm scaled to 0, the block passes its input unchanged in
    training: what reaches the conv before it comes through the shortcut alone, so every
    implementation's gradient there equals that of the network without the block."""
    arch = get_arch("conv4-res(conv4-bn)-relu-flatten-fc10")
    plain = get_arch("conv4-relu-flatten-fc10")
    params = init_params(arch, "torch", 0, np.float64)
    params["block.bn.weight"][:] = 0.0
    params["block.bn.bias"][:] = 0.0
    shared = {k: params[k] for k in tensors(plain)}
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    masks = dropout_masks(arch.dropouts, 4, 0, 0, 0)
    for impl in IMPLEMENTATIONS:
        _, grads = make_backend(impl, arch, np.float64).loss_and_grads(params, x, y, masks)
        _, without = make_backend(impl, plain, np.float64).loss_and_grads(shared, x, y, masks)
        assert set(grads) == set(param_shapes(arch))
        for name in without:
            np.testing.assert_allclose(grads[name], without[name], rtol=1e-10, atol=1e-14)
        assert np.abs(grads["block.conv.weight"]).max() == 0.0  # behind a zero scale
        assert np.abs(grads["block.bn.weight"]).max() > 0.0


def test_a_max_pool_inside_a_block_gives_the_same_loss_and_gradients_in_every_implementation():
    """A block whose body pools, matched by a strided 1x1 shortcut: the training pass's loss
    and gradients agree across the implementations (JAX's max-pool there reads its input
    channels-last, after XLA's convolution; tests/test_jax.py)."""
    arch = get_arch("conv4-res(conv8-relu-maxpool2)-relu-flatten-fc10")
    assert arch.layers[1].shortcut == (Conv("block.downsample.0", 4, 8, 1, 2, 0, bias=False),)
    params = init_params(arch, "torch", 0, np.float64)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    masks = dropout_masks(arch.dropouts, 4, 0, 0, 0)
    results = {
        impl: make_backend(impl, arch, np.float64).loss_and_grads(params, x, y, masks)
        for impl in IMPLEMENTATIONS
    }
    expected_loss, expected = results["torch"]
    for loss, grads in results.values():
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
        assert set(grads) == set(expected)
        for name, grad in grads.items():
            np.testing.assert_allclose(grad, expected[name], rtol=1e-9, atol=1e-13)


def test_the_onnx_graph_adds_the_two_paths():
    from shared.onnx_export import onnx_model
    from shared.proof.onnx_witness import onnx_logits

    arch = get_arch(SPEC)
    params = init_params(arch, "torch", 0, np.float32)
    adds = [n for n in onnx_model(arch, params).graph.node if n.op_type == "Add"]
    assert [(n.name, list(n.input)) for n in adds] == [
        ("block1", ["block1.bn2", "relu1"]),
        ("block2", ["block2.bn2", "block2.downsample.1"]),
        ("block3", ["block3.conv2", "block3.downsample.0"]),
    ]
    x = np.random.default_rng(2).standard_normal((4, 1, 28, 28)).astype(np.float32)
    expected = make_backend("numpy", arch, np.float32).activations(params, x)["fc"]
    np.testing.assert_allclose(onnx_logits(arch, params, x), expected, rtol=1e-4, atol=1e-5)
