"""Users' PyTorch models in: five public models as their authors wrote them and a ResNet
(tests/models/), each imported, exported back and compared with the original on real test
images, proven in all three implementations and trained; and every construct threefold
cannot compute the same way refused in one line naming the submodule."""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

import threefold
from shared.backend import make_backend
from shared.checkpoint import load_checkpoint
from shared.config import IMPLEMENTATIONS, PAIRS, TrainConfig
from shared.data import load_dataset
from shared.errors import UsageError
from shared.loop import train
from shared.network import load_weights
from shared.spec import init_params
from shared.torch_files import import_file
from tests.conftest import make_dataset_dir

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "models"
# Each public model: its file:NAME, the spec it must become (every option written, as
# PyTorch computes it) and whether its forward ends in log_softmax.
PUBLIC = {
    "pytorch_examples_net.py:Net": (
        "conv32k3s1p0b1-relu-conv64k3s1p0b1-relu-maxpool2s2p0-dropout0.25-flatten-fc128-relu-"
        "dropout0.5-fc10",
        True,
    ),
    "d2l_lenet.py:LeNet": (
        "conv6k5s1p2b1-sigmoid-avgpool2s2p0-conv16k5s1p0b1-sigmoid-avgpool2s2p0-flatten-fc120-"
        "sigmoid-fc84-sigmoid-fc10",
        False,
    ),
    "bn_cnn.py:Net": (
        "conv32k3s1p1b0-bn-relu-maxpool2s2p0-conv64k3s1p1b0-bn-relu-maxpool2s2p0-flatten-fc128-"
        "relu-dropout0.5-fc10",
        False,
    ),
    "dropout2d_gap.py:Net": (
        "conv32k3s1p1b1-relu-conv64k3s1p1b1-relu-maxpool2s2p0-dropout2d0.25-conv128k3s1p1b1-"
        "relu-adaptiveavgpool1-flatten-fc10",
        False,
    ),
    "resnet_basic_block.py:ResNet": (
        "conv16k3s1p1b0-bn-relu-res(conv16k3s1p1b0-bn-relu-conv16k3s1p1b0-bn)-relu-"
        "res(conv32k3s2p1b0-bn-relu-conv32k3s1p1b0-bn)-relu-adaptiveavgpool1-flatten-fc10",
        False,
    ),
    "keras_simple_convnet.py:build": (
        "conv32k3s1p0b1-relu-maxpool2s2p0-conv64k3s1p0b1-relu-maxpool2s2p0-flatten-dropout0.5-fc10",
        False,
    ),
}


def model(name: str) -> nn.Module:
    """The public model, built as its file builds it, with trained-looking BatchNorm buffers
    (running statistics away from 0 and 1, so that evaluation mode is really tested)."""
    module, _ = threefold_module(name)
    torch.manual_seed(0)
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            sub.running_mean.uniform_(-0.5, 0.5)
            sub.running_var.uniform_(0.5, 2.0)
            sub.num_batches_tracked.fill_(7)
    return module.eval()


def threefold_module(name: str):
    from shared.torch_files import load_module_file

    return load_module_file(f"{MODELS / name}")


@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_model_imports_as_pytorch_computes_it(name):
    spec, _ = PUBLIC[name]
    network = threefold.from_torch(model(name))
    assert network.spec == spec
    assert network.arch.name == threefold.network(spec).arch.name  # the spec rebuilds it
    # Every tensor of the module is in the network, moved, under its canonical name.
    assert sorted(network.renames) == sorted(model(name).state_dict())
    assert sorted(network.renames.values()) == sorted(network.tensors)


@pytest.mark.parametrize("name", PUBLIC)
def test_the_exported_module_gives_the_originals_outputs(name, real_data):
    """On 1,000 real test images in float32: the original's evaluation-mode outputs (its
    log-probabilities where it returns them) from the exported nn.Sequential."""
    _, log_probabilities = PUBLIC[name]
    original = model(name)
    exported = threefold.to_torch(threefold.from_torch(original))
    x = torch.from_numpy(real_data.test.x[:1000])
    with torch.no_grad():
        theirs, ours = original(x), exported(x)
    if log_probabilities:
        ours = F.log_softmax(ours, dim=1)
    difference = (theirs - ours).abs().max().item()
    assert difference < 1e-5, difference
    assert (theirs.argmax(1) == ours.argmax(1)).all()


@pytest.mark.parametrize("name", PUBLIC)
def test_a_public_model_is_proven_in_all_three(name, real_data):
    """A short cross-check from the model's own weights, every setting, in float64 (both
    dtypes and 20 steps: `crosscheck.py --arch tests/models/FILE.py:NAME`, in the docs)."""
    report = threefold.assert_equivalent(
        model(name), dtypes=("float64",), steps=2, batch_size=6, data=real_data
    )
    assert report.passed and len(report.results) > 250
    assert report.first_divergence is None
    layers = {node.layer.name for node in report.network.arch.nodes}
    assert set(report.worst_by_layer()) <= layers | {"loss"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtypes": "float32"}, "dtypes='float32': a tuple of one or more of"),
        ({"dtypes": ()}, "dtypes=\\(\\): a tuple"),
        ({"dtypes": ("float16",)}, "dtypes=\\('float16',\\)"),
        ({"dtypes": ("float64", "float64")}, "dtypes=.*: a tuple of one or more of .*, each once"),
        (
            {"impls": (*IMPLEMENTATIONS[:1], *IMPLEMENTATIONS[:2])},
            "impls=.*: a tuple of two or more of .*, each once",
        ),
        ({"impls": IMPLEMENTATIONS[:1]}, "impls=.*: a tuple of two or more of .*compares pairs"),
        ({"impls": ()}, "impls=\\(\\)"),
        ({"steps": 0}, "steps=0: out of range"),
        ({"steps": 1.5}, "steps=1.5: not an integer"),
        ({"batch_size": -3}, "batch_size=-3: out of range"),
        (
            {"batch_size": 10**9},
            "network flatten-fc10: a step of this network on 1000000000 images",
        ),
        ({"seed": -1}, "seed=-1: out of range"),
        ({"data": "bogus"}, "crosscheck: data: no fashion-mnist folder found \\(tried bogus"),
        ({"data": 3}, "crosscheck: data: an object of type int; 'auto', a folder, a Dataset or"),
        # Random images are held in memory: 10**9 steps ran on, unbounded.
        ({"steps": 10**9}, "steps 1000000000 x batch_size 32 exceeds the 50000 random images"),
        ({"progress": 3}, "crosscheck: progress=3: a callable taking a str, or None"),
        ({"onnx": "no"}, "crosscheck: onnx='no': True or False"),  # was taken as True
    ],
)
def test_the_api_s_crosscheck_refuses_an_option_as_the_command_does(options, message):
    # One implementation or no dtype would compare nothing and pass.
    with pytest.raises(UsageError, match=message):
        threefold.crosscheck("flatten-fc10", **{"data": None, **options})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((None,), "network: None is not a spec"),
        (("lab", -1), "network: seed=-1: out of range"),
        (("lab", 0, "x"), "network: init='x': not one of"),
        (("/tmp/a\0b.json",), "a name holding a NUL byte is no file's"),  # a ValueError
    ],
)
def test_the_api_s_network_refuses_what_its_flags_would(arguments, message):
    with pytest.raises(UsageError, match=message):
        threefold.network(*arguments)


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ("runs/jax-lab/checkpoint.npz", "is a file of weights; threefold.load reads it"),
        (Path("model.onnx"), "a PosixPath; it takes a Network, a torch.nn.Module or a spec"),
        (None, "a NoneType; it takes a Network"),
        (threefold.Network("lab", {}, ()), "arch is a str, not an Arch"),
    ],
)
def test_the_api_names_what_it_takes_where_it_is_given_something_else(subject, message):
    # A checkpoint's path was read as a spec ("token 'runs/jax' is not a layer"), a Path as
    # a module, a Network of a str as a traceback.
    for call in (threefold.to_torch, threefold.crosscheck):
        with pytest.raises(threefold.UsageError, match=re.escape(message)):
            call(subject)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_an_imported_model_trains_from_its_own_weights(impl, tmp_path):
    network = import_file(f"{MODELS / 'keras_simple_convnet.py'}:build")
    data = load_dataset(make_dataset_dir(tmp_path / "data"))
    config = TrainConfig(impl=impl, arch=network.arch.name, epochs=2, batch_size=16)
    out = tmp_path / "run"
    out.mkdir()
    record = train(
        config, data, out, arch=network.arch, initial=network.tensors, log=lambda _: None
    )
    assert record["history"][-1]["train_loss"] < record["history"][0]["train_loss"]
    assert np.isfinite(record["test"]["loss"])
    # 16 steps moved each tensor less than the seeded start the run would otherwise take.
    trained = load_checkpoint(out / "checkpoint.npz").params
    seeded = init_params(network.arch, config.init, config.seed)
    for name, tensor in network.tensors.items():
        moved = np.abs(trained[name] - tensor).max()
        assert 0 < moved < np.abs(seeded[name] - tensor).max(), name


# --- the command line -------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after argparse's usage
    assert ": error: " in line and result.stderr.count(": error: ") == 1, result.stderr
    return line


def test_train_takes_a_model_file_and_its_weights(tmp_path):
    module = model("d2l_lenet.py:LeNet")
    torch.save(module.state_dict(), tmp_path / "lenet.pt")
    data = make_dataset_dir(tmp_path / "data")
    out = tmp_path / "run"
    arch = f"{MODELS / 'd2l_lenet.py'}:LeNet"
    result = run(
        "scripts/train.py", "--arch", arch, "--weights", str(tmp_path / "lenet.pt"),
        "--epochs", "1", "--batch-size", "16", "--lr", "1e-9", "--plain",
        "--data-dir", str(data), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    network = threefold.load(out / "checkpoint.npz")
    # A rate of 1e-9 for one epoch leaves the model's own weights where they were.
    for theirs, ours in import_file(arch).renames.items():
        np.testing.assert_allclose(
            network.tensors[ours], module.state_dict()[theirs].numpy(), atol=1e-6
        )
    saved = threefold.load(out / "checkpoint.npz")
    assert saved.arch.name == import_file(arch).arch.name
    assert "not from its weights" not in result.stdout
    # Without --weights it starts from --init, which a user whose constructor loads trained
    # weights would not expect: it says so.
    result = run(
        "scripts/train.py", "--arch", arch, "--epochs", "1", "--batch-size", "16",
        "--data-dir", str(data), "--out", str(tmp_path / "drawn"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"note: --arch {arch} gives the layers; training starts from --init he" in result.stdout


def test_a_model_file_may_name_a_module_built_at_its_top(tmp_path):
    # `Net = nn.Sequential(...)`: NAME() ran the module's forward on nothing, and failed.
    (tmp_path / "model.py").write_text(
        "from torch import nn\nNet = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"
    )
    assert import_file(f"{tmp_path / 'model.py'}:Net").spec == "flatten-fc10"


def test_a_model_file_s_weights_are_drawn_from_the_seed_and_leave_the_caller_s_generator():
    # They were drawn from the caller's generator: each call, and each cross-check, differed.
    model = f"{MODELS / 'd2l_lenet.py'}:build"
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    first, again, other = (threefold.network(model, seed=s) for s in (0, 0, 1))
    assert torch.rand(1) == expected
    assert all(np.array_equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert not np.array_equal(first.tensors["conv1.weight"], other.tensors["conv1.weight"])


def test_the_crosscheck_command_takes_a_model_file():
    result = run(
        "scripts/crosscheck.py", "--arch", f"{MODELS / 'keras_simple_convnet.py'}:build",
        "--steps", "2", "--batch-size", "4", "--dtype", "float64",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert "setting 1/7" in result.stderr  # its progress, on stderr
    assert " 0 failed" in result.stdout


# A model file whose forward runs `body` before its one layer.
FORWARD = """import sys
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        {body}
        return self.fc(torch.flatten(x, 1))
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("missing.py:Net", "missing.py is not a file"),
        ("{models}/d2l_lenet.py:Nope", "defines no Nope"),
        ("{bad}:Net", "running bad.py raised ZeroDivisionError"),
        ("{bad_init}:Net", "Net() raised ValueError: no"),
        ("{not_module}:Net", "int is not a torch.nn.Module"),
        ("{exits}:Net", "running exits.py raised SystemExit: 0"),
        ("{exits_traced}:Net", "torch.fx cannot trace its forward (SystemExit: 0)"),
        ("{exits_run}:Net", "images in training mode (SystemExit: 3)"),
    ],
)
def test_a_model_file_that_cannot_be_read_is_one_line(tmp_path, text, expected):
    files = {
        "bad": "1 / 0\n",
        "bad_init": "def Net():\n    raise ValueError('no')\n",
        "not_module": "def Net():\n    return 3\n",
        "exits": "raise SystemExit(0)\n",  # once ended the command without a word
        # A forward's exit() ended it with the exit's status, 0 too, and nothing said.
        "exits_traced": FORWARD.format(body="raise SystemExit(0)"),
        "exits_run": FORWARD.format(body="if not isinstance(x, torch.fx.Proxy): sys.exit(3)"),
    }
    paths = {}
    for stem, code in files.items():
        paths[stem] = tmp_path / f"{stem}.py"
        paths[stem].write_text(code)
    arch = text.format(models=MODELS, **paths)
    line = one_line_error(run("scripts/train.py", "--arch", arch, "--epochs", "1"))
    assert expected in line


def test_a_weights_file_that_does_not_fit_is_one_line(tmp_path):
    arch = f"{MODELS / 'keras_simple_convnet.py'}:build"
    network = import_file(arch)
    state = model("keras_simple_convnet.py:build").state_dict()
    cases = {
        "missing": {k: v for k, v in state.items() if k != "0.bias"},
        "shape": {**state, "0.bias": torch.zeros(3)},
        "nan": {**state, "8.weight": torch.full_like(state["8.weight"], float("nan"))},
        "stranger": {**state, "extra.weight": torch.zeros(1)},
        # An unused layer left in the module under a canonical name once overwrote conv1's.
        "twice": {**state, "conv1.bias": torch.zeros_like(state["0.bias"])},
        # Cast to int64 without a word (complex, int8), or a traceback (bfloat16, sparse, a
        # bare tensor, whose values() is a sparse tensor's method).
        "complex": {**state, "0.bias": state["0.bias"].to(torch.complex64)},
        "int8": {**state, "0.bias": state["0.bias"].to(torch.int8)},
        "bfloat16": {**state, "0.bias": state["0.bias"].to(torch.bfloat16)},
        "sparse": {**state, "0.bias": state["0.bias"].to_sparse()},
        "tensor": state["0.bias"],
    }
    expected = {
        "missing": "1 tensors missing, the first 0.bias (conv1.bias)",
        "shape": "0.bias has shape (3,)",
        "nan": "8.weight has NaN or inf values",
        "stranger": "extra.weight is not a tensor of the network",
        "twice": "0.bias and conv1.bias both give conv1.bias",
        "complex": "0.bias: torch.complex64, not torch.float32 or torch.float64",
        "int8": "0.bias: torch.int8, not torch.float32 or torch.float64",
        "bfloat16": "0.bias: torch.bfloat16, not torch.float32 or torch.float64",
        "sparse": "0.bias: a torch.sparse_coo tensor; threefold reads dense tensors",
        "tensor": "holds a Tensor, not a state_dict of tensors",
    }
    for case, content in cases.items():
        torch.save(content, tmp_path / f"{case}.pt")
        with pytest.raises(UsageError, match=re.escape(expected[case])):
            load_weights(tmp_path / f"{case}.pt", network.arch, network.renames, "--weights")
    # A zip of 16 KB that inflates to 16 MB, refused before torch.load inflates it.
    with zipfile.ZipFile(tmp_path / "inflates.pt", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(16 << 20))
    with pytest.raises(UsageError, match="holds 16,777,216 bytes once inflated, more than"):
        load_weights(tmp_path / "inflates.pt", network.arch, network.renames, "--weights")
    # A pickled object, not tensors: torch.load(weights_only=True) refuses to run it.
    (tmp_path / "object.pt").write_bytes(b"not a zip archive")
    with pytest.raises(UsageError, match=r"not a state_dict torch\.load can read"):
        load_weights(tmp_path / "object.pt", network.arch, network.renames, "--weights")
    # A whole module pickled: torch's refusal, cut at its first line, promised "two options"
    # and gave none, in a terminal's colour codes.
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")
    with pytest.raises(
        UsageError,
        match=r"a pickled torch\.nn\.modules\.linear\.Linear, which torch\.load\(weights_only="
        r"True\) does not run; save the state_dict alone, a dict of tensors \(module\.state_"
        r"dict\(\)\)",
    ) as whole:
        load_weights(tmp_path / "whole.pt", network.arch, network.renames, "--weights")
    assert "\x1b" not in str(whole.value)
    # A state_dict saved beside other objects is no whole module.
    torch.save({"model": state, "args": argparse.Namespace()}, tmp_path / "beside.pt")
    with pytest.raises(UsageError, match=r"argparse\.Namespace, .* save the state_dict alone"):
        load_weights(tmp_path / "beside.pt", network.arch, network.renames, "--weights")
    torch.save({"model": state}, tmp_path / "nested.pt")
    with pytest.raises(UsageError, match="not a state_dict of tensors"):
        load_weights(tmp_path / "nested.pt", network.arch, network.renames, "--weights")
    # Canonical names load as they are (a threefold run's tensors, say).
    canonical = {k: torch.from_numpy(v) for k, v in network.tensors.items()}
    torch.save(canonical, tmp_path / "canonical.pt")
    loaded, digest = load_weights(tmp_path / "canonical.pt", network.arch, {}, "--weights")
    assert len(digest) == 64 and all(np.array_equal(loaded[k], network.tensors[k]) for k in loaded)


# --- what threefold cannot compute the same way: one line naming the submodule -------------


class Chain(nn.Module):
    """A module whose forward is `body`, on layers given by name."""

    def __init__(self, body, **layers):
        super().__init__()
        self.body = body
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        return self.body(self, x)


def head(channels: int = 4, size: int = 26 * 26):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * size, 10))


def _relu_plus_input(m, x):
    y = m.conv(x)
    return m.fc(torch.flatten(F.relu(y) + y, 1))


def _concatenated(m, x):
    y = m.conv(x)
    return m.fc(torch.flatten(torch.cat([F.relu(y), y], 1), 1))


def _projection_with_bias(m, x):
    y = m.conv(x)
    return m.fc(torch.flatten(m.main(y) + m.side(y), 1))


def _three_paths(m, x):
    y = m.conv(x)
    return m.fc(torch.flatten(F.relu(y) + torch.tanh(y) + y, 1))


def _data_dependent(m, x):
    if x.sum() > 0:
        x = F.relu(x)
    return m.fc(torch.flatten(x, 1))


def _flat_fc() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def _altered(module: nn.Module, alter: Callable[[nn.Module], object]) -> nn.Module:
    """`module` altered in place by `alter`."""
    with torch.no_grad():
        alter(module)
    return module


class _Inverted(Chain):
    """Its class's __call__, which torch.fx does not trace, inverts the images first."""

    def __call__(self, x):
        return super().__call__(1 - x)


def _frozen_as_buffer(module: nn.Module) -> None:
    """The conv's weight made a buffer: the module never trains it."""
    weight = module[0].weight.detach().clone()
    del module[0].weight
    module[0].register_buffer("weight", weight)


def _pruned_to_five(module: nn.Module) -> None:
    """Linear(32, 10) cut to 5 outputs, its out_features left at 10: 32 -> 5 -> 10."""
    module[3].weight = nn.Parameter(module[3].weight[:5].clone())
    module[3].bias = nn.Parameter(module[3].bias[:5].clone())
    module[4].weight = nn.Parameter(module[4].weight[:, :5].clone())


def _autocast(m, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return m.fc(torch.flatten(F.relu(m.conv(x)), 1))


def _tied() -> Chain:
    """Two convs holding one weight tensor."""
    module = Chain(
        lambda m, x: m.fc(torch.flatten(m.second(m.first(x)), 1)),
        first=nn.Conv2d(1, 1, 3, padding=1),
        second=nn.Conv2d(1, 1, 3, padding=1),
        fc=nn.Linear(784, 10),
    )
    module.second.weight = module.first.weight
    return module


def _fake_quantized() -> nn.Sequential:
    """A quantization-aware Linear: named Linear, it fake-quantizes its weight."""
    with warnings.catch_warnings():  # torch.ao.quantization says it is deprecated
        warnings.simplefilter("ignore")
        qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
        module = nn.Sequential(nn.Flatten(), torch.ao.nn.qat.Linear(784, 10, qconfig=qconfig))
        module(torch.rand(8, 1, 28, 28))  # its observers see a batch, as in training
    return module.eval()


def _dynamically_quantized() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(_flat_fc().eval(), {nn.Linear}, torch.qint8)


class _WithExtraState(nn.Sequential):
    def get_extra_state(self):
        return {"version": 2}

    def set_extra_state(self, state):
        pass


def _in_place_fork(m, x):
    h = m.conv(x)
    return m.fc(torch.flatten(F.relu(h, inplace=True) + h, 1))  # PyTorch adds relu(h) twice


def _in_place_on_a_view_of_the_fork(m, x):
    h = m.conv(x)
    # Dropout in place on nn.Identity's output drops the shortcut's values too, in training.
    return m.fc(torch.flatten(m.conv2(m.drop(m.same(h))) + h, 1))


def _shortcut_under_no_grad(m, x):
    h = torch.relu(m.conv(x))
    with torch.no_grad():  # the shortcut sends no gradient back; torch.fx records a view
        shortcut = h.view(h.size(0), 4, 26, 26)
    return m.fc(torch.flatten(m.conv2(h) + shortcut, 1))


def _result_never_used(m, x):
    h = m.conv(x)
    F.relu(h)
    return m.fc(torch.flatten(h, 1))


def _log_softmax_in_block(m, x):
    h = m.conv(x)
    return m.fc(torch.flatten(h + F.log_softmax(m.conv2(h), 1), 1))


def _conv_under_no_grad(m, x):
    with torch.no_grad():  # a frozen feature extractor: torch.fx records no trace of it
        h = F.relu(m.conv(x))
    return m.fc(torch.flatten(h, 1))


class _SizesDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x, sizes=(1, 2)):
        return self.fc(torch.flatten(x, 1))


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x, mask):
        return self.fc(torch.flatten(x * mask, 1))


def _frozen_batch_norm() -> nn.Module:
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), head(2))
    module.train()
    module[1].eval()  # kept in evaluation mode while the rest trains, as fine-tuning does
    return module


HEAD = 4 * 26 * 26  # features of a 4-channel 3x3 conv's output, flattened


def _projection_where_the_identity_serves(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = m.conv(x)
    return m.fc(torch.flatten(m.conv2(h) + m.p(h), 1))


REFUSED = {
    "in place on a fork": (
        Chain(_in_place_fork, conv=nn.Conv2d(1, 4, 3), fc=nn.Linear(HEAD, 10)),
        "relu (relu): in place on a value another path also reads",
    ),
    "in place on a view of a fork": (
        Chain(
            _in_place_on_a_view_of_the_fork,
            conv=nn.Conv2d(1, 4, 3),
            same=nn.Identity(),
            drop=nn.Dropout(0.5, inplace=True),
            conv2=nn.Conv2d(4, 4, 3, padding=1),
            fc=nn.Linear(HEAD, 10),
        ),
        "drop (drop): in place on a value another path also reads",  # passed every check
    ),
    "a shortcut under no_grad": (
        Chain(
            _shortcut_under_no_grad,
            conv=nn.Conv2d(1, 4, 3),
            conv2=nn.Conv2d(4, 4, 3, padding=1),
            fc=nn.Linear(HEAD, 10),
        ),
        "module: conv.weight: its gradient differs from that of the layer read from it",
    ),
    "an option by mode": (
        Chain(
            lambda m, x: m.fc(F.leaky_relu(torch.flatten(x, 1), 0.01 if m.training else 0.5)),
            fc=nn.Linear(784, 10),
        ),
        "computes other operations, or with other options, in evaluation mode",
    ),
    "frozen BatchNorm": (_frozen_batch_norm(), "module: 1: in evaluation mode while the module"),
    "log_softmax in a block": (
        Chain(
            _log_softmax_in_block,
            conv=nn.Conv2d(1, 4, 3),
            conv2=nn.Conv2d(4, 4, 3, padding=1),
            fc=nn.Linear(HEAD, 10),
        ),
        "a log_softmax before the last layer",
    ),
    "a value added to itself": (  # "add: add: not an operation threefold has"
        Chain(lambda m, x: m.fc(torch.flatten(x + x, 1)), fc=nn.Linear(784, 10)),
        "add (add): an add of a value to itself, not of two paths from one value",
    ),
    "two branches": (
        Chain(
            lambda m, x: m.fc(torch.flatten(m.a(x) + m.b(x), 1)),
            a=nn.Conv2d(1, 4, 3, padding=1),
            b=nn.Conv2d(1, 4, 5, padding=2),
            fc=nn.Linear(4 * 784, 10),
        ),
        "is not the one threefold's blocks take for this body",
    ),
    "a projection where the identity serves": (  # said "(the identity: a 1x1 conv with ...)"
        Chain(
            _projection_where_the_identity_serves,
            conv=nn.Conv2d(1, 4, 3),
            conv2=nn.Conv2d(4, 4, 3, padding=1),
            p=nn.Conv2d(4, 4, 1, bias=False),
            fc=nn.Linear(HEAD, 10),
        ),
        "for this body (the identity, as the body keeps its input's shape)",
    ),
    "features by the batch's size": (
        Chain(
            lambda m, x: m.fc(m.conv(x).view(-1, x.size(0) * HEAD // 2)),
            conv=nn.Conv2d(1, 4, 3),
            fc=nn.Linear(HEAD, 10),
        ),
        "mul (mul): computes with the batch's size",  # a flatten at the traced batch of 2 alone
    ),
    "the batch's size by a negative dim": (
        Chain(
            lambda m, x: m.fc(m.conv(x).view(-1, x.size(-4) * HEAD // 2)),
            conv=nn.Conv2d(1, 4, 3),
            fc=nn.Linear(HEAD, 10),
        ),
        "mul (mul): computes with the batch's size",  # x.size(-4): imported as a flatten
    ),
    "a batch fixed in a view": (
        Chain(lambda m, x: m.fc(x.view(2, -1)), fc=nn.Linear(784, 10)),
        "view: x.view(2, ...) fixes the batch at 2",  # a flatten at the traced 2 images alone
    ),
    "a tuple returned": (
        Chain(lambda m, x: (m.fc(torch.flatten(x, 1)), x), fc=nn.Linear(784, 10)),
        "its forward returns a tuple of 2",  # was "joins two paths other than by adding them"
    ),
    "a DataParallel wrapper": (
        nn.DataParallel(nn.Sequential(nn.Flatten(), nn.Linear(784, 10))),
        "a DataParallel wrapper; pass its .module",  # was "takes more than one input"
    ),
    "a result never used": (
        Chain(_result_never_used, conv=nn.Conv2d(1, 4, 3), fc=nn.Linear(HEAD, 10)),
        "relu (relu): its result is never used",  # was "inside a residual block"
    ),
    "an empty block": (
        Chain(
            lambda m, x: m.fc(torch.flatten(x + m.same(x), 1)),
            same=nn.Identity(),
            fc=nn.Linear(784, 10),
        ),
        "both paths change nothing",
    ),
    "forward replaced": (
        _altered(
            nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(784, 10)),
            lambda m: setattr(m[1], "forward", torch.tanh),
        ),
        "module: 1: its forward is replaced on the instance",
    ),
    "state_dict hook": (
        _altered(_flat_fc(), lambda m: m[1]._register_state_dict_hook(lambda *args: None)),
        "module: 1: has state_dict hooks",
    ),
    "frozen weight": (
        _altered(_flat_fc(), lambda m: m[1].weight.requires_grad_(False)),
        "module: 1.weight: does not train",
    ),
    "no gradient": (
        Chain(_conv_under_no_grad, conv=nn.Conv2d(1, 4, 3), fc=nn.Linear(HEAD, 10)),
        "module: conv.weight: its forward gives it no gradient in training (torch.no_grad or",
    ),
    "backward hook": (
        _altered(_flat_fc(), lambda m: m[1].register_full_backward_hook(lambda m, gi, go: None)),
        "module: 1: has backward hooks",
    ),
    "a second input": (_TwoInputs(), "module: its forward takes more than one input"),
    "TorchScript": (torch.jit.script(_flat_fc()), "a TorchScript module, whose forward is"),
    "TorchScript inside": (
        nn.Sequential(nn.Flatten(), torch.jit.script(nn.Linear(784, 10))),
        "module: 1: a TorchScript module",  # was "its forward is replaced on the instance"
    ),
    "a layer's result never used": (
        Chain(
            lambda m, x: (m.aux(m.flat(x)), m.fc(m.flat(x)))[1],
            flat=nn.Flatten(),
            aux=nn.Linear(784, 3),
            fc=nn.Linear(784, 10),
        ),
        "its result is never used",  # not "aux.weight: its forward gives it no gradient"
    ),
    "a post-accumulate hook": (
        _altered(_flat_fc(), lambda m: m[1].weight.register_post_accumulate_grad_hook(print)),
        "module: 1.weight: has gradient hooks",  # as an optimizer stepped in the backward
    ),
    "a default not plain": (
        _SizesDefault(),
        "its forward's sizes=(1, 2): threefold traces a forward with plain defaults",
    ),
    "gradient hook": (
        _altered(_flat_fc(), lambda m: m[1].weight.register_hook(lambda grad: grad.clamp(-1, 1))),
        "module: 1.weight: has gradient hooks",
    ),
    "fake-quantized": (
        _fake_quantized(),
        "module: 1: torch.ao.nn.qat.modules.linear.Linear: not torch.nn's Linear",
    ),
    "dynamically quantized": (
        _dynamically_quantized(),
        "module: 1._packed_params.dtype: a dtype in its state_dict",
    ),
    "extra state": (
        _WithExtraState(nn.Flatten(), nn.Linear(784, 10)),
        "module: _extra_state: a dict in its state_dict",
    ),
    "ceil_mode": (
        nn.Sequential(nn.MaxPool2d(3, ceil_mode=True), head(1, 10 * 10)),
        "ceil_mode=True adds a window here (28x28 -> 10x10, not 9x9); threefold floors",
    ),
    "groups": (
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), head(4, 24 * 24)),
        "1: Conv2d(groups=2): grouped convolutions",
    ),
    "dilation": (
        nn.Sequential(nn.Conv2d(1, 4, 3, dilation=2), head(4, 24 * 24)),
        "0: Conv2d(dilation=(2, 2))",
    ),
    "padding mode": (
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), head(4, 28 * 28)),
        "0: Conv2d(padding_mode='reflect'): threefold pads with zeros",
    ),
    "rectangular kernel": (
        nn.Sequential(nn.Conv2d(1, 4, (3, 5)), head(4, 26 * 24)),
        "0: Conv2d(kernel_size=(3, 5)): threefold's windows are square",
    ),
    "even same": (
        nn.Sequential(nn.Conv2d(1, 4, 4, padding="same"), head(4, 28 * 28)),
        "0: Conv2d(padding='same'): an even kernel (4) pads unevenly",
    ),
    "linear without bias": (
        nn.Sequential(nn.Flatten(), nn.Linear(784, 10, bias=False)),
        "1: Linear(bias=False)",
    ),
    "unknown module": (
        nn.Sequential(nn.AdaptiveMaxPool2d(7), head(1, 49)),
        "0: AdaptiveMaxPool2d: not a layer threefold has",
    ),
    "final softmax": (
        nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(dim=1)),
        "2: Softmax(dim=1): threefold trains on logits",
    ),
    "log_softmax inside": (
        nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.LogSoftmax(1), nn.Linear(32, 10)),
        "2: LogSoftmax(dim=1): a log_softmax before the last layer",
    ),
    "batch norm momentum": (
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.01), head()),
        "1: BatchNorm2d(momentum=0.01)",
    ),
    "batch norm without statistics": (
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), head()),
        "1: BatchNorm2d(track_running_stats=False)",
    ),
    "average without padding": (
        nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), head(1, 28 * 28)),
        "0: AvgPool2d(count_include_pad=False)",
    ),
    "softmax without dim": (
        Chain(lambda m, x: F.softmax(m.fc(torch.flatten(x, 1))), fc=nn.Linear(784, 10)),
        "softmax: F.softmax(dim=None): threefold trains on logits",
    ),
    "functional ceil": (
        Chain(
            lambda m, x: m.fc(torch.flatten(F.max_pool2d(x, 3, ceil_mode=True), 1)),
            fc=nn.Linear(100, 10),
        ),
        "F.max_pool2d(kernel_size=3, stride=None, padding=0, dilation=1, ceil_mode=True, "
        "return_indices=False): ceil_mode=True adds a window here (28x28 -> 10x10, not 9x9)",
    ),
    "concatenated paths": (
        Chain(_concatenated, conv=nn.Conv2d(1, 4, 3), fc=nn.Linear(8 * 26 * 26, 10)),
        "cat (cat): joins two paths other than by adding them",
    ),
    "projection with a bias": (
        Chain(
            _projection_with_bias,
            conv=nn.Conv2d(1, 4, 3),
            main=nn.Conv2d(4, 8, 3, 2, 1),
            side=nn.Conv2d(4, 8, 1, 2),
            fc=nn.Linear(8 * 13 * 13, 10),
        ),
        # The bias, which the module's repr does not show, is in the token (conv8k1s2p0b1).
        "add: its shortcut (Conv2d(4, 8, kernel_size=(1, 1), stride=(2, 2)): conv8k1s2p0b1) "
        "is not the one",
    ),
    "three paths": (
        Chain(_three_paths, conv=nn.Conv2d(1, 4, 3), fc=nn.Linear(4 * 26 * 26, 10)),
        "conv: its output feeds 3 operations; threefold reads residual blocks",
    ),
    "data-dependent forward": (
        Chain(_data_dependent, fc=nn.Linear(784, 10)),
        "torch.fx cannot trace its forward",
    ),
    "another image size": (
        nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10)),
        "its forward fails on 1x28x28 images",
    ),
    "dropout2d on features": (
        nn.Sequential(nn.Flatten(), nn.Dropout2d(0.2), nn.Linear(784, 10)),
        "1: Dropout2d(p=0.2, inplace=False): Dropout2d on a flat input",
    ),
    "partial flatten": (
        Chain(lambda m, x: m.fc(torch.flatten(torch.flatten(x, 2), 1)), fc=nn.Linear(784, 10)),
        "flatten: torch.flatten(start_dim=2, end_dim=-1): threefold flattens from dim 1",
    ),
    "shared conv": (
        Chain(
            lambda m, x: m.fc(torch.flatten(m.conv(m.conv(x)), 1)),
            conv=nn.Conv2d(1, 1, 3, padding=1),
            fc=nn.Linear(784, 10),
        ),
        "conv: Conv2d: used twice; its weights would be shared",
    ),
    "half precision": (
        nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).half(),
        "1.weight: torch.float16; threefold computes in float32/64",
    ),
    "a forward that fails": (
        nn.Sequential(nn.Flatten(), nn.Linear(100, 10)),
        "its forward fails on 1x28x28 images (RuntimeError: mat1 and mat2 shapes cannot be "
        "multiplied (2x784 and 100x10))",
    ),
    "NaN in a weight": (
        _altered(_flat_fc(), lambda m: m[1].weight.fill_(float("nan"))),
        "module: 1.weight has NaN or inf values",
    ),
    "a negative running variance": (
        _altered(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), head(2)),
            lambda m: m[1].running_var.fill_(-1.0),
        ),
        "module: 1.running_var has negative values",
    ),
    "a forward hook": (
        _altered(
            _flat_fc(), lambda m: m[1].register_forward_hook(lambda module, inputs, out: out * 2)
        ),
        "module: 1: has forward hooks",
    ),
    "pruned": (
        _altered(_flat_fc(), lambda m: prune.l1_unstructured(m[1], "weight", 0.5)),
        "module: 1: has forward pre-hooks",
    ),
    "weight_norm": (
        _altered(_flat_fc(), lambda m: m.__setitem__(1, parametrizations.weight_norm(m[1]))),
        "module: 1: has parametrizations",
    ),
    "lazy": (
        nn.Sequential(nn.Flatten(), nn.LazyLinear(10)),
        "module: 1: has lazy parameters not yet of a shape",
    ),
    "tied weights": (
        _tied(),
        "first.weight and second.weight are one tensor (tied weights)",
    ),
    "training branch": (
        Chain(
            lambda m, x: m.fc(torch.flatten(x, 1) if m.training else torch.flatten(x, 1) / 2),
            fc=nn.Linear(784, 10),
        ),
        "module: its forward computes other operations, or with other options, in evaluation",
    ),
    "tied storage": (
        _altered(
            nn.Sequential(
                nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1), head(1, 784)
            ),
            lambda m: setattr(m[1], "weight", nn.Parameter(m[0].weight.data)),
        ),
        "0.weight and 1.weight are one tensor (tied weights)",
    ),
    "tied buffers": (
        _altered(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.BatchNorm2d(2), head(2)),
            lambda m: setattr(m[2], "running_mean", m[1].running_mean),
        ),
        "1.running_mean and 2.running_mean are one tensor (tied weights)",
    ),
    # Layers read from the module's settings, tensors from its attributes: the two must fit.
    "a weight replaced by one of another shape": (
        _altered(
            nn.Sequential(
                nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10), nn.Linear(10, 10)
            ),
            _pruned_to_five,
        ),
        "module: 3.weight has shape (5, 32), where Linear(in_features=32, out_features=10",
    ),
    "a weight as a buffer": (
        _altered(nn.Sequential(nn.Conv2d(1, 4, 3), head()), _frozen_as_buffer),
        "module: 0.weight: not a parameter (a buffer, or a plain tensor), which the module",
    ),
    "no running statistics": (  # evaluation then normalises by the batch
        _altered(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), head(2)),
            lambda m: setattr(m[1], "running_mean", None) or setattr(m[1], "running_var", None),
        ),
        "module: 1.running_mean: a NoneType, not a tensor",
    ),
    # What torch.fx does not record shows in the outputs.
    "a replaced __call__": (
        _Inverted(lambda m, x: m.fc(torch.flatten(x, 1)), fc=nn.Linear(784, 10)),
        "module: its outputs differ from those of the layers read from it",
    ),
    "autocast": (
        Chain(_autocast, conv=nn.Conv2d(1, 4, 3), fc=nn.Linear(4 * 26 * 26, 10)),
        "module: its outputs differ from those of the layers read from it",
    ),
    "a size read from the batch": (  # a flatten for a batch as large as its channels only
        Chain(
            lambda m, x: m.fc((y := m.conv(x)).view(y.size(1), -1)),
            conv=nn.Conv2d(1, 2, 3),
            fc=nn.Linear(2 * 26 * 26, 10),
        ),
        "its forward or backward fails on a batch of 3 images in evaluation mode (RuntimeError",
    ),
}


DROPPED = {  # F.dropout(x, 0.9, training) by its `training`
    "self.training": lambda m, x: m.fc(F.dropout(torch.flatten(x, 1), 0.9, m.training)),
    "False": lambda m, x: m.fc(F.dropout(torch.flatten(x, 1), 0.9, False)),
    "True": lambda m, x: m.fc(F.dropout(torch.flatten(x, 1), 0.9, True)),
    "default": lambda m, x: m.fc(F.dropout(torch.flatten(x, 1), 0.9)),  # True
}


@pytest.mark.parametrize(
    ("training", "read"),
    [
        ("self.training", "flatten-dropout0.9-fc10"),
        ("False", "flatten-fc10"),  # never drops: it once became a dropout layer
        ("True", r"\(training=True in evaluation mode\): it would drop in evaluation too"),
        ("default", r"\(training=True in evaluation mode\)"),
    ],
)
def test_a_functional_dropout_is_read_as_it_drops_in_each_mode(training, read):
    module = Chain(DROPPED[training], fc=nn.Linear(784, 10))
    if "evaluation" not in read:
        assert threefold.from_torch(module).spec == read
        return
    with pytest.raises(UsageError, match=read):
        threefold.from_torch(module)


def reads_as(module: nn.Module, spec: str) -> None:
    """The module imports as `spec`, and the module exported from it computes what it does."""
    network = threefold.from_torch(module)
    assert network.spec == spec
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(
            threefold.to_torch(network)(x).numpy(), module(x).numpy(), rtol=1e-6, atol=1e-6
        )


def _by_unpacked_shape(x):
    b, c, h, w = x.shape
    return x.reshape(b, c * h * w)


@pytest.mark.parametrize(
    "flat",
    [
        lambda x: x.view(x.size(0), -1),
        lambda x: x.view(x.shape[0], -1),  # refused as "getattr_1 does not give a tensor"
        lambda x: x.view(x.size()[0], -1),
        lambda x: x.reshape(-1, 4 * 26 * 26),
        # Products of sizes were "mul takes a tensor other than the one before".
        lambda x: x.view(-1, x.size(1) * x.size(2) * x.size(3)),
        _by_unpacked_shape,
    ],
    ids=["size(0)", "shape[0]", "size()[0]", "constant", "product of sizes", "unpacked shape"],
)
def test_a_view_that_flattens_each_image_is_a_flatten(flat):
    module = Chain(
        lambda m, x: m.fc(flat(torch.relu(m.conv(x)))),
        conv=nn.Conv2d(1, 4, 3),
        fc=nn.Linear(4 * 26 * 26, 10),
    )
    reads_as(module, "conv4k3s1p0b1-relu-flatten-fc10")


@pytest.mark.parametrize(
    ("scale", "standardise"),
    [
        (lambda x: (x - 0.1307) / 0.3081, (0.1307, 0.3081)),
        (lambda x: x.sub(0.5).div(0.25), (0.5, 0.25)),
        (lambda x: torch.div(torch.sub(x, 0.5), 2), (0.5, 2.0)),
        (lambda x: x - 1, (1.0, 1.0)),
        (lambda x: x / 255, (0.0, 255.0)),
        (lambda x: (x - np.float64(0.25)) / 2, (0.25, 2.0)),  # np.int64 fx cannot trace
    ],
    ids=["operators", "methods", "functions", "centred", "scaled", "NumPy's numbers"],
)
def test_a_forward_that_standardises_its_input_is_read_as_its_scaling(scale, standardise):
    """It was "sub: not an operation threefold has", where ONNX's Sub and Div were read."""
    module = Chain(
        lambda m, x: m.fc(torch.flatten(torch.relu(m.conv(scale(x))), 1)),
        conv=nn.Conv2d(1, 4, 3),
        fc=nn.Linear(HEAD, 10),
    )
    reads_as(module, "conv4k3s1p0b1-relu-flatten-fc10")  # the scaling exported too
    network = threefold.from_torch(module)
    assert network.standardise == standardise
    mean, std = standardise
    assert network.describe().splitlines()[1].split() == [
        "(input)", "(x", "-", f"{mean:.6g})", "/", f"{std:.6g}", "standardise"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("scale", "refused"),
    [
        (lambda x: (x - 0.5) / -2.0, "sub, truediv: \\(x - 0.5\\) / -2.0: a standardisation"),
        (lambda x: x / 0, "truediv: \\(x - 0.0\\) / 0.0: a standardisation"),
        (lambda x: (x - float("nan")) / 2, "sub, truediv: \\(x - nan\\) / 2.0"),
        # Neither a standardisation nor a layer: refused as before.
        (lambda x: (x - 0.5) * 2, "mul: mul: not an operation threefold has"),
        (lambda x: torch.relu(x) - 0.5, "sub: sub: not an operation threefold has"),
    ],
)
def test_a_scaling_that_is_no_standardisation_is_refused_naming_it(scale, refused):
    module = Chain(lambda m, x: m.fc(torch.flatten(scale(x), 1)), fc=nn.Linear(784, 10))
    with pytest.raises(UsageError, match=f"^module: {refused}"):
        threefold.from_torch(module)


def test_an_elu_of_alpha_past_ten_has_its_token():
    """Its token, elu12.5, was 'malformed' (a float's token had one digit before its point)."""
    reads_as(nn.Sequential(nn.Flatten(), nn.ELU(12.5), nn.Linear(784, 10)), "flatten-elu12.5-fc10")


def test_what_pytorch_computes_the_same_either_way_is_read_not_refused():
    """A padding-free average's count_include_pad, log_softmax's implicit dim (1 on the final
    logits, as old pytorch/examples wrote it) and ceil_mode where the windows fit exactly
    were refused."""
    reads_as(
        nn.Sequential(nn.AvgPool2d(2, count_include_pad=False), nn.Flatten(), nn.Linear(196, 10)),
        "avgpool2s2p0-flatten-fc10",
    )
    # ceil_mode where the windows fit exactly: no window is added (28 / 2, then 14 / 2).
    pools = [nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(2, ceil_mode=True)]
    reads_as(
        nn.Sequential(*pools, nn.Flatten(), nn.Linear(49, 10)),
        "maxpool2s2p0-avgpool2s2p0-flatten-fc10",
    )
    module = Chain(lambda m, x: F.log_softmax(m.fc(torch.flatten(x, 1))), fc=nn.Linear(784, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Implicit dimension choice for log_softmax"
        network = threefold.from_torch(module)
        x = torch.randn(3, 1, 28, 28)
        with torch.no_grad():
            expected = module(x).numpy()
    assert network.spec == "flatten-fc10" and "same loss" in network.mapping[-1].note
    got = torch.log_softmax(threefold.to_torch(network)(x), 1).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


class _ZeroBiasConv(nn.Conv2d):
    """A layer initialised its own way, as people write one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        nn.init.zeros_(self.bias)


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation, through a method Conv2d's forward calls."""

    def _conv_forward(self, x, weight, bias):
        weight = (weight - weight.mean((1, 2, 3), keepdim=True)) / weight.std()
        return super()._conv_forward(x, weight, bias)


def test_a_layer_s_subclass_that_changes_its_init_alone_is_the_layer():
    # Traced into, its weights were "0.weight: a tensor used directly in forward".
    module = nn.Sequential(_ZeroBiasConv(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(HEAD, 10))
    reads_as(module, "conv4k3s1p0b1-relu-flatten-fc10")
    # One whose methods compute otherwise is not.
    module = nn.Sequential(_StandardisedConv(1, 4, 3), nn.Flatten(), nn.Linear(HEAD, 10))
    with pytest.raises(UsageError, match=r"0\.weight: a tensor used directly in forward"):
        threefold.from_torch(module)


def test_an_elu_of_alpha_no_token_can_write_is_refused_naming_it():
    """Past 7 digits before the point it was "token 'elu100000000' is malformed", naming
    neither the module nor the bound."""
    module = nn.Sequential(nn.Flatten(), nn.ELU(1e8), nn.Linear(784, 10))
    with pytest.raises(UsageError) as refused:
        threefold.from_torch(module)
    assert str(refused.value).endswith(
        "1: ELU(alpha=100000000.0): alpha 100000000.0 is not in [0, 1e+07)"
    ), refused.value


def test_a_view_by_the_input_s_size_is_a_flatten():
    """out.view(x.size(0), -1), the images' size on a later value: 'takes several tensors'."""
    module = Chain(
        lambda m, x: m.fc(torch.relu(m.conv(x)).view(x.size(0), -1)),
        conv=nn.Conv2d(1, 4, 3),
        fc=nn.Linear(HEAD, 10),
    )
    reads_as(module, "conv4k3s1p0b1-relu-flatten-fc10")


def test_weights_carved_from_one_buffer_apart_are_not_tied():
    module = _flat_fc()
    flat = torch.randn(784 * 10 + 10)
    module[1].weight = nn.Parameter(flat[: 784 * 10].view(10, 784))
    module[1].bias = nn.Parameter(flat[784 * 10 :])
    network = threefold.from_torch(module)
    np.testing.assert_array_equal(network.tensors["fc.bias"], flat[784 * 10 :].numpy())


def test_global_forward_hooks_are_refused_and_a_compiled_module_is_its_module():
    module = _flat_fc()
    for register, hook in (
        (nn.modules.module.register_module_forward_hook, lambda m, inputs, out: 2 * out),
        (nn.modules.module.register_module_forward_pre_hook, lambda m, inputs: None),
    ):
        handle, made = register(hook), re.escape(f"hooks on every module ({register.__name__})")
        try:
            with pytest.raises(UsageError, match=made):
                threefold.from_torch(module)
        finally:
            handle.remove()
    network = threefold.from_torch(torch.compile(module))  # never run: nothing compiles
    assert network.spec == "flatten-fc10"
    np.testing.assert_array_equal(network.tensors["fc.weight"], module[1].weight.detach().numpy())


def test_a_block_written_as_a_functional_add_is_read_as_one():
    """relu(y) + y: y feeds a ReLU and the add, a block whose body is the ReLU."""
    module = Chain(_relu_plus_input, conv=nn.Conv2d(1, 4, 3), fc=nn.Linear(4 * 26 * 26, 10))
    reads_as(module, "conv4k3s1p0b1-res(relu)-flatten-fc10")


class _WithTargets(nn.Module):
    """A forward that also computes its loss when given targets, as some training code does."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(HEAD, 10)

    def forward(self, x, targets=None, *, smoothing: float = 0.0):
        logits = self.fc(torch.flatten(F.relu(self.conv(x)), 1))
        if targets is None:
            return logits
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)


def test_a_forward_s_arguments_with_defaults_take_them():
    # Read as `module(x)` computes it; refused before, as taking more than one input.
    reads_as(_WithTargets(), "conv4k3s1p0b1-relu-flatten-fc10")


class _GradientsWhileTraining(nn.Module):
    """Gradients on in training alone: every weight trains (it was refused, probed in
    evaluation mode)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(HEAD, 10)

    def forward(self, x):
        with torch.set_grad_enabled(self.training):
            return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class _Counting(nn.Module):
    """A forward with side effects: a count kept, a non-persistent buffer, the seed reset."""

    def __init__(self):
        super().__init__()
        self.fc, self.calls = nn.Linear(784, 10), 0
        self.register_buffer("seen", torch.zeros(1), persistent=False)

    def forward(self, x):
        self.calls = self.calls + 1
        self.seen += 1
        torch.manual_seed(5)
        return self.fc(torch.flatten(x, 1))


def test_importing_runs_the_forward_and_leaves_the_module_and_the_generators_as_they_were():
    # The count was left a torch.fx Proxy, the buffer at 4, the caller's generator reseeded.
    module = _Counting()
    torch.manual_seed(1)
    random.seed(1)
    expected = torch.rand(1), random.random()
    torch.manual_seed(1)
    random.seed(1)
    threefold.from_torch(module)
    assert (torch.rand(1), random.random()) == expected
    assert module.calls == 0 and module.seen.item() == 0
    reads_as(_GradientsWhileTraining(), "conv4k3s1p0b1-relu-flatten-fc10")


class _BlockWithoutNorm(nn.Module):
    """torchvision's BasicBlock with norm_layer=nn.Identity: an in-place ReLU after the
    Identity writes conv1's output, not the block's input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 784, 10)

    def forward(self, x):
        x = self.stem(x)
        out = self.conv2(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(out + x, 1))


class _ScaledWithoutGradients(nn.Module):
    """Standardisation under no_grad: no gradient reaches the images, which training never
    needs; every weight's is the module's."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        with torch.no_grad():
            x = (x - 0.25) / 0.5
        return self.fc(torch.flatten(x, 1))


def test_what_the_outputs_probe_refused_wrongly_is_read():
    # Refused: "in place on a value another path also reads"; the gradients of the images
    # compared; under the caller's inference_mode, the probe's images were inference tensors.
    reads_as(
        _BlockWithoutNorm(), "conv4k3s1p1b1-res(conv4k3s1p1b0-relu-conv4k3s1p1b0)-flatten-fc10"
    )
    assert threefold.from_torch(_ScaledWithoutGradients()).spec == "flatten-fc10"
    with torch.inference_mode():
        assert threefold.from_torch(_flat_fc()).spec == "flatten-fc10"


class _FrozenInForward(nn.Module):
    """BatchNorm frozen by the forward itself, as fine-tuning does: imported as training."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(HEAD, 10)

    def forward(self, x):
        self.bn.eval()
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1))


def test_a_layer_the_forward_freezes_is_refused():
    with pytest.raises(UsageError, match="module: bn: in evaluation mode while the module"):
        threefold.from_torch(_FrozenInForward())


def test_a_forward_that_writes_its_input_in_place_is_read():
    # The outputs probe gave it images that needed a gradient: "a leaf Variable that
    # requires grad is being used in an in-place operation".
    reads_as(
        nn.Sequential(nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(784, 10)), "relu-flatten-fc10"
    )


class _StochasticDepth(nn.Module):
    """A residual block skipped at random in training, by a draw from a global generator."""

    def __init__(self, draw: Callable[[], float]):
        super().__init__()
        self.conv, self.fc, self.draw = nn.Conv2d(1, 1, 3, padding=1), nn.Linear(784, 10), draw

    def forward(self, x):
        if self.training and self.draw() < 0.5:
            return self.fc(torch.flatten(x, 1))
        return self.fc(torch.flatten(x + self.conv(x), 1))


@pytest.mark.parametrize("draw", [random.random, np.random.random_sample])
def test_a_forward_that_draws_from_a_global_generator_is_refused_and_left_as_it_was(draw):
    # Imported as whichever branch the trace's draw took: the block, or at random not.
    random.seed(3)
    np.random.seed(3)
    expected = random.random(), np.random.random_sample()
    random.seed(3)
    np.random.seed(3)
    with pytest.raises(UsageError, match="draws from Python's or NumPy's random numbers"):
        threefold.from_torch(_StochasticDepth(draw))
    assert (random.random(), np.random.random_sample()) == expected


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_module_imports_whatever_grad_mode_the_caller_is_in(mode):
    # Under no_grad a traceback; under inference_mode its weights "got no gradient".
    with getattr(torch, mode)():
        assert threefold.from_torch(_flat_fc()).spec == "flatten-fc10"
        made_here = _flat_fc()  # weights that take no gradient anywhere
    assert threefold.from_torch(made_here).spec == "flatten-fc10"


def _view_path_plus_conv(m, x):
    h = m.stem(x)
    return m.fc(torch.flatten(m.conv(h) + h.view(h.size(0), 4, 28, 28), 1))


def test_a_view_to_its_own_shape_on_the_shortcut_is_the_identity():
    # Read as the identity by the body's choice, then a ValueError in the shortcut's check.
    module = Chain(
        _view_path_plus_conv,
        stem=nn.Conv2d(1, 4, 3, padding=1),
        conv=nn.Conv2d(4, 4, 3, padding=1),
        fc=nn.Linear(4 * 784, 10),
    )
    reads_as(module, "conv4k3s1p1b1-res(conv4k3s1p1b1)-flatten-fc10")


def _identity_path_plus_conv(m, x):
    h = F.relu(m.stem(x))
    return m.fc(torch.flatten(F.relu(m.same(h) + m.conv(h)), 1))


@pytest.mark.parametrize("kernel", [3, 1])
def test_a_shortcut_written_as_an_identity_module_is_the_identity(kernel):
    # nn.Identity() makes the shortcut a path of one step, as long as a one-conv body: the
    # body is the path with layers (the identity was taken as the body, and refused).
    module = Chain(
        _identity_path_plus_conv,
        stem=nn.Conv2d(1, 4, 3, padding=1),
        same=nn.Identity(),
        conv=nn.Conv2d(4, 4, kernel, padding=kernel // 2),
        fc=nn.Linear(4 * 784, 10),
    )
    conv = f"conv4k{kernel}s1p{kernel // 2}b1"
    reads_as(module, f"conv4k3s1p1b1-relu-res({conv})-relu-flatten-fc10")


def test_weights_of_a_layer_the_forward_never_calls_are_passed_over(tmp_path):
    module = Chain(
        lambda m, x: m.fc(torch.flatten(x, 1)), fc=nn.Linear(784, 10), aux=nn.Linear(10, 10)
    )
    network = threefold.from_torch(module)
    assert network.unread == ("aux.weight", "aux.bias")
    torch.save(module.state_dict(), tmp_path / "module.pt")
    args = (tmp_path / "module.pt", network.arch, network.renames, "--weights")
    loaded, _ = load_weights(*args, network.unread)
    assert all(np.array_equal(loaded[k], network.tensors[k]) for k in network.tensors)
    with pytest.raises(UsageError, match=re.escape("aux.weight is not a tensor of the network")):
        load_weights(*args)  # the control: not known to be unused, it is refused
    # An unused layer named as a used one's canonical name: a file of canonical names (the
    # exported module's) still loads, its fc.* not taken for the unused fc's.
    used = nn.Linear(784, 10)
    module = Chain(lambda m, x: m.fc1(torch.flatten(x, 1)), fc=nn.Linear(784, 3), fc1=used)
    network = threefold.from_torch(module)
    exported = threefold.to_torch(network).state_dict()
    for name, state in (("own", module.state_dict()), ("canonical", exported)):
        torch.save(state, tmp_path / f"{name}.pt")
        args = (tmp_path / f"{name}.pt", network.arch, network.renames, "--weights")
        loaded, _ = load_weights(*args, network.unread)
        assert all(np.array_equal(loaded[k], network.tensors[k]) for k in network.tensors)


@pytest.mark.parametrize("construct", REFUSED)
def test_an_unsupported_construct_is_one_line_naming_it(construct):
    module, expected = REFUSED[construct]
    with pytest.raises(UsageError) as refused:
        threefold.from_torch(module)
    message = str(refused.value)
    assert expected in message, message
    assert "\n" not in message


def test_the_command_line_refuses_in_one_line_naming_the_submodule(tmp_path):
    (tmp_path / "model.py").write_text(
        "from torch import nn\n"
        "def Net():\n"
        "    features = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                             nn.MaxPool2d(3, ceil_mode=True))\n"
        "    return nn.Sequential(features, nn.Flatten(), nn.Linear(8 * 5 * 5, 10))\n"
    )
    for script in ("train.py", "crosscheck.py"):
        line = one_line_error(run(f"scripts/{script}", "--arch", f"{tmp_path / 'model.py'}:Net"))
        assert (
            "0.3: MaxPool2d(kernel_size=3, stride=3, padding=0, dilation=1, ceil_mode=True): "
            in line
        )
        assert "adds a window here (13x13 -> 5x5, not 4x4); threefold floors like PyTorch's" in line


def test_the_final_log_softmax_is_dropped_and_said_so():
    network = threefold.from_torch(model("pytorch_examples_net.py:Net"))
    dropped = [m for m in network.mapping if not m.token]
    assert [m.source for m in dropped] == ["log_softmax"]
    assert "same loss" in dropped[0].note
    assert "(dropped: cross-entropy on log-probabilities is the same loss)" in network.describe()


def test_importing_leaves_the_users_module_as_it_was():
    module = model("bn_cnn.py:Net")
    module.train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    threefold.from_torch(module)
    assert module.training and all(m.training for m in module.modules())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_a_tensor_made_in_forward_is_named_and_left_off_the_module():
    """torch.fx kept it on the module as _tensor_constant0, then _tensor_constant1 on the
    second trace, and the two traces' names differing read as "reads self.training"."""
    module = Chain(
        lambda m, x: m.fc(torch.flatten(x / torch.tensor(0.5), 1)), fc=nn.Linear(784, 10)
    )
    attributes = set(vars(module))
    with pytest.raises(UsageError, match="_tensor_constant0: a tensor used directly in forward"):
        threefold.from_torch(module)
    assert set(vars(module)) == attributes


def test_a_float64_module_comes_back_in_float64():
    module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), head(2)).double().eval()
    back = threefold.to_torch(threefold.from_torch(module))
    assert {p.dtype for p in back.parameters()} == {torch.float64}
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(back(x), module(x))


def test_the_api_takes_numpy_integers_as_python_ints():
    assert threefold.network("flatten-fc10", seed=np.int64(3)).arch.name == "flatten-fc10"
    report = threefold.crosscheck(
        "flatten-fc10", dtypes=("float64",), steps=np.int64(1), batch_size=np.int32(4), data=None
    )
    assert report.passed


def test_the_api_s_crosscheck_names_its_pairs_as_usual_in_any_order_of_impls():
    """impls in another order named its pairs torch-numpy, ..., which the report's summary and
    worst_by_layer passed over: every row, a failure too, vanished from them."""
    order = tuple(reversed(IMPLEMENTATIONS))
    report = threefold.crosscheck(
        "flatten-fc10", dtypes=("float64",), steps=1, batch_size=2, data=None, impls=order
    )
    assert set(report.worst_by_layer()) == {"flatten", "fc", "loss"}
    assert {r.pair for r in report.results} >= set(PAIRS)


def test_the_api_s_crosscheck_of_two_implementations_needs_only_their_frameworks(monkeypatch):
    """It ran every shared-code row against PyTorch's and optax's own functions: without
    PyTorch, a check of NumPy and JAX ended in a traceback after all its work."""
    monkeypatch.setitem(sys.modules, "torch", None)  # as if it were not installed
    report = threefold.crosscheck(
        "flatten-fc10", dtypes=("float64",), steps=1, batch_size=2, data=None,
        impls=tuple(impl for impl in IMPLEMENTATIONS if impl != "torch"),
    )  # fmt: skip
    assert report.passed and not any("torch" in r.pair for r in report.results)
    assert any(r.pair == "shared-optax" for r in report.results)


def test_the_api_s_crosscheck_names_data_it_cannot_read_not_random_images(monkeypatch, tmp_path):
    """A $THREEFOLD_DATA naming no folder was taken for Fashion-MNIST not installed."""
    monkeypatch.setenv("THREEFOLD_DATA", str(tmp_path / "typo"))
    with pytest.raises(UsageError, match=r"no fashion-mnist folder found .*typo"):
        threefold.crosscheck("flatten-fc10", dtypes=("float64",), steps=1, batch_size=2)
    with pytest.raises(UsageError, match="data: an object of type ndarray; 'auto', a folder"):
        threefold.crosscheck("flatten-fc10", data=np.zeros(3))  # its repr ran over 50 lines


def test_the_api_s_crosscheck_reads_the_data_from_a_folder(tiny_data_dir):
    # Only a Dataset was taken, which nothing public builds.
    report = threefold.crosscheck(
        "flatten-fc10", dtypes=("float64",), steps=1, batch_size=2, data=str(tiny_data_dir)
    )
    assert report.passed and report.images == f"fashion-mnist images from {tiny_data_dir}"


class _TrainReturnsNothing(nn.Sequential):
    def train(self, mode: bool = True):  # a common override that forgets `return self`
        super().train(mode)


def test_importing_keeps_the_caller_s_threads_and_takes_a_train_that_returns_nothing():
    """The outputs' probe chained module.eval()(x), and made impl_torch's backend, whose import
    set torch's threads for the whole process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        network = threefold.from_torch(_TrainReturnsNothing(nn.Flatten(), nn.Linear(784, 10)))
        assert network.arch.name == "flatten-fc10" and torch.get_num_threads() == 1
        threefold.to_torch(network)
        assert torch.get_num_threads() == 1
        # A torch backend takes every core whatever came first: after a to_torch that had
        # imported impl_torch and kept the caller's one thread, it trained on that one.
        make_backend("torch", network.arch)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(threads)


def test_a_module_whose_large_logits_differ_by_round_off_alone_is_read():
    """Log-probabilities of large, close logits differ by round-off grown with the logits:
    measured against log-probabilities' own size, an honest module was refused."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fc = nn.Linear(64, 10)
        module = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)  # fmt: skip
        with torch.no_grad():
            fc.weight.copy_(torch.ones(10, 64) + 1e-4 * torch.randn(10, 64))
            module[0].weight.mul_(1000)
    assert threefold.from_torch(module).arch.name.endswith("-fc10")
