"""A checkpoint of any implementation is an ordinary PyTorch state_dict: it loads strictly
into `impl_torch.model.as_module(arch)`, a plain nn.Sequential, whose predictions in
evaluation mode are every implementation's."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import shared.export
from impl_torch.model import as_module
from shared.backend import IMPLEMENTATIONS, batched_logits, make_backend
from shared.checkpoint import load_checkpoint
from shared.config import TrainConfig
from shared.data import DATA_DIR_ENV, load_dataset
from shared.errors import DataError, UsageError
from shared.export import raw_test_images
from shared.layers import BatchNorm
from shared.loop import train
from shared.proof.rows import TOLERANCES, compare
from shared.spec import get_arch, init_params, state_shapes
from tests.conftest import make_dataset_dir

# BatchNorm 2d and 1d (running statistics to carry over), dropout (off in evaluation), a
# strided conv, max- and average-pooling.
SPEC = "conv4-bn-relu-maxpool2-conv6s2-bn-tanh-avgpool2s1-flatten-fc16-bn-relu-dropout0.3-fc10"
BATCH_SIZE = 16
FLOAT32_TOL = TOLERANCES[("float32", "pass")]


def module_logits(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_trained_checkpoint_predicts_the_same_in_plain_pytorch(impl, tiny_data_dir, tmp_path):
    data = load_dataset(tiny_data_dir)
    config = TrainConfig(impl=impl, arch=SPEC, epochs=1, batch_size=BATCH_SIZE)
    train(config, data, tmp_path, log=lambda _: None)
    ckpt = load_checkpoint(tmp_path / "checkpoint.npz")
    arch = get_arch(ckpt.meta["arch"], files=False)
    assert ckpt.meta["impl"] == impl and arch.spec == get_arch(SPEC).spec

    module = as_module(arch)
    assert list(module.state_dict()) == list(state_shapes(arch))
    module.load_state_dict({k: torch.from_numpy(v) for k, v in ckpt.params.items()}, strict=True)
    module.eval()
    for name, value in module.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), ckpt.params[name], err_msg=name)
    # One epoch of steps moved every BatchNorm's statistics and counted its batches.
    steps = math.ceil(len(data.train) / BATCH_SIZE)
    for layer in arch.layers:
        if isinstance(layer, BatchNorm):
            assert int(ckpt.params[f"{layer.name}.num_batches_tracked"]) == steps
            assert np.abs(ckpt.params[f"{layer.name}.running_mean"]).max() > 0

    x = data.test.x
    ours = module_logits(module, x)
    assert ours.dtype == np.float32 and ours.shape == (len(x), 10)
    for other in IMPLEMENTATIONS:
        backend = make_backend(other, arch)
        logits = batched_logits(backend, backend.init_state(ckpt.params), x)
        np.testing.assert_array_equal(ours.argmax(axis=1), logits.argmax(axis=1), err_msg=other)
        max_abs, max_rel = compare(ours, logits)
        assert max_rel <= FLOAT32_TOL, f"{other}: max abs {max_abs:.3g}, max rel {max_rel:.3g}"

    # The running statistics matter: with PyTorch's fresh ones the predictions move.
    fresh = as_module(arch)
    defaults = fresh.state_dict()
    trained = {k: torch.from_numpy(v) for k, v in ckpt.params.items()}
    fresh.load_state_dict({k: defaults[k] if "running" in k else v for k, v in trained.items()})
    assert compare(module_logits(fresh.eval(), x), ours)[1] > 100 * FLOAT32_TOL


def tensors(arch) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in init_params(arch, seed=1).items()}


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        ("missing", "Missing key.*bn2.running_var"),
        ("extra", "Unexpected key.*bn4.weight"),
        ("renamed", "Missing key.*fc1.weight.*\n.*Unexpected key.*fc1.kernel"),
        ("reshaped", "size mismatch for conv2.weight"),
    ],
)
def test_strict_loading_refuses_a_tensor_missing_extra_or_misshapen(damage, error):
    arch = get_arch(SPEC)
    state = tensors(arch)
    as_module(arch).load_state_dict(state, strict=True)  # intact, it loads
    if damage == "missing":
        del state["bn2.running_var"]
    elif damage == "extra":
        state["bn4.weight"] = torch.ones(16)
    elif damage == "renamed":
        state["fc1.kernel"] = state.pop("fc1.weight")
    else:
        state["conv2.weight"] = state["conv2.weight"].transpose(2, 3)[:, :, :, :2]
    with pytest.raises(RuntimeError, match=error):
        as_module(arch).load_state_dict(state, strict=True)


def test_pytorch_fills_a_missing_batch_counter_even_when_strict():
    """PyTorch reads a plain dict as a legacy state_dict and sets a missing
    num_batches_tracked to 0 instead of refusing it: strict loading cannot vouch for the
    counter, so the test above checks its value."""
    arch = get_arch(SPEC)
    state = tensors(arch)
    del state["bn1.num_batches_tracked"]
    module = as_module(arch)
    module.load_state_dict(state, strict=True)
    assert int(module.state_dict()["bn1.num_batches_tracked"]) == 0


def test_export_checks_on_random_images_only_where_no_test_set_is_installed(tmp_path, monkeypatch):
    # A damaged test set under $THREEFOLD_DATA was passed over for random images, unsaid; a
    # $THREEFOLD_DATA naming no folder is an error, as everywhere; a folder of the test files
    # alone is enough (the training files were asked for).
    with monkeypatch.context() as nowhere:  # as on a machine without the data
        nowhere.setattr(shared.export, "installed_data_dir", lambda: None)
        images, what = raw_test_images(None)
    assert images.shape == (256, 1, 28, 28) and "not installed" in what
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="no fashion-mnist folder found"):
        raw_test_images(None)
    folder = make_dataset_dir(tmp_path / "data")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (folder / name).unlink()
    assert raw_test_images(str(folder))[0].shape == (30, 1, 28, 28)
    test_images = folder / "t10k-images-idx3-ubyte.gz"
    test_images.write_bytes(test_images.read_bytes()[:-40])  # truncated
    monkeypatch.setenv(DATA_DIR_ENV, str(folder))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        raw_test_images(None)
