"""The settings users train with: Adam and AdamW as torch.optim computes them, Xavier
initialisation, a tutorial's run in one flag, raw pixels carried by the exported module,
training on every training image, and finite differences judged against a scale that
cannot vanish."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import threefold
from shared.backend import make_backend
from shared.config import DEEP_RECIPE, IMPLEMENTATIONS, PLAIN_RECIPE, TrainConfig
from shared.data import load_dataset
from shared.proof.passes import finite_difference_grads
from shared.proof.rows import TOLERANCES, judge
from shared.spec import get_arch, init_params, param_shapes
from tests.conftest import make_dataset_dir, to_native

ROOT = Path(__file__).resolve().parents[1]


def torch_optimizer(optimizer: str, params: list, lr: float, **settings) -> torch.optim.Optimizer:
    betas = (settings["beta1"], settings["beta2"])
    kind = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=lr, betas=betas, eps=settings["eps"], weight_decay=settings["wd"])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_steps_as_torch_optim_does(impl, optimizer):
    """Eight steps with changing rates and gradients, against torch.optim.Adam(W) itself, in
    float64: every parameter and both moments."""
    rng = np.random.default_rng(3)
    shapes = {"w": (4, 3), "b": (4,)}
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    settings = {"beta1": 0.8, "beta2": 0.95, "eps": 1e-3, "wd": 0.05}
    reference = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    expected = torch_optimizer(optimizer, list(reference.values()), 0.1, **settings)
    module = importlib.import_module(f"impl_{impl}.optim")
    ours = module.Adam(
        settings["beta1"], settings["beta2"], settings["eps"], settings["wd"], optimizer == "adamw"
    )
    native = {k: to_native(impl, v) for k, v in params.items()}
    state = ours.init(native)
    for step in range(8):
        lr = 0.1 / (step + 1)
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        for group in expected.param_groups:
            group["lr"] = lr
        for k, p in reference.items():
            p.grad = torch.tensor(grads[k])
        expected.step()
        native, state = ours.update(native, {k: to_native(impl, g) for k, g in grads.items()},
                                    state, lr)  # fmt: skip
    tensors = ours.tensors(state)
    for k, p in reference.items():
        torch_state = expected.state[p]
        np.testing.assert_allclose(np.asarray(native[k]), p.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(
            np.asarray(tensors["exp_avg"][k]), torch_state["exp_avg"].numpy(), rtol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(tensors["exp_avg_sq"][k]), torch_state["exp_avg_sq"].numpy(), rtol=1e-12
        )
        assert float(np.asarray(tensors["step"][k])) == float(torch_state["step"]) == 8


@pytest.mark.parametrize("scheme", ["xavier-uniform", "xavier-normal"])
def test_xavier_draws_with_glorots_scale(scheme):
    arch = get_arch("conv64k5p0-relu-flatten-fc128-relu-fc10")
    params = init_params(arch, scheme, seed=0, dtype=np.float64)
    for name, (fan_in, fan_out) in {
        "conv.weight": (25, 64 * 25),
        "fc1.weight": (64 * 24 * 24, 128),
    }.items():
        w = params[name]
        assert w.std() == pytest.approx(np.sqrt(2 / (fan_in + fan_out)), rel=0.03)
        if scheme == "xavier-uniform":
            bound = np.sqrt(6 / (fan_in + fan_out))
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert not params["fc1.bias"].any()
    # torch.nn.init draws from the same distribution: its standard deviation agrees.
    reference = torch.empty(128, 64 * 24 * 24, dtype=torch.float64)
    draw = (
        torch.nn.init.xavier_uniform_
        if scheme == "xavier-uniform"
        else torch.nn.init.xavier_normal_
    )
    assert draw(reference).std().item() == pytest.approx(params["fc1.weight"].std(), rel=0.01)


def run_train(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/train.py", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_recipes_set_their_settings_and_typed_flags_win(tmp_path):
    data = make_dataset_dir(tmp_path / "data")
    base = ["--epochs", "1", "--batch-size", "16", "--data-dir", str(data)]
    result = run_train(*base, "--plain", "--momentum", "0.5", "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "a" / "metrics.json").read_text())["config"]
    assert config == {**config, **PLAIN_RECIPE, "momentum": 0.5, "optimizer": "sgd"}
    assert config["lr"] == TrainConfig().lr
    # Adam without --lr trains at PyTorch's 0.001; a typed --lr is kept.
    result = run_train(*base, "--optimizer", "adamw", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "b" / "metrics.json").read_text())["config"]
    assert (config["optimizer"], config["lr"]) == ("adamw", 0.001)
    result = run_train(*base, "--resume", str(tmp_path / "b"), "--plain")
    assert result.returncode == 2 and "--recipe plain: --resume continues the run" in result.stderr
    # A preset's recipe by name, the flags typed beside it (--epochs, --batch-size) winning.
    result = run_train(*base, "--arch", "pool", "--recipe", "deep", "--out", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "c" / "metrics.json").read_text())["config"]
    assert config == {**config, **DEEP_RECIPE, "epochs": 1, "batch_size": 16}
    assert DEEP_RECIPE["epochs"] != 1 and DEEP_RECIPE["batch_size"] != 16


def test_raw_pixels_are_recorded_and_the_export_takes_raw_images(tmp_path):
    """Trained on raw [0, 1] pixels or standardised ones, the exported module predicts from
    raw images as the trained network did from what it was trained on."""
    folder = make_dataset_dir(tmp_path / "data")
    for pixels in ("raw", "standardised"):
        out = tmp_path / pixels
        result = run_train(
            "--epochs", "1", "--batch-size", "16", "--pixels", pixels,
            "--data-dir", str(folder), "--out", str(out),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        network = threefold.load(out / "checkpoint.npz")
        assert (network.standardise is None) == (pixels == "raw")
        trained_on = load_dataset(folder, pixels=pixels)
        raw = load_dataset(folder, pixels="raw")
        backend = make_backend("torch", network.arch)
        expected = backend.predict(backend.init_state(network.tensors), trained_on.test.x)
        with torch.no_grad():
            exported = threefold.to_torch(network)(torch.from_numpy(raw.test.x)).numpy()
        np.testing.assert_allclose(exported, expected, atol=1e-5)
        assert json.loads((out / "metrics.json").read_text())["config"]["pixels"] == pixels


def test_training_on_every_training_image(tmp_path):
    folder = make_dataset_dir(tmp_path / "data", n_train=120)
    out = tmp_path / "run"
    result = run_train(
        "--epochs", "2", "--batch-size", "16", "--no-validation",
        "--data-dir", str(folder), "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "120 train, 0 validation" in result.stdout
    assert "Val" not in result.stdout.split("Test")[0].split("writing to")[1]
    record = json.loads((out / "metrics.json").read_text())
    assert [(h["val_loss"], h["val_acc"]) for h in record["history"]] == [(None, None)] * 2
    assert record["test"]["acc"] is not None and (out / "curves.png").is_file()
    # The run continues as it was: without a validation split (its curves gone, as if stopped
    # while drawing them, so that --resume has work to do).
    (out / "curves.png").unlink()
    resumed = run_train("--resume", str(out))
    assert resumed.returncode == 0 and "120 train, 0 validation" in resumed.stdout
    assert (out / "curves.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["history"] == record["history"]


def test_finite_differences_judge_a_tiny_input_gradient_against_the_loss():
    """A sigmoid LeNet's input gradient is ~1e-5 of its loss: the round-off of a central
    difference (1e-10 of the loss) once failed it. Judged against the loss's scale it
    passes; an input gradient wrong by 10% still fails."""
    arch = get_arch(
        "conv6k5p2-sigmoid-avgpool2-conv16k5p0-sigmoid-avgpool2-flatten-fc120-sigmoid-fc84-sigmoid-fc10"
    )
    backend = make_backend("numpy", arch, np.float64)
    params = init_params(arch, "xavier-uniform", 0, np.float64)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    rows = {r.check: r for r in finite_difference_grads(backend, arch, params, x, y, {}, 6, 0)}
    tol = TOLERANCES[("float64", "finite-diff")]
    judged = {k: judge(r, "float64", arch.name, "-", tol) for k, r in rows.items()}
    assert all(r.passed for r in judged.values()), [r for r in judged.values() if not r.passed]
    assert set(judged) == {f"finite-diff {n}" for n in [*param_shapes(arch), "input"]}
    # Against its own size the input gradient fails: the floor is what judges it.
    own = rows["finite-diff input"]
    assert np.abs(own.a).max() < 1e-2 * own.scale
    unfloored = type(own)(own.check, own.pair, own.a, own.b, 0.0)
    assert not judge(unfloored, "float64", arch.name, "-", tol).passed

    wrong = rows["finite-diff input"]
    planted = type(wrong)(wrong.check, wrong.pair, wrong.a * 1.1, wrong.b, wrong.scale)
    assert not judge(planted, "float64", arch.name, "-", tol).passed
