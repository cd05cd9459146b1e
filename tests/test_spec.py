"""Any sequential CNN from one spec: the presets, the compact grammar, JSON and TOML files, the
one-line error for every spec that cannot work, and a spec network's run end to end (train,
resume, evaluate, crosscheck) without ever needing its spec again."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from shared.checkpoint import load_checkpoint
from shared.config import TrainConfig
from shared.data import load_dataset
from shared.errors import Interrupted, UsageError
from shared.layers import Activation, BatchNorm, Conv, Dropout, Flatten, Linear, Pool
from shared.loop import evaluate_epoch, train
from shared.spec import (
    GRAMMAR,
    MAX_LAYERS,
    MAX_SPEC_CHARS,
    MAX_SPEC_FILE_BYTES,
    MAX_TOML_DOTS,
    PRESETS,
    get_arch,
    init_params,
    param_shapes,
    presets,
    state_shapes,
)
from tests.conftest import make_dataset_dir, usage_error
from tests.test_training import run_script

# --- the presets --------------------------------------------------------------------------


def test_the_presets_keep_the_lab_s_names_and_shapes():
    assert list(presets()) == list(PRESETS) == ["lab", "pool", "noconv", "strong", "deep"]
    lab = get_arch("lab")
    assert lab.layers == (
        Conv("conv", 1, 8, 3, 1, 1),
        Activation("relu1", "relu"),
        Flatten("flatten"),
        Linear("fc1", 6272, 128),
        Activation("relu2", "relu"),
        Linear("fc2", 128, 10),
    )
    assert param_shapes(lab) == {
        "conv.weight": (8, 1, 3, 3),
        "conv.bias": (8,),
        "fc1.weight": (128, 6272),
        "fc1.bias": (128,),
        "fc2.weight": (10, 128),
        "fc2.bias": (10,),
    }
    pool = get_arch("pool")
    assert [layer.name for layer in pool.layers] == [
        "conv", "relu1", "pool", "flatten", "fc1", "relu2", "fc2",
    ]  # fmt: skip
    assert pool.layers[2] == Pool("pool", "max", 2, 2)
    assert param_shapes(pool)["fc1.weight"] == (128, 1568)
    noconv = get_arch("noconv")
    assert list(param_shapes(noconv)) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert param_shapes(noconv)["fc1.weight"] == (128, 784)
    strong = get_arch("strong")
    assert param_shapes(strong)["fc1.weight"] == (128, 64 * 7 * 7)
    assert [d.p for d in strong.dropouts] == [0.3] and strong.uses_batch_statistics
    deep = param_shapes(get_arch("deep"))
    assert [name for name in deep if name.startswith("conv")] == [
        f"conv{i}.weight" for i in range(1, 6)
    ]  # BatchNorm follows each, so no bias
    assert deep["conv4.weight"] == (64, 32, 3, 3) and deep["fc1.weight"] == (128, 64 * 7 * 7)
    convs = 9 * (1 * 32 + 32 * 32 + 32 * 32 + 32 * 64 + 64 * 64)  # 3x3 kernels, no bias
    norms = 2 * (32 * 3 + 64 * 2)  # each BatchNorm's weight and bias
    fcs = 64 * 7 * 7 * 128 + 128 + 128 * 10 + 10
    assert sum(math.prod(shape) for shape in deep.values()) == convs + norms + fcs == 477_290
    for name, arch in presets().items():
        assert arch.name == arch.label == name and arch.description == PRESETS[name][1]
        assert arch.spec == PRESETS[name][0]
        # The trainable tensors, plus BatchNorm's running statistics where it has any.
        assert (state_shapes(arch) == param_shapes(arch)) != arch.uses_batch_statistics


def test_a_preset_written_out_is_that_preset():
    spec = get_arch("pool").spec
    arch = get_arch(spec)
    assert arch.layers == get_arch("pool").layers
    assert arch.name == arch.label == "pool"
    # Stripped as a spec is: " lab" was "token 'lab' is not a layer".
    assert get_arch(" lab\n").name == "lab"


# --- the grammar: what builds -------------------------------------------------------------

# Typed -> canonical: defaults left out, numbers as written once.
CANONICAL = [
    (
        "conv16k5s2p2-bn-relu-maxpool2s2-conv8-avgpool3s1-flatten-bn-dropout0.25-fc32-tanh-fc10-"
        "sigmoid",
        "conv16k5s2-bn-relu-maxpool2-conv8-avgpool3s1-flatten-bn-dropout0.25-fc32-tanh-fc10-"
        "sigmoid",
    ),
    ("conv4k5p0-tanh-avgpool2-flatten-fc10", "conv4k5p0-tanh-avgpool2-flatten-fc10"),
    ("conv4k3s2-relu-flatten-fc10", "conv4s2-relu-flatten-fc10"),
    ("conv8k3s1p1-flatten-fc010", "conv8-flatten-fc10"),
    ("dropout0-flatten-dropout.5-fc10", "dropout0-flatten-dropout0.5-fc10"),
    ("conv8k2-flatten-fc10", "conv8k2-flatten-fc10"),
    ("maxpool4s3-flatten-fc10", "maxpool4s3-flatten-fc10"),
    ("bn-flatten-bn-fc10", "bn-flatten-bn-fc10"),
    ("conv2-conv2-conv2-flatten-fc10", "conv2-conv2-conv2-flatten-fc10"),
    ("conv1k28p0-flatten-fc10-relu", "conv1k28p0-flatten-fc10-relu"),
    ("flatten-fc10-dropout0.999999-fc10", "flatten-fc10-dropout0.999999-fc10"),
]


@pytest.mark.parametrize("typed, canonical", CANONICAL)
def test_a_spec_has_one_canonical_form_that_rebuilds_it(typed, canonical):
    arch = get_arch(typed)
    assert arch.spec == arch.name == arch.description == canonical
    again = get_arch(canonical)
    assert again.layers == arch.layers and again.spec == canonical
    assert arch.label == again.label and re.fullmatch(r"custom-[0-9a-f]{8}", arch.label)


def test_specs_of_other_networks_have_other_labels():
    labels = {get_arch(canonical).label for _, canonical in CANONICAL}
    assert len(labels) == len(CANONICAL)


def test_every_kind_of_layer_is_sized_from_the_one_before():
    arch = get_arch(CANONICAL[0][0])
    assert arch.layers == (
        Conv("conv1", 1, 16, 5, 2, 2),  # 28 -> 14
        BatchNorm("bn1", 16, spatial=True),
        Activation("relu", "relu"),
        Pool("pool1", "max", 2, 2),  # 14 -> 7
        Conv("conv2", 16, 8, 3, 1, 1),
        Pool("pool2", "avg", 3, 1),  # 7 -> 5
        Flatten("flatten"),  # 8 * 5 * 5
        BatchNorm("bn2", 200, spatial=False),
        Dropout("dropout", 0.25, (200,)),
        Linear("fc1", 200, 32),
        Activation("tanh", "tanh"),
        Linear("fc2", 32, 10),
        Activation("sigmoid", "sigmoid"),
    )
    assert arch.dropouts == (arch.layers[8],)


@pytest.mark.parametrize(
    "spec, features",
    [
        ("maxpool3-flatten-fc10", 9 * 9),  # floor((28 - 3) / 3) + 1: the last row dropped
        ("conv4-avgpool5s2-flatten-fc10", 4 * 12 * 12),  # floor(23 / 2) + 1
        ("maxpool3s2p1-flatten-fc10", 14 * 14),  # padded by 1: floor(27 / 2) + 1
        ("conv4-adaptiveavgpool1-flatten-fc10", 4),  # global average pooling
        ("conv4-adaptiveavgpool7-flatten-fc10", 4 * 7 * 7),
        ("conv4k5p0-tanh-avgpool2-flatten-fc10", 4 * 12 * 12),  # 28 -> 24 -> 12
        ("conv4k3s2-relu-flatten-fc10", 4 * 14 * 14),
        ("conv8k2-flatten-fc10", 8 * 29 * 29),  # an even kernel, padded by 1: one more
        ("maxpool4s3-flatten-fc10", 9 * 9),  # (28 - 4) / 3 + 1
        ("conv1k28p0-flatten-fc10-relu", 1),
        ("conv2-conv2-conv2-flatten-fc10", 2 * 28 * 28),
    ],
)
def test_the_first_fc_takes_the_flattened_features(spec, features):
    first = next(layer for layer in get_arch(spec).layers if isinstance(layer, Linear))
    assert first.in_features == features


def test_repeated_kinds_are_numbered_and_dropout_keeps_its_input_shape():
    arch = get_arch("conv2-conv2-conv2-flatten-fc10")
    assert [layer.name for layer in arch.layers] == ["conv1", "conv2", "conv3", "flatten", "fc"]
    assert [layer.in_channels for layer in arch.layers[:3]] == [1, 2, 2]
    arch = get_arch("dropout0-flatten-dropout.5-fc10")
    assert arch.dropouts == (
        Dropout("dropout1", 0.0, (1, 28, 28)),
        Dropout("dropout2", 0.5, (784,)),
    )


def test_batch_norm_has_pytorch_s_tensors_and_initial_values():
    arch = get_arch("bn-flatten-bn-fc10")
    assert arch.layers[0] == BatchNorm("bn1", 1, spatial=True)
    assert arch.layers[2] == BatchNorm("bn2", 784, spatial=False)
    assert list(state_shapes(arch)) == [
        *(f"bn1.{k}" for k in ("weight", "bias", "running_mean", "running_var")),
        "bn1.num_batches_tracked",
        *(f"bn2.{k}" for k in ("weight", "bias", "running_mean", "running_var")),
        "bn2.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ]
    trainable = ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "fc.weight", "fc.bias"]
    assert list(param_shapes(arch)) == trainable
    for scheme in ("he", "lab", "torch"):
        tensors = init_params(arch, scheme, 0, np.float64)
        assert tensors["bn2.num_batches_tracked"].dtype == np.int64
        assert (
            tensors["bn1.num_batches_tracked"].shape
            == ()
            == tensors["bn2.num_batches_tracked"].shape
        )
        assert (tensors["bn2.weight"] == 1).all() and (tensors["bn2.running_var"] == 1).all()
        assert (tensors["bn2.bias"] == 0).all() and (tensors["bn2.running_mean"] == 0).all()
        assert tensors["bn2.weight"].dtype == np.float64


# --- JSON and TOML files -------------------------------------------------------------------

NETWORK = "conv16k5s2-bn-relu-maxpool2-flatten-dropout0.3-fc32-tanh-fc10"
NETWORK_JSON = {
    "layers": [
        {"type": "conv", "channels": 16, "kernel": 5, "stride": 2, "padding": 2},
        "bn",
        {"type": "relu"},
        {"type": "maxpool", "size": 2, "stride": 2},
        "flatten",
        {"type": "dropout", "p": 0.3},
        {"type": "fc", "features": 32},
        "tanh",
        "fc10",
    ]
}
NETWORK_TOML = """\
# the same network as a TOML file
layers = [
  { type = "conv", channels = 16, kernel = 5, stride = 2, padding = 2 },
  "bn",
  { type = "relu" },
  { type = "maxpool", size = 2, stride = 2 },
  "flatten",
  { type = "dropout", p = 0.3 },
  { type = "fc", features = 32 },
  "tanh",
  "fc10",
]
"""
NETWORK_TOML_TABLES = """\
[[layers]]
type = "conv"
channels = 16
kernel = 5
stride = 2

[[layers]]
type = "bn"

[[layers]]
type = "relu"

[[layers]]
type = "maxpool"
size = 2

[[layers]]
type = "flatten"

[[layers]]
type = "dropout"
p = 0.3

[[layers]]
type = "fc"
features = 32

[[layers]]
type = "tanh"

[[layers]]
type = "fc"
features = 10
"""


@pytest.mark.parametrize(
    "name, text",
    [
        ("net.json", json.dumps(NETWORK_JSON)),
        ("net.toml", NETWORK_TOML),
        ("tables.toml", NETWORK_TOML_TABLES),
        ("UPPER.JSON", json.dumps(NETWORK_JSON)),
    ],
)
def test_a_file_builds_the_network_of_the_compact_spec(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    arch = get_arch(str(path))
    assert arch.layers == get_arch(NETWORK).layers
    assert arch.name == arch.spec == NETWORK and arch.label == get_arch(NETWORK).label


def test_without_files_a_file_name_is_read_as_a_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.json").write_text(json.dumps(NETWORK_JSON))
    assert get_arch("net.json").spec == NETWORK
    with pytest.raises(UsageError, match=r"token 'net\.json' is not a layer"):
        get_arch("net.json", files=False)


# --- the grammar: what cannot work, in one line naming the token and the conflict ------------


def refused(text: str, *parts: str, where: str = "--arch: ") -> str:
    with pytest.raises(UsageError) as error:
        get_arch(text)
    message = str(error.value)
    assert "\n" not in message and message.startswith(where), message
    for part in parts:
        assert part in message, message
    return message


KNOWN = (
    "known: conv, maxpool, avgpool, adaptiveavgpool, bn, relu, leakyrelu, elu, gelu, gelutanh, "
    "tanh, sigmoid, dropout, dropout2d, flatten, fc"
)


@pytest.mark.parametrize(
    "spec, parts",
    [
        ("conv8-relu-vgg16-flatten-fc10", ["token 'vgg16' is not a layer", KNOWN]),
        ("Flatten-fc10", ["token 'Flatten' is not a layer"]),
        ("flatten--fc10", ["token '' is not a layer"]),
        ("flatten-fc10-", ["token '' is not a layer"]),
        ("conv-flatten-fc10", ["token 'conv' is malformed", "write convC[kK][sS][pP]"]),
        ("conv8k-flatten-fc10", ["token 'conv8k' is malformed"]),
        ("conv3k7p1s3-flatten-fc10", ["token 'conv3k7p1s3' is malformed"]),  # k, s, p in order
        ("conv8x-flatten-fc10", ["token 'conv8x' is malformed"]),
        ("maxpool-flatten-fc10", ["token 'maxpool' is malformed", "write maxpoolK[sS]"]),
        ("flatten-dropout-fc10", ["token 'dropout' is malformed", "write dropoutP"]),
        ("flatten-dropout-0.5-fc10", ["token 'dropout' is malformed"]),
        ("bn2-flatten-fc10", ["token 'bn2' is malformed; write bn"]),
        ("relu1-flatten-fc10", ["token 'relu1' is malformed; write relu"]),
        ("flatten-fc99999999-fc10", ["token 'fc99999999' is malformed; write fcN"]),
        ("maxpool2p2-flatten-fc10", ["token 'maxpool2p2': padding 2 is more than half its 2x2"]),
        ("conv4-adaptiveavgpool3-flatten-fc10", ["token 'adaptiveavgpool3': its 4x28x28 input"]),
        ("flatten-dropout2d0.5-fc10", ["token 'dropout2d0.5': its input is already flat"]),
        ("conv4b2-flatten-fc10", ["token 'conv4b2': bias 2 is not below 2"]),
        ("flatten-leakyrelu1.5-fc10", ["token 'leakyrelu1.5': slope 1.5 is not in [0, 1)"]),
        ("maxpool29-flatten-fc10", ["token 'maxpool29': its 29x29 window is larger than its"]),
        (
            "conv8k29p0-flatten-fc10",
            ["token 'conv8k29p0': its 29x29 kernel is larger than its 28x28 input"],
        ),
        (
            "maxpool2-conv8k17p1-flatten-fc10",
            ["token 'conv8k17p1': its 17x17 kernel is larger than its 16x16 (padded by 1) input"],
        ),
        ("conv8p3-flatten-fc10", ["token 'conv8p3': padding 3 is not smaller than the kernel 3"]),
        ("fc10", ["token 'fc10': its input is 1x28x28; put flatten before it"]),
        ("conv8-relu-fc10", ["token 'fc10': its input is 8x28x28; put flatten before it"]),
        (
            "conv8-flatten-conv8-fc10",
            ["token 'conv8': its input is already flat (6272 features); put it before flatten"],
        ),
        ("flatten-maxpool2-fc10", ["token 'maxpool2': its input is already flat (784 features)"]),
        ("flatten-flatten-fc10", ["token 'flatten': its input is already flat"]),
        ("flatten-fc128", ["the network ends with 128 outputs; it must end with 10"]),
        ("conv8-relu", ["the network ends with 8x28x28 outputs; it must end with 10"]),
        ("flatten-fc10-relu-fc12", ["ends with 12 outputs"]),
        ("flatten-dropout1-fc10", ["token 'dropout1': drop probability 1.0 is not in [0, 1)"]),
        ("flatten-dropout1.5-fc10", ["token 'dropout1.5': drop probability 1.5 is not in"]),
        ("conv0-flatten-fc10", ["token 'conv0': channels 0 is not at least 1"]),
        ("flatten-fc0-fc10", ["token 'fc0': features 0 is not at least 1"]),
        ("conv8k0-flatten-fc10", ["token 'conv8k0': kernel 0 is not at least 1"]),
        ("conv8s0-flatten-fc10", ["token 'conv8s0': stride 0 is not at least 1"]),
        ("maxpool0-flatten-fc10", ["token 'maxpool0': size 0 is not at least 1"]),
        ("maxpool2s0-flatten-fc10", ["token 'maxpool2s0': stride 0 is not at least 1"]),
        (
            "flatten-fc100000-fc10",
            ["token 'fc100000': the network has more than 25000000 parameters by here"],
        ),
        (
            "conv64-conv4096-flatten-fc10",
            ["token 'conv4096': its output 4096x28x28 has more than 1000000 values"],
        ),
        ("conv2000-flatten-fc10", ["token 'conv2000': its output 2000x28x28 has more than"]),
        (
            "conv1k201p100-flatten-fc10",
            ["token 'conv1k201p100': it unfolds each image into 31674384 values, more than"],
        ),
        ("flatten-fc1000001-fc10", ["token 'fc1000001': its output 1000001 has more than"]),
        ("", ["the spec is empty; write layers such as"]),
        ("  ", ["the spec is empty"]),
        (
            "relu-" * (MAX_SPEC_CHARS // 5) + "flatten-fc10",
            [f"the spec is {5 * (MAX_SPEC_CHARS // 5) + 12} characters, more than 4096"],
        ),
        ("relu-" * MAX_LAYERS + "flatten-fc10", [f"{MAX_LAYERS + 2} layers, more than 64"]),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
def test_a_spec_that_cannot_work_names_the_token_and_the_conflict(spec, parts):
    refused(spec, *parts)


# --- files that cannot work --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, parts",
    [
        ("a.json", '{"layers": [', ["not valid JSON (JSONDecodeError: Expecting value: line 1"]),
        ("a.json", "[1, 2]", ['expected {"layers": [...]} with at least one layer']),
        ("a.json", '{"layers": []}', ['expected {"layers": [...]}']),
        ("a.json", '{"layers": "flatten-fc10"}', ['expected {"layers": [...]}']),
        ("a.json", '{"layer": ["flatten", "fc10"]}', ['expected {"layers": [...]}']),
        ("a.json", "", ["not valid JSON"]),
        ("a.json", "\ufeff\xff", ["not valid JSON"]),
        (
            "a.toml",
            'layers = [ "flatten", "fc10" ',
            ["not valid TOML (TOMLDecodeError: Unclosed array"],
        ),
        ("a.toml", 'layers = "flatten-fc10"', ['expected {"layers": [...]}']),
        (
            "a.json",
            '{"layers": [{"type": "conv", "channels": 4, "dilation": 2}, "flatten", "fc10"]}',
            [
                "layers[0] (conv) has no option 'dilation' "
                "(options: channels, kernel, stride, padding, bias)"
            ],
        ),
        (
            "a.json",
            '{"layers": ["flatten", {"type": "relu", "inplace": true}, "fc10"]}',
            ["layers[1] (relu) has no option 'inplace' (options: none)"],
        ),
        (
            "a.json",
            '{"layers": [{"type": "conv", "channels": true}, "flatten", "fc10"]}',
            ["layers[0] (conv) option channels is True, not an integer"],
        ),
        (
            "a.toml",
            'layers = [{type = "conv", channels = 4, kernel = false}, "flatten", "fc10"]',
            ["layers[0] (conv) option kernel is False, not an integer"],
        ),
        (
            "a.json",
            '{"layers": ["flatten", {"type": "dropout", "p": true}, "fc10"]}',
            ["layers[1] (dropout) option p is True, not a number"],
        ),
        (
            "a.json",
            '{"layers": [{"type": "conv", "channels": 4.0}, "flatten", "fc10"]}',
            ["layers[0] (conv) option channels is 4.0"],
        ),
        (
            "a.json",
            '{"layers": [{"type": "conv", "channels": "4"}, "flatten", "fc10"]}',
            ["layers[0] (conv) option channels is '4'"],
        ),
        (
            "a.json",
            '{"layers": [{"type": "conv"}, "flatten", "fc10"]}',
            ["layers[0] (conv) needs its channels"],
        ),
        (
            "a.json",
            '{"layers": [{"type": "vgg"}, "flatten", "fc10"]}',
            ["layers[0] has type 'vgg'; known: conv, maxpool"],
        ),
        (
            "a.json",
            '{"layers": [{"channels": 4}, "flatten", "fc10"]}',
            ["layers[0] has type None"],
        ),
        (
            "a.json",
            '{"layers": [3, "flatten", "fc10"]}',
            ["layers[0] is neither a token nor a table"],
        ),
        (
            "a.json",
            '{"layers": [{"type": "conv", "channels": -4}, "flatten", "fc10"]}',
            ["layers[0] (conv): channels -4 is not at least 1"],
        ),
        (
            "a.json",
            '{"layers": ["flatten", {"type": "dropout", "p": 1}, "fc10"]}',
            ["layers[1] (dropout): drop probability 1 is not in [0, 1)"],
        ),
        (
            "a.json",
            '{"layers": ["flatten", {"type": "dropout", "p": NaN}, "fc10"]}',
            ["layers[1] (dropout): drop probability nan is not in [0, 1)"],
        ),
        (
            "a.json",
            '{"layers": [{"type": "fc", "features": 10}]}',
            ["layers[0] (fc): its input is 1x28x28; put flatten before it"],
        ),
        (
            "a.json",
            '{"layers": ["flatten", {"type": "fc", "features": 1e400}]}',
            ["layers[1] (fc) option features is inf, not an integer"],
        ),
        (
            "a.json",
            '{"layers": ["flatten", {"type": "fc", "features": 100000000000000000000}]}',
            ["layers[1] (fc): features 100000000000000000000 is not below 10000000"],
        ),
        ("a.json", '{"layers": ["flatten", "vgg", "fc10"]}', ["token 'vgg' is not a layer"]),
        ("a.json", '{"layers": ["", "flatten", "fc10"]}', ["layers[0]: the spec is empty"]),
        ("a.json", '{"layers": ["flatten", "fc128"]}', ["the network ends with 128 outputs"]),
        ("a.json", '{"layers": ' + "[" * 100_000 + "]" * 100_000 + "}", ["not valid JSON"]),
        # Each was read, the key unread or the last of two taken.
        ("a.json", '{"layers": ["flatten", "fc10"], "other": 1}', ["'other': a spec holds"]),
        ("a.toml", 'layers = ["flatten", "fc10"]\n[x]\ny = 1\n', ["'x': a spec holds"]),
        ("a.json", '{"layers": ["relu"], "layers": ["flatten", "fc10"]}', ["'layers' given twice"]),
        (
            "a.json",
            '{"layers": ["flatten", {"type": "fc", "features": 10, "features": 5}]}',
            ["not valid JSON (ValueError: 'features' given twice)"],
        ),
        (
            "a.json",
            json.dumps({"layers": ["relu"] * (MAX_LAYERS + 1) + ["flatten", "fc10"]}),
            [f"{MAX_LAYERS + 3} layers, more than {MAX_LAYERS}"],
        ),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
def test_a_spec_file_that_cannot_work_is_one_line(tmp_path, name, content, parts):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    refused(str(path), *parts, where=f"--arch {path}")


def test_a_spec_file_too_big_or_missing_is_one_line(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps(NETWORK_JSON) + " " * MAX_SPEC_FILE_BYTES)
    refused(
        str(big),
        f"more than {MAX_SPEC_FILE_BYTES} bytes; not a network spec",
        where=f"--arch {big}: ",
    )
    dotted = tmp_path / "dotted.toml"  # one key of 40,000 parts took tomllib 6.3 GB
    dotted.write_text("a." * 40_000 + "a = 1\n")
    refused(str(dotted), f"40000 dots, more than {MAX_TOML_DOTS}", where=f"--arch {dotted}: ")
    missing = tmp_path / "none.toml"
    refused(str(missing), "cannot read it (No such file or directory)", where=f"--arch {missing}: ")
    folder = tmp_path / "folder.json"
    folder.mkdir()
    refused(str(folder), "not a regular file", where=f"--arch {folder}: ")


def test_a_file_entry_of_several_layers_is_read_as_those_layers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"layers": ["conv4-relu", "flatten", "fc10"]}')
    assert get_arch(str(path)).layers == get_arch("conv4-relu-flatten-fc10").layers


@pytest.mark.parametrize("p", ["0.1234567", "0.00001", ".999999999"])
def test_a_drop_probability_survives_the_canonical_spec(p):
    arch = get_arch(f"flatten-dropout{p}-fc10")
    assert get_arch(arch.spec).layers == arch.layers


@pytest.mark.parametrize(
    "table",
    [{"type": "dropout", "p": 1e-12}, {"type": "dropout", "p": 0.12345678912}],
    ids=["tiny-p", "long-p"],
)
def test_a_file_network_s_canonical_spec_parses_back_to_it(tmp_path, table):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"layers": [table, "flatten", "fc10"]}))
    arch = get_arch(str(path))
    assert get_arch(arch.spec).layers == arch.layers and arch.dropouts[0].p == table["p"]


def test_a_file_network_with_a_stride_past_its_bound_is_refused_in_one_line(tmp_path):
    path = tmp_path / "a.json"
    table = {"type": "maxpool", "size": 28, "stride": 100_000_000}
    path.write_text(json.dumps({"layers": [table, "flatten", "fc10"]}))
    with pytest.raises(UsageError) as refused:
        get_arch(str(path))
    message = str(refused.value)
    expected = "layers[0] (maxpool): stride 100000000 is not below 10000000"
    assert "\n" not in message and message.endswith(expected), message


# --- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, parts",
    [
        ("vgg16", ["--arch: token 'vgg16' is not a layer"]),
        ("conv8-flatten-conv8-fc10", ["--arch: token 'conv8': its input is already flat"]),
        ("conv8-relu-flatten-fc128", ["the network ends with 128 outputs"]),
        ("missing.json", ["--arch missing.json: cannot read it"]),
        ("bad.toml", ["--arch bad.toml: not valid TOML"]),
        ("option.json", ["--arch option.json: layers[0] (conv) has no option 'dilation'"]),
    ],
)
def test_train_refuses_a_bad_arch_in_one_line_writing_nothing(tmp_path, arch, parts):
    work = tmp_path / "work"
    work.mkdir()
    (work / "bad.toml").write_text("layers = [")
    (work / "option.json").write_text(
        '{"layers": [{"type": "conv", "channels": 4, "dilation": 2}]}'
    )
    before = sorted(work.iterdir())
    result = run_script("train.py", "--arch", arch, "--out", "out", "--epochs", "1", cwd=work)
    line = usage_error(result)
    for part in parts:
        assert part in line, line
    assert sorted(work.iterdir()) == before  # no out/, no runs/


def test_crosscheck_refuses_a_bad_arch_in_one_line(tiny_data_dir):
    result = run_script(
        "crosscheck.py", "--arch", "lab", "--arch", "flatten-fc12", "--steps", "1",
        "--data-dir", str(tiny_data_dir),
    )  # fmt: skip
    assert "the network ends with 12 outputs" in usage_error(result, "crosscheck.py")


def test_crosscheck_refuses_one_network_named_twice(tiny_data_dir):
    # Checked twice; two model files of one network were both checked with one's weights.
    result = run_script(
        "crosscheck.py", "--arch", "noconv", "--arch", "flatten-fc128-relu-fc10", "--steps", "1",
        "--data-dir", str(tiny_data_dir),
    )  # fmt: skip
    line = usage_error(result, "crosscheck.py")
    assert "--arch flatten-fc128-relu-fc10: the same network as --arch noconv" in line


def test_crosscheck_refuses_batch_norm_on_batches_of_one(tiny_data_dir):
    result = run_script(
        "crosscheck.py", "--arch", "strong", "--batch-size", "1", "--steps", "1",
        "--data-dir", str(tiny_data_dir),
    )  # fmt: skip
    assert "BatchNorm cannot take statistics of one image" in usage_error(result, "crosscheck.py")


def test_a_batch_norm_network_refuses_a_last_batch_of_one(tiny_data_dir, tmp_path):
    # 100 training images: batches of 33 leave one image in the last.
    args = ["--arch", "flatten-bn-fc10", "--epochs", "1", "--batch-size", "33"]
    result = run_script(
        "train.py", *args, "--data-dir", str(tiny_data_dir), "--out", "o", cwd=tmp_path
    )
    line = usage_error(result)
    assert "--batch-size 33: the last batch of each epoch would hold 1 of the 100 images" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_train_help_shows_the_grammar():
    result = run_script("train.py", "--help")
    assert result.returncode == 0 and GRAMMAR in result.stdout
    assert "lab: the lab's network" in " ".join(result.stdout.split())


# --- a spec network's run, end to end -------------------------------------------------------

# BatchNorm 2d and 1d and dropout, typed in a non-canonical spelling.
TYPED = "conv4k3p1-bn-relu-maxpool2s2-flatten-dropout0.20-fc16-bn-relu-fc10"
SPEC = "conv4-bn-relu-maxpool2-flatten-dropout0.2-fc16-bn-relu-fc10"
SPEC_JSON = {
    "layers": [
        {"type": "conv", "channels": 4, "kernel": 3, "stride": 1, "padding": 1},
        "bn",
        "relu",
        {"type": "maxpool", "size": 2, "stride": 2},
        "flatten",
        {"type": "dropout", "p": 0.2},
        {"type": "fc", "features": 16},
        "bn",
        "relu",
        "fc10",
    ]
}
QUICK = ["--epochs", "1", "--batch-size", "16"]  # 100 training images: 7 steps


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("spec-run")
    make_dataset_dir(work / "data")
    return work


@pytest.fixture(scope="module")
def spec_run(workspace) -> Path:
    """A run of TYPED, trained for one epoch into the default folder, runs/numpy-LABEL."""
    result = run_script(
        "train.py", "--arch", TYPED, *QUICK, "--data-dir", str(workspace / "data"), cwd=workspace
    )
    assert result.returncode == 0, result.stderr
    label = get_arch(SPEC).label
    assert f"numpy | {SPEC} |" in result.stdout
    assert f"writing to runs/numpy-{label}" in result.stdout
    return workspace / "runs" / f"numpy-{label}"


def test_a_spec_run_records_the_canonical_spec_and_batch_norm_s_state(spec_run):
    assert re.fullmatch(r"numpy-custom-[0-9a-f]{8}", spec_run.name)
    ckpt = load_checkpoint(spec_run / "checkpoint.npz")
    assert ckpt.meta["arch"] == ckpt.meta["config"]["arch"] == SPEC
    assert json.loads((spec_run / "metrics.json").read_text())["config"]["arch"] == SPEC
    arch = get_arch(SPEC)
    assert set(ckpt.params) == set(state_shapes(arch)) and set(ckpt.optimizer["momentum"]) == set(
        param_shapes(arch)
    )
    for bn in ("bn1", "bn2"):
        counter = ckpt.params[f"{bn}.num_batches_tracked"]
        assert counter.dtype == np.int64 and counter.shape == () and counter == 7
        assert not np.array_equal(ckpt.params[f"{bn}.running_mean"], 0)  # statistics taken


def test_a_spec_run_resumes_without_its_spec(spec_run, workspace):
    (spec_run / "curves.png").unlink()  # as if stopped while drawing them: --resume finishes it
    result = run_script("train.py", "--resume", str(spec_run), cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert f"numpy | {SPEC} |" in result.stdout and "resuming after epoch 1 of 1" in result.stdout
    assert (spec_run / "curves.png").is_file()
    # Typed again in another spelling, the network agrees with the run's.
    result = run_script("train.py", "--resume", str(spec_run), "--arch", TYPED, cwd=workspace)
    assert result.returncode == 0, result.stderr
    result = run_script("train.py", "--resume", str(spec_run), "--arch", "lab", cwd=workspace)
    assert f"--arch lab (the run has {SPEC})" in usage_error(result)


def test_evaluate_rebuilds_a_spec_network_from_its_checkpoint(spec_run, workspace):
    out = workspace / "evaluation"
    result = run_script(
        "evaluate.py", str(spec_run / "checkpoint.npz"), "--impl", "torch",
        "--data-dir", str(workspace / "data"), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["arch"] == SPEC and evaluation["evaluated_by"] == "torch"
    metrics = json.loads((spec_run / "metrics.json").read_text())
    assert evaluation["acc"] == pytest.approx(metrics["test"]["acc"])


def test_crosscheck_takes_a_spec_file_and_a_spec_checkpoint(spec_run, workspace):
    spec_file = workspace / "crosscheck.json"
    spec_file.write_text(json.dumps(SPEC_JSON))
    results = workspace / "crosscheck-results.json"
    result = run_script(
        "crosscheck.py", "--arch", str(spec_file), "--checkpoint", str(spec_run / "checkpoint.npz"),
        "--dtype", "float32", "--steps", "1", "--batch-size", "8",
        "--data-dir", str(workspace / "data"), "--json", str(results),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    rows = json.loads(results.read_text())
    assert all(row["passed"] for row in rows)
    assert {row["arch"] for row in rows} == {SPEC, "-"}  # "-": the shared code's own checks
    checkpoint = [row for row in rows if row["setting"] == "checkpoint"]
    assert len(checkpoint) == 6  # logits and argmax for each pair of implementations


@pytest.mark.parametrize("suffix", ["json", "toml"])
def test_a_run_from_a_spec_file_never_needs_the_file_again(workspace, suffix):
    spec_file = workspace / f"net.{suffix}"
    spec_file.write_text(json.dumps(SPEC_JSON) if suffix == "json" else toml(SPEC_JSON))
    out = workspace / f"from-{suffix}"
    data = ["--data-dir", str(workspace / "data")]
    result = run_script(
        "train.py", "--arch", str(spec_file), *QUICK, *data, "--out", str(out), cwd=workspace
    )
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(out / "checkpoint.npz")
    assert ckpt.meta["arch"] == ckpt.meta["config"]["arch"] == SPEC
    assert str(spec_file) not in (out / "metrics.json").read_text()
    # Another file of the same network agrees with the run; one of another network does not.
    other = workspace / f"other.{suffix}"
    other.write_text(toml(SPEC_JSON) if suffix == "toml" else json.dumps(SPEC_JSON))
    result = run_script("train.py", "--resume", str(out), "--arch", str(other), cwd=workspace)
    assert result.returncode == 0, result.stderr
    small = {"layers": ["flatten", "fc10"]}
    other.write_text(toml(small) if suffix == "toml" else json.dumps(small))
    result = run_script("train.py", "--resume", str(out), "--arch", str(other), cwd=workspace)
    assert f"--arch flatten-fc10 (the run has {SPEC})" in usage_error(result)
    spec_file.unlink()
    other.unlink()
    (out / "curves.png").unlink()  # as if stopped while drawing them: --resume builds the net
    result = run_script("train.py", "--resume", str(out), *data, cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 1 of 1" in result.stdout


def toml(document: dict) -> str:
    """SPEC_JSON as TOML: an array of tokens and inline tables."""

    def entry(item) -> str:
        if isinstance(item, str):
            return json.dumps(item)
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in item.items()) + " }"

    return "layers = [\n" + "".join(f"  {entry(item)},\n" for item in document["layers"]) + "]\n"


def test_a_spec_run_resumes_exactly(tmp_path):
    """Interrupted after epoch 1 of 2 and resumed, a BatchNorm and dropout network ends with
    the very tensors of the run that was never interrupted: running statistics, counters,
    momentum buffers and dropout masks all carried over."""
    data = load_dataset(make_dataset_dir(tmp_path / "data"))
    config = TrainConfig(arch=SPEC, epochs=2, batch_size=16)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for folder in (whole, resumed):
        folder.mkdir()
    train(config, data, whole, log=lambda _: None)

    def stop_in_epoch_2(*args, **kwargs):
        if args[3] == 2:  # the epoch
            raise KeyboardInterrupt
        return evaluate_epoch(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("shared.loop.evaluate_epoch", stop_in_epoch_2)
        with pytest.raises(Interrupted, match="holds epoch 1"):
            train(config, data, resumed, log=lambda _: None)
    ckpt = load_checkpoint(resumed / "checkpoint.npz", dtype=config.dtype)
    assert ckpt.meta["epoch"] == 1 and ckpt.params["bn1.num_batches_tracked"] == 7
    train(config, data, resumed, log=lambda _: None, resume=ckpt)
    a, b = (load_checkpoint(folder / "checkpoint.npz") for folder in (whole, resumed))
    assert b.params["bn2.num_batches_tracked"] == 14
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    for name in a.optimizer["momentum"]:
        momenta = a.optimizer["momentum"][name], b.optimizer["momentum"][name]
        np.testing.assert_array_equal(*momenta, err_msg=name)
