"""The training loop, checkpoints and the train.py command, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared import metrics
from shared.backend import IMPLEMENTATIONS, batched_logits, make_backend
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.config import (
    SHORT_RUN_STEPS,
    TrainConfig,
    averages_mirrors,
    check_config,
    learning_rate,
    peak_rate,
    warmup_steps,
)
from shared.data import load_dataset
from shared.errors import CheckpointError, UsageError
from shared.loop import train
from shared.spec import get_arch, init_params
from tests.conftest import usage_error

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_short_real_run_lowers_the_loss(real_data):
    # The defaults are made for 15 epochs: 157 steps want a gentler peak and no warm-up.
    config = TrainConfig(impl="numpy", epochs=2, limit=5000, lr=0.01, warmup=0, flip=False, shift=0)
    backend = make_backend(config.impl, get_arch(config.arch), config.dtype, config.hyperparams)
    state = backend.init_state(init_params(get_arch("lab"), "he", config.seed))
    initial = metrics.cross_entropy(
        batched_logits(backend, state, real_data.val.x), real_data.val.y
    )
    record = train(config, real_data, log=lambda _: None)
    history = record["history"]
    assert history[-1]["val_loss"] < 0.6 * initial
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert record["test"]["acc"] > 0.75


def test_cosine_schedule_runs_from_peak_to_zero():
    assert learning_rate(0, 100, 0.1, "cosine") == 0.1
    assert learning_rate(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert learning_rate(100, 100, 0.1, "cosine") == pytest.approx(0.0)
    assert learning_rate(37, 100, 0.1, "constant") == 0.1


def test_warmup_rises_linearly_then_hands_over_to_the_schedule():
    assert learning_rate(0, 110, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.01)
    assert learning_rate(4, 110, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.05)
    assert learning_rate(10, 110, 0.1, "cosine", warmup_steps=10) == 0.1
    assert learning_rate(60, 110, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.05)
    assert learning_rate(110, 110, 0.1, "cosine", warmup_steps=10) == pytest.approx(0.0)
    assert learning_rate(3, 110, 0.1, "constant", warmup_steps=10) == pytest.approx(0.04)
    assert learning_rate(50, 110, 0.1, "constant", warmup_steps=10) == 0.1
    # By default one epoch, or half the run if shorter; else the epochs asked, to the nearest
    # step. Fractions of a step, against the rounding done by hand: 0.3 x 391 = 117.3,
    # 0.25 x 10 = 2.5 (to the even 2), 0.35 x 10 = 3.5 (4), 1.37 x 782 = 1071.34.
    assert warmup_steps(TrainConfig(epochs=15), 782) == 782
    assert warmup_steps(TrainConfig(epochs=1), 782) == 391
    assert warmup_steps(TrainConfig(epochs=1), 79) == 39
    assert warmup_steps(TrainConfig(epochs=1), 8) == 4
    assert warmup_steps(TrainConfig(epochs=15, warmup=2), 782) == 1564
    assert warmup_steps(TrainConfig(epochs=15, warmup=0.5), 782) == 391
    assert warmup_steps(TrainConfig(epochs=3, warmup=0), 10) == 0
    assert warmup_steps(TrainConfig(epochs=8, warmup=0.3), 391) == 117
    assert warmup_steps(TrainConfig(epochs=3, warmup=0.25), 10) == 2
    assert warmup_steps(TrainConfig(epochs=3, warmup=0.35), 10) == 4
    assert warmup_steps(TrainConfig(epochs=15, warmup=1.37), 782) == 1071


def test_a_short_run_under_the_defaults_peaks_lower_and_comes_down():
    """Fewer than SHORT_RUN_STEPS steps: the peak is lr x steps / SHORT_RUN_STEPS; an asked
    warm-up, or a long run, keeps the whole rate."""
    assert peak_rate(TrainConfig(lr=0.03), 79) == pytest.approx(0.03 * 79 / SHORT_RUN_STEPS)
    assert peak_rate(TrainConfig(lr=0.03), SHORT_RUN_STEPS) == 0.03
    assert peak_rate(TrainConfig(lr=0.03, warmup=0), 8) == 0.03
    peak = peak_rate(TrainConfig(), 79)
    rates = [learning_rate(s, 79, peak, "cosine", 39) for s in range(79)]
    assert max(rates) == pytest.approx(peak) and rates[-1] < peak / 100


def test_a_warmup_longer_than_half_the_run_is_refused_naming_both_flags():
    with pytest.raises(UsageError, match=r"--warmup 5 .* --epochs 2"):
        check_config(TrainConfig(epochs=2, warmup=5))
    check_config(TrainConfig(epochs=2, warmup=1))


def test_mirror_images_are_averaged_by_default_only_after_training_on_flips():
    assert averages_mirrors(flip=True, tta=None) and not averages_mirrors(flip=False, tta=None)
    assert averages_mirrors(flip=False, tta=True) and not averages_mirrors(flip=True, tta=False)
    assert averages_mirrors(TrainConfig().flip, TrainConfig().tta)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_tta_averages_each_image_with_its_mirror_image(impl, tiny_data_dir):
    test = load_dataset(tiny_data_dir).test.x
    mirrored = np.ascontiguousarray(test[..., ::-1])
    backend = make_backend(impl, get_arch("lab"), np.float64)
    state = backend.init_state(init_params(get_arch("lab"), "he", 0, np.dtype(np.float64)))
    plain = batched_logits(backend, state, test, batch_size=7)
    tta = batched_logits(backend, state, test, tta=True, batch_size=7)
    np.testing.assert_allclose(
        tta, (plain + batched_logits(backend, state, mirrored)) / 2, rtol=1e-12
    )
    # Averaged over both orientations, an image and its mirror image get the same logits.
    np.testing.assert_allclose(batched_logits(backend, state, mirrored, tta=True), tta, rtol=1e-12)
    assert not np.allclose(tta, plain)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_train_script_writes_all_outputs(tiny_data_dir, tmp_path, impl):
    out = tmp_path / "run"
    result = run_script(
        "train.py",
        "--impl",
        impl,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--data-dir",
        str(tiny_data_dir),
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "| Epoch:" in line]
    assert len(lines) == 2 and lines[0].startswith(f"{impl} | Epoch:  1 | Train Loss:")
    assert "Test Acc:" in result.stdout
    record = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert record["config"]["impl"] == impl
    assert np.array(record["test"]["confusion_matrix"]).sum() == 30
    ckpt = load_checkpoint(out / "checkpoint.npz")
    assert ckpt.meta["epoch"] == 2 and ckpt.meta["impl"] == impl and ckpt.optimizer is not None
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "curves.png", "metrics.json"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--epochs", "0", "--epochs"),
        ("--batch-size", "-3", "--batch-size"),
        ("--lr", "0", "--lr"),
        ("--lr", "abc", "--lr"),
        ("--impl", "tensorflow", "--impl"),
        ("--arch", "resnet", "--arch"),
        ("--init", "xavier", "--init"),
        ("--momentum", "1.5", "--momentum"),
        ("--warmup", "-1", "--warmup"),
    ],
)
def test_bad_flag_value_is_a_usage_error(flag, value, message, tmp_path):
    assert message in usage_error(run_script("train.py", flag, value, cwd=tmp_path))


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["export.py", "run.npz"], "give --onnx FILE.onnx, --safetensors FILE or both"),
        (["train.py", "--warmup", "9", "--epochs", "2"], "--warmup 9"),
        (["crosscheck.py", "--arch", "lab", "--arch", "lab"], "lab"),
    ],
)
def test_a_value_refused_after_parsing_is_one_line_without_the_usage(command, message, tmp_path):
    """Such refusals came below argparse's whole usage (16 lines for a module's ceil_mode)."""
    result = run_script(*command, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"{command[0]}: error: ") and message in result.stderr


def test_missing_data_folder_and_unwritable_out_are_usage_errors(tmp_path, tiny_data_dir):
    result = run_script("train.py", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path))
    assert result.returncode == 2 and "apt-get install dataset-fashion-mnist" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_script("train.py", "--data-dir", str(tiny_data_dir), "--out", str(blocker / "x"))
    assert result.returncode == 2 and f"--out {blocker / 'x'}" in result.stderr
    result = run_script(
        "train.py", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "o"), "--limit", "101"
    )
    assert result.returncode == 2 and "--limit 101 exceeds the 100 training images" in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_data_is_a_one_line_error(tiny_data_dir, tmp_path):
    (tiny_data_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    result = run_script("train.py", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "t10k-labels-idx1-ubyte.gz" in result.stderr


def test_checkpoint_round_trip_and_atomicity(tmp_path):
    params = init_params(get_arch("pool"), "he", 0)
    path = tmp_path / "c.npz"
    save_checkpoint(path, params, {"arch": "pool", "epoch": 3}, {"momentum": params})
    ckpt = load_checkpoint(path)
    assert ckpt.meta == {"arch": "pool", "epoch": 3}
    for name in params:
        np.testing.assert_array_equal(ckpt.params[name], params[name])
        np.testing.assert_array_equal(ckpt.optimizer["momentum"][name], params[name])
    assert np.load(path)["conv.weight"].shape == (8, 1, 3, 3)  # readable without this project
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind


def test_checkpoint_of_another_shape_names_the_tensor(tmp_path):
    params = init_params(get_arch("lab"), "he", 0)
    path = tmp_path / "c.npz"
    expected = r"fc1.weight has shape \(128, 6272\), arch 'pool' expects \(128, 1568\)"
    # Refused by the writer as by the reader: nothing is written that the loader would refuse.
    with pytest.raises(CheckpointError, match="not written: tensor " + expected):
        save_checkpoint(path, params, {"arch": "pool"})
    assert not path.exists()
    np.savez(path, **params, meta=np.array(json.dumps({"arch": "pool"})))
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"not a threefold checkpoint \(\.npz\)"):
        load_checkpoint(path)


def test_outputs_get_the_usual_file_mode(tmp_path):
    from shared.io import write_json

    write_json(tmp_path / "m.json", {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_the_loop_steps_the_schedule_one_step_at_a_time(tiny_data_dir, monkeypatch):
    """The rate each step trains with is the run's schedule at that step's index, counted
    across epochs: against optax's schedule of the whole run, not the shared formula."""
    from impl_numpy.backend import Backend
    from shared.batches import num_batches
    from shared.config import warmup_steps
    from shared.proof.references import schedule_optax

    config = TrainConfig(impl="numpy", epochs=3, batch_size=16, warmup=1)
    data = load_dataset(tiny_data_dir)
    rates: list[float] = []
    step = Backend.train_step

    def recording(self, state, train_data, batch, lr):
        rates.append(lr)
        return step(self, state, train_data, batch, lr)

    monkeypatch.setattr(Backend, "train_step", recording)
    train(config, data, log=lambda _: None)
    per_epoch = num_batches(len(data.train), config.batch_size)
    total, warm = config.epochs * per_epoch, warmup_steps(config, per_epoch)
    assert len(rates) == total
    np.testing.assert_allclose(rates, schedule_optax(config, total, warm), rtol=1e-12)
